"""The servers the two gates evaluate and measure through, from the fleet (serving/fleet.py).

Each build is served as it will serve (its ServeSpec). The candidate's server is deployed
under the version's serving name and kept after the gates (settings.keep_evaluated_server_s),
so a passing candidate takes traffic without a second load (minutes for 70B on GPUs); the
baseline's is kept only for the performance gate, then stopped.
"""

from __future__ import annotations

from typing import Any

from llmship import events
from llmship.contracts import Build, Side
from llmship.pipeline_config import ServingConfig
from llmship.settings import Settings, get_settings
from serving import fleet
from serving.directory import eval_app_name
from serving.gateway_admin import serves_traffic
from serving.replica import ReplicaSpec


def keeps_for_rollout(side: Side) -> bool:
    return side is Side.CANDIDATE and get_settings().keep_evaluated_server_s > 0


def server_spec(build: Build, model: str, side: Side) -> ReplicaSpec:
    keep = keeps_for_rollout(side)
    return ReplicaSpec(
        app=fleet.app_name(model, build.version) if keep else eval_app_name(model, build.version),
        model=model,
        version=build.version,
        role="serving" if keep else "evaluation",
        prefix=build.prefix,
        serve=build.details.serve,
    )


def take_server(settings: Settings, spec: ReplicaSpec) -> tuple[fleet.Server, bool, bool]:
    """The build's server: (server, started here, was kept warm before). A running server is
    taken as it runs: a live version's replicas stay as they are."""
    before = fleet.find(settings, spec.model, spec.version, spec.app)
    as_it_runs = before is not None and before.status == "RUNNING"
    server, started = fleet.acquire(
        settings, spec, None if as_it_runs else ServingConfig(replicas=1)
    )
    return server, started, before is not None and before.warm_until is not None


def release_server(settings: Settings, model: str, build: Build, side: Side) -> None:
    """The server kept for the build's side stops, unless traffic reaches it."""
    spec = server_spec(build, model, side)
    kept = fleet.find(settings, model, spec.version, spec.app)
    if kept and serves_traffic(settings, model, kept.version) is False:
        fleet.release(settings, kept)


def release_kept(settings: Settings, model: str, candidate: Build, baseline: Build) -> None:
    """A failed gate: the servers kept for the next stages stop, unless traffic reaches one."""
    for build, side in ((candidate, Side.CANDIDATE), (baseline, Side.BASELINE)):
        release_server(settings, model, build, side)


def announce_refusal(
    model: str, candidate: Build, baseline: Build, event: str, payload: dict[str, Any]
) -> None:
    """A gate refused the candidate and no other candidate of the run passed: the servers kept
    for the next stages stop (no rollout will take them), and the event the alert automation
    listens for goes out (llmship/alerts.py)."""
    release_kept(get_settings(), model, candidate, baseline)
    events.emit(
        event,
        model,
        {
            "model": model,
            "candidate": candidate.prefix,
            "candidate_version": candidate.version,
            **payload,
        },
    )
