"""A CPU model server's start, with vLLM's worker in the engine's process and in a third one.

llmship starts vLLM's CPU server with VLLM_ENABLE_V1_MULTIPROCESSING=0 (serving/engines.py):
the engine core runs its one worker itself instead of spawning a process that imports torch
and vLLM again. This bench starts the server the way a replica does (serving/replica.py:
start_engine, wait_healthy, the same command line and environment) with the setting on and
off, alternately, and prints each start's time to /health and to a first completion, the
medians, and their ratio. The host's environment wins over llmship's defaults, which is how
the "three processes" side is had.

    .venv/orchestrator/bin/python bench/engine_start.py [--model-dir demo/tiny-llama --rounds 3]

Needs no stack: a model directory (`make demo` trains demo/tiny-llama) and the serve
environment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmship.contracts import ServeSpec  # noqa: E402
from llmship.settings import get_settings  # noqa: E402
from serving.replica import ReplicaSpec, start_engine, wait_healthy  # noqa: E402

SETTING = "VLLM_ENABLE_V1_MULTIPROCESSING"
# What the demo's build hands its replicas (prefect.yaml: tiny-llama's serving block).
DEMO_ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]


def one_start(model_dir: Path, multiprocessing: str, work: Path) -> dict[str, float]:
    os.environ[SETTING] = multiprocessing
    settings = get_settings()
    spec = ReplicaSpec(
        app="bench--start",
        model="bench",
        version="start",
        role="evaluation",
        prefix="-",
        serve=ServeSpec(engine_args=DEMO_ENGINE_ARGS),
    )
    log = work / f"engine-{multiprocessing}-{time.monotonic_ns()}.log"
    started = time.monotonic()
    engine, url = start_engine(settings, spec, model_dir, log, work)
    try:
        wait_healthy(settings, spec, engine, url, log)
        healthy = time.monotonic() - started
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": "bench", "prompt": "The supplier shall", "max_tokens": 4},
            timeout=60,
        )
        answer.raise_for_status()
        return {"healthy_s": healthy, "first_answer_s": time.monotonic() - started}
    finally:
        engine.terminate()
        engine.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("demo/tiny-llama"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"no model at {args.model_dir}: `make demo` trains demo/tiny-llama")
    sides = {"one process (llmship)": "0", "a worker process (vLLM's default)": "1"}
    starts: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for side, value in sides.items():
                starts[side].append(one_start(args.model_dir.resolve(), value, Path(work)))
                print(f"round {round_ + 1} {side}: {json.dumps(starts[side][-1])}", flush=True)
    medians = {
        side: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for side, runs in starts.items()
    }
    ours, theirs = medians.values()
    print(json.dumps({"median": medians, "ratio_healthy": ours["healthy_s"] / theirs["healthy_s"]}))


if __name__ == "__main__":
    main()
