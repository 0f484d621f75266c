"""Stage 4, gate: lm-evaluation-harness on held-out domain items, candidate against baseline.

Each task in calibration_data/<dataset>/eval.jsonl becomes a local lm-eval task (greedy
generation, exact match on the answer). Both builds are evaluated with lm-eval's `hf` backend;
the rule is vLLM's own CI rule: for every task, candidate >= baseline x (1 - rtol).
A failing gate raises GateFailed: the flow run fails and nothing is published.

    python -m tasks.gate --request R.json --result S.json   # in the quantize environment
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.events import emit_event
from pydantic import BaseModel

from llmship.domain_data import check_disjoint, dataset_dir, file_digest, load_eval_items
from llmship.errors import GateFailed
from llmship.manifest import Manifest, digest_of
from llmship.settings import GateConfig, get_settings
from llmship.store import ArtifactStore
from llmship.subprocess_stage import run_stage, stage_main, tool_versions
from tasks.common import (
    RETRIES, RETRY_DELAYS, StageOutput, artifact_key, cache_key, fresh_dir, record_markdown,
    retry_unless_permanent,
)

TOOLS = ("lm-eval", "transformers", "compressed-tensors", "torch")
METRIC = "exact_match"
RULE = "candidate >= baseline * (1 - rtol) - atol"


class EvaluateRequest(BaseModel):
    model_dir: str
    eval_file: str
    dataset: str
    limit: int | None = None
    device: str = "cpu"


class TaskScore(BaseModel):
    score: float
    stderr: float | None
    n: int


class Evaluation(BaseModel):
    scores: dict[str, TaskScore]
    seconds: float


class TaskVerdict(BaseModel):
    task: str
    metric: str
    n: int
    baseline: float
    candidate: float
    delta: float
    threshold: float
    passed: bool


class GateReport(BaseModel):
    passed: bool
    rule: str
    rtol: float
    atol: float = 0.0
    dataset: str
    eval_data_sha256: str
    candidate: str  # build prefix
    baseline: str
    tasks: list[TaskVerdict]
    harness: dict[str, str]
    seconds: dict[str, float]

    @property
    def failing(self) -> list[TaskVerdict]:
        return [t for t in self.tasks if not t.passed]


def write_lm_eval_tasks(items_file: Path, dataset: str, out: Path) -> list[str]:
    """One lm-eval task YAML per item kind, reading its own JSONL split of the items."""
    by_task: dict[str, list[dict]] = {}
    for item in load_eval_items(items_file):
        by_task.setdefault(item.task, []).append(item.model_dump())
    names = []
    for kind, rows in sorted(by_task.items()):
        name = f"llmship_{dataset}_{kind}"
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
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
            "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }, indent=2))
        names.append(name)
    return names


def evaluate(req: EvaluateRequest) -> Evaluation:
    """Score one model directory on the domain tasks with lm-eval's hf backend."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmship-lm-eval-") as tmp:
        names = write_lm_eval_tasks(Path(req.eval_file), req.dataset, Path(tmp))
        print(f"lm-eval: {', '.join(names)} on {req.model_dir}", flush=True)
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={req.model_dir},dtype=float32,device={req.device}",
            tasks=names, task_manager=TaskManager(include_path=tmp), batch_size=32,
            limit=req.limit, log_samples=False,
        )
    scores = {}
    for name in names:
        row = results["results"][name]
        key = f"{METRIC},strip"
        stderr = row.get(f"{METRIC}_stderr,strip")
        scores[name] = TaskScore(score=float(row[key]),
                                 stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                                 n=int(results["n-samples"][name]["effective"]))
        print(f"  {name}: {scores[name].score:.3f} (n={scores[name].n})", flush=True)
    return Evaluation(scores=scores, seconds=round(time.monotonic() - started, 3))


def judge(baseline: Evaluation, candidate: Evaluation, rtol: float,
          atol: float = 0.0) -> list[TaskVerdict]:
    """vLLM's CI rule per task, with an absolute slack: candidate >= baseline * (1 - rtol) - atol."""
    verdicts = []
    for name, base in sorted(baseline.scores.items()):
        cand = candidate.scores[name]
        threshold = max(0.0, base.score * (1 - rtol) - atol)
        verdicts.append(TaskVerdict(
            task=name, metric=METRIC, n=cand.n, baseline=base.score, candidate=cand.score,
            delta=cand.score - base.score, threshold=threshold,
            passed=cand.score >= threshold - 1e-12,
        ))
    return verdicts


def render_markdown(model: str, report: GateReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# Accuracy gate {verdict}: {model}", "",
        f"Rule: `{report.rule}` with rtol = {report.rtol}, atol = {report.atol}, on "
        f"`{report.dataset}` "
        f"(eval data sha256 `{report.eval_data_sha256[:16]}`).", "",
        "| task | n | baseline | candidate | delta | threshold | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in report.tasks:
        lines.append(f"| {t.task} | {t.n} | {t.baseline:.3f} | {t.candidate:.3f} | "
                     f"{t.delta:+.3f} | {t.threshold:.3f} | {'pass' if t.passed else '**FAIL**'} |")
    lines += ["", f"Candidate: `{report.candidate}`", f"Baseline: `{report.baseline}`"]
    return "\n".join(lines)


def evaluation_key(build: StageOutput, config: GateConfig) -> str:
    settings = get_settings()
    data = dataset_dir(config.dataset) / "eval.jsonl"
    return digest_of({
        "stage": "evaluate", "build": build.digest, "data": file_digest(data),
        "limit": config.limit, "device": settings.device,
        "tools": tool_versions(settings.quantize_python, TOOLS),
    })[:24]


@task(name="evaluate", retries=RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless_permanent, persist_result=True,
      cache_key_fn=cache_key(lambda p: evaluation_key(p["build"], p["config"])))
def evaluate_task(build: StageOutput, config: GateConfig) -> Evaluation:
    settings = get_settings()
    data = dataset_dir(config.dataset) / "eval.jsonl"
    return run_stage(settings, settings.quantize_python, "tasks.gate", EvaluateRequest(
        model_dir=str(ArtifactStore(settings).materialize(build.prefix)), eval_file=str(data),
        dataset=config.dataset, limit=config.limit, device=settings.device,
    ), Evaluation, get_run_logger())


def calibration_file_of(candidate: StageOutput) -> Path:
    """The calibration data a candidate was made with: build -> calibrated checkpoint."""
    store = ArtifactStore(get_settings())
    build = store.read_manifest(candidate.prefix)
    calibrated = store.read_manifest(build.inputs["checkpoint"])
    dataset, name = calibrated.inputs["calibration_data"].split("/")
    return dataset_dir(dataset) / name


def gate_key(candidate: StageOutput, baseline: StageOutput, config: GateConfig) -> str:
    return digest_of({"stage": "gate", "candidate": evaluation_key(candidate, config),
                      "baseline": evaluation_key(baseline, config), "rtol": config.rtol,
                      "atol": config.atol})[:24]


def store_report(key: str, model: str, report: GateReport) -> str:
    """Keep every gate report in the store, failing ones too: they are what people read."""
    store = ArtifactStore(get_settings())
    prefix = f"stages/gate/{key}"
    out = fresh_dir(store.local_path(prefix))
    (out / "gate-report.json").write_text(report.model_dump_json(indent=2))
    (out / "gate-report.md").write_text(render_markdown(model, report))
    store.store_output(out, prefix, Manifest(
        kind="gate", key=key, inputs={"candidate": report.candidate, "baseline": report.baseline},
        parameters={"rtol": report.rtol, "atol": report.atol, "dataset": report.dataset},
        tool_versions=report.harness,
        timings_s=report.seconds, details={"passed": report.passed, "model": model},
    ))
    return prefix


@task(name="gate", persist_result=True,
      cache_key_fn=cache_key(lambda p: gate_key(p["candidate"], p["baseline"], p["config"])))
def gate_task(candidate: StageOutput, baseline: StageOutput, config: GateConfig,
              model: str) -> GateReport:
    """Evaluate both builds (each evaluation cached on its own) and apply the rule."""
    settings = get_settings()
    data = dataset_dir(config.dataset) / "eval.jsonl"
    # A malformed item fails here, naming file and line; so does one that calibration saw.
    check_disjoint(calibration_file_of(candidate), data)
    base_eval = evaluate_task(baseline, config)
    cand_eval = evaluate_task(candidate, config)
    verdicts = judge(base_eval, cand_eval, config.rtol, config.atol)
    report = GateReport(
        passed=all(v.passed for v in verdicts), rule=RULE, rtol=config.rtol, atol=config.atol,
        dataset=config.dataset, eval_data_sha256=file_digest(data),
        candidate=candidate.prefix, baseline=baseline.prefix, tasks=verdicts,
        harness=tool_versions(settings.quantize_python, TOOLS),
        seconds={"baseline": base_eval.seconds, "candidate": cand_eval.seconds},
    )
    stored = store_report(gate_key(candidate, baseline, config), model, report)
    verdict = "passed" if report.passed else "FAILED"
    record_markdown(model, "gate", render_markdown(model, report) + f"\n\nStored: `{stored}`",
                    f"gate {verdict}")
    create_table_artifact(
        key=artifact_key(model, "gate-table"), description=f"gate {verdict}: {report.rule}",
        table=[{"task": t.task, "metric": t.metric, "n": t.n, "baseline": round(t.baseline, 4),
                "candidate": round(t.candidate, 4), "delta": round(t.delta, 4),
                "threshold": round(t.threshold, 4), "verdict": "pass" if t.passed else "FAIL"}
               for t in report.tasks])
    if not report.passed:
        # For automations: an alert on this event reaches the team within seconds (issue 3).
        emit_event(event="llmship.gate.failed",
                   resource={"prefect.resource.id": f"llmship.model.{model}",
                             "llmship.model": model},
                   payload={"model": model, "candidate": candidate.prefix,
                            "report": stored, "failing": [t.model_dump() for t in report.failing]})
        failing = ", ".join(f"{t.task} {t.candidate:.3f} < {t.threshold:.3f} "
                            f"(baseline {t.baseline:.3f})" for t in report.failing)
        raise GateFailed(f"accuracy gate failed for {model}: {failing}; nothing was published "
                         f"(report: s3://{settings.artifacts_bucket}/{stored}/)")
    get_run_logger().info("gate passed: %s", ", ".join(
        f"{t.task} {t.candidate:.3f} vs {t.baseline:.3f}" for t in report.tasks))
    return report


if __name__ == "__main__":
    stage_main(evaluate, EvaluateRequest)
