"""Stage 4, gate: lm-evaluation-harness on held-out tasks, candidate against the baseline.

Each build is scored by the evaluate job (jobs/evaluate.py, in the quantize environment),
through the server the fleet runs for it; the rule and the report are tasks/gate_rule.py.
Each evaluation is cached on its own: the baseline, a BF16 build of the pinned snapshot, is
evaluated once however many candidates are gated against it. A failing candidate's verdict
carries its refusal: when no candidate of the run passes (tasks/choose.py), GateFailed fails the
flow run, nothing is published, and the event `llmship.gate.failed` is what the alert
automation listens for.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from prefect import get_run_logger, task

from jobs.evaluate import EvaluateRequest, Evaluation, TaskSet
from llmship import events
from llmship.contracts import Build, Side
from llmship.domain_data import check_disjoint, dataset_dir
from llmship.errors import GateFailed, VersionConflict
from llmship.manifest import Manifest, digest_of
from llmship.pipeline_config import EvalBackend, GateConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, tool_versions
from llmship.versions import calibration_of_build
from serving import fleet
from serving.engines import engine_for
from tasks.common import (
    RETRIES,
    RETRY_DELAYS,
    cache_key,
    retry_unless_permanent,
    stage_logger,
)
from tasks.gate_rule import GateReport, judge, render_markdown, resolve_tasks, rule_of
from tasks.gating import Judged, Refusal, Verdict, judge_both, keep_report
from tasks.servers import keeps_for_rollout, server_spec, take_server

TOOLS = ("lm-eval", "transformers", "compressed-tensors", "torch")


def evaluation_key(build: Build, tasks: TaskSet, config: GateConfig) -> str:
    """Once per (build, task set, harness and engine versions): the baseline, a BF16 build of
    the pinned snapshot, is evaluated once however many candidates are gated against it."""
    settings = get_settings()
    engine = engine_for(build.details.serve.target)
    served_by = (
        tool_versions(engine.python(settings), engine.tools)
        if config.backend is EvalBackend.SERVED
        else {}
    )
    return digest_of(
        {
            "stage": "evaluate",
            "build": build.digest,
            "data": tasks.eval_data_sha256,
            "domain": tasks.domain,
            "standard": tasks.standard,
            "limit": config.limit,
            "backend": config.backend.value,
            "device": settings.device,
            "tools": tool_versions(settings.stages.quantize_python, TOOLS),
            "engine": served_by,
        }
    )[:24]


def gate_key(candidate: Build, baseline: Build, config: GateConfig, tasks: TaskSet) -> str:
    return digest_of(
        {
            "stage": "gate",
            "candidate": evaluation_key(candidate, tasks, config),
            "baseline": evaluation_key(baseline, tasks, config),
            "policy": config.model_dump(mode="json"),
        }
    )[:24]


# ------------------------------------------------------------------ one build's evaluation


def evaluate(
    build: Build,
    side: Side,
    tasks: TaskSet,
    config: GateConfig,
    model: str,
    keep_for_perf: bool = False,
) -> Evaluation:
    """The evaluate job on one build, through a server of its own engine (backend served).
    keep_for_perf: the performance gate follows; the baseline's server stays up for it (the
    candidate's stays anyway, for the rollout)."""
    settings = get_settings()
    log = stage_logger()
    served = config.backend is EvalBackend.SERVED
    keep = served and (
        keeps_for_rollout(side) or (keep_for_perf and settings.keep_evaluated_server_s > 0)
    )
    server, started = None, False
    if served:
        spec = server_spec(build, model, side)
        log.info(
            "asking the fleet for a %s server of %s's %s to evaluate through",
            spec.serve.target.value,
            model,
            side.value,
        )
        server, started, _ = take_server(settings, spec)
    try:
        evaluation = run_stage(
            settings,
            settings.stages.quantize_python,
            "jobs.evaluate",
            EvaluateRequest(
                model_dir=str(ArtifactStore(settings).materialize(build.prefix)),
                tasks=tasks,
                backend=config.backend,
                served_name=model,
                base_url=server.url if server else None,
                limit=config.limit,
                device=settings.device,
            ),
            Evaluation,
            log,
        )
    except BaseException:
        if started:
            fleet.release(settings, server)
        raise
    if server and started and keep:
        fleet.keep_warm(settings, server, settings.keep_evaluated_server_s)
        evaluation.kept_server = server.app
        log.info(
            "kept %s's %s server as %s for the %s (stopped in %.0f s unless traffic or "
            "the next stage takes it)",
            model,
            side.value,
            server.app,
            "rollout" if keeps_for_rollout(side) else "performance gate",
            settings.keep_evaluated_server_s,
        )
    elif server and started:
        fleet.release(settings, server)
    return evaluation


# ------------------------------------------------------------------ the verdict (pure)


def gate_report(
    candidate: Build,
    baseline: Build,
    config: GateConfig,
    tasks: TaskSet,
    base_eval: Evaluation,
    cand_eval: Evaluation,
    harness: dict[str, str],
) -> GateReport:
    """The rule (tasks/gate_rule.py) applied to both builds' evaluations."""
    verdicts = judge(base_eval, cand_eval, config, tasks)
    return GateReport(
        passed=all(v.passed for v in verdicts),
        rule=rule_of(config),
        strict=config.strict,
        confidence=config.confidence if config.strict else None,
        backend=config.backend,
        rtol=config.rtol,
        atol=config.atol,
        dataset=config.dataset,
        eval_data_sha256=tasks.eval_data_sha256,
        candidate=candidate.prefix,
        candidate_version=candidate.version,
        baseline=baseline.prefix,
        tasks=verdicts,
        harness=harness,
        seconds={"baseline": base_eval.seconds, "candidate": cand_eval.seconds},
    )


def judged(key: str, model: str, report: GateReport) -> Judged[GateReport]:
    """What is stored and shown of a gate report, and what a failing one announces."""
    verdict = "passed" if report.passed else "FAILED"
    failing = ", ".join(
        f"{t.task} {t.measured:.3f} < {t.threshold:.3f} (baseline {t.baseline:.3f})"
        for t in report.failing
    )
    return Judged(
        stage="gate",
        key=key,
        model=model,
        report=report,
        markdown=render_markdown(model, report),
        manifest=Manifest(
            kind="gate",
            key=key,
            inputs={"candidate": report.candidate, "baseline": report.baseline},
            parameters={
                "rule": report.rule,
                "rtol": report.rtol,
                "atol": report.atol,
                "dataset": report.dataset,
                "backend": report.backend.value,
            },
            tool_versions=report.harness,
            timings_s=report.seconds,
            details={"passed": report.passed, "model": model},
        ),
        title=f"gate {verdict}",
        table_title=f"gate {verdict}: {report.rule}",
        table=[
            {
                "task": t.task,
                "metric": t.metric,
                "n": t.n,
                "baseline": round(t.baseline, 4),
                "candidate": round(t.candidate, 4),
                "delta": round(t.delta, 4),
                "threshold": round(t.threshold, 4),
                "measured": round(t.measured, 4),
                "verdict": "pass" if t.passed else "FAIL",
            }
            for t in report.tasks
        ],
        refusal=None
        if report.passed
        else Refusal(
            event=events.GATE_FAILED,
            payload={"rule": report.rule, "failing": [t.model_dump() for t in report.failing]},
            error=GateFailed,
            message=f"accuracy gate failed for {model} candidate {report.candidate_version}: "
            f"{failing}; nothing was published",
        ),
    )


def same_verdict(model: str, prefix: str, report: GateReport, earlier: GateReport) -> None:
    """The same builds under the same policy gated before (a failed gate run again: its
    evaluations are reused, the report is made again): the stored report stays, and only a
    different verdict is a problem worth stopping for."""
    if (earlier.passed, earlier.tasks) != (report.passed, report.tasks):
        raise VersionConflict(
            f"the gate of {model} gave a different verdict on the same builds and policy than "
            f"the one stored at {prefix}/: the evaluation is not deterministic here; compare "
            "the two reports before trusting either"
        )


def store(key: str, model: str, report: GateReport) -> str:
    """Every gate report stays in the store, failing ones too: they are what people read."""
    return keep_report(judged(key, model, report), partial(same_verdict, model))


def calibration_file_of(candidate: Build) -> Path | None:
    """The calibration data a candidate was made with; None for an UNQUANTIZED candidate."""
    calibration = calibration_of_build(ArtifactStore(get_settings()), candidate.prefix)
    if calibration is None:
        return None
    dataset, name = calibration.calibration_data.split("/")
    return dataset_dir(dataset) / name


def gate(
    candidate: Build,
    baseline: Build,
    config: GateConfig,
    model: str,
    evaluate_one: Callable[[Build, Side, TaskSet], Evaluation],
) -> Verdict[GateReport]:
    """Evaluate both builds (evaluate_one: each cached on its own) and apply the rule; the
    report stored and recorded, with the refusal a failing candidate gets."""
    tasks = resolve_tasks(config)  # a policy naming unknown tasks fails here, before any work
    # A malformed item fails here, naming file and line; so does one that calibration saw.
    calibration_file = calibration_file_of(candidate)
    if calibration_file is not None:
        check_disjoint(calibration_file, Path(tasks.eval_file))
    return judge_both(
        candidate,
        baseline,
        lambda build, side: evaluate_one(build, side, tasks),
        lambda base, cand: judged(
            gate_key(candidate, baseline, config, tasks),
            model,
            gate_report(
                candidate,
                baseline,
                config,
                tasks,
                base,
                cand,
                harness=tool_versions(get_settings().stages.quantize_python, TOOLS),
            ),
        ),
        partial(same_verdict, model),
    )


# ------------------------------------------------------------------ the Prefect tasks


@task(
    name="evaluate",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    persist_result=True,
    cache_key_fn=cache_key(lambda p: evaluation_key(p["build"], p["tasks"], p["config"])),
)
def evaluate_task(
    build: Build,
    side: Side,
    tasks: TaskSet,
    config: GateConfig,
    model: str,
    keep_for_perf: bool = False,
) -> Evaluation:
    return evaluate(build, side, tasks, config, model, keep_for_perf)


@task(
    name="gate",
    persist_result=True,
    cache_key_fn=cache_key(
        lambda p: (
            "verdict-"
            + gate_key(p["candidate"], p["baseline"], p["config"], resolve_tasks(p["config"]))
        )
    ),
)
def gate_task(
    candidate: Build, baseline: Build, config: GateConfig, model: str, perf_follows: bool = False
) -> Verdict[GateReport]:
    """perf_follows: keep the baseline's server up for the performance gate."""
    verdict = gate(
        candidate,
        baseline,
        config,
        model,
        lambda build, side, tasks: evaluate_task(
            build, side, tasks, config, model, keep_for_perf=perf_follows and side is Side.BASELINE
        ),
    )
    report = verdict.report
    get_run_logger().info(
        "gate %s for %s (%s): %s",
        "passed" if report.passed else "FAILED",
        candidate.version,
        report.rule,
        ", ".join(f"{t.task} {t.candidate:.3f} vs {t.baseline:.3f}" for t in report.tasks),
    )
    return verdict
