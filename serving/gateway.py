"""The gateway clients talk to: OpenAI-compatible, in front of one model server per version.

    POST /v1/completions, /v1/chat/completions   proxied to the live version (streams unbuffered)
    GET  /v1/models                              the models served, with their live version
    GET  /health                                 the gateway itself
    GET  /metrics                                Prometheus
    GET  /admin/routes, PUT /admin/routes/{model}  bearer token: what the rollout task drives

Requests are checked here, so a bad one gets an OpenAI-style 400 without reaching a model
server. Routes are kept in <state>/gateway/routes.json and restored at start.

    uvicorn serving.gateway:app --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import httpx
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmship.processes import write_json
from llmship.settings import get_settings


# ------------------------------------------------------------------ request schemas

class _OpenAIRequest(BaseModel):
    # Unknown fields pass through to the engine, which knows its own extensions.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=16)
    stream: bool = False


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Any] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Route(BaseModel):
    version: str
    upstream: str  # http://host:port of the model server
    since: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


def openai_error(status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": type_, "param": param, "code": code}})


# ------------------------------------------------------------------ state and metrics

class GatewayState:
    def __init__(self) -> None:
        settings = get_settings()
        self.routes_file = settings.state_dir / "gateway" / "routes.json"
        self.admin_token = settings.gateway_admin_token
        self.routes: dict[str, Route] = {}
        if self.routes_file.exists():
            raw = json.loads(self.routes_file.read_text())
            self.routes = {m: Route.model_validate(r) for m, r in raw.items()}
        self.registry = CollectorRegistry()
        self.requests = Counter("llmship_gateway_requests", "Requests by outcome",
                                ["model", "version", "endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("llmship_gateway_request_seconds", "Request latency",
                                 ["model", "version", "endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                                          10, 30, 60))
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0),
                                        limits=httpx.Limits(max_connections=512))

    def save(self) -> None:
        write_json(self.routes_file, {m: r.model_dump() for m, r in self.routes.items()})


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.gw = GatewayState()
    yield
    await app.state.gw.client.aclose()


app = FastAPI(title="llmship gateway", lifespan=lifespan)


def _gw(request: Request) -> GatewayState:
    return request.app.state.gw


@app.exception_handler(404)
async def _not_found(request: Request, exc) -> JSONResponse:
    return openai_error(404, f"no route {request.method} {request.url.path}", code="not_found")


@app.exception_handler(405)
async def _wrong_method(request: Request, exc) -> JSONResponse:
    return openai_error(405, f"{request.method} is not allowed on {request.url.path}")


@app.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "models": sorted(_gw(request).routes)}


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_gw(request).registry), media_type=CONTENT_TYPE_LATEST)


@app.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [
        {"id": model, "object": "model", "owned_by": "llmship", "version": route.version,
         "created": int(datetime.fromisoformat(route.since).timestamp())}
        for model, route in sorted(_gw(request).routes.items())]}


async def _proxy(request: Request, endpoint: str, schema: type[_OpenAIRequest]) -> Response:
    gw = _gw(request)
    body = await request.body()
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return openai_error(400, f"request body is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        return openai_error(400, "request body must be a JSON object")
    try:
        parsed = schema.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        return openai_error(400, f"{param}: {first['msg']}", param=param)
    route = gw.routes.get(parsed.model)
    if route is None:
        gw.requests.labels(parsed.model, "", endpoint, "404").inc()
        return openai_error(404, f"the model {parsed.model!r} does not exist; "
                                 f"served: {sorted(gw.routes)}", code="model_not_found",
                            param="model")
    started = time.perf_counter()
    upstream = gw.client.build_request("POST", f"{route.upstream}{endpoint}", content=body,
                                       headers={"content-type": "application/json"})
    try:
        resp = await gw.client.send(upstream, stream=True)
    except httpx.HTTPError as exc:
        gw.requests.labels(parsed.model, route.version, endpoint, "503").inc()
        return openai_error(503, f"model server for {parsed.model} {route.version} is "
                                 f"unavailable: {type(exc).__name__}", type_="server_error",
                            code="upstream_unavailable")

    def record() -> None:
        gw.requests.labels(parsed.model, route.version, endpoint, str(resp.status_code)).inc()
        gw.latency.labels(parsed.model, route.version, endpoint).observe(
            time.perf_counter() - started)

    headers = {"x-llmship-version": route.version}
    if parsed.stream and resp.status_code == 200:
        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                record()
        return StreamingResponse(relay(), status_code=resp.status_code, headers=headers,
                                 media_type=resp.headers.get("content-type", "text/event-stream"))
    content = await resp.aread()
    await resp.aclose()
    record()
    return Response(content, status_code=resp.status_code, headers=headers,
                    media_type=resp.headers.get("content-type", "application/json"))


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _proxy(request, "/v1/completions", CompletionRequest)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _proxy(request, "/v1/chat/completions", ChatCompletionRequest)


# ------------------------------------------------------------------ admin

def _authorize(gw: GatewayState, authorization: str | None) -> JSONResponse | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return openai_error(401, "admin endpoints need 'Authorization: Bearer <token>'",
                            type_="authentication_error")
    if not gw.admin_token or not secrets.compare_digest(authorization[7:].strip(),
                                                        gw.admin_token):
        return openai_error(403, "the admin token is wrong", type_="permission_error")
    return None


@app.get("/admin/routes")
async def get_routes(request: Request, authorization: str | None = Header(None)):
    gw = _gw(request)
    if denied := _authorize(gw, authorization):
        return denied
    return {m: r.model_dump() for m, r in gw.routes.items()}


@app.put("/admin/routes/{model}")
async def set_route(model: str, request: Request, authorization: str | None = Header(None)):
    gw = _gw(request)
    if denied := _authorize(gw, authorization):
        return denied
    try:
        route = Route.model_validate(await request.json())
    except (ValidationError, json.JSONDecodeError) as exc:
        return openai_error(400, f"expected {{'version': ..., 'upstream': ...}}: {exc}")
    try:
        healthy = (await gw.client.get(f"{route.upstream}/health", timeout=5.0)).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        return openai_error(409, f"{route.upstream} is not healthy: traffic not moved",
                            code="upstream_unhealthy")
    gw.routes[model] = route
    gw.save()
    return route.model_dump()
