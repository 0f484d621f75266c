"""The endpoints the gateway relays beside completions (issue 26): OpenAI's Responses API
(`/v1/responses`) and vLLM's `/tokenize` and `/detokenize`, through the same routing, limits,
accounting and error shapes. Against stand-in engines that answer as vLLM 0.32 does; the
stack test at the end calls the real engine through the real gateway."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.helpers.gateway_process import gateway_process
from tests.test_gateway_api import ADMIN, assert_openai_error, replicas

# A request each endpoint takes, as clients send them.
REQUESTS = {
    "/v1/responses": {"model": "m", "input": "Clause: The Vendor shall pay.", "temperature": 0},
    "/tokenize": {"model": "m", "prompt": "Clause: The Vendor shall pay."},
    "/detokenize": {"model": "m", "tokens": [1, 2, 3]},
}

# A streamed response as vLLM's /v1/responses sends it: named events, the last one carrying
# the whole response with its usage.
STREAM_EVENTS = [
    ("response.created", {"type": "response.created", "response": {"id": "resp_1"}}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Pay"}),
    ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "ment"}),
    (
        "response.completed",
        {
            "type": "response.completed",
            "response": {"id": "resp_1", "usage": {"input_tokens": 9, "output_tokens": 2}},
        },
    ),
]


def sse(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def stand_in_engine(name: str, lockstep: list[threading.Event] | None = None):
    """An engine that answers /v1/responses, /tokenize and /detokenize in vLLM's shapes, each
    answer naming the engine and the path it reached. A streamed response sends its events
    one by one; with lockstep, event i+1 only after lockstep[i] is set (by the test, once the
    client got event i)."""
    seen: list[tuple[str, dict]] = []

    class Engine(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            seen.append((self.path, body))
            if self.path == "/v1/responses" and body.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for i, (event, data) in enumerate(STREAM_EVENTS):
                    if lockstep and i > 0 and not lockstep[i - 1].wait(10):
                        seen.append((f"buffered: event {i - 1} not relayed alone", {}))
                    chunk = sse(event, data)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                return
            answer = {
                "/v1/responses": {
                    "id": "resp_1",
                    "object": "response",
                    "output": [{"type": "message", "content": [{"text": name}]}],
                    "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
                },
                "/tokenize": {"count": 3, "max_model_len": 2048, "tokens": [1, 2, 3]},
                "/detokenize": {"prompt": name},
            }.get(self.path)
            status = 200 if answer else 404
            out = json.dumps(
                answer or {"error": {"message": "not found", "type": "NotFoundError"}}
            ).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("x-engine", name)
            self.send_header("content-length", str(len(out)))
            # No connection kept: an engine that stops refuses the next request at once.
            self.send_header("connection", "close")
            self.close_connection = True
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.seen = seen
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture()
def gateway(monkeypatch, tmp_path):
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMSHIP_GATEWAY_ADMIN_TOKEN", "right-token")
    monkeypatch.setenv("LLMSHIP_GATEWAY_MAX_REQUEST_BYTES", "4096")
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        yield c
    get_settings.cache_clear()


@pytest.fixture()
def engines():
    servers = [stand_in_engine("v1"), stand_in_engine("v2")]
    yield servers
    for server, _ in servers:
        server.shutdown()


def route(client, version: str = "v1", **extra) -> None:
    resp = client.put("/admin/routes/m", headers=ADMIN, json={"version": version, **extra})
    assert resp.status_code == 200, resp.text


def metric(text: str, prefix: str) -> float:
    found = [line for line in text.splitlines() if line.startswith(prefix)]
    assert found, prefix
    return float(found[0].split()[-1])


@pytest.mark.parametrize("path", list(REQUESTS))
def test_each_endpoint_is_relayed_to_the_live_version(gateway, engines, path, caplog):
    (v1, v1_url), (v2, v2_url) = engines
    replicas(gateway, {"m--v1": [v1_url], "m--v2": [v2_url]})
    route(gateway)
    with caplog.at_level(logging.INFO, logger="llmship.gateway.access"):
        resp = gateway.post(path, json=REQUESTS[path], headers={"x-request-id": "req-26"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-llmship-version"] == "v1" and resp.headers["x-request-id"] == "req-26"
    assert v1.seen == [(path, REQUESTS[path])] and v2.seen == []  # the body as sent
    if path == "/detokenize":
        assert resp.json() == {"prompt": "v1"}
    metrics = gateway.get("/metrics").text
    assert (
        metric(
            metrics,
            f'llmship_gateway_requests_total{{endpoint="{path}",model="m",'
            'status="200",version="v1"}',
        )
        == 1.0
    )
    assert "llmship_gateway_in_flight 0.0" in metrics
    # A 0, not no data, for the canary's error rate; the shed counter exists from the start.
    assert f'llmship_gateway_errors_total{{endpoint="{path}",model="m",version="v1"}} 0.0' in (
        metrics
    )
    assert f'llmship_gateway_shed_total{{endpoint="{path}"}} 0.0' in metrics
    [line] = [r.getMessage() for r in caplog.records if r.name == "llmship.gateway.access"]
    assert line.startswith(f"POST {path} model=m version=v1 status=200 ")
    assert line.endswith("request_id=req-26")
    if path == "/v1/responses":  # the Responses API's usage: input and output tokens
        assert "prompt_tokens=7 completion_tokens=3 tokens=reported" in line
        assert 'llmship_gateway_prompt_tokens_total{model="m",version="v1"} 7.0' in metrics
    else:  # no tokens generated: none counted
        assert "prompt_tokens=- completion_tokens=- tokens=-" in line


def test_a_canary_takes_its_share_of_the_new_endpoints_and_its_errors_count(gateway, engines):
    (_, v1_url), (v2, v2_url) = engines
    replicas(gateway, {"m--v1": [v1_url], "m--v2": [v2_url]})
    route(gateway, canary={"version": "v2", "percent": 50})
    answers = [gateway.post("/detokenize", json=REQUESTS["/detokenize"]) for _ in range(40)]
    assert all(r.status_code == 200 for r in answers)
    assert all(r.json()["prompt"] == r.headers["x-llmship-version"] for r in answers)
    assert {r.headers["x-llmship-version"] for r in answers} == {"v1", "v2"}

    v2.shutdown()
    v2.server_close()  # the canary's engine dies: each refused attempt is its error
    for path, body in REQUESTS.items():
        for _ in range(20):  # none sent to v2: one chance in a million
            resp = gateway.post(path, json=body)
            assert resp.status_code == 200 and resp.headers["x-llmship-version"] == "v1"
    metrics = gateway.get("/metrics").text
    for path in REQUESTS:
        prefix = f'llmship_gateway_errors_total{{endpoint="{path}",model="m",version="v2"}}'
        assert metric(metrics, prefix) >= 1.0, path
    # What the rollout judges the canary on: its errors over every endpoint.
    from tasks.canary_rule import parse_traffic

    traffic = parse_traffic(metrics, "m", "v2")
    assert traffic.errors >= 3 and traffic.requests >= traffic.errors


@pytest.mark.parametrize("path", list(REQUESTS))
def test_an_unknown_model_is_an_openai_404(gateway, path):
    resp = gateway.post(path, json={**REQUESTS[path], "model": "nope"})
    err = assert_openai_error(resp, 404, "model")
    assert err["code"] == "model_not_found"
    assert (
        f'llmship_gateway_requests_total{{endpoint="{path}",model="(unknown)",status="404",'
        'version=""} 1.0' in gateway.get("/metrics").text
    )


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/responses", {"input": "x"}, "model"),
        ("/v1/responses", {"model": 7, "input": "x"}, "model"),
        ("/v1/responses", {"model": "", "input": "x"}, "model"),
        ("/v1/responses", {"model": "m", "input": "x", "stream": "yes"}, "stream"),
        ("/v1/responses", {"model": "m", "input": "x", "previous_response_id": "resp_1"}, None),
        ("/v1/responses", {"model": "m", "input": "x", "background": True}, "background"),
        ("/tokenize", {"model": "m"}, None),
        ("/tokenize", {"model": "m", "prompt": 5}, "prompt"),
        ("/tokenize", {"model": "m", "prompt": "x", "messages": [{"role": "user"}]}, None),
        ("/tokenize", {"model": "m", "messages": [{"role": "hacker"}]}, "messages[0].role"),
        ("/detokenize", {"model": "m"}, "tokens"),
        ("/detokenize", {"model": "m", "tokens": ["a"]}, "tokens[0]"),
        ("/detokenize", {"model": "m", "tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"model": "m", "tokens": [True]}, "tokens[0]"),
        ("/detokenize", {"model": "m", "tokens": "1 2"}, "tokens"),
    ],
)
def test_malformed_requests_are_400_before_any_routing(gateway, path, body, param):
    err = assert_openai_error(gateway.post(path, json=body), 400, param)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["message"].startswith(f"{param}: ")


def test_stateful_responses_are_refused_with_the_reason(gateway):
    """vLLM keeps a stored response in one engine's memory: a follow-up could reach another
    replica. The gateway says so, instead of relaying a request that fails at random."""
    err = assert_openai_error(
        gateway.post(
            "/v1/responses", json={"model": "m", "input": "x", "previous_response_id": "r"}
        ),
        400,
        "previous_response_id",
    )
    assert err["message"].startswith("previous_response_id: not supported by this gateway")
    assert "not stored" in err["message"] and "`input`" in err["message"]
    # `store` passes (the engines ignore it), as does an explicit null or false of the rest.
    for extra in (
        {"store": True},
        {"store": False, "background": False, "previous_response_id": None, "stream": None},
    ):
        resp = gateway.post("/v1/responses", json={"model": "m", "input": "x", **extra})
        assert resp.status_code == 404, extra  # on to routing: no model is served here


@pytest.mark.parametrize("path", list(REQUESTS))
@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2]", b'{"model": "\xff"}', b"[" * 100_000 + b"]" * 100_000]
)
def test_bodies_that_are_not_requests_are_400_not_500(gateway, path, raw):
    # Over the fixture's 4096-byte limit, the deep one is 413: a refusal too, never a 500.
    resp = gateway.post(path, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(resp, 413 if len(raw) > 4096 else 400)


@pytest.mark.parametrize("path", list(REQUESTS))
def test_the_body_limit_holds(gateway, engines, path):
    (v1, v1_url), _ = engines
    replicas(gateway, {"m--v1": [v1_url]})
    route(gateway)
    big = {**REQUESTS[path], "padding": "x" * 5000}
    err = assert_openai_error(gateway.post(path, json=big), 413)
    assert err["code"] == "request_too_large" and "at most 4096" in err["message"]
    assert v1.seen == []  # never reached the engine


def test_the_new_endpoints_are_not_shadowed(gateway, engines):
    """Shadow scoring compares completions' texts: the new endpoints are never copied."""
    (v1, v1_url), (v2, v2_url) = engines
    replicas(gateway, {"m--v1": [v1_url], "m--v2": [v2_url]})
    route(gateway, shadow={"version": "v2", "fraction": 1.0, "max_rps": 100})
    for path, body in REQUESTS.items():
        assert gateway.post(path, json=body).headers["x-llmship-version"] == "v1"
    assert v2.seen == []
    assert "llmship_gateway_shadow_requests_total{" not in gateway.get("/metrics").text


def test_a_streamed_response_is_relayed_event_by_event(tmp_path):
    """Through a real uvicorn gateway: each event reaches the client before the engine sends
    the next (nothing buffered), byte for byte, and the stream's tokens are counted."""
    lockstep = [threading.Event() for _ in STREAM_EVENTS]
    engine, url = stand_in_engine("v1", lockstep)
    log = tmp_path / "gateway.log"
    with gateway_process(tmp_path / "state", 18793, url, log=log) as (gateway_url, _):
        body = {**REQUESTS["/v1/responses"], "stream": True}
        with httpx.stream("POST", f"{gateway_url}/v1/responses", json=body, timeout=20) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["x-llmship-version"] == "v1"
            assert resp.headers["content-type"].startswith("text/event-stream")
            got, i = b"", 0
            for chunk in resp.iter_raw():
                got += chunk
                # The engine sends event i+1 only once event i arrived here.
                while i < len(STREAM_EVENTS) and got.endswith(
                    b"".join(sse(*e) for e in STREAM_EVENTS[: i + 1])
                ):
                    lockstep[i].set()
                    i += 1
        assert got == b"".join(sse(*e) for e in STREAM_EVENTS)
        assert engine.seen == [("/v1/responses", body)]  # no event waited for the next
        metrics = httpx.get(f"{gateway_url}/metrics").text
        assert (
            'llmship_gateway_time_to_first_token_seconds_count{endpoint="/v1/responses",'
            'model="m",version="v1"} 1.0' in metrics
        )
        assert 'llmship_gateway_completion_tokens_total{model="m",version="v1"} 2.0' in metrics
    engine.shutdown()
    access = [line for line in log.read_text().splitlines() if "POST /v1/responses" in line]
    assert len(access) == 1 and "status=200" in access[0], access
    assert "prompt_tokens=9 completion_tokens=2 tokens=reported" in access[0]


def test_stream_tally_of_responses_events():
    from serving.observability import StreamTally

    tally = StreamTally(b"event: response.output_text.delta")
    for event in STREAM_EVENTS[:3]:
        tally.feed(sse(*event))
    cut = tally.usage()  # no response.completed: the deltas counted
    assert (cut.completion_tokens, cut.counted) == (2, True)
    tally.feed(sse(*STREAM_EVENTS[3]))
    whole = tally.usage()
    assert (whole.prompt_tokens, whole.completion_tokens, whole.counted) == (9, 2, False)


@pytest.mark.stack
def test_the_real_engine_answers_the_new_endpoints_through_the_gateway(stack, first_run):
    """The demo model live in the test stack: vLLM's own /tokenize, /detokenize and
    /v1/responses, reached through the gateway (the model is tiny: shapes, not quality)."""
    settings = stack
    prompt = "Clause: The Vendor shall pay the Buyer $12,500 no later than March 3, 2027."
    with httpx.Client(base_url=settings.gateway_url, timeout=120) as gw:
        served = gw.get("/v1/models").json()["data"]
        version = next(m for m in served if m["id"] == "tiny-llama")["version"]

        tokenized = gw.post("/tokenize", json={"model": "tiny-llama", "prompt": prompt})
        assert tokenized.status_code == 200, tokenized.text
        assert tokenized.headers["x-llmship-version"] == version
        tokens = tokenized.json()["tokens"]
        assert tokenized.json()["count"] == len(tokens) > 5
        assert all(isinstance(t, int) for t in tokens)

        back = gw.post("/detokenize", json={"model": "tiny-llama", "tokens": tokens})
        assert back.status_code == 200, back.text
        assert back.headers["x-llmship-version"] == version
        assert prompt in back.json()["prompt"]  # after the BOS token's text, if any

        ask = {
            "model": "tiny-llama",
            "input": prompt + "\nQuestion: What type of clause is this?",
            "max_output_tokens": 8,
            "temperature": 0,
        }
        answer = gw.post("/v1/responses", json=ask)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-llmship-version"] == version
        whole = answer.json()
        assert whole["object"] == "response" and whole["status"] in ("completed", "incomplete")
        texts = [
            part["text"]
            for item in whole["output"]
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        ]
        assert texts and all(isinstance(t, str) for t in texts), whole["output"]
        assert whole["usage"]["input_tokens"] > 0

        with gw.stream("POST", "/v1/responses", json={**ask, "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-llmship-version"] == version
            events = [line.removeprefix("event: ") for line in streamed.iter_lines() if line]
        named = [e for e in events if not e.startswith("data: ")]
        assert named[0] == "response.created" and named[-1] == "response.completed", named

        refused = gw.post("/v1/responses", json={**ask, "previous_response_id": whole["id"]})
        assert_openai_error(refused, 400, "previous_response_id")

        metrics = gw.get("/metrics").text
    for path in ("/tokenize", "/detokenize", "/v1/responses"):
        assert (
            metric(
                metrics,
                f'llmship_gateway_requests_total{{endpoint="{path}",model="tiny-llama",'
                f'status="200",version="{version}"}}',
            )
            >= 1
        )
    log = (settings.state_dir / "logs" / "gateway.log").read_text()
    assert f"POST /tokenize model=tiny-llama version={version} status=200" in log
    assert f"POST /v1/responses model=tiny-llama version={version} status=200" in log
