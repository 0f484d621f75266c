"""build-and-serve: a model from its source to live traffic, one task per stage
(docs/ARCHITECTURE.md).

    preflight -> download -> build the BF16 baseline
              -> calibrate and build each recipe (calibration, then search)
              -> try each candidate: gate, perf if it passed (as many at once as the plan
                 says the GPUs hold) -> choose -> publish
              -> [approval, when config.rollout asks for it] -> rollout

Every stage's output is content-addressed: a rerun with the same inputs finds each stage's
output in the store (the task runs show as Cached) and only checks that the version is live.
Runs of one model take turns at building (build_slot: the second finds each output made)
and at the gates and the rollout, which start servers of the model (serving_slot): two at
once end as one, the second finding the version live.
"""

from __future__ import annotations

from prefect import flow

from llmship.contracts import Side
from llmship.pipeline_config import PipelineConfig
from tasks.build import build_task
from tasks.calibrate import calibrate_task, unquantized
from tasks.choose import choose_task, try_recipes
from tasks.common import build_slot, serving_slot
from tasks.download import download_task
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
        baseline = build_task(
            unquantized(snapshot), config.target, plan.serving, config.name, Side.BASELINE
        )
        # One recipe after another: calibration takes the host's GPUs (or cores) whole.
        candidates = [
            build_task(
                calibrate_task(snapshot, recipe, config.target, plan.serving, config.name),
                config.target,
                plan.serving,
                config.name,
                Side.CANDIDATE,
            )
            for recipe in config.recipes
        ]
    with serving_slot(config.name):  # one run at a time evaluates or serves a model
        # plan.trials_at_once at a time: as many as the GPUs hold, one on CPUs or a shared GPU.
        trials = try_recipes(config.recipes, candidates, baseline, config, plan.trials_at_once)
        choice = choose_task(
            config.name, trials, baseline, config.perf, config.serving.max_model_len
        )
        version = publish_task(config.name, choice)
    if not approve_rollout(version, config.rollout):
        return None  # declined: published, not served
    with serving_slot(config.name):
        return rollout_task(version, config.rollout, plan.serving)
