"""Stage 3, build: a servable artifact for the target engine, checked by loading it.

For vLLM the artifact is a Hugging Face directory: a compressed-tensors checkpoint for a
calibrated candidate, the BF16/FP16 snapshot itself for the baseline. The build checks that
the directory loads and generates, and writes llmship-build.json: the engine, the precision and
scheme, and the engine arguments rollout serves it with.

    python -m tasks.build --request R.json --result S.json   # in the quantize environment
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import BaseModel

from llmship.manifest import Manifest, digest_of
from llmship.settings import ServingConfig, Target, get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, stage_main, tool_versions
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, cache_key, fresh_dir, record_stage_artifact,
    retry_unless_permanent,
)

TOOLS = ("transformers", "compressed-tensors", "torch")
BUILD_FILE = "llmship-build.json"
SMOKE_PROMPT = "Hello"


class BuildRequest(BaseModel):
    checkpoint_dir: str
    out_dir: str
    target: Target
    serving: ServingConfig


class BuildResult(BaseModel):
    target: Target
    precision: str  # "bfloat16", or the quantization scheme's weight/activation format
    quantization_format: str | None  # compressed-tensors format, for a calibrated checkpoint
    engine_args: list[str]
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


def build(req: BuildRequest) -> BuildResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    out = Path(req.out_dir)
    shutil.copytree(req.checkpoint_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    precision, fmt = describe_quantization(config)
    # The same load path lm-eval's hf backend uses: if this fails, nothing downstream works.
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(SMOKE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    smoke = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"{precision} checkpoint loads and generates: {SMOKE_PROMPT!r} -> {smoke!r}", flush=True)
    engine_args = ["--dtype", req.serving.dtype, "--max-model-len",
                   str(req.serving.max_model_len), *req.serving.extra_args]
    result = BuildResult(target=req.target, precision=precision, quantization_format=fmt,
                         engine_args=engine_args, smoke_output=smoke,
                         seconds=round(time.monotonic() - started, 3))
    # Timings stay out of the artifact: the same inputs must give the same bytes, and so the
    # same content digest and version id (the manifest records the timings instead).
    (out / BUILD_FILE).write_text(result.model_dump_json(indent=2, exclude={"seconds"}))
    return result


def build_key(checkpoint: StageOutput, target: Target, serving: ServingConfig) -> str:
    return digest_of({
        "stage": "build", "checkpoint": checkpoint.digest, "target": target.value,
        "serving": serving.model_dump(mode="json"),
        "tools": tool_versions(get_settings().quantize_python, TOOLS),
    })[:24]


@task(name="build", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: build_key(p["checkpoint"], p["target"], p["serving"])))
def build_task(checkpoint: StageOutput, target: Target, serving: ServingConfig, model: str,
               role: str) -> StageOutput:
    """role: "candidate" or "baseline": which side of the gate this build is for."""
    settings = get_settings()
    store = ArtifactStore(settings)
    key = build_key(checkpoint, target, serving)
    prefix = f"stages/build/{key}"
    out_dir = fresh_dir(store.local_path(prefix))
    result = run_stage(settings, settings.quantize_python, "tasks.build", BuildRequest(
        checkpoint_dir=str(store.materialize(checkpoint.prefix)), out_dir=str(out_dir),
        target=target, serving=serving,
    ), BuildResult, get_run_logger())
    manifest = store.store_output(out_dir, prefix, Manifest(
        kind="build", key=key,
        inputs={"checkpoint": checkpoint.prefix, "checkpoint_digest": checkpoint.digest},
        parameters={"target": target.value, "serving": serving.model_dump(mode="json")},
        tool_versions=tool_versions(settings.quantize_python, TOOLS),
        timings_s={"build": result.seconds},
        details=result.model_dump(mode="json") | {
            "role": role, "scheme": checkpoint.details.get("scheme", "none")},
    ))
    out = StageOutput.from_manifest(prefix, manifest)
    record_stage_artifact(model, out, {"role": role, "target": target.value,
                                       "precision": result.precision,
                                       "scheme": out.details["scheme"],
                                       "engine args": " ".join(result.engine_args)},
                          f"{role} build for {target.value}: {result.precision}",
                          label=f"build-{role}")
    return out


if __name__ == "__main__":
    stage_main(build, BuildRequest)
