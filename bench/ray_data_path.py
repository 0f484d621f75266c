"""What Ray would cost in the data path: streamed completions relayed through a Ray Serve
deployment handle, against the same requests sent to the model server directly.

This is the measurement behind serving/replica.py's choice: requests go from the gateway to a
replica's engine directly, and Ray stays in the control path. Here a Serve deployment relays
each request to the stand-in model server of bench/gateway_relay.py (`--tokens` SSE events,
one every `--token-ms`, as vLLM writes them) and streams the bytes back through
`handle.options(stream=True)`, as a gateway holding a Serve handle would; the client in this
process is that gateway. Waves of 1, 8 and 32 concurrent streams go both ways, side by side;
printed per concurrency: throughput ratio, p50 added to the first token and to the whole
answer, and this process's CPU per relayed token (the gateway's share).

    .venv/orchestrator/bin/python bench/ray_data_path.py [--tokens 64 --token-ms 20]

Starts a local Ray instance of its own (loopback, 2 CPUs) and stops it; needs no stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the node on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway instance of this process's own
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
from gateway_relay import free_port, serve_stand_in  # noqa: E402


class Relay:
    """A Serve replica that relays a completion's bytes from the model server, unparsed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512))

    async def stream(self, body: bytes):
        async with self.client.stream(
            "POST",
            f"{self.upstream}/v1/completions",
            content=body,
            headers={"content-type": "application/json"},
        ) as resp:
            async for chunk in resp.aiter_raw():
                yield chunk


async def _timed(chunks) -> tuple[float, float, int]:
    started, first, events = time.perf_counter(), None, 0
    async for chunk in chunks:
        if first is None:
            first = time.perf_counter() - started
        events += chunk.count(b"data:")
    return first or 0.0, time.perf_counter() - started, events


async def _direct(client: httpx.AsyncClient, url: str, body: bytes):
    async with client.stream("POST", f"{url}/v1/completions", content=body) as resp:
        async for chunk in resp.aiter_raw():
            yield chunk


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _wave(make, concurrency: int, requests: int) -> dict:
    results, started = [], time.perf_counter()
    for _ in range(max(1, requests // concurrency)):
        results += await asyncio.gather(*[_timed(make()) for _ in range(concurrency)])
    wall = time.perf_counter() - started
    return {
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50": statistics.median(r[0] for r in results),
        "total_p50": statistics.median(r[1] for r in results),
        "tokens": sum(r[2] for r in results),
    }


async def run(args) -> None:
    import ray
    from ray import serve

    port = free_port()
    stand_in = multiprocessing.Process(
        target=lambda: asyncio.run(serve_stand_in(port, args.tokens, args.token_ms / 1000)),
        daemon=True,
    )
    stand_in.start()
    url = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        serve.start(proxy_location="Disabled")
        deployment = serve.deployment(
            Relay, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0}
        )
        handle = serve.run(deployment.bind(url), name="relay", route_prefix=None)
        body = json.dumps({"model": "relay", "prompt": "x", "stream": True}).encode()
        client = httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=512))
        ways = {
            "direct": lambda: _direct(client, url, body),
            "ray": lambda: handle.options(stream=True).stream.remote(body),
        }
        for make in ways.values():  # warm both paths
            await _wave(make, 4, 8)
        print(
            f"stand-in: {args.tokens} tokens per answer, one every {args.token_ms:g} ms; "
            f"{args.requests} streams per wave, {args.rounds} rounds"
        )
        for concurrency in (1, 8, 32):
            per = {name: [] for name in ways}
            cpu = {name: 0.0 for name in ways}
            for _ in range(args.rounds):
                for name, make in ways.items():
                    before = _cpu()
                    per[name].append(await _wave(make, concurrency, args.requests))
                    cpu[name] += _cpu() - before
            d, r = (
                {k: statistics.median(x[k] for x in per[n]) for k in per[n][0]}
                for n in ("direct", "ray")
            )
            us = {n: cpu[n] / sum(x["tokens"] for x in per[n]) * 1e6 for n in ways}
            print(
                f"c={concurrency:2d}  direct {d['tokens_per_s']:7.0f} tok/s  through a Serve "
                f"handle {r['tokens_per_s']:7.0f} tok/s  ratio "
                f"{r['tokens_per_s'] / d['tokens_per_s']:.3f}  added p50: first token "
                f"{(r['ttft_p50'] - d['ttft_p50']) * 1000:+.1f} ms, whole answer "
                f"{(r['total_p50'] - d['total_p50']) * 1000:+.1f} ms  client CPU per token: "
                f"direct {us['direct']:.0f} us, Serve handle {us['ray']:.0f} us",
                flush=True,
            )
        await client.aclose()
    finally:
        ray.shutdown()
        stand_in.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
