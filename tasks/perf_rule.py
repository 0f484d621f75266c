"""The performance gate's rule and its report: pure functions of the two builds' figures.

Per load, output tokens/s, and time to first token and inter-token latency at p50 and p99:

    candidate tokens/s >= baseline tokens/s * min_throughput_ratio
    candidate TTFT (ITL) <= baseline TTFT (ITL) * (1 + max_ttft_regression (max_itl_regression))

A limit left unset is measured and reported, not judged (the CPU demo).
"""

from __future__ import annotations

from pydantic import BaseModel

from jobs.benchmark import Load, LoadFigures
from llmship.pipeline_config import PerfConfig

# No engine streams one sequence at 10,000 tokens/s: a gap shorter than this is inside a burst
# of tokens that arrived together, not a measure of the engine.
LATENCY_RESOLUTION_MS = 0.1


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

    @property
    def judged(self) -> bool:
        """Whether any limit judged the candidate; a policy of none only measures."""
        return any(v.passed is not None for v in self.verdicts)

    @property
    def verdict(self) -> str:
        if not self.judged:
            return "MEASURED, not judged (the policy sets no limit)"
        return "PASSED" if self.passed else "FAILED"


def loads(config: PerfConfig) -> list[Load]:
    shape = dict(input_len=config.input_len, output_len=config.output_len, seed=config.seed)
    out = [
        Load(
            name="production",
            concurrency=config.concurrency,
            num_prompts=config.num_prompts,
            **shape,
        )
    ]
    if config.single_stream_prompts:
        out.append(
            Load(
                name="single-stream",
                concurrency=1,
                num_prompts=config.single_stream_prompts,
                **shape,
            )
        )
    return out


def judge(
    baseline: list[LoadFigures], candidate: list[LoadFigures], config: PerfConfig
) -> list[PerfVerdict]:
    """Every figure of every load, side by side, with its limit where the policy sets one."""
    verdicts = []
    for base, cand in zip(baseline, candidate, strict=True):
        name = base.load.name
        if cand.failed or base.failed:
            verdicts.append(
                PerfVerdict(
                    load=name,
                    metric="failed requests",
                    baseline=base.failed,
                    candidate=cand.failed,
                    ratio=cand.failed / max(base.failed, 1),
                    limit="0",
                    passed=cand.failed == 0 and base.failed == 0,
                )
            )
        verdicts += [
            figure_verdict(name, metric, b, c, limit, higher_is_better)
            for metric, b, c, limit, higher_is_better in figures(base, cand, config)
        ]
    return verdicts


def figures(
    base: LoadFigures, cand: LoadFigures, config: PerfConfig
) -> list[tuple[str, float, float, float | None, bool]]:
    """(figure, baseline, candidate, the policy's limit, whether higher is better) of one load."""
    rows = [
        (
            "output tokens/s",
            base.output_tokens_per_s,
            cand.output_tokens_per_s,
            config.min_throughput_ratio,
            True,
        )
    ]
    for label, field, limit in (
        ("TTFT", "ttft", config.max_ttft_regression),
        ("ITL", "itl", config.max_itl_regression),
    ):
        rows += [
            (
                f"{label} {p} (ms)",
                getattr(base, f"{field}_{p}_ms"),
                getattr(cand, f"{field}_{p}_ms"),
                limit,
                False,
            )
            for p in ("p50", "p99")
        ]
    return rows


def figure_verdict(
    load: str, metric: str, b: float, c: float, limit: float | None, higher_is_better: bool
) -> PerfVerdict:
    """One figure judged: a floor on a ratio (throughput) or a ceiling on a regression (latency)."""
    floor = 0.0 if higher_is_better else LATENCY_RESOLUTION_MS
    ratio = c / b if b > floor else None
    figure = dict(load=load, metric=metric, baseline=b, candidate=c, ratio=ratio)
    if limit is None or ratio is None:
        # A baseline latency under the resolution has no ratio worth judging: on a CPU, say,
        # an API server that falls behind its engine streams tokens in bursts, and the gaps
        # inside a burst (ITL) measure microseconds.
        unjudged = "-" if limit is None else f"not judged: the baseline's is under {floor:g} ms"
        return PerfVerdict(**figure, limit=unjudged, passed=None)
    if higher_is_better:
        return PerfVerdict(**figure, limit=f">= {limit:g}x", passed=ratio >= limit - 1e-9)
    return PerfVerdict(**figure, limit=f"<= {1 + limit:g}x", passed=ratio <= 1 + limit + 1e-9)


def render_markdown(model: str, report: PerfReport) -> str:
    p = report.policy
    lines = [
        f"# Performance gate {report.verdict}: {model}",
        "",
        f"The same load on both builds' servers, sent by vLLM's benchmark client "
        f"({', '.join(f'{k} {v}' for k, v in report.client.items() if v != 'absent')}): "
        f"{p.input_len} random tokens in, {p.output_len} out (EOS ignored), seed {p.seed}; "
        f"production load {p.num_prompts} requests at {p.concurrency} at once"
        + (f", then {p.single_stream_prompts} one at a time" if p.single_stream_prompts else "")
        + f"; device `{report.device}`.",
        "",
        "| load | figure | baseline | candidate | candidate / baseline | limit | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for v in report.verdicts:
        mark = "-" if v.passed is None else ("pass" if v.passed else "**FAIL**")
        ratio = "-" if v.ratio is None else f"{v.ratio:.3f}"
        lines.append(
            f"| {v.load} | {v.metric} | {v.baseline:.2f} | {v.candidate:.2f} "
            f"| {ratio} | {v.limit} | {mark} |"
        )
    lines += [
        "",
        "```",
        *throughput_chart(report),
        "```",
        "",
        f"Candidate: `{report.candidate}` (version `{report.candidate_version}`)",
        f"Baseline: `{report.baseline}`",
    ]
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
            out.append(
                f"{v.load if side == 'baseline ' else '':<{label}}  {side} "
                f"{bar:<{width}} {value:,.1f} tok/s"
            )
    return out
