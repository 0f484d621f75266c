"""Observability where people look: Prometheus finds every engine through the file the gateway
writes, the gateway counts tokens, and its log has one line per request and per route change,
with nothing of a request's body or secrets.

The first tests need no stack: an OpenAI-style server of the test's own stands for the engine
(one that reports usage as vLLM does). The last runs a real Prometheus (Debian's package,
`make setup` installs it) against the test stack and asks it every query of the dashboard."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers.gateway_process import gateway_process

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "docs" / "grafana" / "llmship-gateway.json"
PROMETHEUS_CONFIG = REPO / "docs" / "grafana" / "prometheus.yml"
PROMETHEUS = "/usr/bin/prometheus"
ADMIN = {"authorization": "Bearer right-token"}
SECRET_PROMPT = "Clause: the password is hunter2-do-not-log"
ANSWER = "the-answer-text"


# ------------------------------------------------------------------ an engine of the test's own


def engine_like_server() -> tuple[ThreadingHTTPServer, str]:
    """Answers completions as vLLM does: 3 tokens, `usage` in a whole answer, and in a stream
    a last event with it when the client asked (stream_options.include_usage)."""

    class Engine(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["content-length"])))
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            self.send_response(200)
            if not req.get("stream"):
                body = json.dumps(
                    {"id": "c", "choices": [{"index": 0, "text": ANSWER}], "usage": usage}
                ).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_header("content-type", "text/event-stream")
            self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
            for token in ("the-", "answer-", "text"):
                event = {"id": "c", "choices": [{"index": 0, "text": token}], "usage": None}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            if (req.get("stream_options") or {}).get("include_usage"):
                last = {"id": "c", "choices": [], "usage": usage}
                self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture()
def engine():
    server, url = engine_like_server()
    yield url
    server.shutdown()


def route(client, model: str, body: dict) -> None:
    resp = client.put(f"/admin/routes/{model}", headers=ADMIN, json=body)
    assert resp.status_code == 200, resp.text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exported
    found = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", text, re.M)
    assert found, f"{name}{{{wanted}}} not in /metrics"
    return float(found.group(1))


# ------------------------------------------------------------------ scrape targets


def test_the_engines_scrape_targets_follow_the_replicas(client, tmp_path):
    from serving.observability import EngineEndpoint, engine_scrape_targets

    gw = client.app.state.gw
    sd_file = tmp_path / "prometheus" / "engines.json"
    assert gw.sd_file == sd_file

    def fleet_says(apps: dict[str, list[tuple[str, str]]]) -> None:
        # What follow_fleet hands on from the fleet's directory at each refresh.
        gw.set_scrape_targets(
            engine_scrape_targets(
                {
                    app: [
                        EngineEndpoint(url=url, replica=rep, node_ip="127.0.0.1", node_id="n")
                        for url, rep in reps
                    ]
                    for app, reps in apps.items()
                }
            )
        )

    fleet_says(
        {
            "tiny-llama--v2": [
                ("http://127.0.0.1:41002", "r2b"),
                ("http://127.0.0.1:41001", "r2a"),
            ],
            "tiny-llama--v1": [("http://10.0.0.7:40000", "r1")],
            "eval--tiny-llama--buildkey": [("http://127.0.0.1:42000", "e1")],  # the gate's
        }
    )
    written = json.loads(sd_file.read_text())
    assert written == [
        {
            "targets": ["10.0.0.7:40000"],
            "labels": {"model": "tiny-llama", "version": "v1", "replica": "r1"},
        },
        {
            "targets": ["127.0.0.1:41001"],
            "labels": {"model": "tiny-llama", "version": "v2", "replica": "r2a"},
        },
        {
            "targets": ["127.0.0.1:41002"],
            "labels": {"model": "tiny-llama", "version": "v2", "replica": "r2b"},
        },
    ]
    assert client.get("/admin/sd/engines", headers=ADMIN).json() == written
    assert client.get("/admin/sd/engines").status_code == 401

    # The same replicas again (every refresh): the file is not rewritten.
    inode = sd_file.stat().st_ino
    fleet_says(
        {
            "tiny-llama--v1": [("http://10.0.0.7:40000", "r1")],
            "tiny-llama--v2": [
                ("http://127.0.0.1:41001", "r2a"),
                ("http://127.0.0.1:41002", "r2b"),
            ],
        }
    )
    assert sd_file.stat().st_ino == inode

    # v1 retired, one of v2's replicas replaced on a new port: replaced whole, no temp left.
    fleet_says({"tiny-llama--v2": [("http://127.0.0.1:41003", "r2c")]})
    assert json.loads(sd_file.read_text()) == [
        {
            "targets": ["127.0.0.1:41003"],
            "labels": {"model": "tiny-llama", "version": "v2", "replica": "r2c"},
        }
    ]
    assert sd_file.stat().st_ino != inode
    assert [p.name for p in sd_file.parent.iterdir()] == ["engines.json"]


# ------------------------------------------------------------------ tokens and the access log


def test_tokens_are_counted_and_the_access_log_keeps_no_body_or_secret(client, engine, caplog):
    gw = client.app.state.gw
    gw.set_endpoints({"m--v1": [engine]})
    route(client, "m", {"version": "v1"})
    caplog.set_level(logging.INFO, logger="llmship.gateway")
    caplog.clear()
    headers = {"authorization": "Bearer sk-client-secret-123", "x-request-id": "req-42"}
    ask = {"model": "m", "prompt": SECRET_PROMPT, "max_tokens": 3}

    whole = client.post("/v1/completions", json=ask, headers=headers)
    assert whole.status_code == 200 and whole.headers["x-request-id"] == "req-42"
    with_usage = {**ask, "stream": True, "stream_options": {"include_usage": True}}
    streamed = client.post("/v1/completions", json=with_usage)
    assert streamed.text.count('"usage": {') == 1  # relayed as the engine sent it
    counted = client.post("/v1/completions", json={**ask, "stream": True})
    assert '"usage": {' not in counted.text  # the gateway asks for nothing the client did not
    unknown = client.post("/v1/completions", json={**ask, "model": "nope\nforged=1"})
    assert unknown.status_code == 404

    lines = [r.getMessage() for r in caplog.records if r.name == "llmship.gateway.access"]
    assert len(lines) == 4, lines
    assert lines[0] == (
        "POST /v1/completions model=m version=v1 status=200 "
        + re.search(r"ms=\S+", lines[0]).group(0)
        + " prompt_tokens=7 completion_tokens=3 tokens=reported request_id=req-42"
    )
    assert "prompt_tokens=7 completion_tokens=3 tokens=reported" in lines[1]
    assert "prompt_tokens=- completion_tokens=3 tokens=counted" in lines[2]
    # A request id of the gateway's own when the client sent none, as answered.
    assert f"request_id={counted.headers['x-request-id']}" in lines[2]
    assert "model=nope_forged_1 version=- status=404" in lines[3]  # one line, no forged field
    everything = "\n".join(r.getMessage() for r in caplog.records)
    for secret in ("hunter2", "sk-client-secret", "right-token", ANSWER, "the-", "Clause"):
        assert secret not in everything

    text = client.get("/metrics").text
    labels = {"model": "m", "version": "v1"}
    assert metric(text, "llmship_gateway_prompt_tokens_total", **labels) == 14
    assert metric(text, "llmship_gateway_completion_tokens_total", **labels) == 9
    # Errors and sheds read 0 rather than nothing: a dashboard's rate of them is a rate.
    errors = {**labels, "endpoint": "/v1/completions"}
    assert metric(text, "llmship_gateway_errors_total", **errors) == 0
    assert metric(text, "llmship_gateway_shed_total", endpoint="/v1/chat/completions") == 0


def test_each_route_change_is_one_line(client, engine, caplog):
    client.app.state.gw.set_endpoints({"m--v1": [engine], "m--v2": [engine]})
    caplog.set_level(logging.INFO, logger="llmship.gateway.routes")
    shadow = {"version": "v2", "fraction": 0.5, "max_rps": 4}
    for body in (
        {"version": "v1"},
        {"version": "v1"},  # given again (a rollout's check): nothing moved
        {"version": "v1", "shadow": shadow},
        {"version": "v1", "canary": {"version": "v2", "percent": 10}, "shadow": shadow},
        {"version": "v1", "canary": {"version": "v2", "percent": 50}},
        {"version": "v2"},
    ):
        route(client, "m", body)
    assert [r.getMessage() for r in caplog.records if r.name == "llmship.gateway.routes"] == [
        "route m: live v1",
        "route m: shadow v2: 50% of requests copied, at most 4/s",
        "route m: canary v2 at 10%",
        "route m: canary v2 at 50%; shadow v2 off",
        "route m: live v1 -> v2; canary v2 ended",
    ]


def test_the_gateway_process_writes_its_lines_to_its_log(tmp_path, engine):
    """Started with the stack's own command line: llmship's INFO lines reach the process's
    output (the stack's gateway.log), uvicorn's own access log does not."""
    log = tmp_path / "gateway.log"
    with gateway_process(tmp_path / "state", free_port(), engine, log=log) as (url, _):
        ask = {"model": "m", "prompt": SECRET_PROMPT, "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=ask, timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while "llmship.gateway.access" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    text = log.read_text()
    assert re.search(
        r"INFO llmship\.gateway\.routes: route m: live v1 \(at start\)$", text, re.M
    ), text
    assert re.search(
        r"INFO llmship\.gateway\.access: POST /v1/completions model=m version=v1 status=200 "
        r"ms=\S+ prompt_tokens=7 completion_tokens=3 tokens=reported request_id=\w+$",
        text,
        re.M,
    ), text
    assert '"POST /v1/completions HTTP/1.1" 200' not in text  # uvicorn's access log is off
    assert "hunter2" not in text


# ------------------------------------------------------------------ a real Prometheus


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every panel, Grafana's variables given values as Grafana would
    (every model: the test stack serves one)."""
    variables = {"$__rate_interval": "30s", "$__interval": "5s", "$model": ".*"}
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not know"
            found.append((panel["title"], expr))
    return found


def prometheus_config(gateway: str, sd_file: Path) -> dict:
    """docs/grafana/prometheus.yml, pointed at the test stack and scraping every second."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"llmship-gateway", "llmship-engines"}
    jobs["llmship-gateway"]["static_configs"] = [{"targets": [gateway]}]
    assert jobs["llmship-engines"]["file_sd_configs"] == [
        {"files": ["../../.llmship/prometheus/engines.json"]}
    ]
    assert os.path.normpath(PROMETHEUS_CONFIG.parent / "../../.llmship") == str(REPO / ".llmship")
    jobs["llmship-engines"]["file_sd_configs"] = [{"files": [str(sd_file)]}]
    for job in jobs.values():
        job["scrape_interval"] = "1s"
    return config


@pytest.mark.stack
def test_prometheus_finds_the_engines_and_answers_every_dashboard_query(stack, first_run):
    if not Path(PROMETHEUS).exists():
        pytest.skip(f"{PROMETHEUS} is not installed: `make setup` installs it (as root)")
    settings = stack
    served = httpx.get(f"{settings.gateway_url}/v1/models", timeout=10).json()["data"]
    model = next(m for m in served if m["id"] == "tiny-llama")
    version = model["version"]

    # The gateway wrote the live version's engines to the file (it refreshes every 0.5 s).
    groups = json.loads(settings.prometheus_sd_file.read_text())
    live = [g for g in groups if g["labels"]["version"] == version]
    assert live and all(g["labels"]["model"] == "tiny-llama" for g in live), groups
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", g["targets"][0]) for g in live), groups

    folder = Path(tempfile.mkdtemp(prefix="llmship-prometheus-"))
    port = free_port()
    gateway = settings.gateway_url.removeprefix("http://")
    (folder / "prometheus.yml").write_text(
        yaml.safe_dump(prometheus_config(gateway, settings.prometheus_sd_file))
    )
    prometheus = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(folder / "prometheus.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        prompt = "Clause: The Vendor shall pay the Buyer $12,500 no later than March 3, 2027."
        ask = {"model": "tiny-llama", "prompt": prompt + "\nAnswer:", "max_tokens": 8}
        with httpx.Client(base_url=settings.gateway_url, timeout=60) as gw:
            for _ in range(3):  # over a few scrapes, so that every rate has an increase
                assert gw.post("/v1/completions", json=ask).status_code == 200
                streamed = gw.post("/v1/completions", json={**ask, "stream": True})
                assert streamed.status_code == 200 and "[DONE]" in streamed.text
                time.sleep(1.5)

        def series(query: str) -> list[dict]:
            resp = httpx.get(f"{api}/query", params={"query": query}, timeout=10)
            assert resp.status_code == 200, resp.text
            return resp.json()["data"]["result"]

        # Every engine of the live version scraped, and labelled from the file.
        deadline = time.monotonic() + 60
        queries = dashboard_queries()
        while True:
            engines_up = series(f'up{{job="llmship-engines", version="{version}"}} == 1')
            empty = [(title, q) for title, q in queries if not series(q)]
            if (len(engines_up) == len(live) and not empty) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert len(engines_up) == len(live), (engines_up, live)
        assert {s["metric"]["replica"] for s in engines_up} == {
            g["labels"]["replica"] for g in live
        }
        assert empty == [], f"dashboard queries with no series: {empty}"
        tokens = series(
            f'llmship_gateway_completion_tokens_total{{model="tiny-llama", version="{version}"}}'
        )
        assert tokens and float(tokens[0]["value"][1]) > 0
        vllm = series(f'vllm:num_requests_running{{model_name="tiny-llama", version="{version}"}}')
        assert vllm, "vLLM's series carry the version from the file"
    finally:
        prometheus.terminate()
        prometheus.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    # The stack's gateway log: the route the rollout set, one line per request, no prompt.
    log = (settings.state_dir / "logs" / "gateway.log").read_text()
    assert re.search(r"llmship\.gateway\.routes: route tiny-llama: .*live", log), log[-3000:]
    relayed = re.findall(
        rf"llmship\.gateway\.access: POST /v1/completions model=tiny-llama version={version} "
        r"status=200 .*",
        log,
    )
    assert len(relayed) >= 6
    assert "Vendor shall pay" not in log
    assert settings.gateway.admin_token and settings.gateway.admin_token not in log
