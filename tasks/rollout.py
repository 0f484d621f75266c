"""Stage 6, rollout: serve a published version and move the gateway's traffic to it.

    the version's servers from the fleet (started, or the warm ones reused) -> smoke test of
    every replica -> canary steps (tasks/canary.py), each baked and judged on
    the gateway's own metrics -> switch -> `live`/`previous` aliases (compare-and-swap) ->
    the old version kept warm for a while (the fleet stops it then), older ones stopped

A canary step that breaches its limits (error rate, p99 latency, a server that stops
answering) sends all traffic back to the version that served before, stops the new server and
fails with the numbers: a bad version goes back by itself. Any other failure before the live
alias has moved (the commit point) does the same. A version already live (the alias says so
and the gateway routes to its healthy server) is left alone.

`rollout` is the stage, one named step per line of the picture above; `rollout_task` adds the
retry and the Prefect artifacts.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from prefect import get_run_logger, pause_flow_run, task
from prefect.input import RunInput
from pydantic import BaseModel, Field

from llmship import events
from llmship.contracts import StageOutput
from llmship.errors import CanaryFailed
from llmship.pipeline_config import RolloutConfig, ServingConfig
from llmship.serving_messages import Route
from llmship.settings import Settings, get_settings
from llmship.store import ArtifactStore
from llmship.versions import PublishedVersion, check_servable, read_signed_version
from serving import fleet
from serving.gateway_admin import route_of, route_traffic
from tasks.canary import run_canary
from tasks.canary_rule import StepResult, render_steps
from tasks.common import (
    record_markdown,
    record_stage_artifact,
    retry_unless_permanent,
)

SMOKE_PROMPT = "Hello"


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
    # Each replica's cold start by phase (Endpoint.cold_start; a warm server's: when the gate
    # started it).
    cold_starts: list[str] = []
    seconds: float


class RolloutApproval(RunInput):
    """The form the Prefect UI shows on a run paused before its traffic moves."""

    approve: bool = Field(description="move traffic to the new version")
    note: str = Field("", description="why; kept in the run's logs")


# ------------------------------------------------------------------ the rollout


def check_gated(
    stored: PublishedVersion | None, version: PublishedVersion, allow_ungated: bool
) -> PublishedVersion:
    """The version as the store has it now (not as the run that published it saw it)."""
    return check_servable(stored, version.model, version.version, allow_ungated)


class TrafficBefore(BaseModel):
    """Where the model's traffic is as a rollout starts."""

    route: Route | None  # the gateway's route for the model (serving/gateway_admin.py)
    server: fleet.Server | None  # the version's own servers, if they run
    live_alias: str | None
    routed: bool  # the gateway sends all of the model's traffic to the version already

    @property
    def serving(self) -> str | None:
        """The version that takes the traffic now, when it is not the new one."""
        return self.route.version if self.route and not self.routed else None

    def previous(self, version: str) -> str | None:
        """The version traffic leaves. A live version with no running server is not routed,
        but traffic still leaves it."""
        was_live = self.serving if self.route and not self.routed else self.live_alias
        return was_live if was_live != version else None


def traffic_before(
    settings: Settings, store: ArtifactStore, version: str, model: str
) -> TrafficBefore:
    current = route_of(settings, model)
    return TrafficBefore(
        route=current,
        server=fleet.find(settings, model, version),
        live_alias=store.read_alias(model, "live"),
        routed=current is not None and current.version == version and not current.canary,
    )


def is_live(before: TrafficBefore, version: str) -> bool:
    """Already live: the gateway routes to its running servers AND the alias (what a gateway
    restart routes by) says so. A gateway that routes it under a stale alias (an alias move
    that failed after the switch) is finished by the rollout: the alias moves, nothing else."""
    return (
        before.routed
        and before.live_alias == version
        and before.server is not None
        and fleet.is_healthy(before.server)
    )


def take_servers(
    settings: Settings,
    version: PublishedVersion,
    stored: PublishedVersion,
    serving: ServingConfig | None,
    log,
) -> tuple[fleet.Server, bool]:
    """The version's servers from the fleet: (server, started here; False: a warm one)."""
    spec = fleet.spec_for_version(version.model, version.version, stored.serve)
    log.info("%s %s: asking the fleet for its servers", version.model, version.version)
    server, started_server = fleet.acquire(settings, spec, serving)
    log.info(
        "%s %s %s: %s",
        version.model,
        version.version,
        "started" if started_server else "was warm",
        _engines(server),
    )
    return server, started_server


def switch(
    settings: Settings,
    store: ArtifactStore,
    stored: PublishedVersion,
    previous: str | None,
    allow_ungated: bool,
    reason: str,
) -> float:
    """All traffic to the version, then the aliases; the seconds the gateway took to switch."""
    model = stored.model
    switch_started = time.monotonic()
    route_traffic(settings, model, stored.version)
    switch_seconds = time.monotonic() - switch_started
    # The commit point: the live alias is what a restarted gateway routes by. Until it has
    # moved, a failure puts traffic back where it was.
    # Aliases name only published versions: traffic may leave one that is not (a route
    # from a hand-edited alias), and the previous alias then stays where it was.
    if previous and store.is_published(model, previous):
        store.move_alias(model, "previous", previous, reason=reason)
    store.move_alias(
        model,
        "live",
        stored.version,
        reason=reason,
        ungated_override=allow_ungated and not stored.gate_passed,
    )
    return switch_seconds


def roll_back(
    settings: Settings,
    version: PublishedVersion,
    before: TrafficBefore,
    server: fleet.Server,
    previous: str | None,
    exc: Exception,
) -> None:
    """A failure before the commit point: traffic back where it was, the new servers let go
    of, and a breached canary announced (llmship.rollout.rolled-back)."""
    if before.routed:
        # It served before this rollout and serves still: only the alias failed.
        fleet.let_go(settings, server)
        return
    if before.route:  # all traffic back where it was, before anything else
        route_traffic(settings, version.model, before.serving)
    fleet.release(settings, server)
    if isinstance(exc, CanaryFailed):
        events.emit(
            events.ROLLED_BACK,
            version.model,
            {
                "model": version.model,
                "version": version.version,
                "back_on": previous,
                "reason": str(exc),
                # No prompts or answers in an event: the examples stay in the bucket.
                "steps": [s.model_dump(exclude={"quality": {"examples"}}) for s in exc.steps],
            },
        )


def settle_others(
    settings: Settings, model: str, version: str, previous: str | None, cfg: RolloutConfig
) -> str | None:
    """The previous version's servers kept warm for a while, older ones stopped; when the
    previous one's warm period ends."""
    warm_until = None
    for other in fleet.running(settings, model):
        if other.version == version or other.role != "serving":
            continue
        if other.version == previous:
            deadline = fleet.keep_warm(settings, other, cfg.keep_previous_warm_seconds)
            warm_until = _iso(deadline) if deadline else None
        else:
            fleet.release(settings, other)
    return warm_until


def rollout(
    version: PublishedVersion,
    cfg: RolloutConfig,
    *,
    serving: ServingConfig | None = None,
    allow_ungated: bool = False,
    reason: str = "",
    log=None,
) -> RolloutResult:
    """The version live behind the gateway (module docstring); RolloutResult says how."""
    log = log or get_run_logger()
    settings = get_settings()
    store = ArtifactStore(settings)
    started = time.monotonic()
    stored = check_gated(
        read_signed_version(store, version.model, version.version), version, allow_ungated
    )
    before = traffic_before(settings, store, version.version, version.model)
    result = RolloutResult(
        model=version.model,
        version=version.version,
        previous=None,
        upstream="",
        gateway=settings.gateway_url,
        changed=False,
        seconds=0.0,
    )
    if is_live(before, version.version):
        return finished(result, before.server, started, log)
    server, started_server = take_servers(settings, version, stored, serving, log)
    previous = before.previous(version.version)
    try:
        smoke = fleet.smoke_test(server, SMOKE_PROMPT)
        steps = run_canary(settings, store, server, before.serving, previous, cfg, log)
        switch_seconds = switch(settings, store, stored, previous, allow_ungated, reason)
    except Exception as exc:
        roll_back(settings, version, before, server, previous, exc)
        raise
    fleet.let_go(settings, server)  # it serves: the directory's warm rule no longer applies
    result = result.model_copy(
        update={
            "previous": previous,
            "changed": True,
            "started_server": started_server,
            "steps": steps,
            "switch_seconds": round(switch_seconds, 4),
            "previous_warm_until": settle_others(
                settings, version.model, version.version, previous, cfg
            ),
            "smoke_output": smoke,
            "cold_starts": [e.cold_start() for e in server.endpoints],
        }
    )
    return finished(result, server, started, log)


def finished(result: RolloutResult, server: fleet.Server, started: float, log) -> RolloutResult:
    """The result with its engines and time, logged."""
    result = result.model_copy(
        update={"upstream": _engines(server), "seconds": round(time.monotonic() - started, 3)}
    )
    if result.changed:
        log.info(
            "%s %s is live at %s (was %s), served by %s; switch %.3f s",
            result.model,
            result.version,
            result.gateway,
            result.previous or "nothing",
            result.upstream,
            result.switch_seconds,
        )
    else:
        log.info("%s %s is already live and healthy: nothing to do", result.model, result.version)
    return result


def _engines(server: fleet.Server) -> str:
    return ", ".join(f"{e.url} (node {e.node_ip})" for e in server.endpoints)


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


# ------------------------------------------------------------------ the Prefect task


def record_steps(
    version: PublishedVersion, steps: list[StepResult], outcome: str, title: str
) -> None:
    record_markdown(
        version.model,
        "rollout-steps",
        render_steps(version.model, version.version, steps, outcome),
        title,
    )


def record_rollout(version: PublishedVersion, result: RolloutResult) -> None:
    """The rollout's keyed table: what is live now, and how it got there."""
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
            "replicas' cold start": "; ".join(result.cold_starts) or "-",
            "canary steps": steps,
            "switch seconds": result.switch_seconds,
            "previous kept warm until": result.previous_warm_until or "-",
            "gateway": result.gateway,
            "seconds": result.seconds,
        },
        f"{result.model} {result.version} live" + ("" if result.changed else " (unchanged)"),
    )


@task(name="rollout", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_permanent)
def rollout_task(
    version: PublishedVersion,
    cfg: RolloutConfig,
    serving: ServingConfig | None = None,
    allow_ungated: bool = False,
    reason: str = "",
) -> RolloutResult:
    try:
        result = rollout(version, cfg, serving=serving, allow_ungated=allow_ungated, reason=reason)
    except CanaryFailed as exc:
        record_steps(version, exc.steps, str(exc), f"{version.version} rolled back")
        raise
    if result.steps:
        record_steps(version, result.steps, "passed", f"{version.version} passed its canary")
    record_rollout(version, result)
    return result
