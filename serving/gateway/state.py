"""One gateway's state: its routes and the fleet's replicas it relays to, its limits, its
metrics, its client to the engines and its shadower; saved to its folder on every change."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import aiohttp
from fastapi import Request

from llmship.processes import write_json
from llmship.serving_messages import Endpoint
from llmship.settings import Settings
from serving.directory import app_name
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.routes import read_saved_routes, restore_routes
from serving.gateway.schemas import RELAYED
from serving.observability import ScrapeTargetGroup
from serving.shadow import Shadower

log = logging.getLogger("llmship.gateway")


class GatewayState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        folder = gateway_state_dir(settings)
        self.routes_file = folder / "routes.json"
        self.endpoints_file = folder / "endpoints.json"
        self.admin_token = settings.gateway.admin_token
        self.max_in_flight = settings.gateway.max_in_flight
        self.max_choices = settings.gateway.max_choices_per_request
        self.max_request_bytes = settings.gateway.max_request_bytes
        self.body_timeout_s = settings.gateway.body_timeout_s
        self.in_flight = 0  # slots taken (one per completion); one event loop: plain counters
        self.upstream_in_flight: dict[str, int] = {}  # engine URL -> requests relayed now
        restored = restore_routes(settings, read_saved_routes(self.routes_file))
        self.routes = restored.routes
        # What the start refused (a bad alias, a version that may not serve): on /ready.
        self.alias_problems = restored.problems
        self.ungated_override = restored.ungated_override
        self.refused = restored.refused
        # Serving application (serving/directory.py: app_name) -> its replicas' engine URLs.
        self.endpoints: dict[str, list[str]] = {}
        if self.endpoints_file.exists():
            self.endpoints = json.loads(self.endpoints_file.read_text())
        self.metrics = GatewayMetrics(RELAYED, lambda: self.in_flight)
        self.sd_file = settings.prometheus_sd_file
        self.scrape_targets: list[ScrapeTargetGroup] | None = None  # as last written
        self.health_interval_s = settings.gateway.health_interval_s
        self.down_after = settings.gateway.down_after
        self.down: dict[str, str] = {}  # model -> its live version, declared down
        # Application -> the longest a replica of it took to start (fetch and engine), as seen:
        # how long Ray takes to replace one, which the watcher waits out before a rollback.
        self.start_s: dict[str, float] = {}
        self.fleet_known = asyncio.Event()  # set once the replicas were read from Ray
        # To the engines: aiohttp, whose C parser relays a token for a fraction of httpx's
        # CPU (bench/gateway_relay.py). An idle connection is dropped before the engine's
        # server drops it (uvicorn's keep-alive: 5 s, vLLM's too): at the same 5 s a request
        # sent on a connection the engine was closing meanwhile failed with "Server
        # disconnected" (seen as a 503 under load), and a POST cannot safely be sent twice.
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, keepalive_timeout=2.0),
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=300.0),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self.shadower = Shadower(
            self.metrics.registry,
            queue_size=settings.gateway.shadow_queue,
            concurrency=settings.gateway.shadow_concurrency,
            timeout_s=settings.gateway.shadow_timeout_s,
            max_bytes=settings.gateway.shadow_max_bytes,
            kept_pairs=settings.gateway.shadow_kept_pairs,
            send=self.send_copy,
            shadow_of=lambda model: (route := self.routes.get(model)) and route.shadow,
        )

    async def send_copy(
        self, model: str, version: str, endpoint: str, body: bytes
    ) -> tuple[int, bytes]:
        """A shadow copy to the least busy of version's replicas: (status, body)."""
        urls = self.least_busy(self.replicas_of(model, version))
        if not urls:
            raise ConnectionError(f"{model} {version} has no running replica")
        self.take_upstream(urls[0])
        try:
            async with self.client.post(
                f"{urls[0]}{endpoint}", data=body, headers={"content-type": "application/json"}
            ) as resp:
                return resp.status, await resp.read()
        finally:
            self.release_upstream(urls[0])

    def least_busy(self, urls: list[str]) -> list[str]:
        """Fewest requests in flight from this gateway first; among equals, a random one (a
        fresh gateway spreads too)."""
        return sorted(urls, key=lambda u: (self.upstream_in_flight.get(u, 0), random.random()))

    def take_upstream(self, url: str) -> None:
        self.upstream_in_flight[url] = self.upstream_in_flight.get(url, 0) + 1

    def release_upstream(self, url: str) -> None:
        left = self.upstream_in_flight.get(url, 1) - 1
        if left > 0:
            self.upstream_in_flight[url] = left
        else:
            self.upstream_in_flight.pop(url, None)

    def replicas_of(self, model: str, version: str) -> list[str]:
        return self.endpoints.get(app_name(model, version), [])

    def save(self) -> None:
        write_json(self.routes_file, {m: r.model_dump() for m, r in self.routes.items()})

    def note_starts(self, endpoints: dict[str, list[Endpoint]]) -> None:
        for app, replicas in endpoints.items():
            for e in replicas:
                took = (e.fetch_s or 0.0) + (e.engine_start_s or 0.0)
                if took > self.start_s.get(app, 0.0):
                    self.start_s[app] = took

    def set_scrape_targets(self, groups: list[ScrapeTargetGroup]) -> None:
        """The engines' scrape targets, written for Prometheus when they change."""
        if groups == self.scrape_targets:
            return
        try:
            write_json(self.sd_file, [g.model_dump() for g in groups])
        except OSError as exc:  # a full or read-only disk must not stop the relaying
            log.warning("cannot write the engines' scrape targets to %s: %s", self.sd_file, exc)
            return
        self.scrape_targets = groups
        log.info("engines' scrape targets: %d, in %s", len(groups), self.sd_file)

    def set_endpoints(self, endpoints: dict[str, list[str]]) -> None:
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            write_json(self.endpoints_file, endpoints)
        for model, route in self.routes.items():
            for version in filter(
                None, (route.version, route.canary.version if route.canary else None)
            ):
                self.metrics.replicas.labels(model, version).set(
                    len(self.replicas_of(model, version))
                )


def gateway_of(request: Request) -> GatewayState:
    """The state of the gateway app that took request."""
    return request.app.state.gw


def gateway_state_dir(settings: Settings):
    """This gateway's saved routes and replicas: one folder per port, as several can run."""
    return settings.state_dir / "gateway" / str(settings.gateway.port)
