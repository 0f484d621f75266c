"""What shadowing costs the client: the same requests with and without a shadow, side by side.

Rounds alternate: in one the model's route has no shadow, in the next it copies every live
request (fraction 1, the worst case) to another version's replicas; each round sends the same
completions, one after another, through the gateway. Reported: the clients' p50 and p95
latency with and without, and their ratio (target: p50 within the noise, ratio <= 1.05 where
the candidate has GPUs of its own; on one CPU host the copies compete with the live engine for
the same cores, which this shows too). Every answer must come from the live version.

    .venv/orchestrator/bin/python bench/shadow_overhead.py --model tiny-llama \
        --shadow-version <a version with running replicas> [--rounds 6] [--requests 20]

tests/test_shadow_canary.py runs it on the test stack and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from llmship.settings import Settings, get_settings
from serving.gateway_admin import model_route, route_traffic
from serving.shadow import Shadow

PROMPT = "Clause: {a} shall pay {b} the sum of ${n},000 no later than May 2, 2027.\nQuestion: "
QUESTION = "What amount does the clause state?\nAnswer:"


def measure(
    settings: Settings, model: str, shadow_version: str, rounds: int = 6, requests: int = 20
) -> dict:
    live = model_route(settings, model)["version"]
    shadow = Shadow(version=shadow_version, fraction=1.0, max_rps=1000).model_dump()
    latencies: dict[str, list[float]] = {"without": [], "with": []}
    answered_by: set[str] = set()
    failures = 0
    try:
        with httpx.Client(timeout=60.0) as client:
            for round_number in range(rounds):
                mode = "with" if round_number % 2 else "without"
                route_traffic(settings, model, live, shadow=shadow if mode == "with" else None)
                for i in range(requests):
                    body = {
                        "model": model,
                        "prompt": PROMPT.format(a="Acme", b="Birch", n=100 + i) + QUESTION,
                        "max_tokens": 8,
                        "temperature": 0,
                    }
                    started = time.perf_counter()
                    resp = client.post(f"{settings.gateway_url}/v1/completions", json=body)
                    latencies[mode].append(time.perf_counter() - started)
                    failures += resp.status_code != 200
                    answered_by.add(resp.headers.get("x-llmship-version", ""))
                time.sleep(1.0)  # the round's copies drain before the next round
    finally:
        route_traffic(settings, model, live)
    p50 = {m: statistics.median(v) for m, v in latencies.items()}
    p95 = {m: statistics.quantiles(v, n=20)[-1] for m, v in latencies.items()}
    return {
        "live": live,
        "shadow": shadow_version,
        "requests_per_mode": len(latencies["with"]),
        "p50_ms": {m: round(v * 1000, 2) for m, v in p50.items()},
        "p95_ms": {m: round(v * 1000, 2) for m, v in p95.items()},
        "p50_ratio_with_over_without": round(p50["with"] / p50["without"], 3),
        "failures": failures,
        "answered_by": sorted(answered_by),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--shadow-version", required=True)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=20)
    args = p.parse_args()
    result = measure(get_settings(), args.model, args.shadow_version, args.rounds, args.requests)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
