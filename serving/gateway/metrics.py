"""The gateway's Prometheus metric families (GET /metrics), and how a request is counted in
them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.observability import TokenUsage

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """One registry per gateway app (several apps in one test process do not share one)."""

    def __init__(self, endpoints: Iterable[str], in_flight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmship_gateway_requests",
            "Requests by outcome",
            ["model", "version", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmship_gateway_request_seconds",
            "Request latency",
            ["model", "version", "endpoint"],
            registry=self.registry,
            buckets=BUCKETS,
        )
        self.first_token = Histogram(
            "llmship_gateway_time_to_first_token_seconds",
            "Streaming requests: from the request to the first chunk relayed",
            ["model", "version", "endpoint"],
            registry=self.registry,
            buckets=BUCKETS,
        )
        self.shed = Counter(
            "llmship_gateway_shed",
            "Requests refused with 429: too many in flight",
            ["endpoint"],
            registry=self.registry,
        )
        for endpoint in endpoints:  # a 0, not no data, on a dashboard until one is shed
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
        self.in_flight_gauge.set_function(in_flight)
        self._replica_families()

    def _replica_families(self) -> None:
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

    def count_unanswered(self, model: str, version: str, endpoint: str) -> None:
        """A request the gateway answered 503 for version: a request and an error, so the
        error rate (errors / requests) stays a rate."""
        self.requests.labels(model, version, endpoint, "503").inc()
        self.errors.labels(model, version, endpoint).inc()

    def count_tokens(self, model: str, version: str, usage: TokenUsage) -> None:
        if usage.prompt_tokens is not None:
            self.prompt_tokens.labels(model, version).inc(usage.prompt_tokens)
        if usage.completion_tokens is not None:
            self.completion_tokens.labels(model, version).inc(usage.completion_tokens)
