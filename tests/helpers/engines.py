"""The model servers' engine processes on this host, found the way an operator would: by the
version's content digest in their command line (each engine serves its node's copy of the
version, <node cache>/<digest>, or its small files, <digest>.stream, where it streams the
weights)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def engine_pids(digest: str) -> list[int]:
    """vLLM API servers serving the content with this digest (not their guards). Each leads
    the process group of its engine (its engine core and workers are in it too)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if (
            "vllm.entrypoints.openai.api_server" in text
            and "serving.engine_guard" not in text
            and digest in text
        ):
            pids.append(int(proc.name))
    return pids


def kill_engines(digest: str) -> list[int]:
    """SIGKILL every engine of the content (its whole process group): a crash, as a GPU
    fault or the OOM killer would make one."""
    killed = []
    for pid in engine_pids(digest):
        try:
            os.killpg(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def live_groups(pgids: list[int]) -> list[int]:
    """Those of the engines' process groups that still have a process (vLLM renames its engine
    core and workers, so only their group tells whose they are)."""
    alive = []
    for pgid in pgids:
        try:
            os.killpg(pgid, 0)
            alive.append(pgid)
        except ProcessLookupError:
            pass
    return alive


def replica_actor_pids(app: str) -> list[int]:
    """The Ray worker processes of a Serve application's replicas."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(f"ray::ServeReplica:{app}:".encode()):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def wait_until_empty(pgids: list[int], timeout_s: float) -> list[int]:
    """The groups still alive after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (alive := live_groups(pgids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive
