"""Wall time of each stage of a deployment's most recent flow runs, from the Prefect API.

    PREFECT_HOME=.llmship/prefect .venv/orchestrator/bin/python bench/stage_times.py \
        build-and-serve/tiny-llama [--runs 2]
"""

from __future__ import annotations

import argparse

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
from prefect.client.schemas.sorting import FlowRunSort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("deployment")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(args.deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id={"any_": [deployment.id]}),
            sort=FlowRunSort.START_TIME_DESC,
            limit=args.runs,
        )
        for run in reversed(runs):
            total = (run.end_time - run.start_time).total_seconds() if run.end_time else None
            print(
                f"flow run {run.name} ({run.state.name}): {total:.1f}s"
                if total is not None
                else f"flow run {run.name}: running"
            )
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            for t in sorted(tasks, key=lambda t: t.start_time or t.expected_start_time):
                seconds = (
                    (t.end_time - t.start_time).total_seconds()
                    if t.start_time and t.end_time
                    else 0.0
                )
                print(f"  {t.name:24s} {t.state.name:10s} {seconds:8.1f}s")


if __name__ == "__main__":
    main()
