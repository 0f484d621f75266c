"""The gateway's background work: following the fleet's replicas, declaring a live version
down when it has none, and the events a starting gateway sends."""

from __future__ import annotations

import asyncio
import logging
import math

from llmship import events, ray_cluster
from llmship.serving_messages import GatewayReport, Route, Snapshot
from serving.directory import app_name, directory
from serving.gateway.state import GatewayState
from serving.observability import EngineEndpoint, engine_scrape_targets

log = logging.getLogger("llmship.gateway")


def report_refused(gw: GatewayState) -> None:
    """The event llmship.serving.refused for each live version a starting gateway would not
    serve (the alert llmship-serving-refused tells the team)."""
    for model, version, why, instead in gw.refused:
        try:
            events.emit(
                events.SERVING_REFUSED,
                model,
                {"model": model, "version": version, "reason": why, "serving": instead},
                version=version,
            )
        except Exception as exc:  # noqa: BLE001 - no Prefect: the log line and /ready remain
            log.error(
                "could not send %s to Prefect (%s: %s)",
                events.SERVING_REFUSED,
                type(exc).__name__,
                exc,
            )


def report_of(gw: GatewayState) -> GatewayReport:
    """What this gateway routes, for the directory: the versions that take each model's
    traffic (the directory retires a kept-warm version none of them routes to)."""
    return GatewayReport(
        url=gw.settings.gateway_url,
        routed={model: route.versions() for model, route in gw.routes.items()},
    )


async def follow_fleet(gw: GatewayState) -> None:
    """Keep gw.endpoints to the fleet's directory (where every replica's engine listens),
    reporting to it what this gateway routes at each refresh."""
    reconciled = False
    while True:
        try:
            await asyncio.to_thread(ray_cluster.connect, gw.settings)
            # After connect: Ray reads the cluster's settings when it is imported.
            from serving import fleet

            actor = await asyncio.to_thread(directory)
            while True:
                snap = Snapshot.model_validate(
                    await actor.snapshot.remote(report_of(gw).model_dump(mode="json"))
                )
                gw.set_endpoints(
                    {app: [e.url for e in reps] for app, reps in snap.endpoints.items()}
                )
                gw.note_starts(snap.endpoints)
                gw.set_scrape_targets(
                    engine_scrape_targets(
                        {
                            app: [EngineEndpoint(url=e.url, replica=e.replica) for e in reps]
                            for app, reps in snap.endpoints.items()
                        }
                    )
                )
                gw.fleet_known.set()
                if not reconciled:  # once: the live aliases are what should serve
                    live = {m: r.version for m, r in gw.routes.items()}
                    for app in await asyncio.to_thread(
                        fleet.reconcile, gw.settings, live, gw.ungated_override
                    ):
                        log.warning("deployed %s: a live version without servers", app)
                    reconciled = True
                await asyncio.sleep(gw.settings.gateway.endpoint_refresh_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray restarting: serve what is known
            log.warning(
                "cannot read the fleet's replicas from Ray (%s: %s): relaying to the "
                "last known ones",
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(5.0)


async def watch_live_versions(gw: GatewayState) -> None:
    """Declare a live version down once it has had no replica for gw.down_after checks more
    than Ray takes to replace one (the longest start of its replicas this gateway has seen:
    seconds for the tiny model, minutes for a 70B engine's load), and up again after
    gw.down_after checks in a row with one. Ray replaces failing replicas; this is for a
    version that cannot stay up at all. Canaries are not watched here: their rollout judges
    them.

    In a crash loop a replica registers for a moment between crashes: only a replica that
    stays up for gw.down_after checks starts the count again, and up again takes as long as
    down (else the version was declared down, an event and a rollback asked for, once per
    moment)."""
    misses: dict[tuple[str, str], int] = {}
    ups: dict[tuple[str, str], int] = {}
    while True:
        await asyncio.sleep(gw.health_interval_s)
        for model, route in list(gw.routes.items()):
            key = (model, route.version)
            up = bool(gw.replicas_of(model, route.version))
            gw.metrics.upstream_up.labels(model, route.version).set(1 if up else 0)
            if up:
                ups[key] = ups.get(key, 0) + 1
                if ups[key] >= gw.down_after:
                    misses.pop(key, None)
                    if gw.down.get(model) == route.version:
                        del gw.down[model]
                        log.warning(
                            "%s %s has had a replica for %d checks: up again",
                            model,
                            route.version,
                            gw.down_after,
                        )
                continue
            ups.pop(key, None)
            if gw.down.get(model) == route.version:
                continue  # declared already
            misses[key] = misses.get(key, 0) + 1
            replacing = gw.start_s.get(app_name(model, route.version), 0.0)
            if misses[key] >= gw.down_after + math.ceil(replacing / gw.health_interval_s):
                declare_down(gw, model, route, misses[key])


def declare_down(gw: GatewayState, model: str, route: Route, failed_checks: int) -> None:
    gw.down[model] = route.version
    seconds = failed_checks * gw.health_interval_s
    log.error(
        "%s's live version %s has had no running replica for %.0f s (%d checks): "
        "declared down; asking for a rollback to its previous version",
        model,
        route.version,
        seconds,
        failed_checks,
    )
    try:
        events.emit(
            events.SERVING_DOWN,
            model,
            {
                "model": model,
                "version": route.version,
                "failed_checks": failed_checks,
                "seconds": seconds,
            },
            version=route.version,
        )
    except Exception as exc:  # noqa: BLE001 - no Prefect: the log line and /ready remain
        log.error(
            "could not send " + events.SERVING_DOWN + " to Prefect (%s: %s): roll back by "
            "hand (`llmship rollback %s`)",
            type(exc).__name__,
            exc,
            model,
        )
