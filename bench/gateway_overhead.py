"""The gateway against the model server behind it, side by side: throughput and latency.

The same streamed completions, at 1, 8 and 32 concurrent clients, sent alternately (round by
round) to the model server directly and through the gateway. Reported per concurrency:
requests per second (ratio gateway / direct, target >= 0.97), and the median time to first
token and to the last chunk (gateway minus direct, target: p50 at most 2 ms added).

    .venv/orchestrator/bin/python bench/gateway_overhead.py --model tiny-llama \
        [--direct http://127.0.0.1:8100] [--gateway http://127.0.0.1:8000] [--requests 64]

--direct defaults to a replica of the live version, as the fleet reports it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

PROMPT = "The supplier shall deliver the goods within thirty days of the order date, and"


async def one(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int
) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    async with client.stream(
        "POST",
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    ) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def wave(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        queue = asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)
        results: list[tuple[float, float]] = []

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                results.append(await one(client, url, model, max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "rps": requests / wall,
        "ttft_p50": statistics.median(r[0] for r in results),
        "total_p50": statistics.median(r[1] for r in results),
    }


def side_by_side(
    direct: str,
    gateway: str,
    model: str,
    concurrency: int,
    requests: int,
    rounds: int,
    max_tokens: int,
) -> dict[str, dict[str, float]]:
    """The medians of `rounds` waves to each, sent alternately: {"direct": ..., "gateway": ...}."""
    per: dict[str, list[dict]] = {"direct": [], "gateway": []}
    for _ in range(rounds):
        for name, url in (("direct", direct), ("gateway", gateway)):
            per[name].append(asyncio.run(wave(url, model, concurrency, requests, max_tokens)))
    return {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in per.items()
    }


def live_upstream(gateway: str, model: str) -> str:
    from llmship.settings import get_settings
    from llmship.store import ArtifactStore
    from serving import fleet

    settings = get_settings()
    live = ArtifactStore(settings).read_alias(model, "live")
    return fleet.find(settings, model, live).url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument("--direct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    direct = args.direct or live_upstream(args.gateway, args.model)
    print(
        f"direct {direct}, gateway {args.gateway}, model {args.model}, {args.requests} "
        f"streamed completions of {args.max_tokens} tokens per wave, {args.rounds} rounds"
    )
    asyncio.run(wave(direct, args.model, 4, 8, args.max_tokens))  # warm both paths
    asyncio.run(wave(args.gateway, args.model, 4, 8, args.max_tokens))
    for concurrency in (1, 8, 32):
        med = side_by_side(
            direct,
            args.gateway,
            args.model,
            concurrency,
            args.requests,
            args.rounds,
            args.max_tokens,
        )
        d, g = med["direct"], med["gateway"]
        print(
            f"c={concurrency:2d}  direct {d['rps']:6.2f} req/s  gateway {g['rps']:6.2f} req/s"
            f"  ratio {g['rps'] / d['rps']:.3f} (target >= 0.97)  added p50: first token "
            f"{(g['ttft_p50'] - d['ttft_p50']) * 1000:+.1f} ms, whole answer "
            f"{(g['total_p50'] - d['total_p50']) * 1000:+.1f} ms (target <= 2 ms)"
        )


if __name__ == "__main__":
    main()
