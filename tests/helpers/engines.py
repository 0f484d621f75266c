"""The model servers' engine processes on this host, found the way an operator would: by the
version's content digest in their command line (each engine serves its node's copy of the
version, <node cache>/<digest>)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def engine_pids(digest: str) -> list[int]:
    """vLLM API servers serving the content with this digest (not their guards)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if "vllm.entrypoints.openai.api_server" in text and "serving.engine_guard" not in text \
                and f"/{digest}" in text:
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
