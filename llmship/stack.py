"""The embedded local stack: SeaweedFS (S3), Prefect server, a process worker, a one-node Ray
cluster (the serving plane: serving/fleet.py), the gateway.

All on loopback, state under one folder (settings.state_dir), each process started and stopped
by PID (llmship.processes). `up` is idempotent: what runs already is kept. Model servers are
not the stack's: they are Ray Serve applications, and go with the Ray cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from llmship import forms, processes, ray_cluster, seaweedfs, signing
from llmship.alerts import ensure_automations
from llmship.credentials import ensure_credentials, prefect_client_settings, ray_env
from llmship.errors import StackError
from llmship.processes import http_ok, wait_until
from llmship.settings import REPO_ROOT, S3_IDENTITY_KEY_PREFIX, Settings, without_password
from llmship.store import ArtifactStore

BIN = Path(sys.executable).parent
DEMO_MODEL_DIR = REPO_ROOT / "demo" / "tiny-llama"
DEMO_MIRROR_PREFIX = "tiny-llama"


def child_env(settings: Settings) -> dict[str, str]:
    """The environment every stack process gets: the same settings, Prefect pointed at this
    stack."""
    env = dict(os.environ)
    # Every setting travels to the processes the stack starts, except the secrets: those
    # they read from the credentials file, so they never show in a process listing.
    secret = {
        "LLMSHIP_S3_ACCESS_KEY",
        "LLMSHIP_S3_SECRET_KEY",
        "LLMSHIP_GATEWAY_ADMIN_TOKEN",
        "LLMSHIP_ALERT_SLACK_WEBHOOK_URL",
        "LLMSHIP_PREFECT_API_AUTH_STRING",
        "LLMSHIP_PREFECT_DATABASE_URL",
    }
    # A mapping (LLMSHIP_HOURLY_USD) travels as the JSON it is read from.
    env.update(
        {
            name: json.dumps(value) if isinstance(value, dict) else str(value)
            for name, value in settings.as_env().items()
            if name not in secret
        }
    )
    env.update(
        {
            "LLMSHIP_REPO_ROOT": str(REPO_ROOT),
            "PREFECT_HOME": str(settings.state_dir / "prefect"),
            "PREFECT_API_URL": settings.prefect_api_url,
            "PREFECT_SERVER_API_HOST": settings.host,
            "PREFECT_SERVER_API_PORT": str(settings.prefect_port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOCAL_STORAGE_PATH": str(settings.state_dir / "prefect" / "results"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(settings.run_heartbeat_s),
            "PREFECT_LOGGING_LOG_PRINTS": "true",
            "DO_NOT_TRACK": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
    )
    # Every Ray client of the stack (flow runs, the gateway) presents the cluster's token;
    # what another stack's Ray settings left in this environment does not carry over.
    for name in [n for n in env if n.startswith("RAY_")]:
        del env[name]
    env.update(ray_env(settings))
    # This stack runs where nothing but package registries is reachable; a GPU host with hub
    # access sets HF_HUB_OFFLINE=0 (and HF_TOKEN) in its worker's environment.
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def as_identity(settings: Settings, creds: dict[str, str], identity: str) -> Settings:
    """settings signing with one of the local store's identities (llmship/seaweedfs.py)."""
    prefix = S3_IDENTITY_KEY_PREFIX[identity]
    return settings.updated(
        s3={
            "identity": identity,
            "access_key": creds[f"{prefix}_access_key"],
            "secret_key": creds[f"{prefix}_secret_key"],
        }
    )


def _require_free(settings: Settings, name: str, port: int) -> None:
    if not processes.port_is_free(settings.host, port):
        raise StackError(
            f"port {settings.host}:{port} for {name} is taken by another program; stop it, or "
            f"choose other ports (LLMSHIP_*_PORT) and state (LLMSHIP_STATE_DIR)"
        )


def start_s3(settings: Settings, creds: dict[str, str], env: dict[str, str]) -> None:
    if processes.find(settings, "seaweedfs"):
        return
    _require_free(settings, "SeaweedFS S3", settings.s3.port)
    folder = seaweedfs.write_config(settings, creds)
    rec = processes.start(
        settings,
        "seaweedfs",
        seaweedfs.argv(settings, BIN / "weed"),
        env=env,
        port=settings.s3.port,
        cwd=folder,
        umask=0o077,
    )
    # Unsigned requests are refused (403) once authentication is on: any HTTP answer means up.
    wait_until(
        lambda: httpx.get(settings.s3_url, timeout=2).status_code in (200, 403),
        rec,
        60,
        "serving S3",
        StackError,
    )
    store = ArtifactStore(settings)
    wait_until(
        lambda: store.client.list_buckets() is not None, rec, 60, "accepting S3 calls", StackError
    )


def prefect_database_env(settings: Settings) -> dict[str, str]:
    """What points the Prefect server at PostgreSQL, when settings name one: only the server's
    environment gets it (never a command line, nor the environment of the other processes).
    Unset, the server keeps its SQLite database in PREFECT_HOME."""
    if settings.prefect_database_url is None:
        return {}
    return {"PREFECT_API_DATABASE_CONNECTION_URL": settings.prefect_database_url.get_secret_value()}


def database_description(settings: Settings) -> str:
    """Where the Prefect server keeps its state, fit to print (no password)."""
    if settings.prefect_database_url is None:
        return f"SQLite {settings.state_dir / 'prefect' / 'prefect.db'}"
    return f"PostgreSQL {without_password(settings.prefect_database_url.get_secret_value())}"


def start_prefect(settings: Settings, env: dict[str, str]) -> None:
    if processes.find(settings, "prefect-server"):
        return
    _require_free(settings, "the Prefect server", settings.prefect_port)
    # The server takes its auth string from the profile in PREFECT_HOME (llmship/credentials.py);
    # its database is its owner's only.
    database = settings.state_dir / "prefect" / "prefect.db"
    if database.exists():
        os.chmod(database, 0o600)
    # Leases of concurrency slots (the build and serving slots) on disk, in PREFECT_HOME: kept
    # in memory (Prefect's default), a restart lost them while the limit still counted the
    # slot taken, and every later run of that model waited for it, for ever.
    env = {
        **env,
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": (
            "prefect.server.concurrency.lease_storage.filesystem"
        ),
        **prefect_database_env(settings),
    }
    rec = processes.start(
        settings,
        "prefect-server",
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            settings.host,
            "--port",
            str(settings.prefect_port),
        ],
        env=env,
        port=settings.prefect_port,
        umask=0o077,
    )
    wait_until(http_ok(f"{settings.prefect_api_url}/health"), rec, 120, "healthy", StackError)


def prefect_cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise StackError(
            f"`prefect {' '.join(args)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    return proc.stdout


def register_deployments(settings: Settings, env: dict[str, str]) -> None:
    # The GPU pool gets no local worker: llama3-70b runs wait there for a GPU host's worker
    # (README: "The GPU path").
    for pool in (settings.work_pool, settings.gpu_work_pool):
        try:
            prefect_cli(env, "work-pool", "inspect", pool)
        except StackError:
            prefect_cli(env, "work-pool", "create", pool, "--type", "process")
    prefect_cli(env, "deploy", "--all", "--no-prompt")
    refuse_unknown_parameters(settings)
    forms.offer_published_versions(settings)  # every model's rollback form


def refuse_unknown_parameters(settings: Settings) -> None:
    """Each deployment's parameter schema, as `prefect deploy` makes it from the flow's
    signature, allows any extra top-level parameter (the flow run then crashes on it); the
    config models below it forbid unknown fields already. Close the top level too, so the
    server refuses a misspelt parameter when the run is asked for, naming it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with prefect_client_settings(settings), get_client(sync_client=True) as client:
        for deployment in client.read_deployments():
            schema = dict(deployment.parameter_openapi_schema or {})
            if schema.get("additionalProperties") is False:
                continue
            schema["additionalProperties"] = False
            client.update_deployment(
                deployment.id, DeploymentUpdate(parameter_openapi_schema=schema)
            )


def start_worker(settings: Settings, env: dict[str, str]) -> None:
    if processes.find(settings, "prefect-worker"):
        return
    # The worker ignores one SIGTERM; SIGINT stops it (docs/FINDINGS.md, Prefect).
    processes.start(
        settings,
        "prefect-worker",
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            settings.work_pool,
            "--type",
            "process",
        ],
        env=env,
        stop_signal=signal.SIGINT,
        cwd=REPO_ROOT,
    )


def start_ray(settings: Settings, env: dict[str, str]) -> None:
    """The local one-node Ray cluster, unless LLMSHIP_RAY_ADDRESS names a cluster to use."""
    if settings.ray.address or processes.find(settings, "ray-head"):
        return
    _require_free(settings, "the Ray head (GCS)", settings.ray.port)
    folder = ray_cluster.private_dir(settings)
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    # Replicas run in the head's environment: they read versions from the store, nothing more.
    env = {**env, "LLMSHIP_S3_IDENTITY": "reader", **ray_cluster.exporter_ports(settings)}
    rec = processes.start(
        settings,
        "ray-head",
        ray_cluster.head_argv(BIN / "ray", settings),
        env=env,
        port=settings.ray.port,
        cwd=REPO_ROOT,
        umask=0o077,
    )
    wait_until(lambda: _ray_ready(settings, env), rec, 120, "accepting clients", StackError)


def _ray_ready(settings: Settings, env: dict[str, str]) -> bool:
    # `ray status` asks the GCS with the token, as every client of the cluster will.
    proc = subprocess.run(
        [str(BIN / "ray"), "status", "--address", ray_cluster.address(settings)],
        env=env,
        capture_output=True,
    )
    return proc.returncode == 0


def gateway_argv(python: Path, settings: Settings) -> list[str]:
    """The gateway's command line (the tests start it so too): serving/gateway_server.py,
    uvicorn on uvloop with httptools and the head limits of serving/gateway_http.py, waking
    once a second rather than uvicorn's ten times. uvicorn configures only its own loggers:
    serving/gateway_logging.json adds llmship's at INFO (the gateway's access and route
    lines), to the process's output, its log. uvicorn's own access log stays off: the gateway
    writes a better one (model, version, tokens)."""
    return [
        str(python),
        "-m",
        "serving.gateway_server",
        "--host",
        settings.host,
        "--port",
        str(settings.gateway.port),
    ]


def start_gateway(settings: Settings, env: dict[str, str]) -> None:
    if processes.find(settings, "gateway"):
        return
    _require_free(settings, "the gateway", settings.gateway.port)
    # The gateway only reads the store (the live aliases): it signs as the reader.
    env = {**env, "LLMSHIP_S3_IDENTITY": "reader", **ray_cluster.exporter_ports(settings)}
    rec = processes.start(
        settings,
        "gateway",
        gateway_argv(BIN / "python", settings),
        env=env,
        port=settings.gateway.port,
        cwd=REPO_ROOT,
    )
    wait_until(http_ok(f"{settings.gateway_url}/health"), rec, 60, "healthy", StackError)


def mirror_demo_model(settings: Settings) -> str:
    """Put the committed demo model into the local mirror bucket, once."""
    store = ArtifactStore(settings)
    store.ensure_bucket(settings.s3.mirror_bucket)
    if not store.list_keys(DEMO_MIRROR_PREFIX + "/", bucket=settings.s3.mirror_bucket):
        store.upload_mirror(DEMO_MODEL_DIR, settings.s3.mirror_bucket, DEMO_MIRROR_PREFIX)
    return f"s3://{settings.s3.mirror_bucket}/{DEMO_MIRROR_PREFIX}"


def up(settings: Settings, *, deployments: bool = True, say=print) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    creds = ensure_credentials(settings)
    signing.ensure_signing_key(settings)
    settings = settings.updated(
        s3={
            "access_key": settings.s3.access_key or creds["s3_access_key"],
            "secret_key": settings.s3.secret_key or creds["s3_secret_key"],
        },
        prefect_api_auth_string=creds["prefect_api_auth_string"],
    )
    env = child_env(settings)
    say(f"S3 (SeaweedFS)   http://{settings.host}:{settings.s3.port}")
    start_s3(settings, creds, env)
    # Buckets are made by the admin identity, here only: the pipeline's writer cannot.
    admin = as_identity(settings, creds, "admin")
    ArtifactStore(admin).ensure_bucket()
    say(f"demo model       {mirror_demo_model(admin)}")
    say(
        f"Prefect          http://{settings.host}:{settings.prefect_port} "
        f"({database_description(settings)})"
    )
    start_prefect(settings, env)
    if deployments:
        say(f"deployments      registered from prefect.yaml, pool {settings.work_pool}")
        register_deployments(settings, env)
        names = ensure_automations(settings)
        # The Slack URL is a secret: say where alerts go without printing it.
        target = (
            "Slack"
            if settings.alert_slack_webhook_url
            else (settings.alert_webhook_url or "no alert URL set")
        )
        say(f"automations      {', '.join(names)} (alerts -> {target})")
        start_worker(settings, env)
    say(
        f"Ray              {ray_cluster.address(settings)}"
        + (
            " (existing cluster)"
            if settings.ray.address
            # The dashboard asks for the cluster's token (Ray's token authentication is on).
            else f" (dashboard http://{settings.host}:{settings.ray.port + 1}: sign in with "
            f"the token in {settings.ray_auth_token_file})"
        )
    )
    start_ray(settings, env)
    say(f"gateway          {settings.gateway_url}")
    start_gateway(settings, env)


def down(settings: Settings, *, say=print) -> None:
    # The gateway first, then the Ray cluster with its model servers; the store last:
    # everything else may still be writing to it.
    order = {"gateway": 1, "ray-head": 2, "prefect-worker": 3, "prefect-server": 4, "seaweedfs": 5}
    for rec in sorted(processes.records(settings), key=lambda r: order.get(r.name, 0)):
        if processes.is_alive(rec.pid):
            say(f"stopping {rec.name} (pid {rec.pid})")
        processes.stop(settings, rec)


# Which setting each stack process's recorded port is: (block, field), or (None, field) for
# one of the stack's own.
PORT_OF = {
    "seaweedfs": ("s3", "port"),
    "prefect-server": (None, "prefect_port"),
    "ray-head": ("ray", "port"),
    "gateway": ("gateway", "port"),
}


def as_started(settings: Settings) -> Settings:
    """settings with the ports the running stack in settings.state_dir was started on: a new
    shell without the LLMSHIP_*_PORT variables of `make demo` still reaches that stack, not
    the default ports (another stack, or nothing)."""
    changes: dict[str, Any] = {}
    for r in processes.records(settings):
        if r.name in PORT_OF and r.port and processes.is_alive(r.pid):
            block, field = PORT_OF[r.name]
            if block:
                changes.setdefault(block, {})[field] = r.port
            else:
                changes[field] = r.port
    return settings.updated(**changes) if changes else settings


def status(settings: Settings) -> list[tuple[str, int, bool, int | None]]:
    return [(r.name, r.pid, processes.is_alive(r.pid), r.port) for r in processes.records(settings)]
