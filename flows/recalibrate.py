"""recalibrate: re-enter build-and-serve at calibrate when the domain data has changed.

Scheduled (cron in prefect.yaml). It compares the digest of calibration_data/<dataset>/ with
the one the live version was calibrated on, and does nothing when they match. Otherwise it
runs build-and-serve as a subflow: the download is a cache hit, so the work starts at
calibrate.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.build_and_serve import build_and_serve
from llmship.domain_data import dataset_dir, file_digest
from llmship.pipeline_config import PipelineConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from llmship.versions import calibration_of_version
from tasks.rollout import RolloutResult


def live_calibration_digest(model: str) -> str | None:
    """The calibration data digest behind the live version: version -> build -> calibrate."""
    store = ArtifactStore(get_settings())
    live = store.read_alias(model, "live")
    calibration = calibration_of_version(store, model, live) if live else None
    return calibration.calibration_data_sha256 if calibration else None


@flow(name="recalibrate", log_prints=True, persist_result=True)
def recalibrate(config: PipelineConfig) -> RolloutResult | None:
    data = dataset_dir(config.calibration.dataset) / "calibration.jsonl"
    if file_digest(data) == live_calibration_digest(config.name):
        get_run_logger().info("calibration data unchanged since the live version: nothing to do")
        return None
    return build_and_serve(config)
