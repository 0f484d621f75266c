"""A replica's engine start with and without the compile cache its version's first replica
saved (serving/compile_cache.py), side by side.

Each round serves a new version id of the demo model, the way a replica does (the key's cache
restored with for_replica, serving/replica.py's start_engine and wait_healthy, the cache kept
after), three times:
  compiling        a new node folder and nothing saved for the key: the engine compiles
                   (torch.compile, Inductor's C++ kernels) and the replica saves the cache
  restored         another new node folder (another node): the cache comes from S3
  eager            --enforce-eager, what the demo's deployment runs on CPU: nothing compiles
Printed per start: the cache's restore, the start to healthy (restore included), the engine's
own init figure, and what the replica said of the cache; then the medians and the ratio of
restored to compiling.

    .venv/orchestrator/bin/python bench/compile_cache.py [--rounds 3]

Needs the stack's S3 (`make up`) and demo/tiny-llama.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmship.contracts import ServeSpec  # noqa: E402
from llmship.settings import get_settings  # noqa: E402
from serving import compile_cache  # noqa: E402
from serving.cold_start import engine_phases  # noqa: E402
from serving.replica import ReplicaSpec, start_engine, wait_healthy  # noqa: E402

COMPILED_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512"]
SIDES = {"compiling": COMPILED_ARGS, "restored": COMPILED_ARGS}
SIDES["eager"] = [*COMPILED_ARGS, "--enforce-eager"]


def one_start(model_dir: Path, version: str, args: list[str], node: Path) -> dict:
    settings = get_settings().updated(ray={"node_cache_dir": node})
    spec = ReplicaSpec(
        app="bench--compile",
        model="bench-compile",
        version=version,
        role="evaluation",
        prefix="-",
        serve=ServeSpec(engine_args=args),
    )
    log = node / "engine.log"
    started = time.monotonic()
    cache = compile_cache.for_replica(settings, spec.model, version, spec.serve, [])
    restored = time.monotonic() - started
    engine, url = start_engine(settings, spec, model_dir, log, node, cache.env)
    try:
        wait_healthy(settings, spec, engine, url, log)
        healthy = time.monotonic() - started
    finally:
        engine.terminate()
        engine.wait(timeout=60)
    return {
        "restore_s": round(restored, 2),
        "healthy_s": round(healthy, 2),
        "engine_init_s": engine_phases(log.read_text(errors="replace")).init_s,
        "cache": cache.keep("bench").describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("demo/tiny-llama"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    starts: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            version = f"bench-{uuid.uuid4().hex[:8]}"
            for side, engine_args in SIDES.items():
                node = Path(work) / f"{version}-{side}"
                node.mkdir()
                got = one_start(args.model_dir.resolve(), version, engine_args, node)
                starts[side].append(got)
                print(f"round {round_ + 1} {side}: {json.dumps(got)}", flush=True)
    medians = {
        side: {k: statistics.median(s[k] for s in runs) for k in ("healthy_s", "engine_init_s")}
        for side, runs in starts.items()
    }
    ratio = medians["restored"]["healthy_s"] / medians["compiling"]["healthy_s"]
    print(json.dumps({"median": medians, "ratio_healthy_restored_to_compiling": round(ratio, 3)}))


if __name__ == "__main__":
    main()
