"""The gateway against slow, huge and malformed clients, as a real uvicorn process started with
the stack's own command line (llmship.stack.gateway_argv): what a client that never finishes
its request, or sends far too much, can cost everyone else (issue 14; docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.gateway_process import gateway_process
from tests.test_gateway_api import fake_model_server

PORT = 18791
LIMIT = 3  # requests in flight
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 3.0
MAX_BODY = 64 * 1024
MAX_HEAD = 8 * 1024


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    upstream, upstream_url = fake_model_server("ok")
    with gateway_process(
        tmp_path_factory.mktemp("gateway-limits"),
        PORT,
        upstream_url,
        gateway_max_in_flight=str(LIMIT),
        gateway_header_timeout_s=str(HEADER_TIMEOUT_S),
        gateway_body_timeout_s=str(BODY_TIMEOUT_S),
        gateway_max_request_bytes=str(MAX_BODY),
        gateway_max_header_bytes=str(MAX_HEAD),
    ) as (url, proc):
        yield url, proc
    upstream.shutdown()


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
