"""How a canary step is judged, from the gateways' counters (pure: tasks/canary.py reads the
counters and acts on the verdict).

Per step, over the new version's requests since the step began, summed over every gateway:
- error rate: its 5xx and unanswered requests, shadow copies it failed included, over all it
  was sent; judged as soon as there is traffic (a failing canary stops early);
- p99 latency at the gateway, when the policy sets a limit;
- with `rollout.quality` on, agreement with the live version's answers on shadowed requests
  (serving/shadow.py): the one-sided Wilson lower bound of the agreement rate must be at least
  the floor when the step ends; a step stops early once even the upper bound is below it;
- too little evidence (fewer requests than min_requests, fewer pairs than min_pairs) only
  when the step ends.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from llmship.pipeline_config import QualityPolicy, RolloutConfig
from tasks.gate_rule import wilson_lower


def _minus(a: dict, b: dict) -> dict:
    return {k: v - b.get(k, 0.0) for k, v in a.items()}


def _plus(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {*a, *b}}


class Traffic(BaseModel):
    """A version's requests at the gateway, as counters: subtract two to get a window."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = {}  # latency histogram: upper bound -> cumulative count
    shadow: dict[str, float] = {}  # shadow copies by outcome (answered, failed, capped, ...)
    pairs: dict[str, float] = {}  # scored pairs by agreement (exact, answer, none)

    def minus(self, before: Traffic) -> Traffic:
        return Traffic(
            requests=self.requests - before.requests,
            errors=self.errors - before.errors,
            buckets=_minus(self.buckets, before.buckets),
            shadow=_minus(self.shadow, before.shadow),
            pairs=_minus(self.pairs, before.pairs),
        )

    def plus(self, other: Traffic) -> Traffic:
        return Traffic(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            buckets=_plus(self.buckets, other.buckets),
            shadow=_plus(self.shadow, other.shadow),
            pairs=_plus(self.pairs, other.pairs),
        )

    def counted_less_than(self, earlier: Traffic) -> bool:
        """A counter went back: the gateway restarted."""
        return self.requests < earlier.requests or sum(self.shadow.values()) < sum(
            earlier.shadow.values()
        )


def parse_traffic(metrics_text: str, model: str, version: str) -> Traffic:
    """The version's totals over every endpoint, from the gateway's /metrics."""
    traffic = Traffic()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != model or labels.get("version") != version:
                continue
            if sample.name == "llmship_gateway_requests_total":
                traffic.requests += sample.value
            elif sample.name == "llmship_gateway_errors_total":
                traffic.errors += sample.value
            elif sample.name == "llmship_gateway_request_seconds_bucket":
                le = float(labels["le"])
                traffic.buckets[le] = traffic.buckets.get(le, 0.0) + sample.value
            elif sample.name == "llmship_gateway_shadow_requests_total":
                outcome = labels["outcome"]
                traffic.shadow[outcome] = traffic.shadow.get(outcome, 0.0) + sample.value
            elif sample.name == "llmship_gateway_shadow_pairs_total":
                agreement = labels["agreement"]
                traffic.pairs[agreement] = traffic.pairs.get(agreement, 0.0) + sample.value
    return traffic


def traffic_since(before: dict[str, Traffic], now: dict[str, Traffic]) -> Traffic:
    """The requests every gateway relayed between two readings. A gateway that started since
    (or restarted: its counters went back) counts from zero; one that stopped keeps what it
    counted before it went."""
    total = Traffic()
    for url, counted in now.items():
        earlier = before.get(url)
        restarted = earlier is None or counted.counted_less_than(earlier)
        total = total.plus(counted if restarted else counted.minus(earlier))
    return total


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in; the
    largest finite bound when it falls in +Inf."""
    bounds = sorted(buckets)
    total = buckets.get(float("inf"), 0.0)
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


class ShadowScore(BaseModel):
    """A step's shadowed requests: how often the new version answered as the live one did."""

    pairs: int
    agreed: int  # by the policy's comparison
    exact: int  # the same text, whitespace aside
    agreement: float | None
    lower_bound: float | None
    upper_bound: float | None
    floor: float
    confidence: float
    compare: str
    copies: dict[str, int]  # by outcome: answered, failed, capped, dropped, ...
    examples: list[dict] = []  # disagreeing pairs, when the policy keeps them
    stored: str | None = None  # s3 key of the step's hashes (and examples)


def wilson_upper(p: float, n: int, confidence: float) -> float:
    return 1.0 - wilson_lower(1.0 - p, n, confidence)


def shadow_score(window: Traffic, policy: QualityPolicy) -> ShadowScore:
    exact = int(window.pairs.get("exact", 0))
    same_answer = exact + int(window.pairs.get("answer", 0))
    pairs = same_answer + int(window.pairs.get("none", 0))
    agreed = same_answer if policy.compare == "answer" else exact
    rate = agreed / pairs if pairs else None
    return ShadowScore(
        pairs=pairs,
        agreed=agreed,
        exact=exact,
        agreement=rate,
        lower_bound=None if rate is None else wilson_lower(rate, pairs, policy.confidence),
        upper_bound=None if rate is None else wilson_upper(rate, pairs, policy.confidence),
        floor=policy.agreement_floor,
        confidence=policy.confidence,
        compare=policy.compare,
        copies={k: int(v) for k, v in sorted(window.shadow.items()) if v},
    )


def judge_quality(score: ShadowScore, policy: QualityPolicy, *, finished: bool) -> str | None:
    said = (
        f"the new version's answers agreed with the live version's in {score.agreed} of "
        f"{score.pairs} shadowed requests ({policy.compare} comparison"
    )
    if (
        score.pairs >= policy.min_pairs
        and score.upper_bound is not None
        and score.upper_bound < policy.agreement_floor
    ):
        return (
            f"{said}, {score.agreement:.1%}): even the {policy.confidence:.0%} upper bound "
            f"{score.upper_bound:.3f} is below the agreement floor {policy.agreement_floor:.3f}"
        )
    if not finished:
        return None
    if score.pairs < policy.min_pairs:
        return (
            f"{said}): fewer than min_pairs {policy.min_pairs}, too little evidence to go on "
            f"(shadow copies by outcome: {score.copies or 'none'})"
        )
    if score.lower_bound < policy.agreement_floor:
        return (
            f"{said}, {score.agreement:.1%}): its {policy.confidence:.0%} lower bound "
            f"{score.lower_bound:.3f} is below the agreement floor {policy.agreement_floor:.3f}"
        )
    return None


def judge(
    window: Traffic, cfg: RolloutConfig, *, finished: bool, shadow_only: bool = False
) -> str | None:
    """Why a step breaches its limits, or None. shadow_only: a step that sends the new
    version copies only, no client traffic (min_requests does not apply)."""
    failed = window.shadow.get("failed", 0.0)
    sent = window.requests + window.shadow.get("answered", 0.0) + failed
    errors = window.errors + failed
    if sent and errors / sent > cfg.max_error_rate:
        return (
            f"error rate {errors / sent:.1%} ({int(errors)} of {int(sent)} requests"
            f"{f', {int(failed)} of them shadow copies' if failed else ''}) > "
            f"{cfg.max_error_rate:.1%}"
        )
    p99 = quantile(0.99, window.buckets)
    if cfg.max_p99_seconds is not None and p99 is not None and p99 > cfg.max_p99_seconds:
        return f"p99 latency {p99:.2f} s > {cfg.max_p99_seconds:.2f} s over {int(sent)} requests"
    if cfg.quality.enabled:
        breach = judge_quality(shadow_score(window, cfg.quality), cfg.quality, finished=finished)
        if breach:
            return breach
    n = int(window.requests)
    if finished and not shadow_only and n < cfg.min_requests:
        return (
            f"only {n} requests in {cfg.bake_seconds:.0f} s, fewer than min_requests "
            f"{cfg.min_requests}: too little evidence to go on"
        )
    return None


class StepResult(BaseModel):
    """One step: the new version's traffic at the gateway over its bake (percent 0: a
    shadow-only step)."""

    percent: float
    seconds: float
    requests: int
    errors: int
    p99_seconds: float | None
    breach: str | None = None
    quality: ShadowScore | None = None  # with rollout.quality on: the shadowed answers


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_steps(model: str, version: str, steps: list[StepResult], outcome: str) -> str:
    """The rollout's steps as the Prefect UI shows them: traffic, errors, latency and, with
    the quality policy on, the shadowed answers' agreement against its floor."""
    lines = [
        f"# Rollout of {model} {version}: {outcome}",
        "",
        "| step | traffic | requests | errors | p99 s | shadowed pairs | agreed | agreement "
        "| lower bound | floor | breach |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for number, step in enumerate(steps, start=1):
        q = step.quality
        lines.append(
            f"| {number} | {step.percent:g}% | {step.requests} | {step.errors} "
            f"| {_number(step.p99_seconds, '.3f')} | {q.pairs if q else '-'} "
            f"| {q.agreed if q else '-'} | {_number(q and q.agreement, '.1%')} "
            f"| {_number(q and q.lower_bound, '.3f')} | {_number(q and q.floor, '.3f')} "
            f"| {step.breach or '-'} |"
        )
    for number, step in enumerate(steps, start=1):
        q = step.quality
        if not q:
            continue
        lines += ["", f"## Step {number}: shadowed answers"]
        lines.append(
            f"{q.compare} comparison, {q.confidence:.0%} one-sided Wilson bound; copies by "
            f"outcome: {q.copies or 'none'}; {q.exact} of {q.pairs} pairs the same text."
        )
        if q.stored:
            lines.append(f"Every pair's hashes: `{q.stored}`.")
        for example in q.examples[:10]:
            prompt = str(example["prompt"])
            prompt = prompt if len(prompt) <= 300 else prompt[:300] + "..."
            lines += [
                "",
                f"- request `{example['request_sha256'][:12]}`: {prompt!r}",
                f"  - live: {example['live']!r}",
                f"  - new: {example['candidate']!r}",
            ]
    return "\n".join(lines) + "\n"
