"""The serving plane's own times on the local stack: a version's first replica, adding one to a
warm version, a replica's failover under client load, and what Ray's processes weigh.

On a published version (`--model`, `--version`; the bench uploads the demo model as one when
the store has none: `--publish`), with the gateway routing to it:
1. cold: the fleet deploys it with one replica (fetch to the node cache, vLLM's start);
2. scale 1 -> 2: the time until the second replica is registered (the version is in the
   node's cache: the engine's start is all of it);
3. failover: under steady client traffic through the gateway, one replica's engine is killed
   (SIGKILL): requests failed, the gap in answers, and the time until Ray has two again;
4. memory: RSS of Ray's processes (GCS, raylet, dashboard and agents, Serve's controller,
   the fleet's directory, the replica actors; not the engines) against the rest of the stack.

    .venv/orchestrator/bin/python bench/fleet_times.py [--model bench-fleet --publish]

Needs the stack (`make up`); leaves the version deployed with two replicas.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmship import processes  # noqa: E402
from llmship.contracts import ServeSpec  # noqa: E402
from llmship.manifest import Manifest, hash_dir  # noqa: E402
from llmship.pipeline_config import ServingConfig  # noqa: E402
from llmship.settings import get_settings  # noqa: E402
from llmship.store import ArtifactStore  # noqa: E402
from llmship.versions import VersionDetails, read_version, sign_version  # noqa: E402
from tests.helpers.load import SteadyLoad  # noqa: E402
from tests.helpers.procs import cmdline, descendants  # noqa: E402

PROMPTS = [
    "Clause: The Vendor shall pay the Buyer $12,500 no later than March 3, 2027.\n"
    "Question: What amount does the clause state?\nAnswer:",
    "Payment is due",
]


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def publish_demo(store: ArtifactStore, model: str, version: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="llmship-bench-fleet-")) / "model"
    shutil.copytree(REPO / "demo" / "tiny-llama", folder)
    (folder / "llmship-note.txt").write_text(f"{model} {version}")
    store.upload_dir(
        folder,
        f"versions/{model}/{version}",
        Manifest(
            kind="version",
            key=version,
            files=hash_dir(folder),
            details=VersionDetails(
                model=model,
                version=version,
                gate_passed=True,
                scheme="UNQUANTIZED",
                serve=ServeSpec(
                    engine_args=["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]
                ),
            ).model_dump(mode="json"),
        ),
    )
    sign_version(store, model, version)  # with the stack's key, as a publish signs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-fleet")
    parser.add_argument("--version", default="fleet0000001")
    parser.add_argument("--publish", action="store_true")
    args = parser.parse_args()
    settings = get_settings()
    store = ArtifactStore(settings)
    if args.publish and store.read_manifest(f"versions/{args.model}/{args.version}") is None:
        publish_demo(store, args.model, args.version)
    published = read_version(store, args.model, args.version)

    from serving import fleet
    from serving.gateway_admin import route_traffic

    spec = fleet.spec_for_version(args.model, args.version, published.serve)
    existing = fleet.find(settings, args.model, args.version)
    if existing:
        fleet.release(settings, existing)
    started = time.monotonic()
    server, _ = fleet.acquire(settings, spec, ServingConfig(replicas=1))
    print(f"cold start, 1 replica (fetch + vLLM start): {time.monotonic() - started:.1f} s")
    time.sleep(2 * settings.gateway.endpoint_refresh_s)
    route_traffic(settings, args.model, args.version)

    started = time.monotonic()
    server = fleet.scale(settings, server, 2)
    print(
        f"scale 1 -> 2 (a warm version, in the node cache): "
        f"{time.monotonic() - started:.1f} s; replicas {[e.url for e in server.endpoints]}"
    )
    time.sleep(2 * settings.gateway.endpoint_refresh_s)

    victim = server.endpoints[0]
    port_flag = f"--port {victim.url.rsplit(':', 1)[1]} "
    engine = next(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit()
        and "vllm.entrypoints" in cmdline(int(p))
        and "engine_guard" not in cmdline(int(p))
        and port_flag in cmdline(int(p))
    )
    with SteadyLoad(settings.gateway_url, args.model, PROMPTS, workers=4, pause_s=0.05) as load:
        time.sleep(5)
        killed = time.time()
        os.killpg(engine, signal.SIGKILL)
        restored = None
        while time.time() - killed < 300:
            now = fleet.find(settings, args.model, args.version)
            ids = {e.replica for e in now.endpoints} if now else set()
            if len(ids) == 2 and victim.replica not in ids:
                restored = time.time() - killed
                break
            time.sleep(1.0)
        time.sleep(3)
    failed = load.failures()
    answered_after = sorted(o.ended for o in load.outcomes if o.ok and o.started > killed)
    gap = (answered_after[0] - killed) if answered_after else float("nan")
    print(
        f"failover: {len(failed)} of {len(load.outcomes)} requests failed (in flight on the "
        f"killed replica); first answer after the kill {gap * 1000:.0f} ms later; Ray had two "
        f"replicas again after {restored:.1f} s"
        if restored
        else "Ray did not restore it"
    )

    head = processes.find(settings, "ray-head")
    ray_pids = {head.pid, *descendants(head.pid)}
    engines = {p for p in ray_pids if "engine_guard" in cmdline(p) or "/serve/" in cmdline(p)}
    engines |= set(descendants(*engines))
    stack = set()
    for rec in processes.records(settings):
        if rec.name != "ray-head" and processes.is_alive(rec.pid):
            stack |= {rec.pid, *descendants(rec.pid)}
    print(
        f"memory: Ray's processes {rss_mib(ray_pids - engines):.0f} MiB (GCS, raylet, "
        f"dashboard and agents, Serve controller, directory, 2 replica actors); the rest of "
        f"the stack {rss_mib(stack):.0f} MiB; the 2 engines {rss_mib(engines):.0f} MiB"
    )


if __name__ == "__main__":
    main()
