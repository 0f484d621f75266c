"""Test fixtures. The suite starts its own real stack (SeaweedFS, Prefect server, worker, Ray,
gateway) on ports and state of its own, so a running `make demo` is never disturbed.

The environment is set here, before anything reads settings: the worker and every flow run
inherit it.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STATE = Path(tempfile.mkdtemp(prefix="llmship-test-state-"))
DATA = STATE / "calibration_data"
shutil.copytree(REPO / "calibration_data", DATA)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The alert receiver's port (alert_receiver): this session's own, since `make test` runs two
# sessions at once and the second could not bind a fixed one while the first held it.
ALERT_PORT = free_port()
TEST_ENV = {
    "LLMSHIP_STATE_DIR": str(STATE),
    "LLMSHIP_PREFECT_PORT": "14200",
    "LLMSHIP_S3_PORT": "18333",  # SeaweedFS also takes the next 9 ports
    "LLMSHIP_GATEWAY_PORT": "18000",
    "LLMSHIP_RAY_PORT": "16379",  # the Ray head takes up to 299 more (llmship/ray_cluster.py)
    "LLMSHIP_CALIBRATION_DATA_DIR": str(DATA),
    "LLMSHIP_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{ALERT_PORT}/alerts",
    # The performance report prices the demo's tokens at this (tests/test_pipeline.py).
    "LLMSHIP_HOURLY_USD": '{"cpu": 0.20}',
    "PREFECT_API_URL": "http://127.0.0.1:14200/api",
    "PREFECT_HOME": str(STATE / "prefect"),
    "PREFECT_LOCAL_STORAGE_PATH": str(STATE / "prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's scheduler looks for schedules to fill every 5 s here (60 s by default), so a
    # test's schedule due in half a minute gets its run from the real scheduler service.
    "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_CACHE": str(STATE / "hf-cache"),
    "HF_DATASETS_CACHE": str(STATE / "datasets-cache"),
    "DO_NOT_TRACK": "1",
}
os.environ.update(TEST_ENV)
# The stack's secrets, and the Prefect profile in PREFECT_HOME that carries the API's auth
# string, exist before anything imports Prefect, which reads its profile once, at import.
from llmship.credentials import ensure_credentials, ray_env  # noqa: E402
from llmship.settings import Settings  # noqa: E402
from tests.helpers.engines import engine_pids, wait_until_empty  # noqa: E402

ensure_credentials(Settings())
# Ray reads its token settings when it is imported: before any test imports it.
os.environ.update(ray_env(Settings()))


@pytest.fixture(scope="session")
def settings():
    from llmship.settings import get_settings

    return get_settings()


@pytest.fixture(scope="session")
def stack(settings):
    """The real local stack, started once for the session and stopped (with its model servers)
    at the end."""
    from llmship import stack as local_stack
    from llmship.settings import get_settings

    local_stack.up(settings)
    # Credentials exist only once the stack is up: read settings again.
    get_settings.cache_clear()
    yield get_settings()
    engines = engine_pids(str(get_settings().node_cache))
    local_stack.down(get_settings(), say=lambda _: None)
    # `llmship down` stops Ray under the model servers: their engines (each a process group:
    # API server, engine core, workers) must not outlive it.
    left = wait_until_empty(engines, timeout_s=60)
    from llmship import ray_cluster

    shutil.rmtree(ray_cluster.private_dir(get_settings()), ignore_errors=True)  # Ray's logs
    shutil.rmtree(STATE, ignore_errors=True)
    assert not left, f"engine process groups {left} outlived `llmship down`"


@pytest.fixture(scope="session")
def store(stack):
    from llmship.store import ArtifactStore

    return ArtifactStore(stack)


@pytest.fixture(scope="session")
def prefect_client(stack):
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


@pytest.fixture(scope="session")
def first_run(stack):
    """The demo deployment's first run (its search cut to two recipes: suite_config): the
    tiny model calibrated, gated, published and live.
    The stack tests build on it (and on each other, in file order)."""
    from prefect.client.orchestration import get_client

    from tests.helpers.prefect_api import DEMO, run_deployment, suite_config

    config = suite_config(get_client(sync_client=True))
    flow_run = run_deployment(DEMO, parameters={"config": config}, timeout=1200)
    assert flow_run.state.is_completed(), flow_run.state.message
    return flow_run


@pytest.fixture(scope="session")
def alert_receiver():
    """A local HTTP endpoint standing in for the team's Slack webhook: it keeps what it gets."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            received.append(json.loads(body or b"{}") | {"received_at": time.time()})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", ALERT_PORT), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield received
    server.shutdown()


@pytest.fixture()
def client(monkeypatch, tmp_path):
    """The gateway app in-process, on a state folder of its own, admin token `right-token`."""
    from fastapi.testclient import TestClient

    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMSHIP_GATEWAY_ADMIN_TOKEN", "right-token")
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        yield c
    get_settings.cache_clear()


def pytest_addoption(parser):
    parser.addoption(
        "--repeat",
        type=int,
        default=1,
        help="run each selected test this many times in a row (the fault tests' 5 runs)",
    )
    parser.addoption(
        "--repeat-only",
        default="",
        help="comma-separated parts of test names: only those tests are repeated (part:N, "
        "N times instead)",
    )
    parser.addoption(
        "--part",
        choices=["all", "shared-stack", "rest"],
        default="all",
        help="shared-stack: the tests on the session's stack (the `stack` fixture); rest: the "
        "others, which start servers of their own or none. `make test` runs the two at once "
        "in two processes: the rest keeps the cores busy while the stack's tests wait",
    )


def pytest_collection_modifyitems(config, items):
    part = config.getoption("part")
    if part == "all":
        return
    on_stack = {item for item in items if "stack" in item.fixturenames}
    keep = [i for i in items if (i in on_stack) == (part == "shared-stack")]
    config.hook.pytest_deselected(items=[i for i in items if i not in keep])
    items[:] = keep


def pytest_generate_tests(metafunc):
    count = metafunc.config.getoption("repeat")
    only = dict(
        (part.partition(":")[0], int(part.partition(":")[2] or count))
        for part in metafunc.config.getoption("repeat_only").split(",")
        if part
    )
    if only:
        count = next((n for part, n in only.items() if part in metafunc.function.__name__), 1)
    if count > 1:
        metafunc.fixturenames.append("repetition")
        metafunc.parametrize("repetition", range(count), indirect=True)


@pytest.fixture
def repetition(request):
    return getattr(request, "param", 0)
