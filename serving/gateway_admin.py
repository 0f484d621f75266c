"""The gateway's admin API as its callers use it: the rollout (reads and moves routes, reads
the shadow pairs) and the gates (whether a version still takes traffic). Bearer token from
Settings. A client only: it imports no server (the gateway's app, the fleet); the gateways it
calls are those the fleet's directory heard from.

There can be several gateways, each relaying to the same fleet (behind a load balancer, or one
per host): every one tells the fleet's directory it is up, and a route moves on all of them.
Without a Ray cluster to ask (tests of the gateway alone), the stack's own gateway.

The messages are llmship/serving_messages.py's: routes, canaries and shadows go out as models
and come back as models (route_of, shadow_pairs); no caller reads them by key.
"""

from __future__ import annotations

import logging

import httpx
from pydantic import TypeAdapter

from llmship.errors import ServingError
from llmship.ray_cluster import uses_ray
from llmship.serving_messages import Canary, KeptPairs, Route, RouteOrder, Shadow
from llmship.settings import GatewaySettings, Settings
from serving import directory

log = logging.getLogger("llmship.fleet")
ROUTES = TypeAdapter(dict[str, Route])  # GET /admin/routes
KEPT = TypeAdapter(dict[str, KeptPairs])  # GET /admin/shadow/{model}


def _auth(gateway: GatewaySettings) -> dict[str, str]:
    return {"authorization": f"Bearer {gateway.admin_token}"}


def gateway_urls(settings: Settings) -> list[str]:
    """Every gateway that relays to the fleet now; the stack's own if none said so yet."""
    if uses_ray(settings):
        urls = directory.gateways(settings)
        if urls:
            return urls
    return [settings.gateway_url]


def gateway_routes(
    settings: Settings, urls: list[str] | None = None
) -> dict[str, dict[str, Route]]:
    """{gateway URL: {model: route}} as each gateway routes now; raises httpx.HTTPError if
    one cannot say."""
    routes = {}
    for url in urls or gateway_urls(settings):
        resp = httpx.get(f"{url}/admin/routes", timeout=10.0, headers=_auth(settings.gateway))
        resp.raise_for_status()
        routes[url] = ROUTES.validate_json(resp.content)
    return routes


def route_of(settings: Settings, model: str) -> Route | None:
    """model's route as the gateways route it: the first one's (they differ only while a
    route moves)."""
    return next(iter(gateway_routes(settings).values())).get(model)


def route_traffic(
    settings: Settings,
    model: str,
    version: str,
    canary: Canary | None = None,
    urls: list[str] | None = None,
    shadow: Shadow | None = None,
) -> None:
    """All of model's traffic to version's replicas, or canary.percent of it to
    canary.version's, on every gateway (or those of urls); with a shadow, copies of a share
    of version's requests to shadow.version."""
    order = RouteOrder(version=version, canary=canary, shadow=shadow)
    refused = []
    for url in urls or gateway_urls(settings):
        try:
            resp = httpx.put(
                f"{url}/admin/routes/{model}",
                timeout=10.0,
                headers=_auth(settings.gateway),
                json=order.model_dump(),
            )
        except httpx.HTTPError as exc:
            refused.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        if resp.status_code != 200:
            refused.append(f"{url}: {resp.status_code} {resp.text[:300]}")
    if refused:
        raise ServingError(
            f"the route to {model} {version} did not reach every gateway: {'; '.join(refused)}"
        )


def keep_routed(
    settings: Settings,
    gateways: list[str],
    model: str,
    version: str,
    canary: Canary | None,
    shadow: Shadow | None = None,
) -> list[str]:
    """Give the route to each of gateways that lacks it (one that started or restarted since
    it moved: a restart routes by the live alias); the URLs it was given to."""
    wanted = RouteOrder(version=version, canary=canary, shadow=shadow)
    lacking = []
    for url in gateways:
        try:
            route = gateway_routes(settings, [url])[url].get(model)
        except httpx.HTTPError:
            continue  # gone: it drops out of the fleet's list (tasks/canary.py leaves it out)
        if route is None or route.order() != wanted:
            lacking.append(url)
    if lacking:
        route_traffic(settings, model, version, wanted.canary, urls=lacking, shadow=wanted.shadow)
    return lacking


def shadow_pairs(
    settings: Settings, gateways: list[str], model: str, since: float
) -> dict[str, KeptPairs]:
    """What the gateways kept of model's shadow pairs since a time, by version, every
    gateway's together. One that does not answer is left out."""
    kept: dict[str, KeptPairs] = {}
    for url in gateways:
        try:
            resp = httpx.get(
                f"{url}/admin/shadow/{model}",
                params={"since": since},
                timeout=10.0,
                headers=_auth(settings.gateway),
            )
            resp.raise_for_status()
        except httpx.HTTPError:
            continue
        for version, found in KEPT.validate_json(resp.content).items():
            kept[version] = kept.get(version, KeptPairs()) + found
    return kept


def serves_traffic(
    settings: Settings, model: str, version: str, gateways: list[str] | None = None
) -> bool | None:
    """Whether a gateway (or, failing them, the live alias) sends traffic to version; None
    when neither can be asked."""
    try:
        return any(
            version in routes[model].versions()
            for routes in gateway_routes(settings, gateways).values()
            if model in routes
        )
    except httpx.HTTPError as exc:
        log.warning("a gateway is not reachable (%s): asking S3 instead", exc)
    return directory.live_alias_is(settings, model, version)
