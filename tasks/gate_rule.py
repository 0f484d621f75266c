"""The accuracy gate's rule and its report: pure functions of the two builds' scores.

The rule, per task, is vLLM's own CI rule with an absolute slack and an optional floor:

    candidate >= max(baseline * (1 - rtol) - atol, floor)

and in strict mode the candidate's side is the one-sided Wilson lower bound of its score over
the task's n items.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from pydantic import BaseModel

from jobs.evaluate import Evaluation, TaskScore, TaskSet
from llmship.domain_data import dataset_dir, file_digest, load_eval_items
from llmship.errors import GateConfigError
from llmship.pipeline_config import EvalBackend, GateConfig, TaskPolicy

DOMAIN_METRIC = "exact_match,strip"
# The metric a standard task is judged on when its policy names none: the first one it reports.
STANDARD_METRICS = (
    "acc,none",
    "exact_match,strict-match",
    "exact_match,flexible-extract",
    "exact_match,none",
    "acc_norm,none",
)
RULE = "candidate >= max(baseline * (1 - rtol) - atol, floor)"
STRICT_RULE = (
    "wilson_lower(candidate, n, {confidence:.0%}) >= max(baseline * (1 - rtol) - atol, floor)"
)


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


def resolve_tasks(config: GateConfig) -> TaskSet:
    """The gate's task set, with every name in the policy checked against it."""
    eval_file = dataset_dir(config.dataset) / "eval.jsonl"
    kinds = sorted({item.task for item in load_eval_items(eval_file)})
    domain = kinds if config.domain_tasks is None else config.domain_tasks
    unknown = sorted(set(domain) - set(kinds))
    if unknown:
        raise GateConfigError(
            f"gate.domain_tasks names {unknown}, which {eval_file} does not "
            f"have: its task kinds are {kinds}"
        )
    if not domain and not config.standard_tasks:
        raise GateConfigError(
            "the gate has no tasks: set gate.domain_tasks to some of "
            f"{kinds}, or gate.standard_tasks"
        )
    tasks = TaskSet(
        dataset=config.dataset,
        eval_file=str(eval_file),
        eval_data_sha256=file_digest(eval_file),
        domain=list(domain),
        standard=list(config.standard_tasks),
    )
    known = set(tasks.names) | set(tasks.domain)
    stray = sorted(set(config.per_task) - known)
    if stray:
        raise GateConfigError(
            f"gate.per_task names {stray}, which the gate does not run: use one of {sorted(known)}"
        )
    return tasks


def policy_for(config: GateConfig, tasks: TaskSet, name: str) -> TaskPolicy:
    own = config.per_task.get(name) or config.per_task.get(tasks.kind_of(name)) or TaskPolicy()
    return TaskPolicy(
        rtol=config.rtol if own.rtol is None else own.rtol,
        atol=config.atol if own.atol is None else own.atol,
        floor=own.floor,
        metric=own.metric,
    )


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
            raise GateConfigError(
                f"task {task_name} reports no metric {wanted!r}: it reports {sorted(score.metrics)}"
            )
        return wanted
    for name in (DOMAIN_METRIC, *STANDARD_METRICS):
        if name in score.metrics:
            return name
    if not score.metrics:
        raise GateConfigError(f"task {task_name} reported no metric to judge")
    return sorted(score.metrics)[0]


def judge(
    baseline: Evaluation, candidate: Evaluation, config: GateConfig, tasks: TaskSet
) -> list[TaskVerdict]:
    """Apply the rule to every task; the verdicts carry every number the rule used."""
    verdicts = []
    for name in tasks.names:
        policy = policy_for(config, tasks, name)
        base, cand = baseline.scores[name], candidate.scores[name]
        metric = pick_metric(base, policy.metric, name)
        b, c = base.metrics[metric], cand.metrics[metric]
        threshold = max(0.0, b * (1 - policy.rtol) - policy.atol, policy.floor or 0.0)
        measured = wilson_lower(c, cand.n, config.confidence) if config.strict else c
        verdicts.append(
            TaskVerdict(
                task=name,
                metric=metric,
                n=cand.n,
                baseline=b,
                candidate=c,
                delta=c - b,
                rtol=policy.rtol,
                atol=policy.atol,
                floor=policy.floor,
                threshold=threshold,
                measured=measured,
                passed=measured >= threshold - 1e-12,
            )
        )
    return verdicts


def rule_of(config: GateConfig) -> str:
    return STRICT_RULE.format(confidence=config.confidence) if config.strict else RULE


def render_markdown(model: str, report: GateReport) -> str:
    verdict = "PASSED" if report.passed else "FAILED"
    lines = [
        f"# Accuracy gate {verdict}: {model}",
        "",
        f"Rule, per task: `{report.rule}`; defaults rtol = {report.rtol}, atol = {report.atol}"
        f"; evaluated with the `{report.backend.value}` backend on `{report.dataset}` "
        f"(eval data sha256 `{report.eval_data_sha256[:16]}`).",
        "",
        "| task | metric | n | baseline | candidate | delta | rtol | atol | floor | threshold "
        "| measured | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in report.tasks:
        floor = "-" if t.floor is None else f"{t.floor:.3f}"
        lines.append(
            f"| {t.task} | {t.metric} | {t.n} | {t.baseline:.3f} | {t.candidate:.3f} "
            f"| {t.delta:+.3f} | {t.rtol} | {t.atol} | {floor} | {t.threshold:.3f} "
            f"| {t.measured:.3f} | {'pass' if t.passed else '**FAIL**'} |"
        )
    lines += [
        "",
        "```",
        *score_chart(report),
        "```",
        "",
        f"Candidate: `{report.candidate}` (version `{report.candidate_version}`)",
        f"Baseline: `{report.baseline}`",
    ]
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
