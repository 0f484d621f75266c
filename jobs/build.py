"""The build job: a servable artifact for the target engine, checked before it is served.

    target vllm    a Hugging Face directory: the compressed-tensors checkpoint of a calibrated
                   candidate, the BF16/FP16 snapshot itself for the baseline. Checked by
                   loading it with transformers and generating.
    target trtllm  the ModelOpt unified checkpoint, checked tensor by tensor (FP8 weights with
                   their scales): nothing but TensorRT-LLM loads it. With the engine opt-in,
                   trtllm-build turns ModelOpt's TensorRT-LLM checkpoint into a TensorRT engine
                   in engine/. The baseline is the BF16 snapshot, served by the PyTorch backend.
Each build writes llmship-build.json: the engine, the precision and scheme, and the engine
arguments the gate and the rollout serve it with.

    python -m jobs.build --request R.json --result S.json   # in the quantize environment

tasks/build.py is its orchestration: the content address, the store, the Prefect task.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from pydantic import BaseModel

from llmship.contracts import ServeSpec
from llmship.errors import StageFailed
from llmship.pipeline_config import ServingConfig, Target
from llmship.settings import get_settings
from llmship.subprocess_stage import stage_main
from serving import engines

BUILD_FILE = "llmship-build.json"
SMOKE_PROMPT = "Hello"


class BuildRequest(BaseModel):
    checkpoint_dir: str
    out_dir: str
    target: Target
    serving: ServingConfig
    kv_cache_fp8: bool = False
    device: str = "cpu"


class BuildResult(BaseModel):
    target: Target
    precision: str  # "bfloat16", or the quantization scheme's weight/activation format
    quantization_format: str | None  # compressed-tensors format, or "modelopt"
    serve: ServeSpec  # the engine, its arguments, and what in the artifact it loads
    smoke_output: str
    seconds: float


def describe_quantization(config: dict) -> tuple[str, str | None]:
    """(precision, format) from a checkpoint's config.json."""
    quant = config.get("quantization_config")
    if not quant:
        return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), None
    groups = quant.get("config_groups", {})
    weights = next(iter(groups.values()), {}).get("weights", {}) if groups else {}
    acts = next(iter(groups.values()), {}).get("input_activations") if groups else None
    w = f"{weights.get('type', '?')}{weights.get('num_bits', '?')}"
    a = f"{acts.get('type', '?')}{acts.get('num_bits', '?')}" if acts else "16"
    return f"w:{w} a:{a}", quant.get("format")


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def smoke_generate(model_dir: Path, device: str) -> str:
    """Load with transformers and generate a few tokens: the same load path as lm-eval's hf
    backend. If this fails, nothing downstream works."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", device_map="auto" if device == "cuda" else None
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(SMOKE_PROMPT, return_tensors="pt").to(model.device)
    with torch.no_grad():
        generated = model.generate(
            **ids,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def check_modelopt_checkpoint(model_dir: Path) -> str:
    """A ModelOpt FP8 unified checkpoint, read tensor by tensor from the safetensors headers:
    every quantized weight is FP8 (E4M3) with its weight_scale and input_scale. Returns a
    one-line summary; raises StageFailed naming what is missing."""
    from safetensors import safe_open

    quant = json.loads((model_dir / "hf_quant_config.json").read_text())["quantization"]
    if quant.get("quant_algo") != "FP8":
        raise StageFailed(
            f"{model_dir}/hf_quant_config.json: quant_algo "
            f"{quant.get('quant_algo')!r}, expected 'FP8'"
        )
    dtypes: dict[str, str] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                dtypes[name] = str(f.get_slice(name).get_dtype())
    fp8 = [n for n, d in dtypes.items() if n.endswith(".weight") and d == "F8_E4M3"]
    if not fp8:
        raise StageFailed(f"{model_dir}: no FP8 (E4M3) weights in the checkpoint")
    missing = [
        n
        for n in fp8
        for scale in ("weight_scale", "input_scale")
        if n.removesuffix("weight") + scale not in dtypes
    ]
    if missing:
        raise StageFailed(f"{model_dir}: FP8 weights without their scales: {missing[:5]}")
    kv = quant.get("kv_cache_quant_algo")
    return f"{len(fp8)} FP8 weights with weight and input scales; KV cache {kv or '16-bit'}"


def build_engine(req: BuildRequest, out: Path) -> None:
    """trtllm-build from ModelOpt's TensorRT-LLM checkpoint into out/engine."""
    import subprocess

    # The stage inherits the worker's environment, LLMSHIP_TRTLLM_* included.
    cmd = engines.trtllm_build_command(
        get_settings(),
        out / engines.TRTLLM_CHECKPOINT_SUBDIR,
        out / engines.ENGINE_SUBDIR,
        req.serving,
    )
    print("building the TensorRT engine: " + " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise StageFailed(f"trtllm-build failed ({exc}); its output is above") from exc


def build(req: BuildRequest) -> BuildResult:
    started = time.monotonic()
    out = Path(req.out_dir)
    # Hard links where the filesystem allows: a 70B baseline is 131 GiB that need not be
    # copied. Nothing here writes into a linked file (llmship-build.json is a new one).
    shutil.copytree(req.checkpoint_dir, out, dirs_exist_ok=True, copy_function=link_or_copy)
    config = json.loads((out / "config.json").read_text())
    serving, subdir = req.serving, None
    engine = engines.engine_for(req.target)
    check = engine.build_check({p.name for p in out.iterdir()})
    if check is engines.BuildCheck.MODELOPT:
        precision, fmt = "w:float8 a:float8", check.value
        smoke = check_modelopt_checkpoint(out)
    elif check is engines.BuildCheck.TRTLLM_ENGINE:
        precision, fmt = "w:float8 a:float8", check.value
        build_engine(req, out)
        smoke, subdir = "TensorRT engine built", engines.ENGINE_SUBDIR
    else:
        precision, fmt = describe_quantization(config)
        smoke = smoke_generate(out, req.device)
        # The 16-bit baseline is served as a checkpoint (TensorRT-LLM: by its PyTorch backend,
        # also when the candidate is an engine).
        serving = engine.checkpoint_serving(serving)
    print(f"{precision} build for {req.target.value}: {smoke!r}", flush=True)
    serve = ServeSpec(
        target=req.target,
        serve_subdir=subdir,
        engine_args=engines.engine_args(req.target, serving, req.kv_cache_fp8),
    )
    result = BuildResult(
        target=req.target,
        precision=precision,
        quantization_format=fmt,
        serve=serve,
        smoke_output=smoke,
        seconds=round(time.monotonic() - started, 3),
    )
    # Timings stay out of the artifact: the same inputs must give the same bytes, and so the
    # same content digest and version id (the manifest records the timings instead).
    (out / BUILD_FILE).write_text(result.model_dump_json(indent=2, exclude={"seconds"}))
    return result


if __name__ == "__main__":
    stage_main(build, BuildRequest)
