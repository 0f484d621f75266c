"""The calibrate job: quantize a snapshot on the team's domain data (quantize environment).

The target decides the quantizer:
    vllm    llmcompressor `oneshot` -> a compressed-tensors checkpoint
            (`quantization_config` in config.json), which vLLM loads.
    trtllm  ModelOpt `mtq.quantize` + `export_hf_checkpoint` -> a unified HF checkpoint
            (`hf_quant_config.json`), which trtllm-serve loads; with the engine opt-in
            (serving.trtllm.backend tensorrt), `export_tensorrt_llm_checkpoint` instead, the
            input of trtllm-build.
Schemes:
    FP8              static per-tensor FP8, activation scales observed on the domain data;
                     the GPU format (Ada/Hopper). vLLM's CPU build cannot run it.
    FP8_DYNAMIC      FP8 weights, per-token dynamic activations; serves on vLLM's CPU build.
    FP8_WEIGHT_ONLY  FP8 weights per channel, 16-bit activations: for GPUs without FP8
                     tensor cores (A100), where vLLM runs it with its Marlin kernels.
    W8A8             INT8 weights by SmoothQuant + GPTQ on the domain data: the CPU default.
    W4A16            INT4 weight-only by GPTQ on the domain data.
    UNQUANTIZED      no calibration: the candidate is the snapshot itself (the FP16 build).
calibration.kv_cache_fp8 adds calibrated FP8 scales for the KV cache to either quantizer.

    python -m jobs.calibrate --request R.json --result S.json   # in the quantize environment

tasks/calibrate.py is its orchestration: the content address, the store, the Prefect task.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pydantic import BaseModel

from llmship.domain_data import load_calibration_texts
from llmship.errors import UnsupportedConfiguration
from llmship.pipeline_config import Scheme, Target
from llmship.subprocess_stage import stage_main


class CalibrateRequest(BaseModel):
    model_dir: str
    data_file: str
    out_dir: str
    scheme: Scheme
    num_samples: int
    max_seq_length: int
    smoothing_strength: float = 0.8
    kv_cache_fp8: bool = False
    target: Target = Target.VLLM
    # ModelOpt's TensorRT-LLM checkpoint for trtllm-build (the engine opt-in), not the
    # unified HF checkpoint: its weights are split for this many GPUs.
    export_trtllm_checkpoint: bool = False
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"
    device: str = "cpu"


class CalibrateResult(BaseModel):
    scheme: Scheme
    samples: int
    seconds: float
    quantizer: str
    quantization_config: dict
    peak_gpu_memory_gib: float | None = None


# Static per-tensor FP8 k/v scales, as in compressed-tensors' KV cache scheme that vLLM reads.
KV_CACHE_FP8 = {
    "num_bits": 8,
    "type": "float",
    "strategy": "tensor",
    "dynamic": False,
    "symmetric": True,
}


def recipe_for(scheme: Scheme, smoothing_strength: float = 0.8, kv_cache_fp8: bool = False):
    """llmcompressor modifiers for a scheme. lm_head stays in 16 bits, as in every published
    FP8 Llama checkpoint."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    kv = {"kv_cache_scheme": KV_CACHE_FP8} if kv_cache_fp8 else {}
    if scheme in (Scheme.FP8, Scheme.FP8_DYNAMIC):
        return QuantizationModifier(targets="Linear", scheme=scheme.value, ignore=["lm_head"], **kv)
    if scheme is Scheme.FP8_WEIGHT_ONLY:
        # No preset in compressed-tensors: FP8 weights, one scale per output channel, and
        # no activation quantization (vLLM: CompressedTensorsW8A16Fp8).
        weights = QuantizationArgs(
            num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False
        )
        return QuantizationModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
            ignore=["lm_head"],
            **kv,
        )
    if scheme is Scheme.W8A8:
        gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"], **kv)
        if smoothing_strength == 0:
            return gptq
        return [SmoothQuantModifier(smoothing_strength=smoothing_strength), gptq]
    return GPTQModifier(targets="Linear", scheme=scheme.value, ignore=["lm_head"], **kv)


def _load(req: CalibrateRequest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # On GPUs the model is spread over all of them (a 70B model fits no single one).
    model = AutoModelForCausalLM.from_pretrained(
        req.model_dir, dtype="auto", device_map="auto" if req.device == "cuda" else req.device
    )
    return model, AutoTokenizer.from_pretrained(req.model_dir)


def calibrate_llmcompressor(req: CalibrateRequest, texts: list[str]) -> dict:
    """llmcompressor's oneshot on the domain texts -> a compressed-tensors checkpoint."""
    from datasets import Dataset
    from llmcompressor import oneshot

    model, tokenizer = _load(req)
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=req.max_seq_length),
        remove_columns=["text"],
    )
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe_for(req.scheme, req.smoothing_strength, req.kv_cache_fp8),
        max_seq_length=req.max_seq_length,
        num_calibration_samples=len(texts),
        shuffle_calibration_samples=False,
    )
    model.save_pretrained(req.out_dir, save_compressed=True)
    tokenizer.save_pretrained(req.out_dir)
    return json.loads((Path(req.out_dir) / "config.json").read_text()).get(
        "quantization_config", {}
    )


def calibrate_modelopt(req: CalibrateRequest, texts: list[str]) -> dict:
    """ModelOpt FP8 (ModelOpt's own llm_ptq recipe) on the domain texts, exported as a unified
    HF checkpoint for trtllm-serve, or as a TensorRT-LLM checkpoint for trtllm-build."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from modelopt.torch.quantization.utils import update_quant_cfg_with_kv_cache_quant

    from serving.engines import TRTLLM_CHECKPOINT_SUBDIR

    if req.scheme is not Scheme.FP8:
        raise UnsupportedConfiguration(
            f"ModelOpt calibration (target trtllm) takes scheme "
            f"FP8, not {req.scheme.value}; use target vllm"
        )
    model, tokenizer = _load(req)
    quant_cfg = mtq.FP8_DEFAULT_CFG
    if req.kv_cache_fp8:
        quant_cfg = update_quant_cfg_with_kv_cache_quant(quant_cfg, mtq.FP8_KV_CFG["quant_cfg"])
    device = next(model.parameters()).device

    def forward_loop(m):
        for i, text in enumerate(texts):
            ids = tokenizer(
                text, return_tensors="pt", truncation=True, max_length=req.max_seq_length
            ).input_ids.to(device)
            m(ids)
            if (i + 1) % 64 == 0:
                print(f"  calibration forward passes: {i + 1}/{len(texts)}", flush=True)

    with torch.inference_mode():
        mtq.quantize(model, quant_cfg, forward_loop)
    out = Path(req.out_dir)
    if req.export_trtllm_checkpoint:
        export_tensorrt_llm_checkpoint(
            model,
            "llama",
            dtype=getattr(torch, req.dtype),
            export_dir=out / TRTLLM_CHECKPOINT_SUBDIR,
            inference_tensor_parallel=req.tensor_parallel_size,
        )
        # The gate, the smoke test and trtllm-serve's --tokenizer read these.
        model.config.save_pretrained(out)
    else:
        export_hf_checkpoint(model, export_dir=out)
    tokenizer.save_pretrained(out)
    quant = out / "hf_quant_config.json"
    if quant.exists():
        return json.loads(quant.read_text()).get("quantization", {})
    return json.loads((out / TRTLLM_CHECKPOINT_SUBDIR / "config.json").read_text()).get(
        "quantization", {}
    )


def calibrate(req: CalibrateRequest) -> CalibrateResult:
    """Quantize the snapshot on the domain texts with the target's quantizer."""
    import torch

    texts = load_calibration_texts(Path(req.data_file), limit=req.num_samples)
    quantizer = req.target.quantizer
    print(
        f"calibrating {req.scheme.value} with {quantizer} on {len(texts)} samples from "
        f"{req.data_file} ({req.device})",
        flush=True,
    )
    started = time.monotonic()
    torch.manual_seed(0)
    if req.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calibrate_with = calibrate_modelopt if quantizer == "modelopt" else calibrate_llmcompressor
    quantization_config = calibrate_with(req, texts)
    seconds = time.monotonic() - started
    peak = None
    if req.device == "cuda":
        peak = round(
            sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
            / 2**30,
            2,
        )
    print(
        f"calibrated in {seconds:.1f}s" + (f", peak GPU memory {peak} GiB" if peak else ""),
        flush=True,
    )
    return CalibrateResult(
        scheme=req.scheme,
        samples=len(texts),
        seconds=round(seconds, 3),
        quantizer=quantizer,
        quantization_config=quantization_config,
        peak_gpu_memory_gib=peak,
    )


if __name__ == "__main__":
    stage_main(calibrate, CalibrateRequest)
