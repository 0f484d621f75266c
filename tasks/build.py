"""Stage 3, build: a servable artifact for the target engine, checked before it is served.

The work is jobs/build.py, run in the quantize environment (its docstring says what each
target's build is); this is its orchestration: the inputs, the store, the Prefect task.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from jobs.build import BuildRequest, BuildResult
from llmship.contracts import Build, BuildDetails, BuildInputs, Checkpoint, Side
from llmship.pipeline_config import ServingConfig, Target
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, tool_versions
from tasks.common import (
    RETRIES,
    RETRY_DELAYS,
    cache_key,
    produce,
    record_stage_artifact,
    retry_unless_permanent,
)

TOOLS = ("transformers", "compressed-tensors", "torch")


def build_inputs(checkpoint: Checkpoint, target: Target, serving: ServingConfig) -> BuildInputs:
    settings = get_settings()
    return BuildInputs(
        checkpoint=checkpoint.prefix,
        checkpoint_digest=checkpoint.digest,
        target=target,
        serving=serving.build_inputs(),
        device=settings.device,
        tools=tool_versions(settings.stages.quantize_python, TOOLS),
    )


def build(inputs: BuildInputs, checkpoint: Checkpoint, serving: ServingConfig) -> Build:
    """Run the build job in the quantize environment and store the artifact."""
    settings = get_settings()

    def make(out_dir: Path):
        result = run_stage(
            settings,
            settings.stages.quantize_python,
            "jobs.build",
            BuildRequest(
                checkpoint_dir=str(ArtifactStore(settings).materialize(checkpoint.prefix)),
                out_dir=str(out_dir),
                target=inputs.target,
                serving=serving,
                kv_cache_fp8=checkpoint.details.kv_cache_fp8,
                device=inputs.device,
            ),
            BuildResult,
            get_run_logger(),
        )
        return BuildDetails(
            scheme=checkpoint.details.scheme,
            precision=result.precision,
            quantization_format=result.quantization_format,
            serve=result.serve,
            smoke_output=result.smoke_output,
        ), {"build": result.seconds}

    return produce(inputs, Build, make)


@task(
    name="build",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    persist_result=True,
    cache_key_fn=cache_key(lambda p: build_inputs(p["checkpoint"], p["target"], p["serving"]).key),
)
def build_task(
    checkpoint: Checkpoint, target: Target, serving: ServingConfig, model: str, side: Side
) -> Build:
    """side: which side of the gate this build is for; it names the artifact only (the build
    itself, content-addressed, is the same whichever side asks for it)."""
    out = build(build_inputs(checkpoint, target, serving), checkpoint, serving)
    d = out.details
    record_stage_artifact(
        model,
        out,
        {
            "side": side.value,
            "target": target.value,
            "precision": d.precision,
            "scheme": d.scheme.value,
            "engine args": " ".join(d.serve.engine_args),
        },
        f"{side.value} build for {target.value}: {d.precision}",
        label=f"build-{side.value}",
    )
    return out
