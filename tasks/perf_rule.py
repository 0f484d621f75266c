"""The performance gate's rule and its report: pure functions of the two builds' figures.

Per load, output tokens/s, and time to first token and inter-token latency at p50 and p99:

    candidate tokens/s >= baseline tokens/s * min_throughput_ratio
    candidate TTFT (ITL) <= baseline TTFT (ITL) * (1 + max_ttft_regression (max_itl_regression))

A limit left unset is measured and reported, not judged (the CPU demo).

With a price for the hardware (LLMSHIP_HOURLY_USD), each load also gets the dollars per
million output tokens of each build at that load: what a server costs per hour over the
tokens it put out in that hour, never judged.
"""

from __future__ import annotations

from pydantic import BaseModel

from jobs.benchmark import Load, LoadFigures
from llmship.pipeline_config import PerfConfig

# No engine streams one sequence at 10,000 tokens/s: a gap shorter than this is inside a burst
# of tokens that arrived together, not a measure of the engine.
LATENCY_RESOLUTION_MS = 0.1
COST_METRIC = "$ per 1M output tokens"
COLD_START_METRIC = "cold start (s)"


class ServerPrice(BaseModel):
    """What one server of the builds costs per hour, and where that figure came from."""

    hardware: str  # "cpu", or the GPU's name
    # A server's GPUs: its tensor parallel size, or its share of one GPU (servers sharing a GPU
    # each pay their share, serving/engines.py: gpus_per_server); 0 on a CPU host.
    gpus: float
    price_key: str | None  # the LLMSHIP_HOURLY_USD entry that priced it; None: none did
    usd_per_hour: float | None  # one server's: the GPU's price times its GPUs

    def describe(self) -> str:
        if self.usd_per_hour is None:
            return (
                f"no price for `{self.hardware}` in LLMSHIP_HOURLY_USD, so no cost per token "
                f"(e.g. LLMSHIP_HOURLY_USD='{{\"{'cpu' if not self.gpus else 'H100'}\": 2.5}}')"
            )
        units = f"{self.gpus:g} x {self.hardware}" if self.gpus else "the CPU host"
        return (
            f"priced at ${self.usd_per_hour:g} per server-hour ({units}, "
            f"LLMSHIP_HOURLY_USD[{self.price_key!r}])"
        )


def server_price(hardware: str, gpus: float, prices: dict[str, float]) -> ServerPrice:
    """The hour of a server with gpus of this hardware, from the per-GPU (or per-CPU-host)
    prices: the longest key that is part of the hardware's name wins ("H100 NVL" over "H100")."""
    name = hardware.lower()
    keys = sorted((k for k in prices if k.lower() in name), key=len, reverse=True)
    if not keys:
        return ServerPrice(hardware=hardware, gpus=gpus, price_key=None, usd_per_hour=None)
    return ServerPrice(
        hardware=hardware,
        gpus=gpus,
        price_key=keys[0],
        usd_per_hour=prices[keys[0]] * (gpus or 1),
    )


def usd_per_million_tokens(usd_per_hour: float, tokens_per_s: float) -> float | None:
    """None when the server put out no tokens: no price per token can be had."""
    return usd_per_hour / (tokens_per_s * 3600) * 1e6 if tokens_per_s > 0 else None


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
    price: ServerPrice | None = None  # None in reports made before prices were kept
    # Each server's cold start when measured, role -> seconds (None: not recorded).
    cold_start_s: dict[str, float | None] = {}

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
    baseline: list[LoadFigures],
    candidate: list[LoadFigures],
    config: PerfConfig,
    price: ServerPrice | None = None,
) -> list[PerfVerdict]:
    """Every figure of every load, side by side, with its limit where the policy sets one; the
    cost per token of each build where the hardware has a price (never judged)."""
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
        if price is not None and price.usd_per_hour is not None:
            b, c = (
                usd_per_million_tokens(price.usd_per_hour, f.output_tokens_per_s)
                for f in (base, cand)
            )
            if b is not None and c is not None:
                verdicts.append(figure_verdict(name, COST_METRIC, b, c, None, False))
    return verdicts


def cold_start_verdict(
    baseline_s: float | None, candidate_s: float | None, config: PerfConfig
) -> PerfVerdict | None:
    """The candidate's server's cold start against the policy's ceiling in seconds (the
    baseline's beside it); None where either server's was not recorded."""
    if not baseline_s or not candidate_s:
        return None
    limit = config.max_cold_start_s
    return PerfVerdict(
        load="start",
        metric=COLD_START_METRIC,
        baseline=baseline_s,
        candidate=candidate_s,
        ratio=candidate_s / baseline_s,
        limit="-" if limit is None else f"<= {limit:g} s",
        passed=None if limit is None else candidate_s <= limit,
    )


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
        + f"; device `{report.device}`"
        + (f"; {report.price.describe()}" if report.price else "")
        + ".",
        "",
        "| load | figure | baseline | candidate | candidate / baseline | limit | verdict |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for v in report.verdicts:
        mark = "-" if v.passed is None else ("pass" if v.passed else "**FAIL**")
        ratio = "-" if v.ratio is None else f"{v.ratio:.3f}"
        figure = "{:.4g}" if v.metric == COST_METRIC else "{:.2f}"
        lines.append(
            f"| {v.load} | {v.metric} | {figure.format(v.baseline)} | "
            f"{figure.format(v.candidate)} | {ratio} | {v.limit} | {mark} |"
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
