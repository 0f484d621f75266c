"""The gateway's admin API (bearer token): the routes a rollout moves, the shadow pairs it
judges, and the engines' scrape targets for a Prometheus on another host."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from llmship.serving_messages import Route
from serving.gateway.reading import read_body
from serving.gateway.routes import route_change
from serving.gateway.schemas import openai_error
from serving.gateway.state import GatewayState, gateway_of

routes_log = logging.getLogger("llmship.gateway.routes")


def authorize(gw: GatewayState, authorization: str | None) -> JSONResponse | None:
    if not authorization or not authorization.lower().startswith("bearer "):
        return openai_error(
            401,
            "admin endpoints need 'Authorization: Bearer <token>'",
            type_="authentication_error",
        )
    # As bytes: compare_digest refuses a str with non-ASCII characters, and a header may
    # hold any (latin-1) character.
    given = authorization[7:].strip().encode("utf-8", "surrogateescape")
    if not gw.admin_token or not secrets.compare_digest(given, gw.admin_token.encode()):
        return openai_error(403, "the admin token is wrong", type_="permission_error")
    return None


async def get_routes(request: Request):
    gw = gateway_of(request)
    return {m: r.model_dump() for m, r in gw.routes.items()}


async def set_route(model: str, request: Request):
    gw = gateway_of(request)
    body = await read_body(gw, request)
    if isinstance(body, Response):
        return body
    try:
        route = Route.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(step) for step in error["loc"]) or None
        return openai_error(
            400,
            "expected {'version': ..., 'canary': {'version': ..., 'percent': ...} or null, "
            f"'shadow': {{...}} or null}}: {param or 'the body'}: {error['msg']}",
            param=param,
        )
    versions = {route.version, *(v.version for v in (route.canary, route.shadow) if v)}
    for version in sorted(versions):
        if not gw.replicas_of(model, version):
            return openai_error(
                409,
                f"{model} {version} has no running replica: traffic not moved",
                code="upstream_unhealthy",
            )
    moved = route_change(model, gw.routes.get(model), route)
    gw.routes[model] = route
    if moved:
        routes_log.info(moved)
    if gw.down.get(model) != route.version:
        gw.down.pop(model, None)
    gw.shadower.forget_all_but(model, route.shadow.version if route.shadow else None)
    gw.save()
    return route.model_dump()


async def get_shadow(model: str, request: Request, since: float = 0.0):
    """What this gateway kept of model's shadow pairs scored since a time (unix seconds):
    hashes, and the disagreeing examples when the route's shadow keeps them."""
    gw = gateway_of(request)
    return gw.shadower.kept(model, since)


async def engines_sd(request: Request):
    """The engines' scrape targets in Prometheus's http_sd format: the file's content, for a
    Prometheus on another host than the gateway (its `authorization` holds the token)."""
    gw = gateway_of(request)
    return [g.model_dump() for g in gw.scrape_targets or []]


def add_routes(app: FastAPI) -> None:
    """The admin routes, on app. Not described in the public /openapi.json and /docs. Every
    route under /admin is authorized by the app (serving/gateway/application.py) before it is
    routed (a new one too)."""
    for method, path, endpoint in (
        ("GET", "/admin/routes", get_routes),
        ("PUT", "/admin/routes/{model}", set_route),
        ("GET", "/admin/shadow/{model}", get_shadow),
        ("GET", "/admin/sd/engines", engines_sd),
    ):
        app.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
