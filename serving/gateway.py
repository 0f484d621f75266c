"""The gateway clients talk to: OpenAI-compatible, in front of each version's replicas.

    POST /v1/completions, /v1/chat/completions   proxied to the live version (streams unbuffered)
    POST /v1/responses, /tokenize, /detokenize   the same way (no shadow copies of these)
    GET  /v1/models                              the models served, with their live version
    GET  /health                                 the gateway itself
    GET  /ready                                  200 when every live version has a running replica
    GET  /metrics                                Prometheus (tokens too: serving/observability.py)
    GET  /admin/routes, PUT /admin/routes/{model}  bearer token: what the rollout task drives
    GET  /admin/sd/engines                       bearer token: the engines, as Prometheus http_sd

A route sends a model's requests to its live version, or, during a canary step, a
percentage of them to the new version. Each request goes to the version's replica with the
fewest requests in flight from this gateway, on whatever node it runs: the fleet's directory
(serving/fleet.py, on Ray) says where each replica's engine listens, and the gateway relays
the bytes to it directly. A replica that refuses the connection is counted as an error of its
version and the request goes to the next replica, then to the route's other version: a
replica that dies costs its clients only the requests it had in flight, and a canary that
dies rolls itself back by its error rate.

Ray checks each replica's health and replaces those that fail. A live version left with no
replica at all, for LLMSHIP_GATEWAY_DOWN_AFTER checks in a row (every
LLMSHIP_GATEWAY_HEALTH_INTERVAL_S), is declared down, once: its clients get OpenAI-style 503s,
/ready says which, and the Prefect event `llmship.serving.down` asks the automation
`llmship-restore-<model>` to roll the model back to its previous version.

Requests are checked here, so a bad one gets an OpenAI-style 400 without reaching a model
server. The gateway keeps no state of its own that matters: at start the routing is the S3
`live` aliases (the source of truth that rollouts move), and the replicas are the fleet's.
<state>/gateway/<port>/routes.json and endpoints.json, written on every change, are what it
serves from when S3 or the Ray cluster cannot be reached.

So it runs as several replicas (one per host, or behind a load balancer): each tells the
fleet's directory it is up, a rollout moves the route on every one of them and judges a
canary on the sum of their metrics, and one that starts during a canary gets its route at the
rollout's next check.

Those who watch it get, beside /metrics: the engines' scrape targets, written to
Settings.prometheus_sd_file whenever the replicas change; one line per request on the logger
llmship.gateway.access, and one per route change on llmship.gateway.routes (INFO; the
stack's command line sends them to the gateway's log: serving/gateway_logging.json).

    uvicorn serving.gateway:app --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal

import aiohttp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from llmship import events
from llmship.processes import write_json
from llmship.settings import Settings, get_settings
from serving.gateway_http import GONE, STALLED_OFF
from serving.observability import (
    AccessEntry,
    EngineEndpoint,
    ScrapeTargetGroup,
    StreamTally,
    TokenUsage,
    access_line,
    engine_scrape_targets,
    usage_of_answer,
)
from serving.shadow import Shadow, Shadower, answer_text, streamed_text

log = logging.getLogger("llmship.gateway")
access_log = logging.getLogger("llmship.gateway.access")
routes_log = logging.getLogger("llmship.gateway.routes")
UNKNOWN_MODEL = "(unknown)"  # the metrics' label for every model name the gateway does not serve
CLIENT_LEFT = 499  # the access log's status of a request whose client left before it was read


# ------------------------------------------------------------------ request schemas


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool | None = None


class RelayedRequest(BaseModel):
    """What the gateway reads of every relayed request: the model, which routes it. Unknown
    fields pass through to the engine, which knows its own extensions. Strict: a "16" for
    max_tokens or "yes" for stream is refused, as OpenAI's API and vLLM refuse it, not read
    as 16 or true."""

    model_config = ConfigDict(extra="allow", strict=True)

    # Whether the route's shadow may copy it (serving/shadow.py scores completions only).
    shadowed: ClassVar[bool] = False
    # What marks an event that carries a generated token, in a relayed stream.
    token_event: ClassVar[bytes] = StreamTally.EVENT

    model: str = Field(min_length=1)

    def streamed(self) -> bool:
        """Whether the engine answers it as a stream of events (a method: a client's
        `stream` field on an endpoint that does not stream is only passed through)."""
        return False

    def choices(self) -> int:
        """How many completions the engine computes for it (prompts x n): the slots it takes
        of the in-flight limit, and what gateway_max_choices_per_request bounds."""
        return 1


class _OpenAIRequest(RelayedRequest):
    shadowed: ClassVar[bool] = True

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def streamed(self) -> bool:
        return self.stream

    def choices(self) -> int:
        # vLLM 0.32 has no best_of on these endpoints (it ignores the field); beam search's
        # width is n, counted here.
        return self.n or 1


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> int:
        """A string or a list of token ids is one prompt; a list of either, one each."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return 1
        return len(prompt)

    def choices(self) -> int:
        return self.prompts() * (self.n or 1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Any] | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _refused(kind: str, message: str):
    """A validator's refusal, in the client's words: no pydantic "Value error, " before it."""

    def check(value: Any) -> Any:
        if value is not None and value is not False:
            raise PydanticCustomError(kind, message)
        return value

    return check


class ResponsesRequest(RelayedRequest):
    """OpenAI's Responses API (vLLM's /v1/responses). Only what routing needs is checked;
    the rest is the engine's to check.

    Refused: what would make the answer depend on state one replica keeps. vLLM 0.32 keeps a
    stored response in its own process's memory, and only when the engine runs with
    VLLM_ENABLE_RESPONSES_API_STORE=1 (its entrypoints/openai/responses/serving.py; otherwise
    `store` is ignored), which serving/replica.py turns off: a `previous_response_id` could
    only be found on the replica that answered it, which the gateway cannot send the request
    to, and a `background` response can only be polled there. `store` itself passes: the
    engine ignores it."""

    token_event: ClassVar[bytes] = b"event: response.output_text.delta"

    stream: bool | None = None
    previous_response_id: Annotated[
        str | None,
        AfterValidator(
            _refused(
                "stateful",
                "not supported by this gateway: responses are not stored (each replica "
                "would keep its own, and the next request may go to another). Send the "
                "conversation so far in `input` instead",
            )
        ),
    ] = None
    background: Annotated[
        bool | None,
        AfterValidator(
            _refused(
                "stateful",
                "not supported by this gateway: a background response is kept by one "
                "replica, and polling may reach another. Send the request without "
                "`background`, or stream it",
            )
        ),
    ] = None

    def streamed(self) -> bool:
        return bool(self.stream)


class TokenizeRequest(RelayedRequest):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError(
                "prompt_or_messages", "give one of `prompt` (a string) and `messages`"
            )
        return self


class DetokenizeRequest(RelayedRequest):
    """vLLM's /detokenize: token ids back to text."""

    tokens: list[Annotated[int, Field(ge=0)]]


def _a_time(since: str) -> str:
    """An ISO 8601 time /v1/models can give as a unix time: `since: "x"` was taken, and every
    /v1/models after it answered 500."""
    try:
        datetime.fromisoformat(since).timestamp()
    except (ValueError, OverflowError, OSError):
        raise PydanticCustomError(
            "iso_time", "an ISO 8601 time, as 2026-01-31T12:00:00+00:00"
        ) from None
    return since


# Strict, as the requests are: an admin field of the wrong type is refused, never converted.
class Canary(BaseModel):
    """A new version taking a share of a model's traffic while a rollout watches it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1)
    percent: float = Field(gt=0, lt=100)


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1)
    since: Annotated[str, AfterValidator(_a_time)] = Field(
        default_factory=lambda: datetime.now(UTC).isoformat()
    )
    canary: Canary | None = None
    # Copies of a share of the live version's requests, scored against the candidate's
    # answers (serving/shadow.py): during a canary, and in a shadow-only step before it.
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _shadow_is_the_candidate(self) -> Route:
        if self.shadow and self.shadow.version == self.version:
            raise ValueError("the shadow must be another version than the live one")
        if self.shadow and self.canary and self.shadow.version != self.canary.version:
            raise ValueError("the shadow must be the canary's version")
        return self


def route_change(model: str, old: Route | None, new: Route) -> str | None:
    """One line saying what a route change moved (`route m: live v1 -> v2; canary v2
    ended`), or None when it moved nothing (a rollout gives a route again to a gateway that
    has it)."""
    moved = []
    if old is None or old.version != new.version:
        moved.append(f"live {old.version} -> {new.version}" if old else f"live {new.version}")
    was, now = (old.canary if old else None), new.canary
    if now and (was is None or (was.version, was.percent) != (now.version, now.percent)):
        moved.append(f"canary {now.version} at {now.percent:g}%")
    elif was and not now:
        moved.append(f"canary {was.version} ended")
    was_shadow, shadow = (old.shadow if old else None), new.shadow
    if shadow and shadow != was_shadow:
        moved.append(
            f"shadow {shadow.version}: {shadow.fraction:.0%} of requests copied, "
            f"at most {shadow.max_rps:g}/s"
        )
    elif was_shadow and not shadow:
        moved.append(f"shadow {was_shadow.version} off")
    return f"route {model}: " + "; ".join(moved) if moved else None


def openai_error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content=openai_error_body(message, type_=type_, param=param, code=code)
    )


# ------------------------------------------------------------------ state and metrics


class GatewayState:
    def __init__(self) -> None:
        settings = self.settings = get_settings()
        folder = gateway_state_dir(settings)
        self.routes_file = folder / "routes.json"
        self.endpoints_file = folder / "endpoints.json"
        self.admin_token = settings.gateway_admin_token
        self.max_in_flight = settings.gateway_max_in_flight
        self.max_choices = settings.gateway_max_choices_per_request
        self.max_request_bytes = settings.gateway_max_request_bytes
        self.body_timeout_s = settings.gateway_body_timeout_s
        self.in_flight = 0  # slots taken (one per completion); one event loop: plain counters
        self.upstream_in_flight: dict[str, int] = {}  # engine URL -> requests relayed now
        restored = restore_routes(settings, read_saved_routes(self.routes_file))
        self.routes = restored.routes
        # What the start refused (a bad alias, a version that may not serve): on /ready.
        self.alias_problems = restored.problems
        self.ungated_override = restored.ungated_override
        self.refused = restored.refused
        # Serving application (serving/fleet.py: app_name) -> its replicas' engine URLs.
        self.endpoints: dict[str, list[str]] = {}
        if self.endpoints_file.exists():
            self.endpoints = json.loads(self.endpoints_file.read_text())
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmship_gateway_requests",
            "Requests by outcome",
            ["model", "version", "endpoint", "status"],
            registry=self.registry,
        )
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.latency = Histogram(
            "llmship_gateway_request_seconds",
            "Request latency",
            ["model", "version", "endpoint"],
            registry=self.registry,
            buckets=buckets,
        )
        self.first_token = Histogram(
            "llmship_gateway_time_to_first_token_seconds",
            "Streaming requests: from the request to the first chunk relayed",
            ["model", "version", "endpoint"],
            registry=self.registry,
            buckets=buckets,
        )
        self.shed = Counter(
            "llmship_gateway_shed",
            "Requests refused with 429: too many in flight",
            ["endpoint"],
            registry=self.registry,
        )
        for endpoint in RELAYED:  # a 0, not no data, on a dashboard until one is shed
            self.shed.labels(endpoint)
        self.prompt_tokens = Counter(
            "llmship_gateway_prompt_tokens",
            "Prompt tokens of the answers relayed (as the engine reported them)",
            ["model", "version"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "llmship_gateway_completion_tokens",
            "Completion tokens of the answers relayed (as the engine reported them; of a "
            "stream without usage, its events counted)",
            ["model", "version"],
            registry=self.registry,
        )
        self.in_flight_gauge = Gauge(
            "llmship_gateway_in_flight",
            "In-flight slots taken: one per completion being served (prompts x n)",
            registry=self.registry,
        )
        self.in_flight_gauge.set_function(lambda: self.in_flight)
        self.errors = Counter(
            "llmship_gateway_errors",
            "Requests answered 5xx or not at all",
            ["model", "version", "endpoint"],
            registry=self.registry,
        )
        self.upstream_up = Gauge(
            "llmship_gateway_upstream_up",
            "1 while a live version has a replica, 0 while it has none",
            ["model", "version"],
            registry=self.registry,
        )
        self.replicas = Gauge(
            "llmship_gateway_replicas",
            "Replicas of a routed version the gateway relays to",
            ["model", "version"],
            registry=self.registry,
        )
        self.sd_file = settings.prometheus_sd_file
        self.scrape_targets: list[ScrapeTargetGroup] | None = None  # as last written
        self.health_interval_s = settings.gateway_health_interval_s
        self.down_after = settings.gateway_down_after
        self.down: dict[str, str] = {}  # model -> its live version, declared down
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
            self.registry,
            queue_size=settings.gateway_shadow_queue,
            concurrency=settings.gateway_shadow_concurrency,
            timeout_s=settings.gateway_shadow_timeout_s,
            max_bytes=settings.gateway_shadow_max_bytes,
            kept_pairs=settings.gateway_shadow_kept_pairs,
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

    def count_unanswered(self, model: str, version: str, endpoint: str) -> None:
        """A request the gateway answered 503 for version: a request and an error, so the
        error rate (errors / requests) stays a rate."""
        self.requests.labels(model, version, endpoint, "503").inc()
        self.errors.labels(model, version, endpoint).inc()

    def replicas_of(self, model: str, version: str) -> list[str]:
        return self.endpoints.get(app_name(model, version), [])

    def save(self) -> None:
        write_json(self.routes_file, {m: r.model_dump() for m, r in self.routes.items()})

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

    def count_tokens(self, model: str, version: str, usage: TokenUsage) -> None:
        if usage.prompt_tokens is not None:
            self.prompt_tokens.labels(model, version).inc(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            self.completion_tokens.labels(model, version).inc(usage.completion_tokens)

    def set_endpoints(self, endpoints: dict[str, list[str]]) -> None:
        if endpoints != self.endpoints:
            self.endpoints = endpoints
            write_json(self.endpoints_file, endpoints)
        for model, route in self.routes.items():
            for version in filter(
                None, (route.version, route.canary.version if route.canary else None)
            ):
                self.replicas.labels(model, version).set(len(self.replicas_of(model, version)))


def read_saved_routes(path) -> dict[str, Route]:
    """The routes saved at the last change; none where the file is missing or unreadable (a
    starting gateway then routes by the aliases alone: it always starts)."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {m: Route.model_validate(r) for m, r in raw.items()}
    except (ValueError, AttributeError, OSError) as exc:  # ValidationError is a ValueError
        log.error("saved routes %s ignored: %s", path, exc)
        return {}


def gateway_state_dir(settings: Settings):
    """This gateway's saved routes and replicas: one folder per port, as several can run."""
    return settings.state_dir / "gateway" / str(settings.gateway_port)


def app_name(model: str, version: str) -> str:
    # serving/fleet.py names applications so; the gateway does not import the fleet (Ray).
    return f"{model}--{version}"


class RestoredRoutes(BaseModel):
    """What a starting gateway routes by: each model's route, and what it refused on the way
    (reported in its log, on /ready and as an event), keyed by alias key or model."""

    routes: dict[str, Route] = {}
    problems: dict[str, str] = {}
    # Models whose live version an operator's allow_ungated override put there (its alias
    # says so): the fleet's reconcile deploys them too.
    ungated_override: set[str] = set()
    # (model, refused version, why, what serves instead): one event each.
    refused: list[tuple[str, str, str, str | None]] = []


def restore_routes(settings: Settings, saved: dict[str, Route]) -> RestoredRoutes:
    """Each model's live alias, as a route (what was saved, when S3 cannot be read).

    Each alias is taken on its own, so one bad one costs only its own model: an alias that
    cannot be read is skipped, and a version the rollout's rule (versions.check_servable)
    would refuse (not published, no passing gate and no override recorded) gives way to the
    version live before it, if that one may serve."""
    from llmship.store import ArtifactStore
    from llmship.versions import choose_live

    if not (settings.s3_access_key and settings.s3_secret_key):
        return RestoredRoutes(routes=saved)
    try:
        store = ArtifactStore(settings)
        scan = store.read_live_aliases()
    except Exception as exc:  # noqa: BLE001 - S3 down: keep serving what was routed before
        log.warning(
            "cannot read the live aliases from S3 (%s: %s): keeping the last saved routes",
            type(exc).__name__,
            exc,
        )
        return RestoredRoutes(routes=saved)
    restored = RestoredRoutes(problems=dict(scan.problems))
    for key, problem in scan.problems.items():
        log.error("alias %s skipped: %s", key, problem)
    for model, alias in scan.aliases.items():
        try:
            choice = choose_live(store, model, alias)
        except Exception as exc:  # noqa: BLE001 - S3 failed now: what was routed, if anything
            log.warning(
                "cannot check %s's live version %s (%s: %s): keeping its saved route",
                model,
                alias.version,
                type(exc).__name__,
                exc,
            )
            if model in saved:
                restored.routes[model] = saved[model]
            continue
        if choice.version != alias.version:
            why = choice.refused[alias.version]
            instead = (
                f"serving {choice.version}, the version live before it, instead"
                if choice.version
                else "nothing else may serve it: requests for it are refused"
            )
            restored.problems[model] = f"live version {alias.version} refused: {why}; {instead}"
            restored.refused.append((model, alias.version, why, choice.version))
            log.error("%s: %s", model, restored.problems[model])
        if choice.version is None:
            continue
        if choice.ungated_override:
            restored.ungated_override.add(model)
        kept = saved.get(model)
        restored.routes[model] = (
            kept
            if kept and kept.version == choice.version and not (kept.canary or kept.shadow)
            else Route(version=choice.version)
        )
    return restored


def report_refused(gw: GatewayState) -> None:
    """The event llmship.serving.refused for each live version a starting gateway would not
    serve (the alert llmship-serving-refused tells the team)."""
    for model, version, why, instead in gw.refused:
        try:
            events.emit(
                events.SERVING_REFUSED,
                model,
                {"model": model, "version": version, "reason": why, "serving": instead},
                version=version,
            )
        except Exception as exc:  # noqa: BLE001 - no Prefect: the log line and /ready remain
            log.error(
                "could not send %s to Prefect (%s: %s)",
                events.SERVING_REFUSED,
                type(exc).__name__,
                exc,
            )


def uses_ray(settings: Settings) -> bool:
    """A cluster to ask: one named, or the local stack's (its token exists once it is up)."""
    return bool(settings.ray_address) or settings.ray_auth_token_file.exists()


async def follow_fleet(gw: GatewayState) -> None:
    """Keep gw.endpoints to the fleet's directory: where every replica's engine listens."""
    from llmship import ray_cluster

    reconciled = False
    while True:
        try:
            await asyncio.to_thread(ray_cluster.connect, gw.settings)
            from serving import fleet

            actor = await asyncio.to_thread(fleet.directory)
            while True:
                snap = await actor.snapshot.remote(gw.settings.gateway_url)
                gw.set_endpoints(
                    {app: [e["url"] for e in reps] for app, reps in snap["endpoints"].items()}
                )
                gw.set_scrape_targets(
                    engine_scrape_targets(
                        {
                            app: [EngineEndpoint.model_validate(e) for e in reps]
                            for app, reps in snap["endpoints"].items()
                        }
                    )
                )
                gw.fleet_known.set()
                if not reconciled:  # once: the live aliases are what should serve
                    live = {m: r.version for m, r in gw.routes.items()}
                    for app in await asyncio.to_thread(
                        fleet.reconcile, gw.settings, live, gw.ungated_override
                    ):
                        log.warning("deployed %s: a live version without servers", app)
                    reconciled = True
                await asyncio.sleep(gw.settings.gateway_endpoint_refresh_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray restarting: serve what is known
            log.warning(
                "cannot read the fleet's replicas from Ray (%s: %s): relaying to the "
                "last known ones",
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(5.0)


async def watch_live_versions(gw: GatewayState) -> None:
    """Declare a live version down after gw.down_after checks in a row with no replica, and
    up again after as many with one. Ray replaces failing replicas; this is for a version that
    cannot stay up at all. Canaries are not watched here: their rollout judges them.

    Up again takes as long as down: in a crash loop a replica registers for a moment between
    crashes, and the version was declared down (an event, a rollback asked for) once per
    moment."""
    misses: dict[tuple[str, str], int] = {}
    ups: dict[tuple[str, str], int] = {}
    while True:
        await asyncio.sleep(gw.health_interval_s)
        for model, route in list(gw.routes.items()):
            key = (model, route.version)
            up = bool(gw.replicas_of(model, route.version))
            gw.upstream_up.labels(model, route.version).set(1 if up else 0)
            if up:
                misses.pop(key, None)
                if gw.down.get(model) == route.version:
                    ups[key] = ups.get(key, 0) + 1
                    if ups[key] >= gw.down_after:
                        del gw.down[model], ups[key]
                        log.warning(
                            "%s %s has had a replica for %d checks: up again",
                            model,
                            route.version,
                            gw.down_after,
                        )
                continue
            ups.pop(key, None)
            if gw.down.get(model) == route.version:
                continue  # declared already
            misses[key] = misses.get(key, 0) + 1
            if misses[key] == gw.down_after:
                declare_down(gw, model, route, misses[key])


def declare_down(gw: GatewayState, model: str, route: Route, failed_checks: int) -> None:
    gw.down[model] = route.version
    seconds = failed_checks * gw.health_interval_s
    log.error(
        "%s's live version %s has had no running replica for %.0f s (%d checks): "
        "declared down; asking for a rollback to its previous version",
        model,
        route.version,
        seconds,
        failed_checks,
    )
    try:
        events.emit(
            events.SERVING_DOWN,
            model,
            {
                "model": model,
                "version": route.version,
                "failed_checks": failed_checks,
                "seconds": seconds,
            },
            version=route.version,
        )
    except Exception as exc:  # noqa: BLE001 - no Prefect: the log line and /ready remain
        log.error(
            "could not send " + events.SERVING_DOWN + " to Prefect (%s: %s): roll back by "
            "hand (`llmship rollback %s`)",
            type(exc).__name__,
            exc,
            model,
        )


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.gw = gw = GatewayState()
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
            await asyncio.wait_for(gw.fleet_known.wait(), gw.settings.gateway_fleet_wait_s)
        except TimeoutError:
            log.warning(
                "the fleet's replicas were not known within %.0f s: relaying to the "
                "last known ones until they are",
                gw.settings.gateway_fleet_wait_s,
            )
    yield
    for task in tasks:
        task.cancel()
    if gw.fleet_known.is_set():  # a gateway that stops drops out of rollouts at once
        try:
            from serving import fleet

            await asyncio.wait_for(
                fleet.directory().gateway_down.remote(gw.settings.gateway_url), 5.0
            )
        except Exception as exc:  # noqa: BLE001 - it drops out after gateway_seen_within_s
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
            denied = _authorize(self.state.gw, Headers(scope=scope).get("authorization"))
            return await (denied or super().__call__)(scope, receive, send)
        schema = RELAYED.get(path)
        if schema is None or scope["method"] != "POST":
            return await super().__call__(scope, receive, send)
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await _proxy(request, scope["path"], schema)
        except Exception as exc:  # noqa: BLE001 - as the app's own handler answers it
            response = await _unexpected(request, exc)
        await response(scope, receive, send)


# No redirects: Starlette's answer to /v1/completions/ was a 307 whose Location it built from
# the client's Host header. Each endpoint has one path, as OpenAI's API has; another is a 404.
app = _Gateway(title="llmship gateway", lifespan=lifespan, redirect_slashes=False)


def _gw(request: Request) -> GatewayState:
    return request.app.state.gw


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    return openai_error(
        500,
        f"the gateway failed on this request ({type(exc).__name__}); its log has the details",
        type_="server_error",
        code="internal_error",
    )


@app.exception_handler(404)
async def _not_found(request: Request, exc) -> JSONResponse:
    path = request.url.path
    hint = f" (did you mean {path.rstrip('/')}?)" if path != "/" and path.endswith("/") else ""
    return openai_error(404, f"no route {request.method} {path}{hint}", code="not_found")


@app.exception_handler(RequestValidationError)
async def _bad_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad query or path parameter of a GET route: OpenAI-style, as every other error."""
    error = exc.errors()[0]
    param = str(error["loc"][-1]) if error.get("loc") else None
    return openai_error(400, f"{param}: {error['msg']}", param=param)


@app.exception_handler(405)
async def _wrong_method(request: Request, exc) -> JSONResponse:
    return openai_error(405, f"{request.method} is not allowed on {request.url.path}")


@app.get("/health")
async def health(request: Request) -> dict:
    return {"status": "ok", "models": sorted(_gw(request).routes)}


@app.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready when every live version has a running replica: what a load balancer in front of
    the gateway should probe."""
    gw = _gw(request)
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


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_gw(request).registry), media_type=CONTENT_TYPE_LATEST)


@app.get("/v1/models")
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
            for model, route in sorted(_gw(request).routes.items())
        ],
    }


async def _proxy(request: Request, endpoint: str, schema: type[RelayedRequest]) -> Response:
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
    gw = _gw(request)
    # The request is read and checked before it takes an in-flight slot: a slow or broken
    # client holds its own connection, never a slot other clients need.
    checked = await _read_request(gw, request, schema)
    if isinstance(checked, Response):
        return checked, None
    body, parsed = checked
    choices = parsed.choices()
    if choices > gw.max_choices:
        return _too_many_choices(gw, parsed, choices), parsed.model
    # The work, not the request, is what the limit counts: a request of k completions takes
    # k slots (all of them at most, so one can always run alone).
    weight = min(choices, gw.max_in_flight)
    if gw.in_flight + weight > gw.max_in_flight:
        gw.shed.labels(endpoint).inc()
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
        response = await _forward(gw, body, parsed, endpoint, client_id, request_id, weight)
        streaming = isinstance(response, _RelayResponse)
        return response, parsed.model
    finally:
        if not streaming:  # a relayed stream gives its slots back when it closes
            gw.in_flight -= weight


def _too_many_choices(gw: GatewayState, parsed: RelayedRequest, choices: int) -> JSONResponse:
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


async def _read_body(gw: GatewayState, request: Request) -> bytes | Response:
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


async def _read_request(
    gw: GatewayState, request: Request, schema: type[RelayedRequest]
) -> tuple[bytes, RelayedRequest] | Response:
    body = await _read_body(gw, request)
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


class _RelayResponse(StreamingResponse):
    """A stream relayed from a model server. Its clean-up (close the upstream response, give
    the in-flight slots back, count the request) runs however the relay ends: also when the
    client leaves before the first chunk, where the generator never starts and so would run
    no `finally` of its own, and when the client stalled a write past
    gateway_send_timeout_s and was dropped (serving/gateway_http.py marks its scope)."""

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
# answer for gateway_send_timeout_s. Not an error of the version (a canary is judged on
# those): any client can stall its own reads.
CLIENT_STALLED = "client_stalled"


# What an engine that refuses, drops or stalls a connection raises on the gateway's side.
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def _backends(gw: GatewayState, model: str, route: Route) -> list[tuple[str, str]]:
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


async def _forward(
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
        gw.requests.labels(UNKNOWN_MODEL, "", endpoint, "404").inc()
        return openai_error(
            404,
            f"the model {model!r} does not exist; served: {sorted(gw.routes)}",
            code="model_not_found",
            param="model",
        )
    backends = _backends(gw, model, route)
    if not backends:
        gw.count_unanswered(model, route.version, endpoint)
        restoring = (
            "; it is down and a rollback to the previous version was asked for"
            if gw.down.get(model) == route.version
            else ""
        )
        resp503 = openai_error(
            503,
            f"{model}'s live version {route.version} has no running "
            f"replica{restoring}: retry shortly",
            type_="server_error",
            code="upstream_unavailable",
        )
        resp503.headers["retry-after"] = "5"
        return resp503
    started = time.perf_counter()
    failed: list[str] = []
    resp = None
    for version, upstream in backends:
        try:
            resp = await gw.client.post(
                f"{upstream}{endpoint}", data=body, headers={"content-type": "application/json"}
            )
            break
        except UPSTREAM_ERRORS as exc:
            # Counted against the version that failed: what a canary step is judged on.
            gw.count_unanswered(model, version, endpoint)
            failed.append(f"{version} at {upstream}: {type(exc).__name__}")
            if not isinstance(exc, aiohttp.ClientConnectorError):
                break  # the request may have reached the server: not safe to send twice
    if resp is None:
        restoring = (
            "; it is down and a rollback to the previous version was asked for"
            if gw.down.get(model) == route.version
            else ""
        )
        resp503 = openai_error(
            503,
            f"the model server of {model} failed: {'; '.join(failed)}{restoring}: retry shortly",
            type_="server_error",
            code="upstream_unavailable",
        )
        resp503.headers["retry-after"] = "5"
        return resp503
    gw.take_upstream(upstream)

    def record(status: str, usage: TokenUsage) -> None:
        seconds = time.perf_counter() - started
        gw.requests.labels(model, version, endpoint, status).inc()
        gw.latency.labels(model, version, endpoint).observe(seconds)
        errors = gw.errors.labels(model, version, endpoint)  # a 0 until one: a rate, not none
        if status == "broken" or (status.isdigit() and int(status) >= 500):
            errors.inc()  # not CLIENT_STALLED: the client's doing, not the version's
        gw.count_tokens(model, version, usage)
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
                    request_id=log_id,
                )
            )
        )

    headers = {"x-llmship-version": version}
    copy = None  # a copy for the route's shadow, offered once the live answer is whole
    if parsed.shadowed and route.shadow and version == route.version and resp.status == 200:
        copy = gw.shadower.choose(model, route.shadow, endpoint, body, parsed, request_id)
    if parsed.streamed() and resp.status == 200:
        outcome = {"status": "200"}
        answer = bytearray() if copy else None
        tally = StreamTally(parsed.token_event)

        async def relay():
            first = True
            try:
                async for chunk in resp.content.iter_any():
                    if first:
                        gw.first_token.labels(model, version, endpoint).observe(
                            time.perf_counter() - started
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
            gw.release_upstream(upstream)
            record(outcome["status"], tally.usage())
            if copy:
                whole = outcome.get("whole") and len(answer) <= gw.shadower.max_bytes
                gw.shadower.offer(copy, streamed_text(bytes(answer)) if whole else None)

        return _RelayResponse(
            relay(),
            on_close=close,
            status_code=200,
            headers=headers,
            media_type=resp.headers.get("content-type", "text/event-stream"),
        )
    try:
        content = await resp.read()
    except UPSTREAM_ERRORS as exc:
        record("broken", TokenUsage())
        return openai_error(
            503,
            f"model server for {model} {version} failed mid-answer: {type(exc).__name__}",
            type_="server_error",
            code="upstream_unavailable",
        )
    finally:
        resp.release()
        gw.release_upstream(upstream)
    try:
        whole = json.loads(content)
    except ValueError:
        whole = None
    record(str(resp.status), usage_of_answer(whole) if resp.status == 200 else TokenUsage())
    if copy:
        gw.shadower.offer(copy, answer_text(whole))
    return Response(
        content,
        status_code=resp.status,
        headers=headers,
        media_type=resp.headers.get("content-type", "application/json"),
    )


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


RELAYED: dict[str, type[RelayedRequest]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/responses": ResponsesRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}


def _relay_route(endpoint: str, schema: type[RelayedRequest]):
    async def relay(request: Request) -> Response:
        return await _proxy(request, endpoint, schema)

    return relay


# Answered by _Gateway.__call__; declared here too, for /openapi.json and /docs.
for _endpoint, _schema in RELAYED.items():
    app.add_api_route(
        _endpoint,
        _relay_route(_endpoint, _schema),
        methods=["POST"],
        name=_endpoint.strip("/").replace("/", "_"),
    )


# ------------------------------------------------------------------ admin


def _authorize(gw: GatewayState, authorization: str | None) -> JSONResponse | None:
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


# The admin API is not described in the public /openapi.json and /docs. Every route under
# /admin is authorized by _Gateway.__call__ before it is routed (a new one too).
@app.get("/admin/routes", include_in_schema=False)
async def get_routes(request: Request):
    gw = _gw(request)
    return {m: r.model_dump() for m, r in gw.routes.items()}


@app.put("/admin/routes/{model}", include_in_schema=False)
async def set_route(model: str, request: Request):
    gw = _gw(request)
    body = await _read_body(gw, request)
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


@app.get("/admin/shadow/{model}", include_in_schema=False)
async def get_shadow(model: str, request: Request, since: float = 0.0):
    """What this gateway kept of model's shadow pairs scored since a time (unix seconds):
    hashes, and the disagreeing examples when the route's shadow keeps them."""
    gw = _gw(request)
    return gw.shadower.kept(model, since)


@app.get("/admin/sd/engines", include_in_schema=False)
async def engines_sd(request: Request):
    """The engines' scrape targets in Prometheus's http_sd format: the file's content, for a
    Prometheus on another host than the gateway (its `authorization` holds the token)."""
    gw = _gw(request)
    return [g.model_dump() for g in gw.scrape_targets or []]
