"""The rollout's canary steps: a share of the live version's traffic (or, first, shadow copies
only) moved to the new version on every gateway, baked and judged on the gateways' counters
(the rule is tasks/canary_rule.py's), each step's shadow pairs kept in the store.

    canary_plan (the steps' percentages) -> for each: canary_step (route it, bake, keep the
    shadow's pairs) -> CanaryFailed at the first breach; tasks/rollout.py rolls back

The routes and the shadow's pairs are llmship/serving_messages.py's models (Canary, Shadow,
KeptPairs), read by field.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx

from llmship.errors import CanaryFailed, ServingError
from llmship.pipeline_config import QualityPolicy, RolloutConfig
from llmship.serving_messages import Canary, KeptPairs, Shadow
from llmship.settings import Settings
from llmship.store import ArtifactStore, shadow_prefix
from serving import fleet
from serving.gateway_admin import gateway_urls, keep_routed, route_traffic, shadow_pairs
from tasks.canary_rule import (
    ShadowScore,
    StepResult,
    Traffic,
    judge,
    parse_traffic,
    quantile,
    shadow_score,
    traffic_since,
)


def read_traffic(gateways: list[str], model: str, version: str) -> dict[str, Traffic]:
    """The version's counters at each gateway. One that does not answer (it died: its
    clients' requests went with it) is left out until it drops out of the fleet's list; none
    answering is an error."""
    traffic, unreachable = {}, []
    for url in gateways:
        try:
            resp = httpx.get(f"{url}/metrics", timeout=10.0)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            unreachable.append(f"{url}: {type(exc).__name__}")
            continue
        traffic[url] = parse_traffic(resp.text, model, version)
    if not traffic:
        raise ServingError(f"no gateway answered for its metrics: {'; '.join(unreachable)}")
    return traffic


def bake(
    settings: Settings,
    server: fleet.Server,
    live: str,
    percent: float,
    cfg: RolloutConfig,
    log,
    shadow: Shadow | None = None,
) -> StepResult:
    """Watch the new version's share of traffic (percent 0: shadow copies only), on every
    gateway, for the step's bake, stopping at the first breach."""
    canary = canary_of(server.version, percent)
    seconds = cfg.bake_seconds if percent else cfg.quality.shadow_bake_seconds
    before = read_traffic(gateway_urls(settings), server.model, server.version)
    started = time.monotonic()
    while True:
        time.sleep(
            min(
                settings.rollout_check_interval_s,
                max(0.0, seconds - (time.monotonic() - started)),
            )
        )
        elapsed = time.monotonic() - started
        gateways = gateway_urls(settings)
        for url in keep_routed(settings, gateways, server.model, live, canary, shadow):
            log.info("step %s%%: gateway %s had not the step's route: given", percent, url)
        window = traffic_since(before, read_traffic(gateways, server.model, server.version))
        finished = elapsed >= seconds
        breach = judge(window, cfg, finished=finished, shadow_only=not percent)
        if breach is None:
            now = fleet.find(settings, server.model, server.version)
            if now is None or not now.endpoints:
                breach = f"{server.app} has no running replica left"
        step = StepResult(
            percent=percent,
            seconds=round(elapsed, 1),
            requests=int(window.requests),
            errors=int(window.errors),
            p99_seconds=quantile(0.99, window.buckets),
            breach=breach,
            quality=shadow_score(window, cfg.quality) if shadow else None,
        )
        if breach or finished:
            return step
        log.info(
            "step %s%%: %d requests, %d errors%s after %.0f s",
            percent,
            step.requests,
            step.errors,
            f", {step.quality.agreed} of {step.quality.pairs} shadowed answers agreed"
            if step.quality
            else "",
            elapsed,
        )


def keep_shadow_record(
    settings: Settings,
    store: ArtifactStore,
    server: fleet.Server,
    step: StepResult,
    number: int,
    since: float,
) -> None:
    """The step's scored pairs, as hashes (and the disagreeing examples the policy keeps), in
    the artifacts bucket under the version; the first ten examples go into the step's result
    for the report."""
    kept = shadow_pairs(settings, gateway_urls(settings), server.model, since).get(
        server.version, KeptPairs()
    )
    stamp = datetime.fromtimestamp(since, UTC).strftime("%Y%m%dT%H%M%SZ")
    key = f"{shadow_prefix(server.model, server.version)}/{stamp}-step{number}.json"
    store.put_json(
        key,
        {
            "model": server.model,
            "version": server.version,
            "step": step.model_dump(exclude={"quality"}),
            "score": step.quality.model_dump(exclude={"examples", "stored"}),
            **kept.model_dump(),
        },
    )
    step.quality.stored = f"s3://{store.bucket}/{key}"
    step.quality.examples = [example.model_dump() for example in kept.examples[:10]]


def canary_plan(cfg: RolloutConfig) -> list[float]:
    """The steps' percentages: a shadow-only step (0 %) first when the quality policy asks."""
    q = cfg.quality
    return ([0.0] if q.enabled and q.shadow_bake_seconds > 0 else []) + cfg.canary_steps


def canary_of(version: str, percent: float) -> Canary | None:
    """The route's canary for a step: percent of the traffic to version (0: none, the step's
    shadow copies only)."""
    return Canary(version=version, percent=percent) if percent else None


def shadow_of(q: QualityPolicy, version: str) -> Shadow | None:
    if not q.enabled:
        return None
    return Shadow(
        version=version,
        fraction=q.sample_fraction,
        max_rps=q.max_shadow_rps,
        keep_examples=q.keep_examples,
    )


def canary_step(
    settings: Settings,
    store: ArtifactStore,
    server: fleet.Server,
    live: str,
    number: int,
    percent: float,
    cfg: RolloutConfig,
    log,
) -> StepResult:
    """One step: percent of the live version's traffic (0: shadow copies only) to the new
    one, baked and judged; its shadow's pairs kept."""
    shadow = shadow_of(cfg.quality, server.version)
    route_traffic(
        settings,
        server.model,
        live,
        canary=canary_of(server.version, percent),
        shadow=shadow,
    )
    log.info(
        "step %d: %s%% of %s's traffic to %s%s for %.0f s",
        number,
        percent,
        server.model,
        server.version,
        f", {shadow.fraction:.0%} of the live requests copied to it" if shadow else "",
        cfg.bake_seconds if percent else cfg.quality.shadow_bake_seconds,
    )
    step_started = time.time()
    step = bake(settings, server, live, percent, cfg, log, shadow)
    if shadow:
        keep_shadow_record(settings, store, server, step, number, step_started)
    return step


def run_canary(
    settings: Settings,
    store: ArtifactStore,
    server: fleet.Server,
    live: str | None,
    previous: str | None,
    cfg: RolloutConfig,
    log,
) -> list[StepResult]:
    """Every canary step, from live (the version the gateways route the model to now, None
    when none or the new one already takes all of it); CanaryFailed (with the steps so far)
    at the first breach. A canary needs a version to compare with and to fall back on (and
    one that takes all the traffic already has nothing left to prove)."""
    steps: list[StepResult] = []
    plan = canary_plan(cfg) if live and previous else []
    for number, percent in enumerate(plan, start=1):
        step = canary_step(settings, store, server, live, number, percent, cfg, log)
        steps.append(step)
        if step.breach:
            step_name = (
                f"canary of {server.model} {server.version} at {percent:g}%"
                if percent
                else f"shadow-only step of {server.model} {server.version}"
            )
            raise CanaryFailed(
                f"{step_name} breached after {step.seconds:.0f} s: {step.breach}; "
                f"traffic is back on {previous}",
                steps=steps,
            )
        log.info(
            "step %s%% passed: %d requests, %d errors, p99 %s%s",
            percent,
            step.requests,
            step.errors,
            _seconds(step.p99_seconds),
            f", {_agreement(step.quality)}" if step.quality else "",
        )
    return steps


def _agreement(score: ShadowScore) -> str:
    if not score.pairs:
        return "no shadowed answers scored"
    return (
        f"{score.agreed} of {score.pairs} shadowed answers agreed ({score.agreement:.1%}, "
        f"{score.confidence:.0%} lower bound {score.lower_bound:.3f}, floor {score.floor:.3f})"
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"
