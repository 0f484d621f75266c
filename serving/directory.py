"""The fleet's directory: a detached Ray actor that knows where every replica's engine listens,
which gateways relay to the fleet and what each routes, and which versions are kept warm until
when; it retires those whose warm period is over and that no gateway routes to.

Control flows one way: replicas register with it, gateways report to it (in the refresh they
make every gateway.endpoint_refresh_s, they say what they route and get the replicas back),
and it decides retirements from those reports. It calls no gateway and no replica back.

Its records are llmship/serving_messages.py's (Endpoint, Snapshot, GatewayReport, Deployed).
It also names what it keeps: a served version is the Serve application `<model>--<version>`
(app_name), a gate's evaluation server of a build that will not serve `eval--<model>--<build
key>` (eval_app_name).
"""

from __future__ import annotations

import asyncio
import logging
import time

from llmship import ray_cluster
from llmship.serving_messages import Deployed, Endpoint, GatewayReport, Snapshot
from llmship.settings import Settings, get_settings

log = logging.getLogger("llmship.fleet")
DIRECTORY = "llmship-fleet-directory"
EVAL_PREFIX = "eval--"


def app_name(model: str, version: str) -> str:
    """The Serve application that serves model's version."""
    return f"{model}--{version}"


def eval_app_name(model: str, build_key: str) -> str:
    return f"{EVAL_PREFIX}{model}--{build_key}"


def parse_app_name(app: str) -> tuple[str, str, str] | None:
    """(model, version or build key, role) of an application llmship made; None otherwise."""
    role = "evaluation" if app.startswith(EVAL_PREFIX) else "serving"
    model, sep, version = app.removeprefix(EVAL_PREFIX).rpartition("--")
    return (model, version, role) if sep and model else None


class Directory:
    """Where each application's replicas' engines are, and which applications are kept warm
    until when. Lives on the head node, detached: it outlives every client. Should it be
    restarted, the replicas register again at their next health check (every 5 s) and the
    gateways report again at their next refresh; the warm deadlines it held are lost, and
    those versions stay up until released."""

    PRUNE_INTERVAL_S = 1.0

    def __init__(self) -> None:
        self.endpoints: dict[str, dict[str, Endpoint]] = {}  # app -> replica -> endpoint
        self.actors: dict[tuple[str, str], object] = {}
        self.warm_until: dict[str, float] = {}
        self.deployments: dict[str, Deployed] = {}  # app -> the spec and serving it runs
        self.gateways: dict[str, float] = {}  # gateway URL -> when it last reported
        self.reports: dict[str, GatewayReport] = {}  # gateway URL -> its last report
        self.held_until: dict[str, float] = {}  # app -> until when its acquirer holds it
        self._loop = asyncio.get_event_loop().create_task(self._maintain())

    async def register(self, app: str, endpoint: Endpoint | dict, actor) -> None:
        endpoint = Endpoint.model_validate(endpoint)
        self.endpoints.setdefault(app, {})[endpoint.replica] = endpoint
        self.actors[(app, endpoint.replica)] = actor

    async def unregister(self, app: str, replica: str) -> None:
        self.endpoints.get(app, {}).pop(replica, None)
        self.actors.pop((app, replica), None)

    async def forget(self, app: str) -> None:
        for replica in list(self.endpoints.pop(app, {})):
            self.actors.pop((app, replica), None)
        self.warm_until.pop(app, None)
        self.held_until.pop(app, None)
        self.deployments.pop(app, None)

    async def set_deployed(self, app: str, deployed: Deployed) -> None:
        self.deployments[app] = deployed

    async def deployed(self, app: str) -> Deployed | None:
        return self.deployments.get(app)

    async def all_deployed(self) -> dict[str, Deployed]:
        return dict(self.deployments)

    async def gateway_down(self, url: str) -> None:
        self.gateways.pop(url, None)
        self.reports.pop(url, None)

    async def live_gateways(self, seen_within_s: float) -> list[str]:
        now = time.time()
        return sorted(url for url, seen in self.gateways.items() if now - seen <= seen_within_s)

    async def snapshot(self, report: GatewayReport | dict | None = None) -> dict:
        """Where every replica's engine listens (a Snapshot, as JSON: across processes the
        messages travel as JSON, so a gateway or a flow of another llmship version still reads
        them; Ray's pickles of a model whose fields changed do not); a gateway asking reports
        what it routes (and so that it is up)."""
        if report is not None:
            report = GatewayReport.model_validate(report)
            self.gateways[report.url] = time.time()
            self.reports[report.url] = report
        return Snapshot(
            endpoints={app: list(reps.values()) for app, reps in self.endpoints.items() if reps},
            warm_until=dict(self.warm_until),
        ).model_dump(mode="json")

    async def set_warm_until(self, app: str, deadline: float | None) -> None:
        if deadline is None:
            self.warm_until.pop(app, None)
        else:
            self.warm_until[app] = deadline
            self.held_until.pop(app, None)  # kept warm: the deadline decides now

    async def hold(self, app: str, lease_s: float) -> None:
        """app's acquirer holds it for lease_s more (this actor's clock: no skew between
        hosts)."""
        self.held_until[app] = time.time() + lease_s

    async def let_go(self, app: str) -> None:
        self.held_until.pop(app, None)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.PRUNE_INTERVAL_S)
            try:
                await self._prune()
                await self._retire()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("directory maintenance failed")

    async def _prune(self) -> None:
        """Drop replicas whose actor is gone (killed, or its node lost): they cannot say so."""
        import ray

        for (app, replica), actor in list(self.actors.items()):
            try:
                await asyncio.wait_for(actor.__ray_ready__.remote(), timeout=5.0)
            except TimeoutError:
                continue  # busy, not gone
            except ray.exceptions.RayActorError:
                log.warning("replica %s of %s is gone", replica, app)
                await self.unregister(app, replica)

    async def _retire(self) -> None:
        from ray import serve

        now = time.time()
        for app, until in list(self.held_until.items()):
            if until > now:
                continue
            # Its acquirer stopped renewing: its process was killed, or its run cancelled,
            # before the servers took traffic or were released.
            del self.held_until[app]
            if app not in self.warm_until:
                log.warning("%s: the run that held it is gone; retiring it", app)
                self.warm_until[app] = now
        for app, deadline in list(self.warm_until.items()):
            if deadline > now:
                continue
            settings = get_settings()
            live = await self.live_gateways(settings.gateway.seen_within_s)
            if any(self.gateways[url] < deadline for url in live):
                # A report from before the deadline may be from before the route moved off
                # it: decided at the next round, on every gateway's report since.
                continue
            model, version, _ = parse_app_name(app) or (app, "", "")
            if live:
                reports = [self.reports[url] for url in live if url in self.reports]
                serving = any(report.routes_to(model, version) for report in reports)
            else:  # no gateway relays to the fleet: S3 says what should serve
                serving = await asyncio.to_thread(live_alias_is, settings, model, version)
            if serving is False:
                log.warning("stopping %s: its warm period is over", app)
                await asyncio.to_thread(serve.delete, app, False)
                await self.forget(app)
            else:
                log.warning(
                    "%s keeps running: %s",
                    app,
                    "traffic is back on it" if serving else "cannot tell whether it serves",
                )
                self.warm_until.pop(app, None)


def live_alias_is(settings: Settings, model: str, version: str) -> bool | None:
    """Whether version is model's live alias (where no gateway can say what it routes, S3 says
    what should serve); None when S3 cannot be read either."""
    try:
        from llmship.store import ArtifactStore

        return ArtifactStore(settings).read_alias(model, "live") == version
    except Exception as exc:  # noqa: BLE001 - S3 down too: the caller keeps the server
        log.warning("S3 is not reachable (%s): cannot tell whether %s serves", exc, version)
        return None


def directory():
    """The directory actor (started on first use, on the head node)."""
    import ray

    return (
        ray.remote(Directory)
        .options(
            name=DIRECTORY,
            namespace=ray_cluster.NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            # On the head, beside the Serve controller: it lives as long as the cluster does.
            resources={"node:__internal_head__": 0.001},
        )
        .remote()
    )


def gateways(settings: Settings) -> list[str]:
    """The gateways relaying to this fleet: those heard from within gateway.seen_within_s."""
    ray_cluster.connect(settings)  # first: Ray reads the cluster's settings when it is imported
    import ray

    return ray.get(directory().live_gateways.remote(settings.gateway.seen_within_s))
