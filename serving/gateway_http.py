"""How the gateway is served: uvicorn with httptools, and the two limits uvicorn lacks.

uvicorn waits for a request's head (its request line and headers) as long as the client
takes, and takes a head of any size: a client sending a byte a second holds its connection for
ever, and a 64 MiB header is read into memory. GatewayHttpProtocol adds:
- a time limit on the head (LLMSHIP_GATEWAY_HEADER_TIMEOUT_S), from the connection's first
  moment and from the first byte of each later request on it: past it, 408 and closed;
- a size limit on the head (LLMSHIP_GATEWAY_MAX_HEADER_BYTES), counted as it arrives: past
  it, 431 and closed, nothing more read;
- a time limit on a stalled write (LLMSHIP_GATEWAY_SEND_TIMEOUT_S): a client that takes
  nothing of its answer for that long (the connection's buffer full, from the moment it
  filled) is dropped at once (aborted: what is buffered for it is thrown away), so its
  request ends, its relay closes the model server's stream and its in-flight slots come
  back. uvicorn waits for a client to read for as long as it likes: three clients that never
  read held three slots, and the engine's work for them, for 100 s and more.
A request whose connection is gone before its answer is whole is marked so in its scope
(GONE, in its extensions: STALLED_OFF or LEFT), for the gateway to stop relaying to it at
once and count it as the client's doing. uvicorn takes what is sent to a lost connection
without a word, and a relay that reads a fast model server never waits long enough for
Starlette's cancellation to reach it: it went on reading the engine's answer into nothing.
The body's limits (its time and size) are the application's (serving/gateway/reading.py), which
reads it before the request takes an in-flight slot.
"""

from __future__ import annotations

import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmship.settings import get_settings

REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# In a request's scope["extensions"] once its connection is gone mid-answer: why.
GONE = "llmship.client_gone"
STALLED_OFF = "stalled"  # dropped here: it took nothing of a write for the send timeout
LEFT = "left"  # it closed the connection, or the network lost it

log = logging.getLogger("llmship.gateway")


class GatewayHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._head_timeout_s = settings.gateway.header_timeout_s
        self._max_head_bytes = settings.gateway.max_header_bytes
        self._send_timeout_s = settings.gateway.send_timeout_s
        self._head_bytes = 0
        self._head_timer = None
        self._stall_timer = None
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
        self._disarm_stall_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault("extensions", {}).setdefault(GONE, LEFT)
        super().connection_lost(exc)

    # A write must not wait on the client for ever: timed from when the transport's buffer
    # filled (the client stopped taking what was sent) until it drains again. A client that
    # reads slowly but steadily drains it, and is never cut off.
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self._send_timeout_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._disarm_stall_timer()
        super().resume_writing()

    def _disarm_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        cycle = self.cycle
        what = "its answer"
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault("extensions", {})[GONE] = STALLED_OFF
            what = f"the answer to {cycle.scope['method']} {cycle.scope['path']}"
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.warning(
            "client %s took nothing of %s for %g s (LLMSHIP_GATEWAY_SEND_TIMEOUT_S): "
            "connection dropped",
            client,
            what,
            self._send_timeout_s,
        )
        # Not close(): it waits for the buffer to drain, which is what this client never lets
        # happen. connection_lost follows, and with it the request's http.disconnect.
        self.transport.abort()

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
