"""Long-running local processes, started and stopped by PID.

Each process runs in its own session (so a stop reaches its children too), logs to
<state>/logs/<name>.log, and has a record <state>/pids/<name>.json that outlives whoever
started it: `make down` in another shell finds and stops everything `make demo` started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from pydantic import BaseModel

from llmship.settings import Settings


class ProcessRecord(BaseModel):
    name: str
    pid: int
    argv: list[str]
    log: str
    port: int | None = None
    stop_signal: int = signal.SIGTERM
    info: dict = {}


def _pid_dir(settings: Settings) -> Path:
    return settings.state_dir / "pids"


def is_alive(pid: int) -> bool:
    try:
        # Reap it first if it is our own child that has exited, so a zombie does not look alive.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def records(settings: Settings) -> list[ProcessRecord]:
    folder = _pid_dir(settings)
    if not folder.is_dir():
        return []
    return [ProcessRecord.model_validate_json(p.read_text()) for p in sorted(folder.glob("*.json"))]


def find(settings: Settings, name: str) -> ProcessRecord | None:
    path = _pid_dir(settings) / f"{name}.json"
    if not path.exists():
        return None
    rec = ProcessRecord.model_validate_json(path.read_text())
    return rec if is_alive(rec.pid) else None


def start(
    settings: Settings,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    port: int | None = None,
    stop_signal: int = signal.SIGTERM,
    cwd: Path | None = None,
    info: dict | None = None,
    umask: int = -1,
) -> ProcessRecord:
    logs = settings.state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _pid_dir(settings).mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
            umask=umask,
        )
    rec = ProcessRecord(
        name=name,
        pid=proc.pid,
        argv=argv,
        log=str(log_path),
        port=port,
        stop_signal=stop_signal,
        info=info or {},
    )
    (_pid_dir(settings) / f"{name}.json").write_text(rec.model_dump_json(indent=2))
    return rec


def stop(settings: Settings, rec: ProcessRecord, timeout_s: float = 15.0) -> None:
    """Signal the process group, wait, then kill what is left; forget the record."""
    for sig, wait in ((rec.stop_signal, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(rec.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and is_alive(rec.pid):
            time.sleep(0.1)
        if not is_alive(rec.pid):
            # The leader is gone; make sure no straggler of its group holds a port.
            try:
                os.killpg(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
    (_pid_dir(settings) / f"{rec.name}.json").unlink(missing_ok=True)


def rename(
    settings: Settings, rec: ProcessRecord, new_name: str, info: dict | None = None
) -> ProcessRecord:
    """The same process under another record name, its info updated with info (its log
    stays where it is)."""
    renamed = rec.model_copy(update={"name": new_name, "info": {**rec.info, **(info or {})}})
    (_pid_dir(settings) / f"{new_name}.json").write_text(renamed.model_dump_json(indent=2))
    (_pid_dir(settings) / f"{rec.name}.json").unlink(missing_ok=True)
    return renamed


def forget(settings: Settings, name: str) -> None:
    """Drop a record whose process has ended (a helper that exits when its work is done)."""
    (_pid_dir(settings) / f"{name}.json").unlink(missing_ok=True)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(rec: ProcessRecord, lines: int = 30) -> str:
    try:
        return "\n".join(Path(rec.log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(
    check: Callable[[], bool],
    rec: ProcessRecord,
    timeout_s: float,
    what: str,
    error: type[Exception],
    exited_error: type[Exception] | None = None,
) -> None:
    """Poll check() until it holds; fail early, with the log tail, if the process dies
    (raising exited_error, when given: a process that exits is often a different problem
    from one that is slow)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_alive(rec.pid):
            raise (exited_error or error)(
                f"{rec.name} exited before {what}; last log lines ({rec.log}):\n{log_tail(rec)}"
            )
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    raise error(
        f"{rec.name} was not {what} after {timeout_s:.0f}s; last log lines "
        f"({rec.log}):\n{log_tail(rec)}"
    )


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code == 200


def write_json(path: Path, obj: dict | list) -> None:
    """Written whole or not at all: readers (Prometheus, a gateway restarting) never see half a
    file. The temporary name is this process's own, as several gateways can write one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def write_private(path: Path, text: str | bytes) -> None:
    """Write a file only its owner can read, in one step (never world-readable on the way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
