"""Stage 4, gate: lm-evaluation-harness on held-out tasks, candidate against the baseline.

The tasks are the domain tasks of calibration_data/<dataset>/eval.jsonl (each item kind becomes
a local lm-eval task: greedy generation, exact match on the answer) and, optionally, standard
lm-eval tasks (mmlu, gsm8k, ...) whose data is in the local datasets cache. By default each
build is evaluated through the engine that serves it: a vLLM server started for the build, and
lm-eval's `local-completions` client; the `hf` backend is the alternative.

The rule, per task, is vLLM's own CI rule with an absolute slack and an optional floor:

    candidate >= max(baseline * (1 - rtol) - atol, floor)

and in strict mode the candidate's side is the one-sided Wilson lower bound of its score over
the task's n items. A failing gate raises GateFailed: the flow run fails, nothing is published,
and the event `llmship.gate.failed` is what the alert automation listens for.

    python -m tasks.gate --request R.json --result S.json   # in the quantize environment
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from statistics import NormalDist

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from llmship import events
from prefect.transactions import CommitMode, transaction
from pydantic import BaseModel

from llmship.domain_data import check_disjoint, dataset_dir, file_digest, load_eval_items
from llmship.errors import GateConfigError, GateFailed, ServerExited, VersionConflict
from llmship.manifest import Manifest, digest_of
from llmship.settings import EvalBackend, GateConfig, ServingConfig, Target, TaskPolicy, get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, stage_main, tool_versions
from serving.engines import answers_health, python_for, target_of
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, artifact_key, cache_key, fresh_dir, record_markdown,
    retry_unless_permanent, version_id,
)

TOOLS = ("lm-eval", "transformers", "compressed-tensors", "torch")
# What an evaluation through a served build depends on, per engine.
SERVE_TOOLS = {Target.VLLM: ("vllm", "torch"), Target.TRTLLM: ("tensorrt-llm", "torch")}
DOMAIN_METRIC = "exact_match,strip"
# The metric a standard task is judged on when its policy names none: the first one it reports.
STANDARD_METRICS = ("acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
                    "exact_match,none", "acc_norm,none")
RULE = "candidate >= max(baseline * (1 - rtol) - atol, floor)"
STRICT_RULE = ("wilson_lower(candidate, n, {confidence:.0%}) "
               ">= max(baseline * (1 - rtol) - atol, floor)")


class TaskSet(BaseModel):
    """What the gate evaluates: lm-eval task names, domain ones built from eval.jsonl."""

    dataset: str
    eval_file: str
    eval_data_sha256: str
    domain: list[str]  # item kinds of eval.jsonl
    standard: list[str]  # lm-eval task names

    def domain_task(self, kind: str) -> str:
        return f"llmship_{self.dataset}_{kind}"

    @property
    def names(self) -> list[str]:
        return [self.domain_task(k) for k in self.domain] + self.standard

    def kind_of(self, name: str) -> str:
        prefix = f"llmship_{self.dataset}_"
        return name.removeprefix(prefix) if name.startswith(prefix) else name


class EvaluateRequest(BaseModel):
    model_dir: str
    tasks: TaskSet
    backend: EvalBackend
    served_name: str  # the model name the evaluation server answers to
    # backend served: the engine of the build's evaluation server (the fleet's), as it will
    # serve; evaluate_task asks the fleet for it.
    base_url: str | None = None
    limit: int | None = None
    device: str = "cpu"


class TaskScore(BaseModel):
    metrics: dict[str, float]  # every numeric metric lm-eval reported, e.g. "exact_match,strip"
    n: int


class Evaluation(BaseModel):
    backend: EvalBackend
    scores: dict[str, TaskScore]
    seconds: float
    kept_server: str | None = None  # the fleet's application left running for the rollout


class TaskVerdict(BaseModel):
    task: str
    metric: str
    n: int
    baseline: float
    candidate: float
    delta: float
    rtol: float
    atol: float
    floor: float | None
    threshold: float
    # What the threshold is compared with: the candidate's score, or in strict mode the
    # Wilson lower bound of it.
    measured: float
    passed: bool


class GateReport(BaseModel):
    passed: bool
    rule: str
    strict: bool = False
    confidence: float | None = None
    backend: EvalBackend = EvalBackend.HF
    rtol: float
    atol: float = 0.0
    dataset: str
    eval_data_sha256: str
    candidate: str  # build prefix
    candidate_version: str = ""
    baseline: str
    tasks: list[TaskVerdict]
    harness: dict[str, str]
    seconds: dict[str, float]

    @property
    def failing(self) -> list[TaskVerdict]:
        return [t for t in self.tasks if not t.passed]


# ------------------------------------------------------------------ policy (orchestrator side)


def resolve_tasks(config: GateConfig) -> TaskSet:
    """The gate's task set, with every name in the policy checked against it."""
    eval_file = dataset_dir(config.dataset) / "eval.jsonl"
    kinds = sorted({item.task for item in load_eval_items(eval_file)})
    domain = kinds if config.domain_tasks is None else config.domain_tasks
    unknown = sorted(set(domain) - set(kinds))
    if unknown:
        raise GateConfigError(f"gate.domain_tasks names {unknown}, which {eval_file} does not "
                              f"have: its task kinds are {kinds}")
    if not domain and not config.standard_tasks:
        raise GateConfigError("the gate has no tasks: set gate.domain_tasks to some of "
                              f"{kinds}, or gate.standard_tasks")
    tasks = TaskSet(dataset=config.dataset, eval_file=str(eval_file),
                    eval_data_sha256=file_digest(eval_file), domain=list(domain),
                    standard=list(config.standard_tasks))
    known = set(tasks.names) | set(tasks.domain)
    stray = sorted(set(config.per_task) - known)
    if stray:
        raise GateConfigError(f"gate.per_task names {stray}, which the gate does not run: "
                              f"use one of {sorted(known)}")
    return tasks


def policy_for(config: GateConfig, tasks: TaskSet, name: str) -> TaskPolicy:
    own = config.per_task.get(name) or config.per_task.get(tasks.kind_of(name)) or TaskPolicy()
    return TaskPolicy(rtol=config.rtol if own.rtol is None else own.rtol,
                      atol=config.atol if own.atol is None else own.atol,
                      floor=own.floor, metric=own.metric)


def wilson_lower(p: float, n: int, confidence: float) -> float:
    """One-sided Wilson score lower bound of a proportion p observed over n items."""
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def pick_metric(score: TaskScore, wanted: str | None, task_name: str) -> str:
    if wanted:
        if wanted not in score.metrics:
            raise GateConfigError(f"task {task_name} reports no metric {wanted!r}: it reports "
                                  f"{sorted(score.metrics)}")
        return wanted
    for name in (DOMAIN_METRIC, *STANDARD_METRICS):
        if name in score.metrics:
            return name
    if not score.metrics:
        raise GateConfigError(f"task {task_name} reported no metric to judge")
    return sorted(score.metrics)[0]


def judge(baseline: Evaluation, candidate: Evaluation, config: GateConfig,
          tasks: TaskSet) -> list[TaskVerdict]:
    """Apply the rule to every task; the verdicts carry every number the rule used."""
    verdicts = []
    for name in tasks.names:
        policy = policy_for(config, tasks, name)
        base, cand = baseline.scores[name], candidate.scores[name]
        metric = pick_metric(base, policy.metric, name)
        b, c = base.metrics[metric], cand.metrics[metric]
        threshold = max(0.0, b * (1 - policy.rtol) - policy.atol, policy.floor or 0.0)
        measured = wilson_lower(c, cand.n, config.confidence) if config.strict else c
        verdicts.append(TaskVerdict(
            task=name, metric=metric, n=cand.n, baseline=b, candidate=c, delta=c - b,
            rtol=policy.rtol, atol=policy.atol, floor=policy.floor, threshold=threshold,
            measured=measured, passed=measured >= threshold - 1e-12,
        ))
    return verdicts


def rule_of(config: GateConfig) -> str:
    return STRICT_RULE.format(confidence=config.confidence) if config.strict else RULE


# ------------------------------------------------------------------ evaluation (stage side)


def write_domain_tasks(tasks: TaskSet, out: Path) -> None:
    """One lm-eval task YAML per item kind, reading its own JSONL split of the items."""
    by_kind: dict[str, list[dict]] = {}
    for item in load_eval_items(Path(tasks.eval_file)):
        by_kind.setdefault(item.task, []).append(item.model_dump())
    for kind in tasks.domain:
        name = tasks.domain_task(kind)
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in by_kind[kind]))
        # JSON is valid YAML: no template engine between us and the harness' config parser.
        (out / f"{name}.yaml").write_text(json.dumps({
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "generate_until",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 24},
            "filter_list": [{"name": "strip", "filter": [
                {"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean",
                             "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }, indent=2))


def load_task_manager(tasks: TaskSet, include_path: Path):
    """lm-eval's task index, with each standard task's data checked to be here, offline."""
    from lm_eval.tasks import TaskManager

    # Indexing the harness' own ~15k task configs takes ~15 s: only when they are asked for.
    manager = TaskManager(include_path=str(include_path), include_defaults=bool(tasks.standard))
    for name in tasks.standard:
        if name not in manager.all_tasks:
            raise GateConfigError(f"lm-eval {_harness_version()} has no task {name!r} "
                                  "(gate.standard_tasks): see `lm_eval --tasks list`")
        try:
            manager.load_task_or_group([name])
        except (ConnectionError, OSError, FileNotFoundError) as exc:
            from datasets import config as datasets_config

            cache = datasets_config.HF_DATASETS_CACHE
            raise GateConfigError(
                f"the data of lm-eval task {name!r} is not in the local datasets cache "
                f"({cache}) and this machine is offline: {exc}. Load it once where the hub is "
                f"reachable (README, 'Standard tasks'), or drop {name!r} from "
                "gate.standard_tasks") from None
    return manager


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _model_args(req: EvaluateRequest, base_url: str | None) -> tuple[str, str]:
    if req.backend is EvalBackend.HF:
        # float32 on CPU (its bf16 matmuls are slow here); on GPUs the checkpoint's own dtype,
        # spread over every GPU (parallelize) as a 70B model needs.
        if req.device == "cpu":
            return "hf", f"pretrained={req.model_dir},dtype=float32,device=cpu"
        return "hf", f"pretrained={req.model_dir},dtype=auto,parallelize=True"
    # add_bos_token: without it the completions client sends prompts without BOS and scores
    # collapse (docs/FINDINGS.md, lm-evaluation-harness: 0.96 -> 0.24); vLLM itself adds it when it tokenizes text.
    return "local-completions", (f"base_url={base_url}/v1/completions,model={req.served_name},"
                                 f"tokenizer={req.model_dir},tokenizer_backend=huggingface,"
                                 "add_bos_token=True,num_concurrent=8,max_retries=3")


def evaluate(req: EvaluateRequest) -> Evaluation:
    """Score one build on the gate's tasks, through the backend the request names."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmship-lm-eval-") as tmp:
        write_domain_tasks(req.tasks, Path(tmp))
        import lm_eval

        manager = load_task_manager(req.tasks, Path(tmp))
        model, model_args = _model_args(req, req.base_url)
        print(f"lm-eval ({model}): {', '.join(req.tasks.names)} on {req.model_dir}"
              + (f" through {req.base_url}" if req.base_url else ""), flush=True)
        try:
            results = lm_eval.simple_evaluate(
                model=model, model_args=model_args, tasks=req.tasks.names,
                task_manager=manager, batch_size=32 if model == "hf" else 1,
                limit=req.limit, log_samples=False,
            )
        except Exception:
            if req.base_url and not answers_health(req.base_url):
                # Not a flaky evaluation: this build, as configured, crashes the engine
                # that would serve it. Retrying cannot help; its log says why.
                raise ServerExited(
                    f"the model server for {req.model_dir} at {req.base_url} stopped "
                    "answering during the evaluation: this build cannot be served with these "
                    "engine arguments on this machine (the engine's log is named in "
                    "`llmship status`)") from None
            raise
    scores = {}
    for name in req.tasks.names:
        row = results["results"][name]
        metrics = {k: float(v) for k, v in row.items()
                   if isinstance(v, (int, float)) and "_stderr" not in k and "," in k}
        scores[name] = TaskScore(metrics=metrics, n=_items_of(results, name))
        print(f"  {name}: {metrics} (n={scores[name].n})", flush=True)
    return Evaluation(backend=req.backend, scores=scores,
                      seconds=round(time.monotonic() - started, 3))


def _items_of(results: dict, name: str) -> int:
    """Items a task (or a group, such as mmlu: the sum of its subtasks) was scored on."""
    samples = results.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"])
    subtasks = results.get("group_subtasks", {}).get(name, [])
    return sum(_items_of(results, sub) for sub in subtasks)


# ------------------------------------------------------------------ the Prefect tasks


def evaluation_key(build: StageOutput, tasks: TaskSet, config: GateConfig) -> str:
    """Once per (build, task set, harness and engine versions): the baseline, a BF16 build of
    the pinned snapshot, is evaluated once however many candidates are gated against it."""
    settings = get_settings()
    target = target_of(build.details)
    engine = (tool_versions(python_for(settings, target), SERVE_TOOLS[target])
              if config.backend is EvalBackend.SERVED else {})
    return digest_of({
        "stage": "evaluate", "build": build.digest, "data": tasks.eval_data_sha256,
        "domain": tasks.domain, "standard": tasks.standard, "limit": config.limit,
        "backend": config.backend.value, "device": settings.device,
        "tools": tool_versions(settings.quantize_python, TOOLS), "engine": engine,
    })[:24]


def keeps_for_rollout(build: StageOutput) -> bool:
    """The candidate's server, as it will serve, is the one the rollout would start next: it
    is deployed under the version's serving name and kept (settings.keep_evaluated_server_s),
    so a passing candidate takes traffic without a second load (minutes for 70B on GPUs)."""
    return (build.details.get("role") == "candidate"
            and get_settings().keep_evaluated_server_s > 0)


def server_spec(build: StageOutput, model: str):
    """The fleet's server of a build, for the gates: the engine and its arguments as the build
    will be served."""
    from serving import fleet
    from serving.replica import ReplicaSpec

    version = version_id(build)
    keep = keeps_for_rollout(build)
    return ReplicaSpec(
        app=fleet.app_name(model, version) if keep else fleet.eval_app_name(model, version),
        model=model, version=version, role="serving" if keep else "evaluation",
        prefix=build.prefix, target=target_of(build.details),
        engine_args=build.details.get("engine_args", []),
        serve_subdir=build.details.get("serve_subdir"))


@task(name="evaluate", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: evaluation_key(p["build"], p["tasks"], p["config"])))
def evaluate_task(build: StageOutput, tasks: TaskSet, config: GateConfig,
                  model: str, keep_for_perf: bool = False) -> Evaluation:
    """keep_for_perf: the performance gate follows; the baseline's server stays up for it
    (the candidate's stays anyway, for the rollout)."""
    from serving import fleet

    settings = get_settings()
    log = get_run_logger()
    role = build.details.get("role", "build")
    keep = config.backend is EvalBackend.SERVED and (keeps_for_rollout(build) or (
        keep_for_perf and settings.keep_evaluated_server_s > 0))
    server, started = None, False
    if config.backend is EvalBackend.SERVED:
        spec = server_spec(build, model)
        log.info("asking the fleet for a %s server of %s's %s to evaluate through",
                 spec.target.value, model, role)
        # A running server is taken as it runs: a live version's replicas stay as they are.
        running = fleet.find(settings, spec.model, spec.version, spec.app)
        as_it_runs = running is not None and running.status == "RUNNING"
        server, started = fleet.acquire(settings, spec,
                                        None if as_it_runs else ServingConfig(replicas=1))
    try:
        evaluation = run_stage(settings, settings.quantize_python, "tasks.gate", EvaluateRequest(
            model_dir=str(ArtifactStore(settings).materialize(build.prefix)), tasks=tasks,
            backend=config.backend, served_name=model,
            base_url=server.url if server else None, limit=config.limit,
            device=settings.device,
        ), Evaluation, log)
    except BaseException:
        if started:
            fleet.release(settings, server)
        raise
    if server and started and keep:
        fleet.keep_warm(settings, server, settings.keep_evaluated_server_s)
        evaluation.kept_server = server.app
        log.info("kept %s's %s server as %s for the %s (stopped in %.0f s unless traffic or "
                 "the next stage takes it)", model, role, server.app,
                 "rollout" if keeps_for_rollout(build) else "performance gate",
                 settings.keep_evaluated_server_s)
    elif server and started:
        fleet.release(settings, server)
    return evaluation


def calibration_file_of(candidate: StageOutput) -> Path | None:
    """The calibration data a candidate was made with: build -> calibrated checkpoint. None
    for an UNQUANTIZED candidate, which saw no calibration data."""
    store = ArtifactStore(get_settings())
    build = store.read_manifest(candidate.prefix)
    calibrated = store.read_manifest(build.inputs["checkpoint"])
    if "calibration_data" not in calibrated.inputs:
        return None
    dataset, name = calibrated.inputs["calibration_data"].split("/")
    return dataset_dir(dataset) / name


def gate_key(candidate: StageOutput, baseline: StageOutput, config: GateConfig,
             tasks: TaskSet) -> str:
    return digest_of({"stage": "gate", "candidate": evaluation_key(candidate, tasks, config),
                      "baseline": evaluation_key(baseline, tasks, config),
                      "policy": config.model_dump(mode="json")})[:24]


def render_markdown(model: str, report: GateReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# Accuracy gate {verdict}: {model}", "",
        f"Rule, per task: `{report.rule}`; defaults rtol = {report.rtol}, atol = {report.atol}"
        f"; evaluated with the `{report.backend.value}` backend on `{report.dataset}` "
        f"(eval data sha256 `{report.eval_data_sha256[:16]}`).", "",
        "| task | metric | n | baseline | candidate | delta | rtol | atol | floor | threshold "
        "| measured | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in report.tasks:
        floor = "-" if t.floor is None else f"{t.floor:.3f}"
        lines.append(f"| {t.task} | {t.metric} | {t.n} | {t.baseline:.3f} | {t.candidate:.3f} "
                     f"| {t.delta:+.3f} | {t.rtol} | {t.atol} | {floor} | {t.threshold:.3f} "
                     f"| {t.measured:.3f} | {'pass' if t.passed else '**FAIL**'} |")
    lines += ["", "```", *score_chart(report), "```", "",
              f"Candidate: `{report.candidate}` (version `{report.candidate_version}`)",
              f"Baseline: `{report.baseline}`"]
    return "\n".join(lines)


def score_chart(report: GateReport, width: int = 40) -> list[str]:
    """Bars of baseline and candidate per task, the threshold marked with '|'."""
    label = max(len(t.task) for t in report.tasks)
    rows = []
    for t in report.tasks:
        mark = min(width - 1, round(t.threshold * width))
        for side, value in (("baseline ", t.baseline), ("candidate", t.candidate)):
            bar = list("#" * round(value * width) + " " * (width - round(value * width)))
            bar[mark] = "|"
            name = t.task if side == "baseline " else ""
            rows.append(f"{name:<{label}}  {side} {''.join(bar)} {value:.3f}")
    return rows


def store_report(key: str, model: str, report: GateReport) -> str:
    """Keep every gate report in the store, failing ones too: they are what people read."""
    store = ArtifactStore(get_settings())
    prefix = f"stages/gate/{key}"
    out = fresh_dir(store.local_path(prefix))
    (out / "gate-report.json").write_text(report.model_dump_json(indent=2))
    (out / "gate-report.md").write_text(render_markdown(model, report))
    try:
        store.store_output(out, prefix, Manifest(
            kind="gate", key=key,
            inputs={"candidate": report.candidate, "baseline": report.baseline},
            parameters={"rule": report.rule, "rtol": report.rtol, "atol": report.atol,
                        "dataset": report.dataset, "backend": report.backend.value},
            tool_versions=report.harness,
            timings_s=report.seconds, details={"passed": report.passed, "model": model},
        ))
    except VersionConflict:
        # The same builds under the same policy were gated before (a failed gate run again:
        # its evaluations are reused, the report is made again). The stored report stays;
        # only a different verdict is a problem worth stopping for.
        earlier = GateReport.model_validate(
            store.get_json(f"{prefix}/files/gate-report.json")[0])
        if (earlier.passed, earlier.tasks) != (report.passed, report.tasks):
            raise VersionConflict(
                f"the gate of {model} gave a different verdict on the same builds and policy "
                f"than the one stored at s3://{store.bucket}/{prefix}/: the evaluation is not "
                "deterministic here; compare the two reports before trusting either") from None
    return prefix


def record_report(model: str, report: GateReport, stored: str) -> None:
    verdict = "passed" if report.passed else "FAILED"
    record_markdown(model, "gate", render_markdown(model, report) + f"\n\nStored: `{stored}`",
                    f"gate {verdict}")
    create_table_artifact(
        key=artifact_key(model, "gate-table"), description=f"gate {verdict}: {report.rule}",
        table=[{"task": t.task, "metric": t.metric, "n": t.n, "baseline": round(t.baseline, 4),
                "candidate": round(t.candidate, 4), "delta": round(t.delta, 4),
                "threshold": round(t.threshold, 4), "measured": round(t.measured, 4),
                "verdict": "pass" if t.passed else "FAIL"} for t in report.tasks])


def release_kept(settings, model: str, candidate: StageOutput, baseline: StageOutput) -> None:
    """A failed gate: the servers kept for the next stages stop, unless traffic reaches one."""
    from serving import fleet

    for build in (candidate, baseline):
        spec = server_spec(build, model)
        kept = fleet.find(settings, model, spec.version, spec.app)
        if kept and fleet.serves_traffic(settings, model, kept.version) is False:
            fleet.release(settings, kept)


@task(name="gate", persist_result=True,
      cache_key_fn=cache_key(lambda p: gate_key(p["candidate"], p["baseline"], p["config"],
                                                resolve_tasks(p["config"]))))
def gate_task(candidate: StageOutput, baseline: StageOutput, config: GateConfig,
              model: str, perf_follows: bool = False) -> GateReport:
    """Evaluate both builds (each evaluation cached on its own) and apply the rule.
    perf_follows: keep the baseline's server up for the performance gate."""
    settings = get_settings()
    tasks = resolve_tasks(config)  # a policy naming unknown tasks fails here, before any work
    # A malformed item fails here, naming file and line; so does one that calibration saw.
    calibration_file = calibration_file_of(candidate)
    if calibration_file is not None:
        check_disjoint(calibration_file, Path(tasks.eval_file))
    # Each evaluation's result commits as it ends. Inside the gate's own transaction they
    # would be rolled back with a failing gate, and the rerun after its alert would evaluate
    # both builds again: two model loads, minutes for 70B.
    with transaction(commit_mode=CommitMode.EAGER):
        base_eval = evaluate_task(baseline, tasks, config, model, keep_for_perf=perf_follows)
        cand_eval = evaluate_task(candidate, tasks, config, model)
    verdicts = judge(base_eval, cand_eval, config, tasks)
    report = GateReport(
        passed=all(v.passed for v in verdicts), rule=rule_of(config), strict=config.strict,
        confidence=config.confidence if config.strict else None, backend=config.backend,
        rtol=config.rtol, atol=config.atol, dataset=config.dataset,
        eval_data_sha256=tasks.eval_data_sha256, candidate=candidate.prefix,
        candidate_version=version_id(candidate), baseline=baseline.prefix, tasks=verdicts,
        harness=tool_versions(settings.quantize_python, TOOLS),
        seconds={"baseline": base_eval.seconds, "candidate": cand_eval.seconds},
    )
    stored = store_report(gate_key(candidate, baseline, config, tasks), model, report)
    record_report(model, report, stored)
    if not report.passed:
        release_kept(settings, model, candidate, baseline)  # no rollout will take them
        # The alert automation (llmship/alerts.py) sends this to the team within seconds.
        events.emit(events.GATE_FAILED, model, {"model": model, "candidate": candidate.prefix,
                            "candidate_version": report.candidate_version, "report": stored,
                            "rule": report.rule,
                            "failing": [t.model_dump() for t in report.failing]})
        failing = ", ".join(f"{t.task} {t.measured:.3f} < {t.threshold:.3f} "
                            f"(baseline {t.baseline:.3f})" for t in report.failing)
        raise GateFailed(f"accuracy gate failed for {model} candidate "
                         f"{report.candidate_version}: {failing}; nothing was published "
                         f"(report: s3://{settings.artifacts_bucket}/{stored}/)")
    get_run_logger().info("gate passed (%s): %s", report.rule, ", ".join(
        f"{t.task} {t.candidate:.3f} vs {t.baseline:.3f}" for t in report.tasks))
    return report


if __name__ == "__main__":
    stage_main(evaluate, EvaluateRequest)
