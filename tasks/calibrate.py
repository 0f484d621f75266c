"""Stage 2, calibrate: quantize the snapshot with llmcompressor on the team's domain data.

Schemes (llmcompressor presets):
    FP8           static per-tensor FP8 with activation scales observed on the domain data; the
                  GPU format (Ada/Hopper). vLLM's CPU build cannot run it.
    FP8_DYNAMIC   FP8 weights, per-token dynamic activations; serves on vLLM's CPU build.
    W8A8          INT8 weights by SmoothQuant + GPTQ on the domain data: the CPU demo default.
    W4A16         INT4 weight-only by GPTQ on the domain data.
The output is a compressed-tensors checkpoint (`quantization_config` in config.json).

    python -m tasks.calibrate --request R.json --result S.json   # in the quantize environment
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from llmship.domain_data import dataset_dir, file_digest, load_calibration_texts
from llmship.manifest import Manifest, digest_of
from llmship.settings import CalibrationConfig, Scheme, get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, stage_main, tool_versions
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, cache_key, fresh_dir, record_stage_artifact,
    retry_unless_permanent,
)

TOOLS = ("llmcompressor", "compressed-tensors", "transformers", "torch")


class CalibrateRequest(BaseModel):
    model_dir: str
    data_file: str
    out_dir: str
    scheme: Scheme
    num_samples: int
    max_seq_length: int
    smoothing_strength: float = 0.8
    device: str = "cpu"


class CalibrateResult(BaseModel):
    scheme: Scheme
    samples: int
    seconds: float
    quantization_config: dict


def recipe_for(scheme: Scheme, smoothing_strength: float = 0.8):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    # lm_head stays in full precision, as in every published FP8 Llama checkpoint.
    if scheme in (Scheme.FP8, Scheme.FP8_DYNAMIC):
        return QuantizationModifier(targets="Linear", scheme=scheme.value, ignore=["lm_head"])
    if scheme is Scheme.W8A8:
        gptq = GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
        if smoothing_strength == 0:
            return gptq
        return [SmoothQuantModifier(smoothing_strength=smoothing_strength), gptq]
    return GPTQModifier(targets="Linear", scheme=scheme.value, ignore=["lm_head"])


def calibrate(req: CalibrateRequest) -> CalibrateResult:
    """Run llmcompressor's oneshot on the domain texts and save a compressed-tensors checkpoint."""
    import json

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = load_calibration_texts(Path(req.data_file))[: req.num_samples]
    print(f"calibrating {req.scheme.value} on {len(texts)} samples from {req.data_file}",
          flush=True)
    started = time.monotonic()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(req.model_dir, torch_dtype="auto",
                                                 device_map=req.device)
    tokenizer = AutoTokenizer.from_pretrained(req.model_dir)
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda row: tokenizer(row["text"], truncation=True, max_length=req.max_seq_length),
        remove_columns=["text"],
    )
    oneshot(model=model, dataset=dataset, recipe=recipe_for(req.scheme, req.smoothing_strength),
            max_seq_length=req.max_seq_length, num_calibration_samples=len(texts),
            shuffle_calibration_samples=False)
    model.save_pretrained(req.out_dir, save_compressed=True)
    tokenizer.save_pretrained(req.out_dir)
    config = json.loads((Path(req.out_dir) / "config.json").read_text())
    seconds = time.monotonic() - started
    print(f"calibrated in {seconds:.1f}s", flush=True)
    return CalibrateResult(scheme=req.scheme, samples=len(texts), seconds=round(seconds, 3),
                           quantization_config=config.get("quantization_config", {}))


def calibrate_key(snapshot: StageOutput, config: CalibrationConfig) -> str:
    settings = get_settings()
    data = dataset_dir(config.dataset) / "calibration.jsonl"
    return digest_of({
        "stage": "calibrate", "snapshot": snapshot.digest, "config": config.model_dump(mode="json"),
        "data": file_digest(data), "device": settings.device,
        "tools": tool_versions(settings.quantize_python, TOOLS),
    })[:24]


@task(name="calibrate", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: calibrate_key(p["snapshot"], p["config"])))
def calibrate_task(snapshot: StageOutput, config: CalibrationConfig, model: str) -> StageOutput:
    settings = get_settings()
    logger = get_run_logger()
    data = dataset_dir(config.dataset) / "calibration.jsonl"
    # Check the data here first: a bad line fails in a second, before any model is loaded.
    n_texts = len(load_calibration_texts(data))
    key = calibrate_key(snapshot, config)
    prefix = f"stages/calibrate/{key}"
    store = ArtifactStore(settings)
    out_dir = fresh_dir(store.local_path(prefix))
    result = run_stage(settings, settings.quantize_python, "tasks.calibrate", CalibrateRequest(
        model_dir=str(store.materialize(snapshot.prefix)), data_file=str(data),
        out_dir=str(out_dir), scheme=config.scheme,
        num_samples=min(config.num_samples, n_texts), max_seq_length=config.max_seq_length,
        smoothing_strength=config.smoothing_strength, device=settings.device,
    ), CalibrateResult, logger)
    manifest = store.store_output(out_dir, prefix, Manifest(
        kind="calibrate", key=key,
        inputs={"snapshot": snapshot.prefix, "snapshot_digest": snapshot.digest,
                "calibration_data": f"{config.dataset}/{data.name}",
                "calibration_data_sha256": file_digest(data)},
        parameters=config.model_dump(mode="json") | {"device": settings.device},
        tool_versions=tool_versions(settings.quantize_python, TOOLS),
        timings_s={"calibrate": result.seconds},
        details={"scheme": result.scheme.value, "samples": result.samples,
                 "quantization_config": result.quantization_config},
    ))
    out = StageOutput.from_manifest(prefix, manifest)
    record_stage_artifact(model, out, {"scheme": result.scheme.value,
                                       "calibration samples": result.samples,
                                       "calibration data": data.name,
                                       "seconds": result.seconds},
                          f"{result.scheme.value} checkpoint calibrated on {config.dataset}")
    return out


if __name__ == "__main__":
    stage_main(calibrate, CalibrateRequest)
