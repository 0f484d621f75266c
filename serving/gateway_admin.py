"""The gateway's admin API as its callers use it: the rollout (reads and moves routes) and the
fleet (whether a version still takes traffic). Bearer token from Settings."""

from __future__ import annotations

import httpx

from llmship.errors import ServingError
from llmship.settings import Settings


def _auth(settings: Settings) -> dict[str, str]:
    return {"authorization": f"Bearer {settings.gateway_admin_token}"}


def gateway_routes(settings: Settings) -> dict:
    """{model: route} as the gateway routes now; raises httpx.HTTPError if it cannot say."""
    resp = httpx.get(f"{settings.gateway_url}/admin/routes", timeout=10.0,
                     headers=_auth(settings))
    resp.raise_for_status()
    return resp.json()


def route_traffic(settings: Settings, model: str, version: str,
                  canary: dict | None = None) -> None:
    """All of model's traffic to version's replicas, or canary['percent'] of it to
    canary['version']'s."""
    resp = httpx.put(f"{settings.gateway_url}/admin/routes/{model}", timeout=10.0,
                     headers=_auth(settings), json={"version": version, "canary": canary})
    if resp.status_code != 200:
        raise ServingError(f"the gateway refused the route to {model} {version}: "
                           f"{resp.status_code} {resp.text[:300]}")
