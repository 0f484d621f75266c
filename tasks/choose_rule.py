"""The recipe search's policy and its comparison: pure functions of the candidates' verdicts.

    among the candidates that pass both gates, the most output tokens/s at perf.concurrency;
    within perf.throughput_tie of the fastest, the smallest memory footprint (the weights, and
    the KV cache of perf.concurrency sequences of serving.max_model_len tokens); then the
    deployment's order. With the performance gate off: the first that passes, in that order.

A candidate that fails the accuracy gate is never measured for speed (tasks/choose.py).
"""

from __future__ import annotations

from html import escape

from pydantic import BaseModel

from llmship.contracts import Build
from llmship.pipeline_config import CalibrationConfig, PerfConfig
from tasks.gate_rule import GateReport
from tasks.gating import Refusal, Verdict
from tasks.perf_rule import COST_METRIC, PerfReport

GIB = 1024**3
POLICY = (
    "the most output tokens/s at the deployment's concurrency among the candidates that pass "
    "the accuracy gate and the performance limits; within {tie:.0%} of the fastest, the "
    "smallest weights + KV cache; then the deployment's order"
)


class Trial(BaseModel):
    """One recipe's candidate and what the gates made of it."""

    recipe: CalibrationConfig
    build: Build
    gate: Verdict[GateReport]
    perf: Verdict[PerfReport] | None = None  # None: not measured (failed accuracy, or perf off)

    @property
    def refusal(self) -> Refusal | None:
        """What refusing it announces; None when it passes both gates."""
        return self.gate.refusal or (self.perf.refusal if self.perf else None)


class CandidateRow(BaseModel):
    """One line of the comparison: a candidate's figures and verdict, or the baseline's."""

    recipe: str
    version: str
    build: str  # the build's prefix
    accuracy: dict[str, float]  # lm-eval task -> score
    accuracy_mean: float
    passed: bool  # both gates (the baseline's row: True)
    output_tokens_per_s: float | None = None  # at the production load; None: not measured
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    usd_per_million_tokens: float | None = None  # None: not measured, or no price set
    cold_start_s: float | None = None  # its server's, when measured
    weights_bytes: int
    kv_cache_bytes: int | None = None  # None: the model's shape is unknown
    verdict: str = ""  # winner, passed, failed accuracy, failed performance, baseline
    why: str = ""

    @property
    def footprint_bytes(self) -> int:
        return self.weights_bytes + (self.kv_cache_bytes or 0)


class CandidatesReport(BaseModel):
    model: str
    policy: str
    concurrency: int
    winner: str | None  # the version published; None: no candidate passed
    winner_recipe: str | None
    rows: list[CandidateRow]  # the candidates in the deployment's order, then the baseline
    # The domain data the calibrated recipes were calibrated on: dataset file -> sha256.
    calibration_data: dict[str, str] = {}


def figures_row(
    recipe: str,
    build: Build,
    gate: GateReport,
    perf: PerfReport | None,
    role: str,
    kv_bytes_per_token: float | None,
    sequences_tokens: int,
) -> CandidateRow:
    """A row from one side (role: candidate or baseline) of a candidate's reports."""
    scores = {t.task: getattr(t, role) for t in gate.tasks}
    row = CandidateRow(
        recipe=recipe,
        version=build.version,
        build=build.prefix,
        accuracy=scores,
        accuracy_mean=sum(scores.values()) / len(scores) if scores else 0.0,
        passed=True,
        weights_bytes=build.bytes,
        kv_cache_bytes=None
        if kv_bytes_per_token is None
        else round(kv_bytes_per_token * sequences_tokens),
    )
    if perf is None:
        return row
    production = perf.figures[role][0]
    cost = next(
        (v for v in perf.verdicts if v.load == "production" and v.metric == COST_METRIC), None
    )
    return row.model_copy(
        update={
            "output_tokens_per_s": production.output_tokens_per_s,
            "ttft_p50_ms": production.ttft_p50_ms,
            "ttft_p99_ms": production.ttft_p99_ms,
            "itl_p50_ms": production.itl_p50_ms,
            "itl_p99_ms": production.itl_p99_ms,
            "usd_per_million_tokens": getattr(cost, role) if cost else None,
            "cold_start_s": perf.cold_start_s.get(role),
        }
    )


def failed_why(trial: Trial) -> tuple[str, str]:
    if not trial.gate.report.passed:
        failing = ", ".join(
            f"{t.task} {t.measured:.3f} < {t.threshold:.3f}" for t in trial.gate.report.failing
        )
        return "failed accuracy", f"accuracy gate: {failing}; speed not measured"
    failing = "; ".join(
        f"{v.load} {v.metric} {v.ratio:.2f}x (limit {v.limit})" for v in trial.perf.report.failing
    )
    return "failed performance", f"performance gate: {failing}"


def pick(rows: list[CandidateRow], tie: float) -> int | None:
    """The index of the row the policy picks among the candidates' rows; None: none passed."""
    passing = [i for i, r in enumerate(rows) if r.passed]
    measured = [i for i in passing if rows[i].output_tokens_per_s is not None]
    if not measured:
        return passing[0] if passing else None
    fastest = max(rows[i].output_tokens_per_s for i in measured)
    tied = [i for i in measured if rows[i].output_tokens_per_s >= fastest * (1 - tie)]
    return min(tied, key=lambda i: (rows[i].footprint_bytes, i))


def lost_why(row: CandidateRow, winner: CandidateRow, tie: float) -> str:
    if row.version == winner.version:
        return "the same build as the winner"
    if row.output_tokens_per_s is None or winner.output_tokens_per_s is None:
        return "passed; the deployment lists the winner first (no speed measured)"
    if row.output_tokens_per_s >= winner.output_tokens_per_s * (1 - tie):
        return (
            f"tied on speed (within {tie:.0%}), larger footprint: "
            f"{row.footprint_bytes / GIB:.2f} GiB against {winner.footprint_bytes / GIB:.2f}"
        )
    ratio = row.output_tokens_per_s / winner.output_tokens_per_s
    return (
        f"slower: {row.output_tokens_per_s:.1f} output tokens/s against the winner's "
        f"{winner.output_tokens_per_s:.1f} ({ratio:.2f}x)"
    )


def compare(
    model: str,
    trials: list[Trial],
    baseline: Build,
    config: PerfConfig,
    max_model_len: int,
    kv_bytes_per_token: dict[bool, float] | None,
) -> CandidatesReport:
    """Every candidate's row, the policy's pick, and why each other one lost.
    kv_bytes_per_token: by whether the KV cache is FP8; None when the model's shape is unknown."""
    tokens = config.concurrency * max_model_len
    rows = []
    for t in trials:
        kv = kv_bytes_per_token[t.recipe.kv_cache_fp8] if kv_bytes_per_token else None
        perf = t.perf.report if t.perf else None
        row = figures_row(
            t.recipe.describe(), t.build, t.gate.report, perf, "candidate", kv, tokens
        )
        if t.refusal is not None:
            verdict, why = failed_why(t)
            row = row.model_copy(update={"passed": False, "verdict": verdict, "why": why})
        rows.append(row)
    chosen = pick(rows, config.throughput_tie)
    for i, row in enumerate(rows):
        if chosen is None or not row.passed:
            continue
        row.verdict = "winner" if i == chosen else "passed"
        row.why = (
            "picked by the policy"
            if i == chosen
            else lost_why(row, rows[chosen], config.throughput_tie)
        )
    measured = next((t.perf.report for t in trials if t.perf), None)
    base_row = figures_row(
        "baseline (BF16)",
        baseline,
        trials[0].gate.report,
        measured,
        "baseline",
        kv_bytes_per_token[False] if kv_bytes_per_token else None,
        tokens,
    )
    base_row.verdict, base_row.why = "baseline", "what every candidate is compared with"
    return CandidatesReport(
        model=model,
        policy=POLICY.format(tie=config.throughput_tie),
        concurrency=config.concurrency,
        winner=None if chosen is None else rows[chosen].version,
        winner_recipe=None if chosen is None else rows[chosen].recipe,
        rows=[*rows, base_row],
    )


# ------------------------------------------------------------------ how it is shown


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(report: CandidatesReport) -> list[dict]:
    """The `<model>-candidates` table artifact: one row per recipe, then the baseline."""
    return [
        {
            "recipe": r.recipe,
            "version": r.version,
            "verdict": r.verdict,
            **{f"accuracy {task}": round(score, 4) for task, score in r.accuracy.items()},
            "output tokens/s": fmt(r.output_tokens_per_s),
            "TTFT p50/p99 ms": f"{fmt(r.ttft_p50_ms)} / {fmt(r.ttft_p99_ms)}",
            "ITL p50/p99 ms": f"{fmt(r.itl_p50_ms, 2)} / {fmt(r.itl_p99_ms, 2)}",
            "$ per 1M output tokens": fmt(r.usd_per_million_tokens, 2),
            "cold start s": fmt(r.cold_start_s),
            "weights GiB": round(r.weights_bytes / GIB, 3),
            "KV cache GiB": "-" if r.kv_cache_bytes is None else round(r.kv_cache_bytes / GIB, 3),
            "why": r.why,
        }
        for r in report.rows
    ]


def chart_points(report: CandidatesReport) -> list[tuple[str, float, float, str]]:
    """(label, output tokens/s, mean accuracy, mark) of every measured row."""
    marks = {"winner": "*", "baseline": "B"}
    return [
        (r.recipe, r.output_tokens_per_s, r.accuracy_mean, marks.get(r.verdict, "o"))
        for r in report.rows
        if r.output_tokens_per_s is not None
    ]


def text_chart(report: CandidatesReport, width: int = 48, height: int = 12) -> str:
    """Accuracy against throughput in characters: the Prefect UI shows markdown, not images."""
    points = chart_points(report)
    if not points:
        return "(no candidate was measured for speed)"
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01
    grid = [[" "] * width for _ in range(height)]
    legend = []
    for n, (label, x, y, mark) in enumerate(points):
        col = round((x - x0) / (x1 - x0) * (width - 1))
        row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
        symbol = mark if mark != "o" else str(n + 1)
        grid[row][col] = symbol
        legend.append(f"{symbol} {label}: {x:.1f} tokens/s, accuracy {y:.3f}")
    lines = [f"{y1:6.3f} |" + "".join(grid[0])]
    lines += ["       |" + "".join(r) for r in grid[1:-1]]
    lines += [f"{y0:6.3f} |" + "".join(grid[-1]), "       +" + "-" * width]
    lines += [f"        {x0:<10.1f}output tokens/s{x1:>{width - 25}.1f}", "", *legend]
    return "\n".join(lines)


def svg_chart(report: CandidatesReport) -> str:
    """The same picture as an image, kept beside the version (candidates.svg)."""
    points = chart_points(report)
    w, h, pad = 640, 400, 60
    xs = [p[1] for p in points] or [0.0, 1.0]
    ys = [p[2] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05 or 1.0
    y0, y1 = min(ys) - 0.01, max(ys) + 0.01

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad),
            h - pad - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad),
        )

    colours = {"*": "#d62728", "B": "#555555"}
    shapes = []
    for label, x, y, mark in points:
        cx, cy = at(x, y)
        shapes.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{8 if mark == "*" else 5}" '
            f'fill="{colours.get(mark, "#1f77b4")}"/>'
            f'<text x="{cx + 10:.1f}" y="{cy - 8:.1f}" font-size="12">'
            f"{escape(label)}{' (winner)' if mark == '*' else ''}</text>"
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>'
        f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">output tokens/s at '
        f"{report.concurrency} streams ({x0:.1f} to {x1:.1f})</text>"
        f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">'
        f"mean accuracy ({y0:.3f} to {y1:.3f})</text>"
        f'<text x="{w / 2}" y="30" text-anchor="middle" font-size="16">{escape(report.model)}: '
        f"accuracy against throughput</text>{''.join(shapes)}</svg>"
    )


def render_markdown(report: CandidatesReport) -> str:
    winner = (
        f"published: **{report.winner_recipe}** (version `{report.winner}`)"
        if report.winner
        else "**no candidate passed both gates: nothing was published**"
    )
    rows = table_rows(report)
    columns = list(rows[0])
    lines = [
        f"# Recipe search: {report.model}",
        "",
        f"{len(report.rows) - 1} recipe(s); {winner}.",
        "",
        f"Policy: {report.policy}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows),
        "",
        "Accuracy (mean over the gate's tasks) against output tokens/s; * the winner, B the "
        "baseline:",
        "",
        "```",
        text_chart(report),
        "```",
    ]
    return "\n".join(lines)
