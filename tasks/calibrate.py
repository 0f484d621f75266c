"""Stage 2, calibrate: quantize the snapshot on the team's domain data.

The work is jobs/calibrate.py, run in the quantize environment (its docstring lists the
quantizers and schemes); this is its orchestration: the inputs, the store, the Prefect task.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from jobs.calibrate import CalibrateRequest, CalibrateResult
from llmship.contracts import CalibrateInputs, Checkpoint, CheckpointDetails, Snapshot
from llmship.domain_data import count_calibration_texts, dataset_dir, file_digest
from llmship.pipeline_config import CalibrationConfig, Scheme, ServingConfig, Target
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

TOOLS = ("llmcompressor", "compressed-tensors", "nvidia-modelopt", "transformers", "torch")


def export_options(target: Target, serving: ServingConfig) -> dict:
    """What of the serving config shapes the calibrated checkpoint itself."""
    from serving.engines import builds_engine

    if not builds_engine(target, serving):
        return {"export_trtllm_checkpoint": False}
    return {
        "export_trtllm_checkpoint": True,
        "tensor_parallel_size": serving.tensor_parallel_size,
        "dtype": serving.dtype,
    }


def calibrate_inputs(
    snapshot: Snapshot, config: CalibrationConfig, target: Target, serving: ServingConfig
) -> CalibrateInputs:
    settings = get_settings()
    data = dataset_dir(config.dataset) / "calibration.jsonl"
    return CalibrateInputs(
        snapshot=snapshot.prefix,
        snapshot_digest=snapshot.digest,
        calibration=config,
        target=target,
        export=export_options(target, serving),
        calibration_data=f"{config.dataset}/{data.name}",
        calibration_data_sha256=file_digest(data),
        device=settings.device,
        tools=tool_versions(settings.stages.quantize_python, TOOLS),
    )


def calibrate(inputs: CalibrateInputs) -> Checkpoint:
    """Run the calibrate job in the quantize environment and store its checkpoint."""
    settings = get_settings()
    config = inputs.calibration
    data = dataset_dir(config.dataset) / "calibration.jsonl"
    # Check the data here first: a bad line fails in a second, before any model is loaded.
    n_texts = count_calibration_texts(data)

    def make(out_dir: Path):
        result = run_stage(
            settings,
            settings.stages.quantize_python,
            "jobs.calibrate",
            CalibrateRequest(
                model_dir=str(ArtifactStore(settings).materialize(inputs.snapshot)),
                data_file=str(data),
                out_dir=str(out_dir),
                scheme=config.scheme,
                num_samples=min(config.num_samples, n_texts),
                max_seq_length=config.max_seq_length,
                smoothing_strength=config.smoothing_strength,
                kv_cache_fp8=config.kv_cache_fp8,
                target=inputs.target,
                device=inputs.device,
                **inputs.export,
            ),
            CalibrateResult,
            get_run_logger(),
        )
        return CheckpointDetails(
            scheme=result.scheme,
            samples=result.samples,
            quantizer=result.quantizer,
            kv_cache_fp8=config.kv_cache_fp8,
            peak_gpu_memory_gib=result.peak_gpu_memory_gib,
            quantization_config=result.quantization_config,
        ), {"calibrate": result.seconds}

    return produce(inputs, Checkpoint, make)


def unquantized(snapshot: Snapshot) -> Checkpoint:
    """The snapshot itself as a checkpoint: the baseline's, and an UNQUANTIZED candidate's."""
    return Checkpoint(
        **snapshot.model_dump(exclude={"details"}),
        details=CheckpointDetails(scheme=Scheme.UNQUANTIZED),
    )


@task(
    name="calibrate",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    persist_result=True,
    cache_key_fn=cache_key(
        lambda p: calibrate_inputs(p["snapshot"], p["config"], p["target"], p["serving"]).key
    ),
)
def calibrate_task(
    snapshot: Snapshot,
    config: CalibrationConfig,
    target: Target,
    serving: ServingConfig,
    model: str,
) -> Checkpoint:
    if config.scheme is Scheme.UNQUANTIZED:
        get_run_logger().info(
            "scheme UNQUANTIZED: no calibration; the candidate is the snapshot's own 16-bit weights"
        )
        return unquantized(snapshot)
    out = calibrate(calibrate_inputs(snapshot, config, target, serving))
    d = out.details
    record_stage_artifact(
        model,
        out,
        {
            "scheme": d.scheme.value,
            "quantizer": d.quantizer,
            "calibration samples": d.samples,
            "calibration data": config.dataset,
        },
        f"{d.scheme.value} checkpoint calibrated with {d.quantizer} on {config.dataset}",
    )
    return out
