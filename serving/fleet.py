"""The fleet: the one owner of model servers. The gate, the rollout, the rollback, `llmship
status` and the gateway ask it; nothing else starts or stops a model server.

    acquire(spec)        a version's servers, started if not running (reused if they are)
    find / running       what serves now: versions, their replicas, the node of each
    release(server)      stop a version's servers
    keep_warm(server, s) stop them in s seconds unless traffic comes back (a rollback's
                         warm target); cancelled by the next acquire
    let_go(server)       the run that acquired them is done with them (they serve)
    scale(server, n)     change the replica count in place

Each served version is a Ray Serve application of ModelReplica (serving/replica.py) named
`<model>--<version>`; a gate's evaluation server of a build that will not serve is
`eval--<model>--<build key>`. Ray places the replicas, replaces those that fail their health
check, and keeps the applications when the flow run that made them ends: a version outlives
the run that rolled it out. The applications are the Serve controller's; llmship keeps no
record of its own.

The directory (serving/directory.py) is a detached Ray actor that knows the engine address of
every replica (each registers itself once its engine is healthy), drops replicas that are
gone, and stops versions whose warm period is over and that no gateway reports it routes to.
The gateway reads it to relay requests straight to an engine.

Holds: the process that acquires a version's servers holds them until it releases them, keeps
them warm or lets them go (they serve), renewing the hold from a thread of its own
(settings.server_hold_lease_s). A run cancelled, or whose process is killed, while its
target's replica deploys stops renewing: its hold runs out, the directory gives the servers a
warm deadline of now and stops them, unless a gateway routes traffic to them (issue 27: such
servers ran on with no deadline, a model's worth of memory each).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection

from pydantic import BaseModel

from llmship import ray_cluster
from llmship.contracts import ServeSpec
from llmship.errors import EngineArgumentRefused, IntegrityError, ServingError, UngatedVersion
from llmship.manifest import digest_of
from llmship.pipeline_config import AutoscalingBlock, ServingConfig
from llmship.serving_messages import Deployed, Endpoint, Snapshot
from llmship.settings import Settings
from serving import engines
from serving.autoscale import ray_autoscaling_config
from serving.directory import app_name, directory, parse_app_name
from serving.directory import gateways as gateways_heard
from serving.replica import ReplicaSpec

log = logging.getLogger("llmship.fleet")


class Server(BaseModel):
    """A version's model servers: one Serve application and its replicas."""

    app: str
    model: str
    version: str
    role: str
    status: str  # Serve's: DEPLOYING, RUNNING, UNHEALTHY, DEPLOY_FAILED, DELETING
    replicas: int  # the count asked for
    endpoints: list[Endpoint] = []
    warm_until: float | None = None
    message: str = ""

    @property
    def url(self) -> str:
        """One replica's engine: what a smoke test or an evaluation talks to."""
        if not self.endpoints:
            raise ServingError(f"{self.app} has no running replica")
        return self.endpoints[0].url


# ------------------------------------------------------------------ what callers use


def gateways(settings: Settings) -> list[str]:
    """The gateways relaying to this fleet: those heard from within gateway.seen_within_s."""
    _connect(settings)  # first: Ray reads the cluster's settings when it is imported
    return gateways_heard(settings)


def _connect(settings: Settings) -> None:
    ray_cluster.connect(settings)
    from ray import serve

    # serve.start says at INFO, at every call, that Serve is running already: in `llmship
    # status` and every flow run's log. Its warnings and errors still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # No Serve HTTP proxy: requests reach the engines through the gateway, directly.
    serve.start(proxy_location="Disabled")


def _statuses() -> dict:
    from ray import serve

    return serve.status().applications


def _servers(statuses: dict, snap: Snapshot, model: str | None = None) -> list[Server]:
    servers = []
    for app, status in statuses.items():
        parsed = parse_app_name(app)
        if parsed is None or (model is not None and parsed[0] != model):
            continue
        deployment = next(iter(status.deployments.values()), None)
        counts = (deployment.replica_states or {}) if deployment else {}
        # The application's message says that it failed; its deployment's, why (the
        # replica's exception: the engine's exit and its last log lines).
        message = "\n".join(
            filter(None, [status.message, deployment.message if deployment else ""])
        )
        servers.append(
            Server(
                app=app,
                model=parsed[0],
                version=parsed[1],
                role=parsed[2],
                status=str(getattr(status.status, "value", status.status)),
                replicas=sum(counts.values()),
                endpoints=snap.endpoints.get(app, []),
                warm_until=snap.warm_until.get(app),
                message=message,
            )
        )
    return sorted(servers, key=lambda s: s.app)


def running(settings: Settings, model: str | None = None) -> list[Server]:
    """Every version with model servers (evaluation servers too), with its replicas."""
    _connect(settings)
    import ray

    snap = Snapshot.model_validate(ray.get(directory().snapshot.remote()))
    return _servers(_statuses(), snap, model)


def find(settings: Settings, model: str, version: str, app: str | None = None) -> Server | None:
    app = app or app_name(model, version)
    return next((s for s in running(settings, model) if s.app == app), None)


def is_healthy(server: Server) -> bool:
    """Running, with every replica asked for registered (each registers once healthy)."""
    return server.status == "RUNNING" and len(server.endpoints) >= max(server.replicas, 1)


def spec_for_version(model: str, version: str, serve: ServeSpec) -> ReplicaSpec:
    """How a published version is served: as its build said (the version's ServeSpec)."""
    from llmship.store import version_prefix

    return ReplicaSpec(
        app=app_name(model, version),
        model=model,
        version=version,
        role="serving",
        prefix=version_prefix(model, version),
        serve=serve,
    )


def acquire(
    settings: Settings,
    spec: ReplicaSpec,
    serving: ServingConfig | None = None,
    timeout_s: float | None = None,
) -> tuple[Server, bool]:
    """The version's servers, running and healthy: (server, started). A running application
    is reused (its warm period, if any, cancelled), else deployed and waited for. serving:
    the replica count and spread; None (a rollback) takes those of the model's other
    versions, as last deployed."""
    _connect(settings)
    import ray

    existing = find(settings, spec.model, spec.version, spec.app)
    if existing and existing.status == "RUNNING":
        ray.get(directory().set_warm_until.remote(spec.app, None))
        hold(settings, spec.app)
        deployed = ray.get(directory().deployed.remote(spec.app))
        if serving is not None and (
            deployed is None
            or placement(ServingConfig.model_validate(deployed.serving)) != placement(serving)
        ):
            # In place: with the spec it runs (the gate's candidate server runs its build's
            # copy under the version's name), Serve only adds or removes replicas.
            running_spec = ReplicaSpec.model_validate(deployed.spec) if deployed else spec
            return _redeploy(settings, running_spec, serving), False
        return _wait_ready(settings, spec.app, timeout_s or 60.0), False
    _deploy(settings, spec, serving or _placement_like(spec.model))
    # Before the wait: a run killed or cancelled while the replicas start lets them go.
    hold(settings, spec.app)
    # Fetching the version to each node and the engine's start, on top of Serve's own.
    return _wait_ready(settings, spec.app, timeout_s or settings.server_start_timeout_s + 120), True


def _deploy(settings: Settings, spec: ReplicaSpec, serving: ServingConfig) -> None:
    import ray
    from ray import serve

    from serving.replica import deployment as replica_deployment

    # Refused here, before Serve is asked, as the replica refuses them again at the command
    # line (serving/engines.py): every path that deploys (rollout, rollback, restore, the
    # gateway's reconcile, scale) comes through here.
    engines.checked_engine_args(
        spec.serve.target, spec.serve.engine_args, f"{spec.model} {spec.version}"
    )
    # The build's engine arguments say how many GPUs one engine spans: they are what it runs.
    gpus = engines.gpus_per_server(spec.serve.engine_args) if settings.device == "cuda" else 0
    # Serve's autoscaler on the engines' queues (serving/autoscale.py), a fixed count as
    # min = max: a replica reports its engine's load only if it started autoscaled, and a
    # version switched to autoscaling in place (its running replicas kept) must report.
    block = serving.autoscaling or AutoscalingBlock(
        min_replicas=serving.replicas, max_replicas=serving.replicas
    )
    deployment = replica_deployment().options(
        name="engine",
        autoscaling_config=ray_autoscaling_config(block),
        max_replicas_per_node=serving.max_replicas_per_node,
        # On CPU a replica asks Ray for no CPU: vLLM's CPU engine takes what the OS gives it,
        # and a rollout runs several side by side. On CUDA, its GPUs.
        ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
        # An engine that fails to load mostly fails again: two tries per replica, then the
        # deployment is DEPLOY_FAILED with the engine's own words in its message.
        max_constructor_retry_count=2,
    )
    # Serve gives an imperative deployment a new code version at every deploy, and so new
    # replicas: each a new engine load, for what is only a change of the replica count. With
    # the spec as its version the running replicas stay, and Serve adds or removes some.
    # (`version` is no longer a public option of Deployment.options: hence _internal.)
    deployment = deployment.options(
        version=digest_of(spec.model_dump(mode="json"))[:16], _internal=True
    )
    log.info("deploying %s: %s, %g GPU(s) each", spec.app, describe_count(serving), gpus)
    ray.get(
        directory().set_deployed.remote(
            spec.app,
            Deployed(spec=spec.model_dump(mode="json"), serving=serving.model_dump(mode="json")),
        )
    )
    # Not serve.run: it waits for the application without a limit; _wait_ready has one and
    # says what failed.
    serve._run(
        deployment.bind(spec.model_dump(mode="json")),
        name=spec.app,
        route_prefix=None,
        _blocking=False,
    )


def _placement_like(model: str) -> ServingConfig:
    import ray

    for app, deployed in ray.get(directory().all_deployed.remote()).items():
        parsed = parse_app_name(app)
        if parsed and parsed[0] == model and parsed[2] == "serving":
            return ServingConfig.model_validate(deployed.serving)
    return ServingConfig()


def reconcile(
    settings: Settings, live: dict[str, str], ungated_override: Collection[str] = ()
) -> list[str]:
    """Deploy every live version that has no servers (after the cluster restarted, or the
    servers of a version were lost): the S3 `live` aliases are what should serve, by the
    rollout's own rule (versions.check_servable): a version without a passing gate only for
    the models in ungated_override, whose alias records an operator's override. Returns the
    applications deployed; does not wait for them."""
    from llmship.store import ArtifactStore
    from llmship.versions import check_servable, read_signed_version

    _connect(settings)
    apps = {s.app for s in running(settings)}
    store = ArtifactStore(settings)
    started = []
    for model, version in live.items():
        if app_name(model, version) in apps:
            continue
        try:
            published = check_servable(
                read_signed_version(store, model, version),
                model,
                version,
                model in ungated_override,
            )
        except (UngatedVersion, IntegrityError) as exc:
            log.error("%s's live version %s is not deployed: %s", model, version, exc)
            continue
        spec = spec_for_version(model, version, published.serve)
        log.warning("%s's live version %s has no servers: deploying it", model, version)
        try:
            _deploy(settings, spec, _placement_like(model))
        except EngineArgumentRefused as exc:
            log.error("%s's live version is not served: %s", model, exc)
            continue
        started.append(spec.app)
    return started


def _wait_ready(settings: Settings, app: str, timeout_s: float) -> Server:
    deadline = time.monotonic() + timeout_s
    model, version, _ = parse_app_name(app)
    while True:
        server = find(settings, model, version, app)
        if server and is_healthy(server):
            return server
        if server and server.status == "DEPLOY_FAILED":
            _delete(app)
            raise ServingError(f"{app} could not start: {_shorten(server.message)}")
        if time.monotonic() > deadline:
            message = _shorten(server.message) if server else "it is not deployed"
            raise ServingError(
                f"{app} was not healthy within {timeout_s:.0f} s "
                f"({server.status if server else '-'}, "
                f"{len(server.endpoints) if server else 0} replica(s) up): "
                f"{message}"
            )
        time.sleep(1.0)


def _shorten(message: str, limit: int = 6000) -> str:
    """A failure's message, its head (what failed) and its tail (the engine's last words)."""
    if len(message) <= limit:
        return message
    return f"{message[: limit // 4]}\n[...]\n{message[-(limit * 3 // 4) :]}"


def _delete(app: str) -> None:
    import ray
    from ray import serve

    _unheld(app)
    serve.delete(app, _blocking=True)
    ray.get(directory().forget.remote(app))


def release(settings: Settings, server: Server) -> None:
    """Stop a version's servers (every replica, on every node)."""
    _connect(settings)
    log.info("stopping %s", server.app)
    _delete(server.app)


def keep_warm(settings: Settings, server: Server, seconds: float) -> float | None:
    """Stop server in seconds (at once for 0), unless traffic is back on it by then, or an
    acquire takes it; returns the deadline (unix time)."""
    if seconds <= 0:
        release(settings, server)
        return None
    _connect(settings)
    import ray

    _unheld(server.app)
    deadline = time.time() + seconds
    ray.get(directory().set_warm_until.remote(server.app, deadline))
    return deadline


# ------------------------------------------------------------------ holds

_holds_lock = threading.Lock()
_held: set[str] = set()  # the applications this process holds
_renewer: threading.Thread | None = None


def hold(settings: Settings, app: str) -> None:
    """This process holds app's servers until it releases them, keeps them warm or lets them
    go: renewed every third of server_hold_lease_s while the process lives. A hold that runs
    out has the directory stop them, unless traffic is on them."""
    import ray

    global _renewer
    lease_s = settings.server_hold_lease_s
    ray.get(directory().hold.remote(app, lease_s))
    with _holds_lock:
        _held.add(app)
        if _renewer is None or not _renewer.is_alive():
            _renewer = threading.Thread(
                target=_renew_holds, args=(lease_s,), name="llmship-fleet-holds", daemon=True
            )
            _renewer.start()


def let_go(settings: Settings, server: Server) -> None:
    """The caller is done with server (it serves now): no hold on it any more."""
    _connect(settings)
    import ray

    _unheld(server.app)
    ray.get(directory().let_go.remote(server.app))


def _unheld(app: str) -> None:
    with _holds_lock:
        _held.discard(app)


def _renew_holds(lease_s: float) -> None:
    import ray

    while True:
        time.sleep(lease_s / 3)
        with _holds_lock:
            apps = sorted(_held)
        for app in apps:
            try:
                ray.get(directory().hold.remote(app, lease_s), timeout=lease_s / 3)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not renew the hold on %s: %s", app, exc)


def scale(settings: Settings, server: Server, replicas: int) -> Server:
    """Change a running version's replica count in place: its running replicas keep serving.
    An autoscaled version is fixed at that count (a rollout with an autoscaling block
    autoscales it again)."""
    _connect(settings)
    if replicas < 1:
        raise ServingError(
            f"{replicas} replicas: a served version needs at least 1 "
            "(`llmship rollback` or a new rollout moves traffic off it)"
        )
    running, serving = _deployed(server)
    if serving.autoscaling:
        log.info(
            "%s autoscaled (%s): fixed at %d replica(s) now",
            server.app,
            describe_count(serving),
            replicas,
        )
    return _redeploy(
        settings, running, serving.model_copy(update={"replicas": replicas, "autoscaling": None})
    )


def placement(serving: ServingConfig) -> dict:
    """How many replicas of a version run, and how they spread: what a redeploy changes in
    place (the engine's settings are the build's, and make a new version)."""
    return serving.model_dump(include={"replicas", "max_replicas_per_node", "autoscaling"})


def describe_count(serving: ServingConfig) -> str:
    if block := serving.autoscaling:
        return (
            f"{block.min_replicas}-{block.max_replicas} replicas (autoscaled, "
            f"{block.target_ongoing_requests:g} requests per engine)"
        )
    return f"{serving.replicas} replica(s)"


def _deployed(server: Server) -> tuple[ReplicaSpec, ServingConfig]:
    """The spec a running version was deployed with, and its serving block."""
    import ray

    deployed = ray.get(directory().deployed.remote(server.app))
    if deployed is None:
        raise ServingError(
            f"the fleet does not know how {server.app} was deployed (the "
            "cluster restarted under it): roll it out again"
        )
    return (
        ReplicaSpec.model_validate(deployed.spec),
        ServingConfig.model_validate(deployed.serving),
    )


def _redeploy(settings: Settings, running: ReplicaSpec, serving: ServingConfig) -> Server:
    """Deployed again with the spec it runs: its running replicas keep serving, Serve only
    adds or removes replicas."""
    _deploy(settings, running, serving)
    return _wait_ready(settings, running.app, settings.server_start_timeout_s + 120)


def smoke_test(server: Server, prompt: str) -> str:
    """One real completion through each replica; raises ServingError if one does not answer."""
    import httpx

    text = ""
    for endpoint in server.endpoints:
        try:
            resp = httpx.post(
                f"{endpoint.url}/v1/completions",
                timeout=60.0,
                json={"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0},
            )
        except httpx.HTTPError as exc:
            raise ServingError(
                f"{server.app}'s replica on {endpoint.node_ip} did not answer: {exc}"
            ) from exc
        if resp.status_code != 200:
            raise ServingError(
                f"{server.app}'s replica on {endpoint.node_ip} answered "
                f"{resp.status_code}: {resp.text[:500]}"
            )
        text = resp.json()["choices"][0]["text"]
    return text
