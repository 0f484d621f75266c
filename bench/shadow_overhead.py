"""What shadowing costs the client: the same requests with and without a shadow, side by side.

Rounds alternate: in one the model's route has no shadow, in the next it copies every live
request (fraction 1, the worst case) to another version's replicas; each round sends the same
completions, one after another, through the gateway. Reported: the clients' p50 and p95
latency with and without, and their ratio. Every answer must come from the live version.

On one CPU host the shadow's engine computes on the same cores as the live one, so the ratio
here is mostly two vLLM engines sharing 2 cores; `bench/gateway_relay.py --shadow` measures
the gateway's own part against stand-in engines.

    make demo   # the stack, with tiny-llama live
    .venv/orchestrator/bin/python bench/shadow_overhead.py --model tiny-llama --make-twin \
        [--rounds 6] [--requests 20]

--make-twin publishes a copy of the live version's files as version `benchtwin0001` and
starts its replicas (stopped again at the end); or name a version with running replicas with
--shadow-version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from llmship.pipeline_config import ServingConfig
from llmship.settings import Settings, get_settings
from llmship.store import ArtifactStore, version_prefix
from llmship.versions import read_version
from serving import fleet
from serving.gateway_admin import route_of, route_traffic
from serving.shadow import Shadow

PROMPT = "Clause: {a} shall pay {b} the sum of ${n},000 no later than May 2, 2027.\nQuestion: "
QUESTION = "What amount does the clause state?\nAnswer:"
TWIN = "benchtwin0001"


def measure(
    settings: Settings, model: str, shadow_version: str, rounds: int = 6, requests: int = 20
) -> dict:
    live = route_of(settings, model).version
    shadow = Shadow(version=shadow_version, fraction=1.0, max_rps=1000)
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


def start_twin(settings: Settings, model: str) -> fleet.Server:
    """The live version's files as version TWIN, published (once) and served."""
    store = ArtifactStore(settings)
    live = store.read_alias(model, "live")
    if read_version(store, model, TWIN) is None:
        with tempfile.TemporaryDirectory() as tmp:
            files = Path(tmp) / "files"
            manifest = store.download_dir(version_prefix(model, live), files)
            store.upload_dir(
                files, version_prefix(model, TWIN), manifest.model_copy(update={"key": TWIN})
            )
    twin = read_version(store, model, TWIN)
    server, _ = fleet.acquire(
        settings, fleet.spec_for_version(model, TWIN, twin.serve), ServingConfig()
    )
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--shadow-version")
    p.add_argument("--make-twin", action="store_true")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=20)
    args = p.parse_args()
    if not (args.shadow_version or args.make_twin):
        p.error("name --shadow-version, or --make-twin")
    settings = get_settings()
    twin = start_twin(settings, args.model) if args.make_twin else None
    try:
        result = measure(
            settings, args.model, args.shadow_version or TWIN, args.rounds, args.requests
        )
    finally:
        if twin:
            fleet.release(settings, twin)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
