"""The gateway's own answers, before any model server is involved: OpenAI-style errors for
bad requests, and an admin API that refuses callers without the token.

Here no Ray cluster runs: the replicas the fleet would report are handed to the gateway
(`replicas`) through the same method its fleet follower uses, or written where the gateway
reads them at start (endpoints.json). The stack tests run it against the real fleet."""

import json

import pytest
from fastapi.testclient import TestClient


def saved_state(state):
    """Where a gateway of the tests' settings keeps its routes and replicas."""
    from llmship.settings import Settings
    from serving.gateway import gateway_state_dir

    return gateway_state_dir(Settings(state_dir=state))


def replicas(client, apps: dict[str, list[str]]) -> None:
    """What the fleet's directory would say: application (model--version) -> engine URLs."""
    client.app.state.gw.set_endpoints(apps)


def assert_openai_error(resp, status, param=None):
    assert resp.status_code == status
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": -0.5}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": "m"}, "prompt"),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
    ],
)
def test_bad_completion_fields_are_400(client, body, param):
    err = assert_openai_error(client.post("/v1/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error"


def test_bad_chat_requests_are_400(client):
    assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "m", "messages": []}), 400, "messages"
    )
    assert_openai_error(
        client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
    )
    assert_openai_error(client.post("/v1/chat/completions", json=[1, 2]), 400)


def test_unknown_model_is_404_and_lists_nothing_served(client):
    err = assert_openai_error(
        client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404, "model"
    )
    assert err["code"] == "model_not_found"
    assert client.get("/v1/models").json() == {"object": "list", "data": []}


def test_admin_needs_the_token(client):
    assert_openai_error(client.get("/admin/routes"), 401)
    assert_openai_error(client.get("/admin/routes", headers={"authorization": "Bearer wrong"}), 403)
    ok = client.get("/admin/routes", headers={"authorization": "Bearer right-token"})
    assert ok.status_code == 200 and ok.json() == {}


def test_route_to_a_version_without_replicas_is_refused(client):
    replicas(client, {"m--v2": ["http://127.0.0.1:9"]})
    resp = client.put(
        "/admin/routes/m", headers={"authorization": "Bearer right-token"}, json={"version": "v1"}
    )
    err = assert_openai_error(resp, 409)
    assert "m v1 has no running replica" in err["message"]
    assert client.get("/v1/models").json()["data"] == []
    # The old shape, with an upstream URL the gateway would trust blindly, is refused.
    old = client.put(
        "/admin/routes/m",
        headers={"authorization": "Bearer right-token"},
        json={"version": "v2", "upstream": "http://127.0.0.1:9"},
    )
    assert_openai_error(old, 400)


def test_unknown_path_is_an_openai_404(client):
    assert_openai_error(client.get("/v1/nothing"), 404)


def test_ready_is_503_while_a_routed_version_has_no_replica(monkeypatch, tmp_path):
    """A route saved before a restart whose version has no replica now: the gateway is up
    (/health) but not ready, and says which model and version lack one; a replica that
    refuses connections is an error of its version, answered 503."""
    from llmship.processes import write_json
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    write_json(saved_state(tmp_path) / "routes.json", {"m": {"version": "v1"}})
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        err = assert_openai_error(c.get("/ready"), 503)
        assert err["code"] == "not_ready" and "'m': 'v1'" in err["message"]
        down = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert_openai_error(down, 503)
        assert "no running replica" in down.json()["error"]["message"]
        replicas(c, {"m--v1": ["http://127.0.0.1:9"]})  # registered, but gone
        assert c.get("/ready").status_code == 200
        refused = c.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert_openai_error(refused, 503)
        assert refused.json()["error"]["code"] == "upstream_unavailable"
        assert (
            'llmship_gateway_errors_total{endpoint="/v1/completions",model="m",'
            'version="v1"} 2.0' in c.get("/metrics").text
        )
    get_settings.cache_clear()


def watched_gateway(monkeypatch, tmp_path):
    """The gateway app with the live version wm v1 routed and no replica, its watcher
    checking every 0.1 s and declaring down after 3 misses."""
    from llmship.processes import write_json
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMSHIP_GATEWAY_HEALTH_INTERVAL_S", "0.1")
    monkeypatch.setenv("LLMSHIP_GATEWAY_DOWN_AFTER", "3")
    write_json(saved_state(tmp_path) / "routes.json", {"wm": {"version": "v1"}})
    get_settings.cache_clear()
    from serving.gateway import app

    return app


def test_a_live_version_left_without_replicas_is_declared_down_once(monkeypatch, tmp_path, caplog):
    """The watcher: after LLMSHIP_GATEWAY_DOWN_AFTER checks in a row with no replica the
    live version is declared down (the log says so and asks for the rollback, which the
    stack tests follow through Prefect); its clients get 503s that say a rollback was asked
    for. A replica that comes for a moment and crashes again (a crash loop) declares nothing
    more; one that stays, and it is up again."""
    import time

    from llmship.settings import get_settings

    server, url = fake_model_server("m-v1")
    app = watched_gateway(monkeypatch, tmp_path)

    with caplog.at_level("ERROR", logger="llmship.gateway"), TestClient(app) as c:
        deadline = time.monotonic() + 10
        while "declared down" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a few more misses: still one declaration
        declared = [r for r in caplog.records if "declared down" in r.getMessage()]
        assert len(declared) == 1 and "wm's live version v1" in declared[0].getMessage()
        assert 'llmship_gateway_upstream_up{model="wm",version="v1"} 0.0' in c.get("/metrics").text
        err = assert_openai_error(
            c.post("/v1/completions", json={"model": "wm", "prompt": "x"}), 503
        )
        assert "a rollback to the previous version was asked for" in err["message"]
        for _ in range(3):  # a crash loop: a replica registers, and is gone a check later
            replicas(c, {"wm--v1": [url]})
            time.sleep(0.15)
            replicas(c, {})
            time.sleep(0.5)
        assert len([r for r in caplog.records if "declared down" in r.getMessage()]) == 1
        replicas(c, {"wm--v1": [url]})
        time.sleep(0.5)
        assert c.post("/v1/completions", json={"model": "wm", "prompt": "x"}).json() == {
            "choices": [{"text": "m-v1"}]
        }
        assert 'llmship_gateway_upstream_up{model="wm",version="v1"} 1.0' in c.get("/metrics").text
    server.shutdown()
    get_settings.cache_clear()


def test_a_replica_ray_is_replacing_is_waited_for_and_a_crash_loop_is_not(
    monkeypatch, tmp_path, caplog
):
    """A live version whose one replica Ray is replacing has none for as long as a replica
    takes to start (minutes for a 70B engine): that is not a version that cannot stay up, and
    no rollback is asked for. One whose replica comes for a moment between crashes is, once
    its outages add up to that start and the checks the watcher allows (a moment up does not
    start the count again)."""
    import time

    from llmship.serving_messages import Endpoint
    from llmship.settings import get_settings

    server, url = fake_model_server("m-v1")
    app = watched_gateway(monkeypatch, tmp_path)

    def declared() -> int:
        return len([r for r in caplog.records if "declared down" in r.getMessage()])

    with caplog.at_level("ERROR", logger="llmship.gateway"), TestClient(app) as c:
        gw = c.app.state.gw
        # Its replica took 1 s to start: 3 checks + 1 s (10 checks) before a rollback.
        gw.note_starts(
            {
                "wm--v1": [
                    Endpoint(
                        url=url,
                        replica="r1",
                        node_ip="127.0.0.1",
                        node_id="n",
                        fetch_s=0.4,
                        engine_start_s=0.6,
                    )
                ]
            }
        )
        replicas(c, {"wm--v1": [url]})
        time.sleep(0.5)
        replicas(c, {})  # Ray replaces it: fewer than 13 checks (sleeps only run long)
        time.sleep(0.9)
        assert declared() == 0, caplog.text
        replicas(c, {"wm--v1": [url]})
        time.sleep(0.6)  # up for 3 checks and more: the outage is over
        for _ in range(20):  # a crash loop: up for a check or two, then 5 down
            replicas(c, {})
            time.sleep(0.5)
            if declared():
                break
            replicas(c, {"wm--v1": [url]})
            time.sleep(0.15)
        assert declared() == 1, caplog.text
        assert "wm's live version v1" in caplog.text
    server.shutdown()
    get_settings.cache_clear()


def test_ready_when_nothing_is_routed(client):
    assert client.get("/ready").json() == {"status": "ready", "models": {}}


def fake_model_server(name: str, delay_s: float = 0.0):
    """A model server that answers every completion with its own name, after delay_s."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Named(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            time.sleep(delay_s)
            body = json.dumps({"choices": [{"text": name}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Named)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture()
def slow_upstream():
    """A model server that takes a second per completion: enough to fill the gateway."""
    server, url = fake_model_server("ok", delay_s=1.0)
    yield url
    server.shutdown()


def test_past_its_in_flight_limit_the_gateway_sheds_with_429(monkeypatch, tmp_path, slow_upstream):
    from concurrent.futures import ThreadPoolExecutor

    from llmship.processes import write_json
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMSHIP_GATEWAY_MAX_IN_FLIGHT", "2")
    write_json(saved_state(tmp_path) / "routes.json", {"m": {"version": "v1"}})
    write_json(saved_state(tmp_path) / "endpoints.json", {"m--v1": [slow_upstream]})
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda _: c.post("/v1/completions", json={"model": "m", "prompt": "x"}),
                    range(8),
                )
            )
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        shed = [a for a in answers if a.status_code == 429]
        assert all(a.headers["retry-after"] == "1" for a in shed)
        assert assert_openai_error(shed[0], 429)["code"] == "overloaded"
        metrics = c.get("/metrics").text
        assert f'llmship_gateway_shed_total{{endpoint="/v1/completions"}} {len(shed)}.0' in metrics
        assert "llmship_gateway_in_flight 0.0" in metrics  # every slot given back
    get_settings.cache_clear()


ADMIN = {"authorization": "Bearer right-token"}


def test_a_canary_takes_its_share_and_a_dead_one_costs_clients_nothing(client):
    old, old_url = fake_model_server("old")
    new, new_url = fake_model_server("new")
    replicas(client, {"m--v1": [old_url], "m--v2": [new_url]})
    resp = client.put(
        "/admin/routes/m",
        headers=ADMIN,
        json={"version": "v1", "canary": {"version": "v2", "percent": 30}},
    )
    assert resp.status_code == 200, resp.text
    assert client.get("/v1/models").json()["data"][0]["canary"] == {"version": "v2", "percent": 30}
    served = [
        client.post("/v1/completions", json={"model": "m", "prompt": "x"}) for _ in range(400)
    ]
    assert all(r.status_code == 200 for r in served)
    by_version = [r.headers["x-llmship-version"] for r in served]
    assert all(
        r.json()["choices"][0]["text"] == {"v1": "old", "v2": "new"}[v]
        for r, v in zip(served, by_version, strict=True)
    )
    share = by_version.count("v2") / len(served)
    # 30 %, give or take 4.4 standard deviations of 400 draws (0.023 each): a band of 0.18 to
    # 0.42 over 200 draws was 3.7 of them, and a fresh-clone run once drew 0.425.
    assert 0.2 < share < 0.4, share

    new.shutdown()
    new.server_close()  # the canary's server dies: its port refuses connections
    after = [client.post("/v1/completions", json={"model": "m", "prompt": "x"}) for _ in range(60)]
    assert [r.status_code for r in after] == [200] * 60
    assert {r.headers["x-llmship-version"] for r in after} == {"v1"}
    metrics = client.get("/metrics").text
    # Each refused attempt is an error of the canary's version: what rolls it back.
    failed = [
        line
        for line in metrics.splitlines()
        if line.startswith(
            'llmship_gateway_errors_total{endpoint="/v1/completions",model="m",version="v2"}'
        )
    ]
    assert failed and float(failed[0].split()[-1]) >= 5, failed
    old.shutdown()


def test_canary_route_needs_a_canary_with_replicas(client):
    old, old_url = fake_model_server("old")
    replicas(client, {"m--v1": [old_url]})
    resp = client.put(
        "/admin/routes/m",
        headers=ADMIN,
        json={"version": "v1", "canary": {"version": "v2", "percent": 10}},
    )
    assert_openai_error(resp, 409)
    assert client.get("/v1/models").json()["data"] == []
    replicas(client, {"m--v1": [old_url], "m--v2": [old_url]})
    for percent in (0, 100):
        bad = client.put(
            "/admin/routes/m",
            headers=ADMIN,
            json={"version": "v1", "canary": {"version": "v2", "percent": percent}},
        )
        assert_openai_error(bad, 400)
    old.shutdown()


def test_requests_spread_over_a_versions_replicas_and_skip_a_dead_one(client):
    """Two replicas of one version: the gateway relays to both (the least busy first), and a
    replica that refuses connections costs the clients nothing while the other answers."""
    first, first_url = fake_model_server("first")
    second, second_url = fake_model_server("second")
    replicas(client, {"m--v1": [first_url, second_url]})
    assert client.put("/admin/routes/m", headers=ADMIN, json={"version": "v1"}).status_code == 200
    texts = [
        client.post("/v1/completions", json={"model": "m", "prompt": "x"}).json()["choices"][0][
            "text"
        ]
        for _ in range(60)
    ]
    assert 10 < texts.count("first") < 50, texts.count("first")
    second.shutdown()
    second.server_close()
    after = [client.post("/v1/completions", json={"model": "m", "prompt": "x"}) for _ in range(30)]
    assert [r.status_code for r in after] == [200] * 30
    assert {r.json()["choices"][0]["text"] for r in after} == {"first"}
    first.shutdown()


def test_a_body_past_the_limit_is_413_before_it_reaches_a_server(monkeypatch, tmp_path):
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMSHIP_GATEWAY_MAX_REQUEST_BYTES", "2048")
    get_settings.cache_clear()
    from serving.gateway import app

    with TestClient(app) as c:
        err = assert_openai_error(
            c.post("/v1/completions", json={"model": "m", "prompt": "clause " * 500}), 413
        )
        assert err["code"] == "request_too_large" and "at most 2048" in err["message"]
        # Under the limit the same request goes on to routing (no such model here).
        assert_openai_error(c.post("/v1/completions", json={"model": "m", "prompt": "x"}), 404)
    get_settings.cache_clear()


def test_a_relayed_stream_gives_its_slot_back_and_is_counted(client):
    server, url = fake_model_server("streamed")
    replicas(client, {"m--v1": [url]})
    assert client.put("/admin/routes/m", headers=ADMIN, json={"version": "v1"}).status_code == 200
    for _ in range(3):
        with client.stream(
            "POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}
        ) as resp:
            assert resp.status_code == 200 and b"streamed" in resp.read()
    metrics = client.get("/metrics").text
    assert "llmship_gateway_in_flight 0.0" in metrics
    assert (
        'llmship_gateway_requests_total{endpoint="/v1/completions",model="m",'
        'status="200",version="v1"} 3.0' in metrics
    )
    assert (
        'llmship_gateway_time_to_first_token_seconds_count{endpoint="/v1/completions",'
        'model="m",version="v1"} 3.0' in metrics
    )
    server.shutdown()


def dying_stream_server():
    """A model server that starts a stream of chunks, sends one event and then dies: the
    connection closes before the chunked body ends."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                if request.startswith(b"GET"):
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                event = b'data: {"choices": [{"text": "half"}]}\n\n'
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(event):x}\r\n".encode()
                    + event
                    + b"\r\n"
                )

    threading.Thread(target=serve, daemon=True).start()
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_a_stream_its_server_drops_ends_with_an_openai_error_event(client):
    listener, url = dying_stream_server()
    replicas(client, {"m--v1": [url]})
    assert client.put("/admin/routes/m", headers=ADMIN, json={"version": "v1"}).status_code == 200
    with client.stream(
        "POST", "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}
    ) as resp:
        events = [line for line in resp.iter_lines() if line]
    assert resp.status_code == 200
    # What the server sent arrives, then an error event, and no [DONE]: no client can take
    # the half answer for a whole one, and none sees a connection reset.
    assert events[0] == 'data: {"choices": [{"text": "half"}]}'
    assert events[-1].startswith("data: ") and "[DONE]" not in events
    error = json.loads(events[-1][len("data: ") :])["error"]
    assert error["code"] == "upstream_unavailable" and error["type"] == "server_error"
    assert "m v1 failed mid-answer" in error["message"]
    metrics = client.get("/metrics").text
    assert (
        'llmship_gateway_requests_total{endpoint="/v1/completions",model="m",'
        'status="broken",version="v1"} 1.0' in metrics
    )
    listener.close()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "m", "prompt": "x", "max_tokens": "16"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        (
            {
                "model": "m",
                "prompt": "x",
                "stream": True,
                "stream_options": {"include_usage": "yes"},
            },
            "stream_options.include_usage",
        ),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": [1, "two"]}, "prompt[0]"),
        ({"model": 7, "prompt": "x"}, "model"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(client, body, param):
    """OpenAI's API and vLLM refuse "16" for max_tokens and "yes" for stream; so does the
    gateway, naming the field as the client wrote it (not pydantic's `prompt.str`)."""
    err = assert_openai_error(client.post("/v1/completions", json=body), 400, param)
    assert err["message"].startswith(f"{param}: ")


@pytest.mark.parametrize(
    "messages,param",
    [
        ([{"role": "hacker", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], "messages[1].role"),
    ],
)
def test_chat_messages_are_checked_and_named_as_sent(client, messages, param):
    err = assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "m", "messages": messages}), 400, param
    )
    assert err["message"].startswith(f"{param}: ")


def test_accepted_types_still_pass(client):
    """What clients do send: an int temperature, token-id prompts, a null max_tokens, content
    parts, engine extensions: through to the routing (404 here: no model is served)."""
    for body in (
        {"model": "m", "prompt": "x", "temperature": 0, "max_tokens": None},
        {"model": "m", "prompt": [[1, 2], [3]], "seed": 7, "logprobs": 2},
        {
            "model": "m",
            "prompt": ["a", "b"],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ):
        assert client.post("/v1/completions", json=body).status_code == 404, body
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "x"}]},
        ],
    }
    assert client.post("/v1/chat/completions", json=chat).status_code == 404


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "m", "prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"model": "m", "prompt": "\xff\xfe"}',
    ],
    ids=["nested-200000-deep", "int-5000-digits", "invalid-utf8"],
)
def test_bodies_that_break_json_parsers_are_400_not_500(client, raw):
    resp = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    err = assert_openai_error(resp, 400)
    assert err["type"] == "invalid_request_error"


def test_admin_refusals_never_500(client):
    # A non-ASCII token (a header carries latin-1): refused, not a TypeError in the comparison.
    latin1 = {"authorization": "Bearer caf\xe9-token".encode("latin-1")}
    resp = client.get("/admin/routes", headers=latin1)
    assert_openai_error(resp, 403)
    resp = client.put("/admin/routes/m", headers=latin1, content=b"{}")
    assert_openai_error(resp, 403)
    # A body that is not UTF-8, and one that is not a route.
    auth = {"authorization": "Bearer right-token", "content-type": "application/json"}
    assert_openai_error(client.put("/admin/routes/m", headers=auth, content=b"\xff\xfe{"), 400)
    assert_openai_error(client.put("/admin/routes/m", headers=auth, content=b"[1]"), 400)
    assert client.get("/v1/models").json()["data"] == []


def test_unknown_model_names_do_not_become_metric_labels(client):
    """Every name a client makes up would be a Prometheus series kept for ever (30 requests
    with 3 MB names made /metrics 220 MB): they are counted under one label."""
    for i in range(30):
        client.post(
            "/v1/completions", json={"model": f"made-up-{i}-" + "x" * 100_000, "prompt": "x"}
        )
    text = client.get("/metrics").text
    assert "made-up" not in text and len(text) < 100_000, len(text)
    assert (
        'llmship_gateway_requests_total{endpoint="/v1/completions",model="(unknown)",'
        'status="404",version=""} 30.0'
    ) in text


def test_the_public_api_description_leaves_the_admin_api_out(client):
    schema = client.get("/openapi.json").json()
    assert "/v1/completions" in schema["paths"]
    assert not [p for p in schema["paths"] if p.startswith("/admin")], list(schema["paths"])
    assert client.get("/docs").status_code == 200


# ------------------------------------------------------------------ issue 27, through a real
# uvicorn gateway (the stack's own command line) in front of a stand-in model server

LIVE_PORT = 18792


def vllm_like_server():
    """A stand-in for vLLM: it answers 500 to a request holding a lone surrogate (as vLLM
    0.32 does, failing to encode it), "ok" to any other; it keeps the requests it got."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    got: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            got.append(body)
            try:
                json.dumps(json.loads(body), ensure_ascii=False).encode()
                status, answer = 200, {"choices": [{"text": "ok"}]}
            except UnicodeEncodeError as exc:
                status = 500
                answer = {"error": {"message": str(exc), "type": "InternalServerError"}}
            raw = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}", got


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(gateway URL, the requests its model server got): model m's v1 on the stand-in."""
    from tests.helpers.gateway_process import gateway_process

    server, upstream, got = vllm_like_server()
    with gateway_process(
        tmp_path_factory.mktemp("gateway-api-live"),
        LIVE_PORT,
        upstream,
        gateway_admin_token="right-token",
    ) as (url, _):
        yield url, got
    server.shutdown()


def version_errors(url: str) -> float:
    """The v1 errors a canary judge would read (every endpoint)."""
    import httpx

    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith("llmship_gateway_errors_total{") and 'version="v1"' in line
    )


SURROGATE = "\ud800"


@pytest.mark.parametrize(
    "endpoint,body,param",
    [
        ("/v1/completions", {"prompt": "x", "stop": [SURROGATE]}, "stop[0]"),
        ("/v1/completions", {"prompt": "x", "request_id": SURROGATE}, "request_id"),
        ("/v1/completions", {"prompt": "x", "bad_words": ["a" + SURROGATE]}, "bad_words[0]"),
        (
            "/v1/completions",
            {"prompt": "x", "kv_transfer_params": {"k": [SURROGATE]}},
            "kv_transfer_params.k[0]",
        ),
        ("/v1/completions", {"prompt": "x", "vllm_xargs": {SURROGATE: 1}}, "vllm_xargs"),
        ("/v1/completions", {"prompt": "x", SURROGATE: 1}, None),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stop": SURROGATE},
            "stop",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "\udfff"}]},
            "messages[0].content",
        ),
        ("/v1/responses", {"input": SURROGATE}, "input"),
        ("/tokenize", {"prompt": "x" + SURROGATE}, "prompt"),
        ("/detokenize", {"tokens": [1], "extra": SURROGATE}, "extra"),
    ],
)
def test_a_lone_surrogate_anywhere_is_refused_before_the_engine(live, endpoint, body, param):
    """Issue 27: a lone surrogate escape in any string made vLLM answer 500, which the
    gateway relayed and counted against the version: anyone could fail a canary. It is the
    client's 400 now, naming the parameter, and the engine never sees it."""
    import httpx

    url, got = live
    errors, requests = version_errors(url), len(got)
    raw = json.dumps({"model": "m", **body}).encode()  # ASCII: the surrogate as \ud800
    assert b"\\ud800" in raw or b"\\udfff" in raw
    resp = httpx.post(f"{url}{endpoint}", content=raw, headers={"content-type": "application/json"})
    err = assert_openai_error(resp, 400, param)
    assert err["param"] == param and err["code"] == "invalid_unicode", err
    assert "lone UTF-16 surrogate" in err["message"]
    assert len(got) == requests and version_errors(url) == errors
    # The same surrogate as raw bytes (which Python's JSON parser also takes), and a valid
    # pair, which is a character and goes through.
    raw_bytes = raw.replace(b"\\ud800", "\ud800".encode("utf-8", "surrogatepass"))
    if raw_bytes != raw:
        resp = httpx.post(
            f"{url}{endpoint}", content=raw_bytes, headers={"content-type": "application/json"}
        )
        assert assert_openai_error(resp, 400, param)["code"] == "invalid_unicode"
    pair = httpx.post(
        f"{url}/v1/completions",
        content=b'{"model": "m", "prompt": "x", "stop": ["\\ud83d\\ude00"]}',
        headers={"content-type": "application/json"},
    )
    assert pair.status_code == 200, pair.text


def test_every_admin_route_asks_for_the_token_before_anything_else(live):
    """Issue 27: /admin/shadow/<model>?since=abc without a token answered FastAPI's 422,
    describing the parameter. Every admin route (as the app declares them) answers 401
    without the token, 403 with a wrong one, whatever its parameters; with the token a bad
    parameter is an OpenAI-style 400."""
    import httpx

    from serving.gateway import app

    url, _ = live
    admin = [r for r in app.routes if getattr(r, "path", "").startswith("/admin")]
    assert len(admin) >= 4, admin
    for route in admin:
        path = route.path.replace("{model}", "m")
        for method in route.methods:
            for headers, status in (({}, 401), ({"authorization": "Bearer wrong"}, 403)):
                resp = httpx.request(
                    method,
                    f"{url}{path}?since=abc&limit=-1",
                    headers=headers,
                    content=b"{not json",
                )
                assert_openai_error(resp, status)
    bad = httpx.get(f"{url}/admin/shadow/m?since=abc", headers=ADMIN)
    assert assert_openai_error(bad, 400, "since")


ROUTE_FIELDS_BAD = {
    "since": ["x", 1, None, "2026-13-01T00:00:00+00:00", "0001-01-01T00:00:00"],
    "version": [1, "", None, ["v1"], True],
    "canary": ["v2", 5, [], {"version": "v2"}],
    "canary.version": [2, "", None],
    "canary.percent": ["10", 0, 100, -1, True, None],
    "shadow": ["v2", 1, []],
    "shadow.version": [2, "", None],
    "shadow.fraction": ["0.5", 0, 1.5, None],
    "shadow.max_rps": ["1", 0, -1, None],
    "shadow.keep_examples": [1.5, "1", 101, -1, True],
}


def test_every_admin_field_is_checked_and_a_bad_one_breaks_nothing(live):
    """Issue 27: PUT /admin/routes/m took `"since": "x"`, and every GET /v1/models after it
    answered 500. Each field of the admin body, set to a bad value (a wrong type, out of
    range, missing), is a 400 naming it; the route stays as it was, and /v1/models answers."""
    import httpx

    from serving.gateway import Canary, Route
    from serving.shadow import Shadow

    url, _ = live
    fields = {*Route.model_fields}
    fields |= {f"canary.{f}" for f in Canary.model_fields}
    fields |= {f"shadow.{f}" for f in Shadow.model_fields}
    assert fields <= set(ROUTE_FIELDS_BAD), (
        f"no bad values tried for {fields - set(ROUTE_FIELDS_BAD)}"
    )
    before = httpx.get(f"{url}/admin/routes", headers=ADMIN).json()
    good_canary = {"version": "v2", "percent": 10}
    good_shadow = {"version": "v2", "fraction": 0.5, "max_rps": 1}
    for field, values in ROUTE_FIELDS_BAD.items():
        for value in values:
            body = {"version": "v1"}
            if field.startswith("canary."):
                body["canary"] = {**good_canary, field.split(".")[1]: value}
            elif field.startswith("shadow."):
                body["shadow"] = {**good_shadow, field.split(".")[1]: value}
            else:
                body[field] = value
            resp = httpx.put(f"{url}/admin/routes/m", headers=ADMIN, json=body)
            assert resp.status_code == 400, (field, value, resp.text)
            param = assert_openai_error(resp, 400)["param"] or ""
            assert param.startswith(field.split(".")[0]), (field, value, resp.text)
            models = httpx.get(f"{url}/v1/models")
            assert models.status_code == 200, (field, value, models.text)
    for extra in ({"upstream": "http://127.0.0.1:9"}, {"canary": {**good_canary, "x": 1}}):
        resp = httpx.put(f"{url}/admin/routes/m", headers=ADMIN, json={"version": "v1", **extra})
        assert_openai_error(resp, 400)
    assert httpx.get(f"{url}/admin/routes", headers=ADMIN).json() == before
    ok = httpx.put(
        f"{url}/admin/routes/m",
        headers=ADMIN,
        json={"version": "v1", "since": "2026-01-31T12:00:00+00:00"},
    )
    assert ok.status_code == 200, ok.text
    models = httpx.get(f"{url}/v1/models")
    assert models.status_code == 200 and models.json()["data"][0]["created"] == 1769860800


@pytest.mark.parametrize(
    "method,path",
    [("POST", "/v1/completions/"), ("POST", "/v1/chat/completions/"), ("GET", "/v1/models/")],
)
def test_a_trailing_slash_is_a_404_not_a_redirect_to_the_clients_host(live, method, path):
    """Issue 27: POST /v1/completions/ answered 307 to a Location built from the client's
    Host header. Each endpoint has one path: another is an OpenAI-style 404 that says which."""
    import httpx

    url, _ = live
    resp = httpx.request(
        method,
        f"{url}{path}",
        headers={"host": "evil.example"},
        json={"model": "m", "prompt": "x"},
    )
    assert "location" not in resp.headers
    err = assert_openai_error(resp, 404)
    assert f"did you mean {path.rstrip('/')}?" in err["message"]
