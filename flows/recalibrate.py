"""recalibrate: re-enter build-and-serve at calibrate when the domain data has changed.

Scheduled (cron in prefect.yaml). It compares the digests of the calibration data of the
deployment's recipes with those the live version's search calibrated on, and does nothing when
they match. Otherwise it runs build-and-serve as a subflow: the download is a cache hit, so the
work starts at calibrate.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.build_and_serve import build_and_serve
from llmship.pipeline_config import PipelineConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore, version_prefix
from llmship.versions import VersionDetails, VersionInputs, calibration_of_build
from tasks.choose import calibration_data
from tasks.rollout import RolloutResult


def live_calibration_data(model: str) -> dict[str, str]:
    """The calibration data behind the live version, dataset file -> sha256: what its search
    recorded, or (a version published before searches) version -> build -> calibrate."""
    store = ArtifactStore(get_settings())
    live = store.read_alias(model, "live")
    manifest = store.read_manifest(version_prefix(model, live)) if live else None
    if manifest is None:
        return {}
    recorded = VersionDetails.model_validate(manifest.details).calibration_data
    if recorded:
        return recorded
    calibration = calibration_of_build(store, VersionInputs.model_validate(manifest.inputs).build)
    if calibration is None:
        return {}
    return {calibration.calibration_data: calibration.calibration_data_sha256}


@flow(name="recalibrate", log_prints=True, persist_result=True)
def recalibrate(config: PipelineConfig) -> RolloutResult | None:
    if calibration_data(config.recipes) == live_calibration_data(config.name):
        get_run_logger().info("calibration data unchanged since the live version: nothing to do")
        return None
    return build_and_serve(config)
