"""build-and-serve: a model from its source to live traffic, one task per stage
(docs/ARCHITECTURE.md).

    preflight -> download -> calibrate -> build (candidate, and the BF16 baseline) -> gate
              -> perf -> publish -> [approval, when config.rollout asks for it] -> rollout

Every stage's output is content-addressed: a rerun with the same inputs finds each stage's
output in the store (the task runs show as Cached) and only checks that the version is live.
Runs of one model take turns at building (build_slot: the second finds each output made)
and at the gate and the rollout, which start servers of the model (serving_slot): two at
once end as one, the second finding the version live.
"""

from __future__ import annotations

from prefect import flow

from llmship.contracts import Side
from llmship.pipeline_config import PipelineConfig
from tasks.build import build_task
from tasks.calibrate import calibrate_task, unquantized
from tasks.common import build_slot, serving_slot
from tasks.download import download_task
from tasks.gate import gate_task
from tasks.perf import perf_task
from tasks.preflight import preflight_task
from tasks.publish import publish_task
from tasks.rollout import RolloutResult, approve_rollout, rollout_task


@flow(name="build-and-serve", log_prints=True, persist_result=True)
def build_and_serve(config: PipelineConfig) -> RolloutResult | None:
    # Refuses before any download or GPU time is spent. plan.serving is config.serving, with
    # each server's share of a GPU where the servers outnumber the GPUs (tasks/plan.py).
    plan = preflight_task(config)
    with build_slot(config.name):  # one run at a time builds a model
        snapshot = download_task(config.source, config.name)
        calibrated = calibrate_task(
            snapshot, config.calibration, config.target, plan.serving, config.name
        )
        candidate = build_task(calibrated, config.target, plan.serving, config.name, Side.CANDIDATE)
        baseline = build_task(
            unquantized(snapshot), config.target, plan.serving, config.name, Side.BASELINE
        )
    with serving_slot(config.name):  # one run at a time evaluates or serves a model
        report = gate_task(
            candidate, baseline, config.gate, config.name, perf_follows=config.perf.enabled
        )
        perf = perf_task(candidate, baseline, config.perf, config.name)
        version = publish_task(config.name, candidate, report, perf)
    if not approve_rollout(version, config.rollout):
        return None  # declined: published, not served
    with serving_slot(config.name):
        return rollout_task(version, config.rollout, plan.serving)
