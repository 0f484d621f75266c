"""The gateway against slow, huge and malformed clients, as a real uvicorn process started with
the stack's own command line (llmship.stack.gateway_argv): what a client that never finishes
its request, never reads its answer, asks for far too much work or sends far too much, can
cost everyone else (issues 14 and 27; docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.helpers.gateway_process import gateway_process

PORT = 18791
LIMIT = 3  # in-flight slots
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, SEND_TIMEOUT_S = 2.0, 3.0, 2.0
MAX_BODY = 64 * 1024
MAX_HEAD = 8 * 1024
MAX_CHOICES = 8  # prompts x n in one request


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class StandIn:
    """A model server standing in for vLLM: a completion is answered "ok"; a streamed one is
    events without end (more than any client's buffers hold, as n=16 x 400 tokens with 20
    logprobs each is) until the gateway closes the stream, as an engine generates until its
    client goes; a completion whose prompt is "hold" is answered once `release` is set."""

    def __init__(self) -> None:
        self.streams_opened = 0
        self.streams_closed = 0  # by the gateway, mid-stream
        self.streamed_bytes = 0
        self.release = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["content-length"])))
                if request.get("stream"):
                    return self.stream()
                if request.get("prompt") == "hold":
                    stand_in.release.wait(30)
                body = json.dumps({"choices": [{"text": "ok"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def stream(self):
                stand_in.streams_opened += 1
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                event = b"data: " + json.dumps({"choices": [{"text": "x" * 4000}]}).encode()
                try:
                    while True:
                        self.wfile.write(event + b"\n\n")
                        stand_in.streamed_bytes += len(event) + 2
                except OSError:  # the gateway closed the stream: the engine would stop here
                    stand_in.streams_closed += 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def stand_in():
    server = StandIn()
    yield server
    server.release.set()
    server.server.shutdown()


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway-limits")


@pytest.fixture(scope="module")
def gateway(state, stand_in):
    with gateway_process(
        state,
        PORT,
        stand_in.url,
        log=state / "gateway.log",
        gateway_max_in_flight=str(LIMIT),
        gateway_header_timeout_s=str(HEADER_TIMEOUT_S),
        gateway_body_timeout_s=str(BODY_TIMEOUT_S),
        gateway_send_timeout_s=str(SEND_TIMEOUT_S),
        gateway_max_request_bytes=str(MAX_BODY),
        gateway_max_header_bytes=str(MAX_HEAD),
        gateway_max_choices_per_request=str(MAX_CHOICES),
    ) as (url, proc):
        yield url, proc


@pytest.fixture()
def gateway_log(gateway, state):
    """What the gateway logs from the test's start on."""
    path = state / "gateway.log"
    start = path.stat().st_size
    return lambda: path.read_bytes()[start:].decode(errors="replace")


def metric(url: str, name: str, **labels: str) -> float:
    """A sample of the gateway's /metrics (0 when it has none yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{want}}}" if labels else name
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def in_flight(url: str) -> float:
    return metric(url, "llmship_gateway_in_flight")


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() held; fails, saying what, if it did not within timeout_s."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def completion(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)


def read_response(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def error_of(raw: bytes) -> dict:
    """The OpenAI-style error of the first response in raw."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    return json.loads(rest[:length])["error"]


def send_until_answered(sock: socket.socket, piece: bytes, most: int = 64 * 2**20) -> int:
    """Send piece after piece until the gateway answers or closes (or most bytes went in);
    how many bytes went in."""
    sent = 0
    while sent < most:
        if select.select([sock], [], [], 0)[0]:
            return sent
        try:
            sock.sendall(piece)
        except OSError:  # the gateway closed the connection
            return sent
        sent += len(piece)
    pytest.fail(f"{most} bytes went in without an answer")


def test_slow_bodies_take_no_slot_and_are_cut_off(gateway):
    """Three clients sending their bodies a byte a second, with the limit at 3 in flight:
    everyone else is still served at once, and each slow one gets a 408 when its time is up."""
    url, _ = gateway
    slow = []
    for _ in range(LIMIT):
        sock = socket.create_connection(("127.0.0.1", PORT))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"
        )
        slow.append(sock)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            for sock in slow:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass
            time.sleep(1)

    threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.5)
    try:
        for _ in range(5):
            assert completion(url).status_code == 200
        answers = [read_response(sock, BODY_TIMEOUT_S + 5) for sock in slow]
    finally:
        stop.set()
    for raw in answers:
        assert status_of(raw) == 408, raw[:300]
        error = error_of(raw)
        assert error["code"] == "request_timeout", error
        assert "LLMSHIP_GATEWAY_BODY_TIMEOUT_S" in error["message"]
    assert completion(url).status_code == 200


def test_a_head_sent_slowly_or_never_is_cut_off(gateway):
    url, _ = gateway
    silent = socket.create_connection(("127.0.0.1", PORT))
    slowloris = socket.create_connection(("127.0.0.1", PORT))
    slowloris.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
    started = time.monotonic()
    for _ in range(3):
        time.sleep(0.5)
        slowloris.sendall(b"x-a: b\r\n")
    raws = [read_response(sock, HEADER_TIMEOUT_S + 5) for sock in (silent, slowloris)]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 4
    for raw in raws:
        assert status_of(raw) == 408, raw[:300]
        assert "LLMSHIP_GATEWAY_HEADER_TIMEOUT_S" in error_of(raw)["message"]
    # A keep-alive connection's second request is held to the same limit.
    sock = socket.create_connection(("127.0.0.1", PORT))
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\n")
    raw = read_response(sock, HEADER_TIMEOUT_S + 5)
    assert raw.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in raw, raw[:500]
    assert completion(url).status_code == 200


def test_a_huge_head_is_refused_while_it_is_read(gateway):
    url, proc = gateway
    before = rss_mb(proc.pid)
    sock = socket.create_connection(("127.0.0.1", PORT))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-big: ")
    sent = send_until_answered(sock, b"a" * 65536)
    raw = read_response(sock, 5)
    assert status_of(raw) == 431, raw[:300]
    assert error_of(raw)["code"] == "request_header_too_large"
    assert sent < 16 * 2**20, sent  # cut off near the limit, not after reading it all
    assert rss_mb(proc.pid) - before < 20
    assert completion(url).status_code == 200


def test_a_chunked_body_is_cut_off_at_the_limit(gateway):
    url, proc = gateway
    sock = socket.create_connection(("127.0.0.1", PORT))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
        b"\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    piece = b"a" * 16384
    sent = send_until_answered(sock, b"%x\r\n" % len(piece) + piece + b"\r\n")
    raw = read_response(sock, 5)
    assert status_of(raw) == 413, raw[:300]
    assert b"connection: close" in raw.lower()
    assert error_of(raw)["code"] == "request_too_large"
    assert sent < 16 * 2**20, sent
    # A declared length past the limit is refused before a byte of the body is read.
    resp = httpx.post(f"{url}/v1/completions", content=b"x" * (MAX_BODY + 1), timeout=10)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert completion(url).status_code == 200


def never_reading_client(body: dict) -> socket.socket:
    """A client with a 4 KiB receive buffer that sends its request and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", PORT))
    raw = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(raw) + raw
    )
    return sock


def test_clients_that_never_read_lose_their_slots(gateway, stand_in, gateway_log):
    """Issue 27: clients that send a streamed request and never read held their in-flight
    slots (and the engine's work) for as long as they liked: with as many of them as the
    limit, every other client got 429. A write that stalls past LLMSHIP_GATEWAY_SEND_TIMEOUT_S
    drops the client, closes the model server's stream and gives the slot back; it is
    counted as the client's doing, never as an error of the version."""
    url, _ = gateway
    closed_before, streamed_before = stand_in.streams_closed, stand_in.streamed_bytes
    errors = {"model": "m", "version": "v1", "endpoint": "/v1/completions"}
    errors_before = metric(url, "llmship_gateway_errors_total", **errors)
    stalled = dict(errors, status="client_stalled")
    stalled_before = metric(url, "llmship_gateway_requests_total", **stalled)
    body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 400}
    clients = [never_reading_client(body) for _ in range(LIMIT)]
    try:
        wait_for(lambda: in_flight(url) == LIMIT, 10, "every never-reading client relayed")
        # Their slots come back once their writes stalled the timeout. The margin is the
        # time the buffers between the gateway and each client take to fill (under a second
        # here) and a loaded machine's. Unfixed: never.
        wait_for(
            lambda: in_flight(url) == 0,
            SEND_TIMEOUT_S + 5,
            f"slots given back by clients that never read (in flight: {in_flight(url)})",
        )
        for _ in range(5):  # everyone else is served again, not refused with 429
            assert completion(url).status_code == 200
        # The model server's streams were closed: the engine stops generating for them.
        wait_for(
            lambda: stand_in.streams_closed - closed_before == LIMIT,
            5,
            "the model server's streams closed",
        )
        # ... at once: what it sent is what the buffers on the way held (some 9 MB a stream
        # here), not more read after the client was gone (that went on at 100 MB/s).
        assert stand_in.streamed_bytes - streamed_before < LIMIT * 24 * 2**20
        # The clients were dropped: after what was buffered for them, the end.
        for sock in clients:
            sock.settimeout(10)
            try:
                while sock.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
    finally:
        for sock in clients:
            sock.close()
    assert metric(url, "llmship_gateway_requests_total", **stalled) - stalled_before == LIMIT
    assert metric(url, "llmship_gateway_errors_total", **errors) == errors_before
    wait_for(
        lambda: gateway_log().count("LLMSHIP_GATEWAY_SEND_TIMEOUT_S") == LIMIT,
        5,
        "one log line per dropped client",
    )
    lines = [line for line in gateway_log().splitlines() if "SEND_TIMEOUT" in line]
    assert all("took nothing of the answer to POST /v1/completions" in x for x in lines), lines
    assert "Traceback" not in gateway_log()


def test_a_request_takes_a_slot_per_completion_it_asks_for(gateway, stand_in):
    """Issue 27: 512 prompts x n=2 in one request counted as one request in flight and made a
    concurrent 8-token request wait 10 s. Now prompts x n is bounded per request, and each
    completion takes a slot of the in-flight limit."""
    url, _ = gateway
    for body, param in (
        ({"prompt": ["a"] * 5, "n": 2}, "prompt"),  # 10 completions
        ({"prompt": [[1, 2]] * (MAX_CHOICES + 1)}, "prompt"),
        ({"prompt": "a", "n": MAX_CHOICES + 1}, "n"),
    ):
        resp = httpx.post(f"{url}/v1/completions", json={"model": "m", **body}, timeout=10)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param and error["code"] == "too_many_choices", error
        assert f"at most {MAX_CHOICES}" in error["message"]
        assert "LLMSHIP_GATEWAY_MAX_CHOICES_PER_REQUEST" in error["message"]
    # A request of n=2 held by the model server takes 2 of the 3 slots.
    stand_in.release.clear()
    held = []
    holder = threading.Thread(
        target=lambda: held.append(
            httpx.post(
                f"{url}/v1/completions",
                json={"model": "m", "prompt": "hold", "n": 2},
                timeout=30,
            )
        )
    )
    holder.start()
    try:
        wait_for(lambda: in_flight(url) == 2, 10, "a request of n=2 taking 2 slots")
        two = httpx.post(
            f"{url}/v1/completions", json={"model": "m", "prompt": ["a", "b"]}, timeout=10
        )
        assert two.status_code == 429, two.text
        assert "needs 2" in two.json()["error"]["message"]
        one = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": ["a"]}, timeout=10)
        assert one.status_code == 200, one.text
        assert in_flight(url) == 2
    finally:
        stand_in.release.set()
        holder.join(30)
    assert held and held[0].status_code == 200
    wait_for(lambda: in_flight(url) == 0, 5, "the slots given back")
    # More completions than the whole limit (within the bound): it takes all of it, alone.
    whole = httpx.post(
        f"{url}/v1/completions",
        json={"model": "m", "prompt": [[1, 2, 3]], "n": MAX_CHOICES},
        timeout=10,
    )
    assert whole.status_code == 200, whole.text
    assert in_flight(url) == 0


def test_a_client_that_leaves_mid_body_is_one_short_line(gateway, gateway_log):
    """Issue 27: a client that disconnected mid-body was logged as an "unexpected error" with
    a traceback, 865 bytes each. It is one short access line, status 499."""
    url, _ = gateway
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", PORT))
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"model": "m", "prompt": "'
        )
        sock.close()
    wait_for(
        lambda: len(re.findall(r"status=499|unexpected error", gateway_log())) >= 20,
        10,
        "the gateway logged the 20 clients that left",
    )
    logged = gateway_log()
    assert "Traceback" not in logged and "unexpected error" not in logged, logged[:2000]
    lines = logged.splitlines()
    assert len(lines) == 20, lines
    assert all("POST /v1/completions" in line and "status=499" in line for line in lines)
    assert max(len(line) for line in lines) < 200, lines
    assert completion(url).status_code == 200
