"""The gateway's FastAPI application, built by create_app(settings): its start and stop (the
background work), its error answers, and its public routes (health, readiness, metrics,
models, the relayed endpoints)."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers

from llmship.ray_cluster import uses_ray
from llmship.settings import Settings, get_settings
from serving.gateway import admin
from serving.gateway.loops import follow_fleet, report_refused, watch_live_versions
from serving.gateway.relay import relay_request
from serving.gateway.routes import route_change
from serving.gateway.schemas import RELAYED, RelayedRequest, openai_error
from serving.gateway.state import GatewayState, gateway_of

log = logging.getLogger("llmship.gateway")
routes_log = logging.getLogger("llmship.gateway.routes")


@asynccontextmanager
async def lifespan(app: FastAPI, settings: Settings | None = None):
    # The settings given to create_app, or those of the environment as the app starts (a
    # test sets the environment, then starts the app).
    app.state.gw = gw = GatewayState(settings or get_settings())
    for model, route in sorted(gw.routes.items()):
        routes_log.info("%s (at start)", route_change(model, None, route))
    await asyncio.to_thread(report_refused, gw)
    tasks = [
        asyncio.create_task(watch_live_versions(gw)),
        asyncio.create_task(gw.shadower.run()),
    ]
    if uses_ray(gw.settings):
        tasks.append(asyncio.create_task(follow_fleet(gw)))
        # A gateway (re)started under traffic relays nothing until it knows the replicas:
        # it waits for them before it takes requests, or relays to the last known ones.
        try:
            await asyncio.wait_for(gw.fleet_known.wait(), gw.settings.gateway.fleet_wait_s)
        except TimeoutError:
            log.warning(
                "the fleet's replicas were not known within %.0f s: relaying to the "
                "last known ones until they are",
                gw.settings.gateway.fleet_wait_s,
            )
    yield
    for task in tasks:
        task.cancel()
    if gw.fleet_known.is_set():  # a gateway that stops drops out of rollouts at once
        try:
            from serving.directory import directory

            await asyncio.wait_for(directory().gateway_down.remote(gw.settings.gateway_url), 5.0)
        except Exception as exc:  # noqa: BLE001 - it drops out after gateway.seen_within_s
            log.warning("could not tell the fleet this gateway stops (%s)", exc)
    await app.state.gw.client.close()


class _Gateway(FastAPI):
    """FastAPI, with the relayed endpoints (RELAYED) answered before its middleware and router:
    each layer wraps every relayed chunk's send in a call of its own, and resolves every
    request's route and dependencies, a good part of the gateway's CPU per token. What they
    add there (a 500 for an unexpected error) is done here."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await super().__call__(scope, receive, send)
        path = scope["path"]
        if path == "/admin" or path.startswith("/admin/"):
            # The token first, before FastAPI reads a parameter: without it the admin API
            # answers 401 and nothing else (a bad `since` was a 422 describing it).
            denied = admin.authorize(self.state.gw, Headers(scope=scope).get("authorization"))
            return await (denied or super().__call__)(scope, receive, send)
        schema = RELAYED.get(path)
        if schema is None or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await relay_request(request, scope["path"], schema)
        except Exception as exc:  # noqa: BLE001 - as the app's own handler answers it
            response = await _unexpected(request, exc)
        await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's app, on settings (None: the environment's, read as the app starts)."""
    # No redirects: Starlette's answer to /v1/completions/ was a 307 whose Location it built
    # from the client's Host header. Each endpoint has one path, as OpenAI's API has; another
    # is a 404.
    app = _Gateway(
        title="llmship gateway",
        lifespan=partial(lifespan, settings=settings),
        redirect_slashes=False,
    )
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(404, _not_found)
    app.add_exception_handler(RequestValidationError, _bad_parameter)
    app.add_exception_handler(405, _wrong_method)
    for path, endpoint in (
        ("/health", health),
        ("/ready", ready),
        ("/metrics", metrics),
        ("/v1/models", list_models),
    ):
        app.add_api_route(path, endpoint, methods=["GET"])
    # Answered by _Gateway.__call__; declared here too, for /openapi.json and /docs.
    for endpoint, schema in RELAYED.items():
        app.add_api_route(
            endpoint,
            _relay_route(endpoint, schema),
            methods=["POST"],
            name=endpoint.strip("/").replace("/", "_"),
        )
    admin.add_routes(app)
    return app


def _relay_route(endpoint: str, schema: type[RelayedRequest]):
    async def relay(request: Request) -> Response:
        return await relay_request(request, endpoint, schema)

    return relay


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    return openai_error(
        500,
        f"the gateway failed on this request ({type(exc).__name__}); its log has the details",
        type_="server_error",
        code="internal_error",
    )


async def _not_found(request: Request, exc) -> JSONResponse:
    path = request.url.path
    hint = f" (did you mean {path.rstrip('/')}?)" if path != "/" and path.endswith("/") else ""
    return openai_error(404, f"no route {request.method} {path}{hint}", code="not_found")


async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad query or path parameter of a GET route: OpenAI-style, as every other error."""
    error = exc.errors()[0]
    param = str(error["loc"][-1]) if error.get("loc") else None
    return openai_error(400, f"{param}: {error['msg']}", param=param)


async def _wrong_method(request: Request, exc) -> JSONResponse:
    return openai_error(405, f"{request.method} is not allowed on {request.url.path}")


async def health(request: Request) -> dict:
    return {"status": "ok", "models": sorted(gateway_of(request).routes)}


async def ready(request: Request) -> JSONResponse:
    """Ready when every live version has a running replica: what a load balancer in front of
    the gateway should probe."""
    gw = gateway_of(request)
    unserved = {
        model: route.version
        for model, route in gw.routes.items()
        if not gw.replicas_of(model, route.version)
    }
    # Aliases a starting gateway skipped or whose version it refused: every other model
    # still serves, so these do not make it unready; they are for whoever reads /ready.
    problems = gw.alias_problems
    if unserved:
        resp = openai_error(
            503,
            f"not ready: no running replica for {unserved}",
            type_="server_error",
            code="not_ready",
        )
        if problems:
            body = json.loads(resp.body)
            resp = JSONResponse(status_code=503, content=body | {"alias_problems": problems})
        return resp
    return JSONResponse(
        {
            "status": "ready",
            "models": {m: r.version for m, r in sorted(gw.routes.items())},
            **({"alias_problems": problems} if problems else {}),
        }
    )


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(gateway_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


async def list_models(request: Request) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "owned_by": "llmship",
                "version": route.version,
                "created": int(datetime.fromisoformat(route.since).timestamp()),
                **(
                    {"canary": {"version": route.canary.version, "percent": route.canary.percent}}
                    if route.canary
                    else {}
                ),
            }
            for model, route in sorted(gateway_of(request).routes.items())
        ],
    }
