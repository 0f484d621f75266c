"""recalibrate: re-enter build-and-serve at calibrate when the domain data has changed.

Scheduled (cron in prefect.yaml). It compares the digest of calibration_data/<dataset>/ with
the one the live version was calibrated on, and does nothing when they match.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from llmship.domain_data import dataset_dir, file_digest
from llmship.settings import PipelineConfig, get_settings
from llmship.store import ArtifactStore
from tasks.build import build_task
from tasks.calibrate import calibrate_task
from tasks.download import download_task
from tasks.gate import gate_task
from tasks.publish import publish_task, version_prefix
from tasks.rollout import RolloutResult, rollout_task


def live_calibration_digest(model: str) -> str | None:
    """The calibration data digest behind the live version: version -> build -> calibrate."""
    store = ArtifactStore(get_settings())
    live = store.read_alias(model, "live")
    if not live:
        return None
    version = store.read_manifest(version_prefix(model, live))
    build = store.read_manifest(version.inputs["build"]) if version else None
    calibrated = store.read_manifest(build.inputs["checkpoint"]) if build else None
    return calibrated.inputs.get("calibration_data_sha256") if calibrated else None


@flow(name="recalibrate", log_prints=True, persist_result=True)
def recalibrate(config: PipelineConfig) -> RolloutResult | None:
    data = dataset_dir(config.calibration.dataset) / "calibration.jsonl"
    if file_digest(data) == live_calibration_digest(config.name):
        get_run_logger().info("calibration data unchanged since the live version: nothing to do")
        return None
    snapshot = download_task(config.source, config.name)
    calibrated = calibrate_task(snapshot, config.calibration, config.name)
    candidate = build_task(calibrated, config.target, config.serving, config.name, "candidate")
    baseline = build_task(snapshot, config.target, config.serving, config.name, "baseline")
    report = gate_task(candidate, baseline, config.gate, config.name)
    version = publish_task(config.name, candidate, report)
    return rollout_task(version)
