"""A Prefect server of an llmship stack, alone, on ports and state of its own (no store, Ray or
gateway): what the control-plane tests load. Also: a private PostgreSQL cluster, and the load
itself (flow runs created and moved through states, events emitted, from threads and
processes at once)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.helpers.prefect_api import prefect_auth


@contextmanager
def prefect_only_stack(state_dir: Path, prefect_port: int, **overrides) -> Iterator:
    """llmship's Prefect server (llmship.stack.start_prefect: the environment and settings
    `llmship up` gives it) with credentials and a profile of its own; stopped at the end."""
    from llmship import stack
    from llmship.credentials import ensure_credentials
    from llmship.settings import Settings

    settings = Settings(state_dir=state_dir, prefect_port=prefect_port, **overrides)
    ensure_credentials(settings)
    settings = Settings(state_dir=state_dir, prefect_port=prefect_port, **overrides)
    try:
        stack.start_prefect(settings, stack.child_env(settings))
        yield settings
    finally:
        stack.down(settings, say=lambda _: None)


@dataclass
class Load:
    statuses: list = field(default_factory=list)  # HTTP status, or the exception, per request
    flow_run_ids: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list:
        return [s for s in self.statuses if not isinstance(s, int) or s >= 500]


EMITTER = """
import json, sys
from prefect.events import emit_event
from llmship import events
ids = []
for version in sys.argv[1:]:
    event = emit_event(
        event=events.GATE_FAILED,
        resource=events.model_resource("tiny-llama"),
        payload={
            "candidate_version": version, "rule": "min", "report": "stages/gate/load",
            "failing": [{"task": "t", "measured": 0.1, "threshold": 0.5, "baseline": 0.6}],
        },
    )
    ids.append(str(event.id))
from prefect.events.worker import EventsWorker
EventsWorker.drain_all()
print(json.dumps(ids))
"""


def concurrent_load(
    settings, *, events: int, emitters: int, writers: int, runs_per_writer: int
) -> Load:
    """`events` llmship.gate.failed events from `emitters` processes while `writers` threads
    each create flow runs and move them Pending -> Running -> Failed: what concurrent
    pipeline runs ask of the server."""
    from llmship.stack import child_env

    load = Load()
    api = settings.prefect_api_url
    auth = prefect_auth(settings)
    flow_id = httpx.post(f"{api}/flows/", json={"name": "load"}, auth=auth).json()["id"]

    def writes(writer: int) -> None:
        with httpx.Client(auth=auth, timeout=120) as client:
            for n in range(runs_per_writer):
                try:
                    created = client.post(
                        f"{api}/flow_runs/", json={"flow_id": flow_id, "name": f"w{writer}-{n}"}
                    )
                    load.statuses.append(created.status_code)
                    if created.status_code >= 300:
                        continue
                    load.flow_run_ids.append(created.json()["id"])
                    for state in ("PENDING", "RUNNING", "FAILED"):
                        moved = client.post(
                            f"{api}/flow_runs/{created.json()['id']}/set_state",
                            json={"state": {"type": state}, "force": True},
                        )
                        load.statuses.append(moved.status_code)
                except httpx.HTTPError as e:
                    load.statuses.append(repr(e))

    versions = [f"v{i:02d}" for i in range(events)]
    # The emitters find the server and its auth string in the stack's Prefect profile.
    env = child_env(settings)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EMITTER, *versions[k::emitters]],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(emitters)
    ]
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writes, range(writers)))
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"an emitter failed ({proc.returncode})"
        load.event_ids += json.loads(out.strip().splitlines()[-1])
    return load


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (apt's postgresql; `make setup` installs it), newest."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def private_postgres(bin_dir: Path, port: int, password: str) -> Iterator[str]:
    """A PostgreSQL cluster of its own in a temporary folder, on 127.0.0.1:port only, password
    (scram) authentication, database `prefect` owned by `llmship`; its URL for the Prefect
    server. Run as the postgres user when we are root (PostgreSQL refuses root)."""
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="llmship-pg-"))
    data = folder / "data"
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    if as_owner:
        shutil.chown(folder, "postgres")
        shutil.chown(pwfile, "postgres")
    os.chmod(pwfile, 0o600)

    def run(*argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*as_owner, *argv], capture_output=True, text=True, check=True, cwd=folder, **kw
        )

    run(
        str(bin_dir / "initdb"),
        "-D",
        str(data),
        "-U",
        "llmship",
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
        "--encoding=UTF8",
    )
    pwfile.unlink()
    run(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "postgres.log"),
        "-w",
        "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c max_connections=100",
        "start",
    )
    try:
        psql(bin_dir, port, password, "CREATE DATABASE prefect", database="postgres")
        yield f"postgresql+asyncpg://llmship:{password}@127.0.0.1:{port}/prefect"
    finally:
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def psql(bin_dir: Path, port: int, password: str, sql: str, database: str = "prefect") -> str:
    """One statement through psql over TCP, as llmship; the password in psql's environment
    (PGPASSWORD), not on its command line."""
    out = subprocess.run(
        [
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "llmship",
            "-d",
            database,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def wait_for(what: str, check, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(every)
    raise AssertionError(f"no {what} within {timeout:.0f} s")
