"""The gateway as a real uvicorn process, started with the stack's own command line
(llmship.stack.gateway_argv), routing model "m" to an upstream of the test's choosing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from llmship.processes import write_json
from llmship.settings import Settings
from llmship.stack import gateway_argv

REPO = Path(__file__).resolve().parents[2]


@contextmanager
def gateway_process(
    state: Path, port: int, upstream_url: str, log: Path | None = None, **settings: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) of a gateway with state in state and LLMSHIP_<NAME> settings, healthy;
    its output goes to log, as the stack's goes to its log file."""
    # Routed from the saved state (no S3, no Ray here): model m's version v1, one replica.
    write_json(state / "gateway" / str(port) / "routes.json", {"m": {"version": "v1"}})
    write_json(state / "gateway" / str(port) / "endpoints.json", {"m--v1": [upstream_url]})
    env = {
        **os.environ,
        "LLMSHIP_STATE_DIR": str(state),
        "LLMSHIP_S3_PORT": "1",
        "LLMSHIP_GATEWAY_PORT": str(port),
        **{f"LLMSHIP_{name.upper()}": value for name, value in settings.items()},
    }
    output = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        gateway_argv(Path(sys.executable), Settings(gateway={"port": port})),
        cwd=REPO,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    if log:
        output.close()  # the process holds its own
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    try:
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(10)
