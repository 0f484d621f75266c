"""How the gateway is served: uvicorn with httptools, and the two limits uvicorn lacks.

uvicorn waits for a request's head (its request line and headers) as long as the client
takes, and takes a head of any size: a client sending a byte a second holds its connection for
ever, and a 64 MiB header is read into memory. GatewayHttpProtocol adds:
- a time limit on the head (LLMSHIP_GATEWAY_HEADER_TIMEOUT_S), from the connection's first
  moment and from the first byte of each later request on it: past it, 408 and closed;
- a size limit on the head (LLMSHIP_GATEWAY_MAX_HEADER_BYTES), counted as it arrives: past
  it, 431 and closed, nothing more read.
The body's limits (its time and size) are the application's (serving/gateway.py), which
reads it before the request takes an in-flight slot.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmship.settings import get_settings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class GatewayHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._head_timeout_s = settings.gateway_header_timeout_s
        self._max_head_bytes = settings.gateway_max_header_bytes
        self._head_bytes = 0
        self._head_timer = None
        self._refused = False

    # A head must arrive in time: timed from the connection, and from each request's start.
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._head_bytes = 0
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(
            408,
            f"the request's line and headers did not arrive within "
            f"{self._head_timeout_s:g} s (LLMSHIP_GATEWAY_HEADER_TIMEOUT_S)",
            "request_timeout",
        )

    # ... and be of bounded size. httptools keeps a header until its value is complete, so
    # the bytes are counted as they arrive, not in its callbacks.
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        awaiting_head = self._head_timer is not None
        if awaiting_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still no whole head after this many bytes (a head that completed in this data is
        # not refused for the body that came with it).
        if (
            awaiting_head
            and self._head_timer is not None
            and self._head_bytes > self._max_head_bytes
        ):
            self._refuse(
                431,
                f"the request's line and headers are over "
                f"{self._max_head_bytes} bytes "
                "(LLMSHIP_GATEWAY_MAX_HEADER_BYTES)",
                "request_header_too_large",
            )

    def _refuse(self, status: int, message: str, code: str) -> None:
        """An OpenAI-style error, then the connection closed: nothing more is read from it."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        body = json.dumps(
            {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": code,
                }
            }
        ).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, REASONS[status], len(body)) + body
        )
        self.transport.close()
