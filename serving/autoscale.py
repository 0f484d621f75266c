"""A version's replica count from its engines' own queues: Ray Serve's autoscaler, fed with
vLLM's count of running and waiting requests.

Requests go from the gateway to the engines directly, not through Serve (Ray in the data path
cost up to 10% of throughput and 108 ms of first token: docs/BENCHMARKS.md), so Serve's own
count of ongoing requests stays 0. Each replica reports its engine's load instead
(`ModelReplica.record_autoscaling_stats`, every `metrics_interval_s`); Ray takes its peak over
`look_back_period_s`, calls `engine_load_policy`, and applies the bounds, the upscale and
downscale delays and the scaling factors to what it returns.
"""

from __future__ import annotations

import math
from typing import Any

import httpx

from llmship.pipeline_config import AutoscalingBlock
from serving.engines import ENGINES

ENGINE_LOAD = "engine_ongoing_requests"
# The engines' Prometheus gauges of running and waiting requests (vLLM's: serving/engines.py).
LOAD_GAUGES = frozenset(gauge for engine in ENGINES.values() for gauge in engine.load_gauges)


def engine_load(metrics_text: str) -> float | None:
    """Running plus waiting requests from an engine's /metrics text; None where it has no such
    gauges (trtllm-serve's metrics are JSON iteration stats: such a version does not scale)."""
    found = False
    total = 0.0
    for line in metrics_text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in LOAD_GAUGES:
            found = True
            total += float(line.rsplit(" ", 1)[1])
    return total if found else None


async def read_engine_load(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    resp = await client.get(f"{url}/metrics")
    resp.raise_for_status()
    load = engine_load(resp.text)
    return {} if load is None else {ENGINE_LOAD: load}


def engine_load_policy(ctx: Any) -> tuple[int, dict]:
    """Enough replicas that each has target_ongoing_requests in its engine. Ray's
    AutoscalingContext in; (replicas wanted, policy state) out."""
    per_replica = (ctx.aggregated_metrics or {}).get(ENGINE_LOAD) or {}
    if not per_replica:  # no report yet (replicas starting): keep what was decided
        return ctx.target_num_replicas, {}
    load = sum(per_replica.values())
    return math.ceil(load / ctx.config.target_ongoing_requests), {}


def ray_autoscaling_config(block: AutoscalingBlock) -> dict[str, Any]:
    """Serve's autoscaling_config for a deployment's `serving.autoscaling` block."""
    return {
        "min_replicas": block.min_replicas,
        "initial_replicas": block.min_replicas,
        "max_replicas": block.max_replicas,
        "target_ongoing_requests": block.target_ongoing_requests,
        "upscale_delay_s": block.upscale_delay_s,
        "downscale_delay_s": block.downscale_delay_s,
        "metrics_interval_s": block.metrics_interval_s,
        "look_back_period_s": block.look_back_period_s,
        # The peak of each engine's load over the look-back period, not its mean: requests
        # come and go between samples, and a mean under the target removed a replica that
        # was still starting (Serve counts it in the current number) while clients were busy.
        "aggregation_function": "max",
        "policy": {"policy_function": f"{__name__}:engine_load_policy"},
    }
