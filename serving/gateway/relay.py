"""The relay: a checked request to one of its version's replicas (the least busy, a canary's
share to the canary), and the engine's answer back, streamed or whole, counted and logged."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass

import aiohttp
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmship.serving_messages import Route
from serving.gateway.reading import read_request, too_many_choices
from serving.gateway.schemas import RelayedRequest, openai_error, openai_error_body
from serving.gateway.state import GatewayState, gateway_of
from serving.gateway_http import GONE, STALLED_OFF
from serving.observability import (
    AccessEntry,
    StreamTally,
    TokenUsage,
    access_line,
    usage_of_answer,
)
from serving.shadow import answer_text, streamed_text

access_log = logging.getLogger("llmship.gateway.access")
UNKNOWN_MODEL = "(unknown)"  # the metrics' label for every model name the gateway does not serve


async def relay_request(request: Request, endpoint: str, schema: type[RelayedRequest]) -> Response:
    started = time.perf_counter()
    client_id = request.headers.get("x-request-id")
    # The client's id, or one of the gateway's: in the access log and the answer's header.
    request_id = client_id or secrets.token_hex(8)
    response, model = await _answer(request, endpoint, schema, client_id, request_id)
    response.headers["x-request-id"] = request_id
    if "x-llmship-version" not in response.headers:  # a relayed answer is logged as it ends
        access_log.info(
            access_line(
                AccessEntry(
                    method=request.method,
                    path=endpoint,
                    model=model,
                    status=str(response.status_code),
                    duration_ms=(time.perf_counter() - started) * 1000,
                    request_id=request_id,
                )
            )
        )
    return response


async def _answer(
    request: Request,
    endpoint: str,
    schema: type[RelayedRequest],
    client_id: str | None,
    request_id: str,
) -> tuple[Response, str | None]:
    """The answer, and the model asked for (None when the request did not say one)."""
    gw = gateway_of(request)
    # The request is read and checked before it takes an in-flight slot: a slow or broken
    # client holds its own connection, never a slot other clients need.
    checked = await read_request(gw, request, schema)
    if isinstance(checked, Response):
        return checked, None
    body, parsed = checked
    choices = parsed.choices()
    if choices > gw.max_choices:
        return too_many_choices(gw, parsed, choices), parsed.model
    # The work, not the request, is what the limit counts: a request of k completions takes
    # k slots (all of them at most, so one can always run alone).
    weight = min(choices, gw.max_in_flight)
    if gw.in_flight + weight > gw.max_in_flight:
        gw.metrics.shed.labels(endpoint).inc()
        resp = openai_error(
            429,
            f"the gateway has {gw.in_flight} of its {gw.max_in_flight} in-flight slots taken, "
            f"and this request needs {weight} (one per completion asked for): retry shortly",
            type_="rate_limit_error",
            code="overloaded",
        )
        resp.headers["retry-after"] = "1"
        return resp, parsed.model
    gw.in_flight += weight
    streaming = False
    try:
        response = await forward(gw, body, parsed, endpoint, client_id, request_id, weight)
        streaming = isinstance(response, _RelayResponse)
        return response, parsed.model
    finally:
        if not streaming:  # a relayed stream gives its slots back when it closes
            gw.in_flight -= weight


class _RelayResponse(StreamingResponse):
    """A stream relayed from a model server. Its clean-up (close the upstream response, give
    the in-flight slots back, count the request) runs however the relay ends: also when the
    client leaves before the first chunk, where the generator never starts and so would run
    no `finally` of its own, and when the client stalled a write past
    gateway.send_timeout_s and was dropped (serving/gateway_http.py marks its scope)."""

    def __init__(self, *args, on_close, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def send_while_there(message) -> None:
            await send(message)
            # The extensions are read each time: the server adds them when the client goes.
            if scope.get("extensions", {}).get(GONE):
                raise _ClientGone  # no more reading of the engine's answer into nothing

        try:
            await super().__call__(scope, receive, send_while_there)
        except _ClientGone:
            pass
        finally:
            gone = scope.get("extensions", {}).get(GONE)
            await self._on_close(gone == STALLED_OFF)


class _ClientGone(Exception):
    """The client of a relayed stream is gone (serving/gateway_http.py marks its scope)."""


# The requests counter's status of a relay dropped because its client took nothing of the
# answer for gateway.send_timeout_s. Not an error of the version (a canary is judged on
# those): any client can stall its own reads.
CLIENT_STALLED = "client_stalled"


# What an engine that refuses, drops or stalls a connection raises on the gateway's side.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def choose_backends(gw: GatewayState, model: str, route: Route) -> list[tuple[str, str]]:
    """(version, engine URL) to try, in order: the replicas of the version this request is
    sent to, the least busy first, then the other version's, as fallbacks for a replica that
    refuses the connection."""
    versions = [route.version]
    if route.canary is not None:
        canary_first = random.random() * 100 < route.canary.percent
        versions = (
            [route.canary.version, route.version]
            if canary_first
            else [route.version, route.canary.version]
        )
    order = []
    for version in versions:
        order += [(version, url) for url in gw.least_busy(gw.replicas_of(model, version))]
    return order


def unavailable(gw: GatewayState, model: str, route: Route, what: str) -> JSONResponse:
    """The 503 of a request no replica of model took: what failed, whether the live version
    is down (a rollback asked for), and when to retry."""
    restoring = (
        "; it is down and a rollback to the previous version was asked for"
        if gw.down.get(model) == route.version
        else ""
    )
    resp503 = openai_error(
        503,
        f"{what}{restoring}: retry shortly",
        type_="server_error",
        code="upstream_unavailable",
    )
    resp503.headers["retry-after"] = "5"
    return resp503


async def _send(
    gw: GatewayState, backends: list[tuple[str, str]], model: str, endpoint: str, body: bytes
) -> tuple[str, str, aiohttp.ClientResponse] | list[str]:
    """(version, engine URL, its response) of the first backend that took the request, or
    what failed of each tried."""
    failed: list[str] = []
    for version, upstream in backends:
        try:
            resp = await gw.client.post(
                f"{upstream}{endpoint}", data=body, headers={"content-type": "application/json"}
            )
            return version, upstream, resp
        except UPSTREAM_ERRORS as exc:
            # Counted against the version that failed: what a canary step is judged on.
            gw.metrics.count_unanswered(model, version, endpoint)
            failed.append(f"{version} at {upstream}: {type(exc).__name__}")
            if not isinstance(exc, aiohttp.ClientConnectorError):
                break  # the request may have reached the server: not safe to send twice
    return failed


@dataclass
class _Relayed:
    """One request relayed to one replica: what its outcome is counted and logged as."""

    gw: GatewayState
    model: str
    version: str
    endpoint: str
    upstream: str
    started: float
    log_id: str

    def record(self, status: str, usage: TokenUsage) -> None:
        gw, model, version, endpoint = self.gw, self.model, self.version, self.endpoint
        seconds = time.perf_counter() - self.started
        gw.metrics.requests.labels(model, version, endpoint, status).inc()
        gw.metrics.latency.labels(model, version, endpoint).observe(seconds)
        # A 0 until one: a rate, not none.
        errors = gw.metrics.errors.labels(model, version, endpoint)
        if status == "broken" or (status.isdigit() and int(status) >= 500):
            errors.inc()  # not CLIENT_STALLED: the client's doing, not the version's
        gw.metrics.count_tokens(model, version, usage)
        access_log.info(
            access_line(
                AccessEntry(
                    method="POST",
                    path=endpoint,
                    model=model,
                    version=version,
                    status=status,
                    duration_ms=seconds * 1000,
                    usage=usage,
                    request_id=self.log_id,
                )
            )
        )


async def forward(
    gw: GatewayState,
    body: bytes,
    parsed: RelayedRequest,
    endpoint: str,
    request_id: str | None = None,
    log_id: str = "-",
    weight: int = 1,
) -> Response:
    """request_id: the client's, which names a shadow pair; log_id: the access log's;
    weight: the in-flight slots the request holds, which a relayed stream gives back."""
    model = parsed.model
    route = gw.routes.get(model)
    if route is None:
        # Not the client's name as a label: every new one would be a series kept for ever.
        gw.metrics.requests.labels(UNKNOWN_MODEL, "", endpoint, "404").inc()
        return openai_error(
            404,
            f"the model {model!r} does not exist; served: {sorted(gw.routes)}",
            code="model_not_found",
            param="model",
        )
    backends = choose_backends(gw, model, route)
    if not backends:
        gw.metrics.count_unanswered(model, route.version, endpoint)
        return unavailable(
            gw, model, route, f"{model}'s live version {route.version} has no running replica"
        )
    started = time.perf_counter()
    sent = await _send(gw, backends, model, endpoint, body)
    if isinstance(sent, list):
        return unavailable(
            gw, model, route, f"the model server of {model} failed: {'; '.join(sent)}"
        )
    version, upstream, resp = sent
    gw.take_upstream(upstream)
    relayed = _Relayed(gw, model, version, endpoint, upstream, started, log_id)
    copy = None  # a copy for the route's shadow, offered once the live answer is whole
    if parsed.shadowed and route.shadow and version == route.version and resp.status == 200:
        copy = gw.shadower.choose(model, route.shadow, endpoint, body, parsed, request_id)
    if parsed.streamed() and resp.status == 200:
        return _relay_stream(relayed, resp, parsed, copy, weight)
    return await _relay_whole(relayed, resp, copy)


def _relay_stream(
    relayed: _Relayed,
    resp: aiohttp.ClientResponse,
    parsed: RelayedRequest,
    copy,
    weight: int,
) -> _RelayResponse:
    """The engine's stream, relayed chunk by chunk as it comes."""
    gw, model, version, endpoint = relayed.gw, relayed.model, relayed.version, relayed.endpoint
    outcome = {"status": "200"}
    answer = bytearray() if copy else None
    tally = StreamTally(parsed.token_event)

    async def relay():
        first = True
        try:
            async for chunk in resp.content.iter_any():
                if first:
                    gw.metrics.first_token.labels(model, version, endpoint).observe(
                        time.perf_counter() - relayed.started
                    )
                    first = False
                tally.feed(chunk)
                if answer is not None and len(answer) <= gw.shadower.max_bytes:
                    answer.extend(chunk)
                yield chunk
            outcome["whole"] = True
        except UPSTREAM_ERRORS as exc:
            # The server went away mid-stream, after the 200 went out: the stream ends
            # with an error event, as vLLM's own do (OpenAI's client raises it as an
            # APIError), and no [DONE], so no client takes the answer as whole.
            outcome["status"] = "broken"
            error = openai_error_body(
                f"the model server of {model} {version} failed mid-answer: "
                f"{type(exc).__name__}: retry shortly",
                type_="server_error",
                code="upstream_unavailable",
            )
            yield f"data: {json.dumps(error)}\n\n".encode()

    async def close(stalled: bool) -> None:
        if outcome.get("whole"):
            resp.release()  # the connection goes back to the pool
        else:
            # The client left or stalled, or the engine failed: not reusable. Closing it
            # is what tells the engine to stop generating the answer.
            resp.close()
            if stalled:
                outcome["status"] = CLIENT_STALLED
        gw.in_flight -= weight
        gw.release_upstream(relayed.upstream)
        relayed.record(outcome["status"], tally.usage())
        if copy:
            whole = outcome.get("whole") and len(answer) <= gw.shadower.max_bytes
            gw.shadower.offer(copy, streamed_text(bytes(answer)) if whole else None)

    return _RelayResponse(
        relay(),
        on_close=close,
        status_code=200,
        headers={"x-llmship-version": version},
        media_type=resp.headers.get("content-type", "text/event-stream"),
    )


async def _relay_whole(relayed: _Relayed, resp: aiohttp.ClientResponse, copy) -> Response:
    """The engine's answer, read whole, then relayed."""
    gw, model, version = relayed.gw, relayed.model, relayed.version
    try:
        content = await resp.read()
    except UPSTREAM_ERRORS as exc:
        relayed.record("broken", TokenUsage())
        return openai_error(
            503,
            f"model server for {model} {version} failed mid-answer: {type(exc).__name__}",
            type_="server_error",
            code="upstream_unavailable",
        )
    finally:
        resp.release()
        gw.release_upstream(relayed.upstream)
    try:
        whole = json.loads(content)
    except ValueError:
        whole = None
    relayed.record(str(resp.status), usage_of_answer(whole) if resp.status == 200 else TokenUsage())
    if copy:
        gw.shadower.offer(copy, answer_text(whole))
    return Response(
        content,
        status_code=resp.status,
        headers={"x-llmship-version": version},
        media_type=resp.headers.get("content-type", "application/json"),
    )
