"""A fault-injecting HTTP proxy on loopback, between the pipeline and SeaweedFS.

Requests pass through unchanged (the Host header too, so SigV4 signatures stay valid) except
every `every`-th one, or with `first_get=True` the first GET of each object and byte range
(its retry passes: deterministic, so a test cannot pass by where the faults happened to
land), which gets the fault of the proxy's mode:
    "503"       S3's own SlowDown error, as AWS answers under load
    "reset"     the connection closed without an answer
    "truncate"  for a GET: the upstream's status and headers, half the body, then closed
"""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream_port: int, mode: str, every: int = 3, first_get: bool = False):
        self.upstream_port, self.mode, self.every = upstream_port, mode, every
        self.first_get = first_get
        self.requests = 0
        self._gets_seen: set[tuple[str, str]] = set()
        self.faults: list[str] = []  # "METHOD path" of each request that got a fault
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    if proxy.first_get:
                        target = (self.path, self.headers.get("Range", ""))
                        faulty = self.command == "GET" and target not in proxy._gets_seen
                        if self.command == "GET":
                            proxy._gets_seen.add(target)
                    else:
                        faulty = proxy.requests % proxy.every == 0 and (
                            proxy.mode != "truncate" or self.command == "GET"
                        )
                    if faulty:
                        proxy.faults.append(f"{self.command} {self.path}")
                if faulty and proxy.mode == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if faulty and proxy.mode == "reset":
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                    )
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                upstream.putrequest(
                    self.command, self.path, skip_host=True, skip_accept_encoding=True
                )
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders(body or None)
                resp = upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection"):
                        self.send_header(name, value)
                if "content-length" not in {n.lower() for n, _ in resp.getheaders()}:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if faulty and proxy.mode == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
