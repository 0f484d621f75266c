"""A rerun with unchanged inputs against the cold run, and the orchestration's own overhead.

Runs the deployment twice through Prefect, as a user does: cold, on a copy of the demo model
that no earlier run has seen (one added file gives it new content addresses, so every stage
runs), then again with the same parameters. Reports:
- rerun wall time / cold wall time (target: at most 5%), and which stages ran again (target:
  none: every task Cached, the rollout a no-op);
- orchestration overhead of the cold run: the flow run's wall time minus the time its tasks
  ran (Prefect's own start-up, scheduling and result handling between stages; target: at
  most 10%).

    .venv/orchestrator/bin/python bench/rerun.py [--deployment build-and-serve/tiny-llama]

Needs the stack (`make up`); the bench's model is served as `bench-llama` afterwards
(`llmship down` stops it with the rest).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.deployments import run_deployment

from llmship.settings import REPO_ROOT, get_settings


def task_seconds(client, flow_run) -> tuple[float, dict[str, str]]:
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
    # The evaluate tasks run inside the gate task: their time is the gate's already.
    busy = sum(
        (t.end_time - t.start_time).total_seconds()
        for t in runs
        if t.start_time and t.end_time and not t.name.startswith("evaluate")
    )
    return busy, {t.name: t.state.name for t in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deployment", default="build-and-serve/tiny-llama")
    args = parser.parse_args()
    settings = get_settings()
    model_dir = settings.state_dir / "bench" / f"model-{uuid.uuid4().hex[:8]}"
    shutil.copytree(REPO_ROOT / "demo" / "tiny-llama", model_dir)
    (model_dir / "bench-nonce.txt").write_text(model_dir.name)
    with get_client(sync_client=True) as client:
        config = json.loads(
            json.dumps(client.read_deployment_by_name(args.deployment).parameters["config"])
        )
        config.update(name="bench-llama", source=str(model_dir))
        runs = {}
        for label in ("cold", "rerun"):
            started = time.perf_counter()
            flow_run = run_deployment(args.deployment, parameters={"config": config}, timeout=3600)
            wall = time.perf_counter() - started
            assert flow_run.state.is_completed(), flow_run.state.message
            time.sleep(3)  # task-run states can land after the flow run's
            flow_run = client.read_flow_run(flow_run.id)
            run_s = (flow_run.end_time - flow_run.start_time).total_seconds()
            busy, states = task_seconds(client, flow_run)
            runs[label] = {"wall": wall, "run": run_s, "tasks": busy, "states": states}
            print(
                f"{label:5s}: {wall:7.1f} s from `run_deployment` to done; flow run "
                f"{run_s:7.1f} s, its tasks {busy:7.1f} s; "
                f"{sorted(set(states.values()))}"
            )
    cold, rerun = runs["cold"], runs["rerun"]
    ran_again = sorted(
        n
        for n, s in rerun["states"].items()
        if s not in ("Cached",) and not n.startswith(("preflight", "rollout"))
    )
    print(
        f"rerun / cold wall time: {rerun['wall'] / cold['wall']:.3f} (target <= 0.05); "
        f"stages run again: {ran_again or 'none'}"
    )
    overhead = cold["run"] - cold["tasks"]
    print(
        f"orchestration overhead, cold run: {overhead:.1f} s of {cold['run']:.1f} s = "
        f"{overhead / cold['run']:.1%} (target <= 10%); with the worker's start of the flow "
        f"run process: {cold['wall'] - cold['tasks']:.1f} s = "
        f"{(cold['wall'] - cold['tasks']) / cold['wall']:.1%}"
    )


if __name__ == "__main__":
    main()
