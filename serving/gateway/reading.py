"""A relayed request read and checked before it reaches a model server: its body within its
time and size limits, valid JSON and Unicode, the endpoint's schema, the choices it asks for."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from serving.gateway.schemas import CompletionRequest, RelayedRequest, openai_error
from serving.gateway.state import GatewayState

CLIENT_LEFT = 499  # the access log's status of a request whose client left before it was read


def too_many_choices(gw: GatewayState, parsed: RelayedRequest, choices: int) -> JSONResponse:
    n = getattr(parsed, "n", None) or 1
    prompts = parsed.prompts() if isinstance(parsed, CompletionRequest) else 1
    param = "prompt" if prompts > 1 else "n"
    return openai_error(
        400,
        f"{param}: this request asks for {choices} completions ({prompts} prompts x n={n}); "
        f"this gateway takes at most {gw.max_choices} in one request "
        "(LLMSHIP_GATEWAY_MAX_CHOICES_PER_REQUEST): send them in several requests",
        param=param,
        code="too_many_choices",
    )


async def read_body(gw: GatewayState, request: Request) -> bytes | Response:
    """The body, read within its time and size limits (counted as it arrives, so a chunked
    body is cut off at the limit, not read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > gw.max_request_bytes:
        return _too_large(gw, f"{int(declared)} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(gw.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > gw.max_request_bytes:
                    return _too_large(gw, f"over {gw.max_request_bytes} bytes")
                chunks.append(chunk)
    except ClientDisconnect:
        # The client went away mid-body: nothing to answer and nothing wrong here. nginx's
        # 499 ("client closed request"), for the one access line that records it; it was
        # an "unexpected error" with a traceback, 865 bytes of log each.
        return Response(status_code=CLIENT_LEFT)
    except TimeoutError:
        return _closing(
            openai_error(
                408,
                f"the request body did not arrive within {gw.body_timeout_s:g} s "
                f"({size} bytes came; LLMSHIP_GATEWAY_BODY_TIMEOUT_S)",
                code="request_timeout",
            )
        )
    return b"".join(chunks)


def _lone_surrogate(body: bytes, payload: Any) -> tuple[str, bool] | None:
    """Where the body holds a string with a lone surrogate: (its parameter, as `stop[0]` or
    `messages[1].content`, and whether it is a key there), or None. Python's JSON parser takes
    "\\ud800" (and the raw bytes of a surrogate); vLLM answers such a request 500, which
    counted against the version a canary is judged on: anyone could fail a canary. Any
    string anywhere, as any field may reach the engine's tokenizer or its logs."""
    if body.isascii() and b"\\u" not in body:
        return None  # no escape and no byte past ASCII: no surrogate can be in it
    try:  # in C, a few ms for the largest body: the walk below is for the bad ones only
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    stack: list[tuple[Any, str]] = [(payload, "")]
    while stack:  # not recursive: a body may nest as deep as the JSON parser allows
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                return path, True
            if isinstance(item, str | dict | list):  # a path only for what may hold one
                if isinstance(key, str):
                    here = f"{path}.{key}" if path else key
                else:
                    here = f"{path}[{key}]"
                if not isinstance(item, str):
                    stack.append((item, here))
                elif _has_surrogate(item):
                    return here, False
    return None


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _param(loc: tuple, payload: Any) -> str:
    """A validation error's location as the client wrote it: `messages[0].content`, not
    pydantic's `messages.0.content.str` (the union member it tried is not the client's)."""
    parts, value = [], payload
    for step in loc:
        if isinstance(step, int) and isinstance(value, list) and step < len(value):
            parts.append(f"[{step}]")
            value = value[step]
        elif isinstance(step, str) and isinstance(value, dict) and step in value:
            parts.append(f".{step}" if parts else step)
            value = value[step]
        elif isinstance(step, str) and isinstance(value, dict):
            parts.append(f".{step}" if parts else step)  # a field the client left out
            break
    return "".join(parts)


async def read_request(
    gw: GatewayState, request: Request, schema: type[RelayedRequest]
) -> tuple[bytes, RelayedRequest] | Response:
    body = await read_body(gw, request)
    if isinstance(body, Response):
        return body
    try:
        payload = json.loads(body)
    except RecursionError:
        return openai_error(400, "request body is nested too deeply to be a request")
    except ValueError as exc:  # not JSON, not UTF-8, or a number past Python's 4300 digits
        return openai_error(400, f"request body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return openai_error(400, "request body must be a JSON object")
    if (where := _lone_surrogate(body, payload)) is not None:
        param, key = where
        return openai_error(
            400,
            (f"a key of {param or 'the request'}" if key else param)
            + " holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape not in a pair), "
            "which is no character: send valid Unicode",
            param=param or None,
            code="invalid_unicode",
        )
    try:
        return body, schema.model_validate(payload)
    except ValidationError as exc:
        # Of a union's errors (one per member tried), the one that reaches deepest into what
        # the client sent says most: prompt[1], not prompt.
        errors = [(_param(e["loc"], payload), e["msg"]) for e in exc.errors()]
        param, msg = max(errors, key=lambda e: e[0].count("[") + e[0].count("."))
        if not param:  # a refusal of the request as a whole
            return openai_error(400, msg)
        return openai_error(400, f"{param}: {msg}", param=param)


def _too_large(gw: GatewayState, size: str) -> JSONResponse:
    return _closing(
        openai_error(
            413,
            f"the request body is {size}; this gateway takes at most {gw.max_request_bytes} "
            "bytes (LLMSHIP_GATEWAY_MAX_REQUEST_BYTES)",
            code="request_too_large",
        )
    )


def _closing(resp: JSONResponse) -> JSONResponse:
    """The connection closes after this answer: what the client still sends is not read."""
    resp.headers["connection"] = "close"
    return resp
