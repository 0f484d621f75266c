"""Stage 6, rollout: serve a published version and move the gateway's traffic to it.

    the version's servers from the fleet (started, or the warm ones reused) -> smoke test of
    every replica -> canary steps, each baked and judged on
    the gateway's own metrics -> switch -> `live`/`previous` aliases (compare-and-swap) ->
    the old version kept warm for a while (the fleet stops it then), older ones stopped

A canary step that breaches its limits (error rate, p99 latency, a server that stops
answering) sends all traffic back to the version that served before, stops the new server and
fails with the numbers: a bad version goes back by itself. Any other failure before the live
alias has moved (the commit point) does the same. A version already live (the alias says so
and the gateway routes to its healthy server) is left alone.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
from prefect import get_run_logger, pause_flow_run, task
from prefect.input import RunInput
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from llmship import events
from llmship.contracts import StageOutput
from llmship.errors import CanaryFailed, ServingError, UngatedVersion
from llmship.settings import RolloutConfig, ServingConfig, Settings, get_settings
from llmship.store import ArtifactStore
from llmship.versions import PublishedVersion, read_version
from serving import fleet
from serving.gateway_admin import gateway_urls, keep_routed, model_route, route_traffic
from tasks.common import (
    record_markdown,
    record_stage_artifact,
    retry_unless_permanent,
)

SMOKE_PROMPT = "Hello"


class StepResult(BaseModel):
    """One canary step: the new version's traffic at the gateway over its bake."""

    percent: float
    seconds: float
    requests: int
    errors: int
    p99_seconds: float | None
    breach: str | None = None


class RolloutResult(BaseModel):
    model: str
    version: str
    previous: str | None
    upstream: str  # the engines of its replicas
    gateway: str
    changed: bool
    started_server: bool = False  # False: a running (warm) server took the traffic
    steps: list[StepResult] = []
    # From the decision to switch to the gateway routing to the new server: what a
    # rollback to a warm version costs.
    switch_seconds: float = 0.0
    previous_warm_until: str | None = None
    smoke_output: str = ""
    seconds: float


class RolloutApproval(RunInput):
    """The form the Prefect UI shows on a run paused before its traffic moves."""

    approve: bool = Field(description="move traffic to the new version")
    note: str = Field("", description="why; kept in the run's logs")


# ------------------------------------------------------------------ judging a canary step


class Traffic(BaseModel):
    """A version's requests at the gateway, as counters: subtract two to get a window."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = {}  # latency histogram: upper bound -> cumulative count

    def minus(self, before: Traffic) -> Traffic:
        return Traffic(
            requests=self.requests - before.requests,
            errors=self.errors - before.errors,
            buckets={le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
        )

    def plus(self, other: Traffic) -> Traffic:
        return Traffic(
            requests=self.requests + other.requests,
            errors=self.errors + other.errors,
            buckets={
                le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0)
                for le in {*self.buckets, *other.buckets}
            },
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
    return traffic


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


def judge(window: Traffic, cfg: RolloutConfig, *, finished: bool) -> str | None:
    """Why a step breaches its limits, or None. Error rate and latency are judged as soon as
    there is traffic (a failing canary stops early); too little traffic only at the end."""
    n = int(window.requests)
    if n and window.errors / n > cfg.max_error_rate:
        return (
            f"error rate {window.errors / n:.1%} ({int(window.errors)} of {n} requests) > "
            f"{cfg.max_error_rate:.1%}"
        )
    p99 = quantile(0.99, window.buckets)
    if cfg.max_p99_seconds is not None and p99 is not None and p99 > cfg.max_p99_seconds:
        return f"p99 latency {p99:.2f} s > {cfg.max_p99_seconds:.2f} s over {n} requests"
    if finished and n < cfg.min_requests:
        return (
            f"only {n} requests in {cfg.bake_seconds:.0f} s, fewer than min_requests "
            f"{cfg.min_requests}: too little evidence to go on"
        )
    return None


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


def traffic_since(before: dict[str, Traffic], now: dict[str, Traffic]) -> Traffic:
    """The requests every gateway relayed between two readings. A gateway that started since
    (or restarted: its counters went back) counts from zero; one that stopped keeps what it
    counted before it went."""
    total = Traffic()
    for url, counted in now.items():
        earlier = before.get(url)
        restarted = earlier is None or counted.requests < earlier.requests
        total = total.plus(counted if restarted else counted.minus(earlier))
    return total


def bake(
    settings: Settings, server: fleet.Server, live: str, percent: float, cfg: RolloutConfig, log
) -> StepResult:
    """Watch the new version's share of traffic, on every gateway, for cfg.bake_seconds,
    stopping at the first breach."""
    canary = {"version": server.version, "percent": percent}
    before = read_traffic(gateway_urls(settings), server.model, server.version)
    started = time.monotonic()
    while True:
        time.sleep(
            min(
                settings.rollout_check_interval_s,
                max(0.0, cfg.bake_seconds - (time.monotonic() - started)),
            )
        )
        elapsed = time.monotonic() - started
        gateways = gateway_urls(settings)
        for url in keep_routed(settings, gateways, server.model, live, canary):
            log.info("canary %s%%: gateway %s had not the canary's route: given", percent, url)
        window = traffic_since(before, read_traffic(gateways, server.model, server.version))
        finished = elapsed >= cfg.bake_seconds
        breach = judge(window, cfg, finished=finished)
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
        )
        if breach or finished:
            return step
        log.info(
            "canary %s%%: %d requests, %d errors after %.0f s",
            percent,
            step.requests,
            step.errors,
            elapsed,
        )


# ------------------------------------------------------------------ the rollout


def check_gated(
    stored: PublishedVersion | None, version: PublishedVersion, allow_ungated: bool
) -> PublishedVersion:
    """The version as the store has it now (not as the run that published it saw it)."""
    if stored is None:
        raise UngatedVersion(f"{version.prefix} is not a published version")
    if not stored.gate_passed and not allow_ungated:
        raise UngatedVersion(
            f"{version.model} {version.version} has no passing gate record: nothing reaches "
            "traffic without one. Pass allow_ungated=true (the rollback form's override) to "
            "serve it anyway"
        )
    return stored


def rollout(
    version: PublishedVersion,
    cfg: RolloutConfig,
    *,
    serving: ServingConfig | None = None,
    allow_ungated: bool = False,
    reason: str = "",
    log=None,
) -> RolloutResult:
    log = log or get_run_logger()
    settings = get_settings()
    store = ArtifactStore(settings)
    started = time.monotonic()
    stored = check_gated(
        read_version(store, version.model, version.version), version, allow_ungated
    )
    model = version.model
    current = model_route(settings, model)
    server = fleet.find(settings, model, version.version)
    live_alias = store.read_alias(model, "live")
    routed = (
        current is not None and current["version"] == version.version and not current.get("canary")
    )
    # Already live: the gateway routes to its running servers AND the alias (what a gateway
    # restart routes by) says so. A gateway that routes it under a stale alias (an alias move
    # that failed after the switch) is finished below: the alias moves, nothing else.
    if routed and live_alias == version.version and server and fleet.is_healthy(server):
        return RolloutResult(
            model=model,
            version=version.version,
            previous=None,
            upstream=_engines(server),
            gateway=settings.gateway_url,
            changed=False,
            seconds=round(time.monotonic() - started, 3),
        )
    spec = fleet.spec_for_version(model, version.version, stored.serve)
    log.info("%s %s: asking the fleet for its servers", model, version.version)
    server, started_server = fleet.acquire(settings, spec, serving)
    log.info(
        "%s %s %s: %s",
        model,
        version.version,
        "started" if started_server else "was warm",
        _engines(server),
    )
    # A live version with no running server is not routed, but traffic still leaves it.
    was_live = current["version"] if current and not routed else live_alias
    previous = was_live if was_live != version.version else None
    steps: list[StepResult] = []
    try:
        smoke = fleet.smoke_test(server, SMOKE_PROMPT)
        # A canary needs a version to compare with and to fall back on (and one that takes
        # all the traffic already has nothing left to prove).
        for percent in cfg.canary_steps if current and previous and not routed else []:
            route_traffic(
                settings,
                model,
                current["version"],
                canary={"version": version.version, "percent": percent},
            )
            log.info(
                "canary: %s%% of %s's traffic to %s for %.0f s",
                percent,
                model,
                version.version,
                cfg.bake_seconds,
            )
            step = bake(settings, server, current["version"], percent, cfg, log)
            steps.append(step)
            if step.breach:
                raise CanaryFailed(
                    f"canary of {model} {version.version} at {percent:g}% "
                    f"breached after {step.seconds:.0f} s: {step.breach}; "
                    f"traffic is back on {previous}"
                )
            log.info(
                "canary %s%% passed: %d requests, %d errors, p99 %s",
                percent,
                step.requests,
                step.errors,
                _seconds(step.p99_seconds),
            )
        switch_started = time.monotonic()
        route_traffic(settings, model, version.version)
        switch_seconds = time.monotonic() - switch_started
        # The commit point: the live alias is what a restarted gateway routes by. Until it has
        # moved, a failure puts traffic back where it was.
        if previous:
            store.move_alias(model, "previous", previous, reason=reason)
        store.move_alias(model, "live", version.version, reason=reason)
    except Exception as exc:
        if routed:
            raise  # it served before this rollout and serves still: only the alias failed
        if current:  # all traffic back where it was, before anything else
            route_traffic(settings, model, current["version"])
        fleet.release(settings, server)
        if isinstance(exc, CanaryFailed):
            events.emit(
                events.ROLLED_BACK,
                model,
                {
                    "model": model,
                    "version": version.version,
                    "back_on": previous,
                    "reason": str(exc),
                    "steps": [s.model_dump() for s in steps],
                },
            )
        raise
    warm_until = None
    for other in fleet.running(settings, model):
        if other.version == version.version or other.role != "serving":
            continue
        if other.version == previous:
            deadline = fleet.keep_warm(settings, other, cfg.keep_previous_warm_seconds)
            warm_until = _iso(deadline) if deadline else None
        else:
            fleet.release(settings, other)
    return RolloutResult(
        model=model,
        version=version.version,
        previous=previous,
        upstream=_engines(server),
        gateway=settings.gateway_url,
        changed=True,
        started_server=started_server,
        steps=steps,
        switch_seconds=round(switch_seconds, 4),
        previous_warm_until=warm_until,
        smoke_output=smoke,
        seconds=round(time.monotonic() - started, 3),
    )


def _engines(server: fleet.Server) -> str:
    return ", ".join(f"{e.url} (node {e.node_ip})" for e in server.endpoints)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


def approve_rollout(version: PublishedVersion, cfg: RolloutConfig) -> bool:
    """With cfg.require_approval, pause the flow run until someone answers the form the
    Prefect UI shows on it; True when traffic may move."""
    if not cfg.require_approval:
        return True
    log = get_run_logger()
    record_markdown(
        version.model,
        "approval",
        (
            f"# Waiting for approval: {version.model} {version.version}\n\n"
            f"Published and gated ({version.scheme}, {version.bytes / 1e6:.1f} MB, "
            f"`{version.prefix}`). Resume this run in the Prefect UI and answer the form to move "
            f"traffic to it; the run fails if nobody answers within "
            f"{cfg.approval_timeout_seconds} s.\n"
        ),
        f"{version.version} awaits approval",
    )
    log.info(
        "%s %s is published; waiting for approval before traffic moves (resume the run "
        "in the Prefect UI)",
        version.model,
        version.version,
    )
    answer = pause_flow_run(
        wait_for_input=RolloutApproval,
        timeout=cfg.approval_timeout_seconds,
        poll_interval=get_settings().approval_poll_interval_s,
    )
    log.info(
        "rollout of %s %s %s: %s",
        version.model,
        version.version,
        "approved" if answer.approve else "declined",
        answer.note or "(no note)",
    )
    return answer.approve


@task(name="rollout", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def rollout_task(
    version: PublishedVersion,
    cfg: RolloutConfig,
    serving: ServingConfig | None = None,
    allow_ungated: bool = False,
    reason: str = "",
) -> RolloutResult:
    result = rollout(version, cfg, serving=serving, allow_ungated=allow_ungated, reason=reason)
    logger = get_run_logger()
    if result.changed:
        logger.info(
            "%s %s is live at %s (was %s), served by %s; switch %.3f s",
            result.model,
            result.version,
            result.gateway,
            result.previous or "nothing",
            result.upstream,
            result.switch_seconds,
        )
    else:
        logger.info(
            "%s %s is already live and healthy: nothing to do", result.model, result.version
        )
    steps = (
        " -> ".join(f"{s.percent:g}% ({s.requests} req, {s.errors} err)" for s in result.steps)
        or "none"
    )
    record_stage_artifact(
        version.model,
        StageOutput(
            stage="rollout",
            key=version.version,
            prefix=version.prefix,
            digest=version.digest,
            files=version.files,
            bytes=version.bytes,
        ),
        {
            "live version": result.version,
            "previous": result.previous or "-",
            "changed": result.changed,
            "server": result.upstream
            + ("" if result.started_server or not result.changed else " (was warm)"),
            "canary steps": steps,
            "switch seconds": result.switch_seconds,
            "previous kept warm until": result.previous_warm_until or "-",
            "gateway": result.gateway,
            "seconds": result.seconds,
        },
        f"{result.model} {result.version} live" + ("" if result.changed else " (unchanged)"),
    )
    return result
