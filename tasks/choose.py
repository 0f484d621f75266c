"""Stage 4c, choose: the recipe search's pick among the candidates (README, 'Recipe search').

Each recipe of the deployment (calibration, then search) was built and gated against the one
BF16 baseline, its speed measured only if it passed the accuracy gate (trial). The policy and
the comparison are tasks/choose_rule.py; this module keeps the comparison where people look
(the `<model>-candidates` table and markdown artifacts, stages/candidates/<key>/ in the store,
and, through the publish, beside the version), stops the losers' kept servers, and refuses the
run as a single failing gate does when no candidate passes: each candidate's alert, the first
one's error, nothing published.
"""

from __future__ import annotations

from prefect import get_run_logger, task, unmapped
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from llmship.contracts import Build, Side
from llmship.domain_data import dataset_dir, file_digest
from llmship.manifest import Manifest, digest_of
from llmship.pipeline_config import CalibrationConfig, PerfConfig, PipelineConfig, Scheme
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from tasks.choose_rule import (
    CandidatesReport,
    Trial,
    compare,
    render_markdown,
    svg_chart,
    table_rows,
)
from tasks.common import artifact_key, cache_key, record_markdown, store_report
from tasks.gate import gate_task
from tasks.perf import perf_task
from tasks.plan import ModelShape
from tasks.servers import announce_refusal, release_server


class Choice(BaseModel):
    """The candidate to publish, and the comparison that picked it."""

    winner: Trial
    candidates: CandidatesReport
    stored: str  # stages/candidates/<key>


def trial(
    recipe: CalibrationConfig, candidate: Build, baseline: Build, config: PipelineConfig
) -> Trial:
    """The accuracy gate; the performance gate only for a candidate that passes it."""
    gate = gate_task(
        candidate, baseline, config.gate, config.name, perf_follows=config.perf.enabled
    )
    perf = perf_task(candidate, baseline, config.perf, config.name) if gate.report.passed else None
    return Trial(recipe=recipe, build=candidate, gate=gate, perf=perf)


@task(name="trial")
def trial_task(
    recipe: CalibrationConfig, candidate: Build, baseline: Build, config: PipelineConfig
) -> Trial:
    """Not cached itself: its gates are, each on its own."""
    return trial(recipe, candidate, baseline, config)


def keep_fastest(kept: Trial | None, ended: list[Trial]) -> tuple[Trial | None, list[Trial]]:
    """Of the fastest candidate that passed so far and the trials just ended: the one whose
    server stays up for the rollout (the earlier on a tie), and the rest, whose servers stop."""
    seen = ([kept] if kept else []) + ended
    fastest = max((t for t in seen if t.refusal is None), key=tokens_per_s, default=None)
    return fastest, [t for t in seen if t is not fastest]


def try_recipes(
    recipes: list[CalibrationConfig],
    candidates: list[Build],
    baseline: Build,
    config: PipelineConfig,
    at_once: int = 1,
) -> list[Trial]:
    """Each recipe's trial, at_once at a time (the plan's count: Prefect maps a wave's trials
    onto threads, each candidate's server on GPUs of its own). Of a search's candidates, only
    the fastest that passed so far keeps its server for the rollout: a host holds the plan's
    servers, not one per recipe. The rollout starts the winner's server again where the tie
    rule picked another."""
    settings = get_settings()
    trials: list[Trial] = []
    kept: Trial | None = None
    for start in range(0, len(recipes), at_once):
        wave = slice(start, start + at_once)
        ended = trial_task.map(
            recipes[wave], candidates[wave], unmapped(baseline), unmapped(config)
        ).result()
        trials += ended
        if len(recipes) == 1:
            break
        kept, losers = keep_fastest(kept, ended)
        for loser in losers:
            if kept is None or loser.build.version != kept.build.version:
                release_server(settings, config.name, loser.build, Side.CANDIDATE)
    return trials


def tokens_per_s(t: Trial) -> float:
    """The candidate's output tokens/s at the production load; 0 where not measured."""
    return t.perf.report.figures["candidate"][0].output_tokens_per_s if t.perf else 0.0


def kv_bytes_per_token(store: ArtifactStore, baseline: Build) -> dict[bool, float] | None:
    """The KV cache's bytes per token, 16-bit (False) and FP8 (True), from the model's shape;
    None where the build holds no Llama config.json (an engine build)."""
    found = store.get_json(f"{baseline.prefix}/files/config.json")
    try:
        shape = ModelShape.from_config(found[0]) if found else None
    except Exception:  # noqa: BLE001 - a shape it cannot read: the footprint is the weights
        return None
    return {fp8: shape.kv_gib_per_token(fp8) * 1024**3 for fp8 in (False, True)} if shape else None


def calibration_data(recipes: list[CalibrationConfig]) -> dict[str, str]:
    """The data the calibrated recipes were calibrated on: what recalibrate compares."""
    files = {
        f"{r.dataset}/calibration.jsonl": dataset_dir(r.dataset) / "calibration.jsonl"
        for r in recipes
        if r.scheme is not Scheme.UNQUANTIZED
    }
    return {name: file_digest(path) for name, path in files.items()}


def refuse_all(model: str, trials: list[Trial], baseline: Build) -> None:
    """No candidate passed: every candidate's alert goes out, and the run fails with the first
    one's error (a deployment of one recipe fails exactly as its gate failed)."""
    for t in trials:
        announce_refusal(model, t.build, baseline, t.refusal.event, t.refusal.payload)
    first = trials[0].refusal
    if len(trials) == 1:
        raise first.error(first.message)
    raise first.error(
        f"no candidate of {model} passed both gates; nothing was published: "
        + "; ".join(f"[{t.recipe.describe()}] {t.refusal.message}" for t in trials)
    )


def candidates_key(trials: list[Trial], config: PerfConfig, max_model_len: int) -> str:
    """One comparison per (the candidates' stored verdicts, the policy): the choice's cache
    key, and where its comparison is stored."""
    return digest_of(
        {
            "stage": "candidates",
            "trials": [[t.gate.stored, t.perf.stored if t.perf else None] for t in trials],
            "policy": config.model_dump(mode="json"),
            "max_model_len": max_model_len,
        }
    )[:24]


def choose(
    model: str,
    trials: list[Trial],
    baseline: Build,
    config: PerfConfig,
    max_model_len: int,
) -> Choice:
    """The comparison, kept and shown; the losers' kept servers stopped; the winner, or the
    run refused when there is none."""
    settings = get_settings()
    store = ArtifactStore(settings)
    report = compare(
        model, trials, baseline, config, max_model_len, kv_bytes_per_token(store, baseline)
    )
    report.calibration_data = calibration_data([t.recipe for t in trials])
    key = candidates_key(trials, config, max_model_len)
    markdown = render_markdown(report)
    stored, _ = store_report(
        "candidates",
        key,
        report,
        markdown,
        Manifest(kind="candidates", key=key, details={"model": model, "winner": report.winner}),
        extra={"candidates.svg": svg_chart(report)},
    )
    record_markdown(
        model, "candidates-chart", markdown + f"\n\nStored: `{stored}`", "recipe search"
    )
    create_table_artifact(
        key=artifact_key(model, "candidates"),
        description=f"recipe search: {report.winner_recipe or 'no candidate passed'}",
        table=table_rows(report),
    )
    if report.winner is None:
        refuse_all(model, trials, baseline)
    winner = next(t for t in trials if t.build.version == report.winner)
    losers = [t for t in trials if t.build.version != winner.build.version]
    for t in losers:
        release_server(settings, model, t.build, Side.CANDIDATE)
    if losers:
        release_server(settings, model, baseline, Side.BASELINE)
    return Choice(winner=winner, candidates=report, stored=stored)


@task(
    name="choose",
    persist_result=True,
    cache_key_fn=cache_key(
        lambda p: "choose-" + candidates_key(p["trials"], p["config"], p["max_model_len"])
    ),
)
def choose_task(
    model: str,
    trials: list[Trial],
    baseline: Build,
    config: PerfConfig,
    max_model_len: int,
) -> Choice:
    choice = choose(model, trials, baseline, config, max_model_len)
    get_run_logger().info(
        "of %d recipe(s), %s (%s) is published: %s",
        len(trials),
        choice.candidates.winner_recipe,
        choice.winner.build.version,
        "; ".join(f"{r.recipe}: {r.verdict} ({r.why})" for r in choice.candidates.rows[:-1]),
    )
    return choice
