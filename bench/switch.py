"""The time to switch traffic and to roll back, warm and cold, as clients see it.

On a model with a live and a previous version (the bench makes the second version when the
model has one only: the same deployment with 255 calibration samples instead of 256), under
steady client traffic through the gateway:
- warm: `rollback` to the previous version while its server is still up (the rollout kept it
  warm, `keep_previous_warm_seconds`): the gateway's route changes, nothing starts;
- cold: `rollback` again, to the version just left, after stopping its server: it is fetched
  from the cache (checked against its manifest) and a vLLM server starts.
Printed for each: the rollback flow's wall time, the rollout's own time and its switch (the
gateway's route change), the time from the rollback's start until clients get answers from the
target version, and the failed requests meanwhile (target: none). The flow is called in this
process; started from the UI or `llmship rollback`, the worker's start of a flow-run process
comes on top (some 13 s here: `bench/rerun.py` measures it).

    .venv/orchestrator/bin/python bench/switch.py [--model bench-llama]

Needs the stack (`make up`), PREFECT_HOME=.llmship/prefect (the stack's profile: its API and
password), and the model served
(`bench/rerun.py` serves bench-llama).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
from load import SteadyLoad  # noqa: E402

from flows.rollback import rollback  # noqa: E402
from llmship.settings import get_settings  # noqa: E402
from llmship.store import ArtifactStore  # noqa: E402
from serving import fleet  # noqa: E402

PROMPTS = ["The supplier shall deliver the goods within thirty days of", "Payment is due"]


def second_version(model: str, deployment: str) -> None:
    """Publish a second version of model: the same source, one calibration sample fewer."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=200)
        for run in runs:  # the parameters the model was last built with
            config = (run.parameters or {}).get("config")
            if isinstance(config, dict) and config.get("name") == model:
                break
        else:
            raise SystemExit(f"no flow run built {model}: run bench/rerun.py first")
    config = json.loads(json.dumps(config))
    samples = config["calibration"].get("num_samples", 256) - 1
    config["calibration"]["num_samples"] = samples
    config.setdefault("rollout", {})["canary_steps"] = []
    print(f"making a second version of {model} (build-and-serve, {samples} calibration samples)")
    flow_run = run_deployment(deployment, parameters={"config": config}, timeout=3600)
    assert flow_run.state.is_completed(), flow_run.state.message


def timed_rollback(model: str, gateway: str, target: str, label: str) -> None:
    with SteadyLoad(gateway, model, PROMPTS, workers=2, pause_s=0.05) as load:
        time.sleep(2)
        started = time.time()
        result = rollback(model=model, reason=f"bench/switch.py: {label}")
        flow_s = time.time() - started
        deadline = time.time() + 30
        while not any(o.ok and o.version == target for o in load.outcomes):
            assert time.time() < deadline, f"no answer from {target} within 30 s"
            time.sleep(0.05)
        time.sleep(2)
    served = min(o.ended for o in load.outcomes if o.ok and o.version == target)
    failed = [o for o in load.outcomes if not o.ok and o.started >= started - 1]
    print(
        f"{label}: rollback flow {flow_s:6.2f} s; rollout {result.seconds:6.2f} s "
        f"(server started: {result.started_server}); gateway switch "
        f"{result.switch_seconds * 1000:5.1f} ms; clients answered by {target} "
        f"{served - started:6.2f} s after the rollback began; {len(failed)} failed of "
        f"{len(load.outcomes)} requests"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-llama")
    parser.add_argument("--deployment", default="build-and-serve/tiny-llama")
    args = parser.parse_args()
    settings = get_settings()
    store = ArtifactStore(settings)
    if store.read_alias(args.model, "live") is None:
        raise SystemExit(f"{args.model} is not live: run bench/rerun.py first")
    if store.read_alias(args.model, "previous") is None:
        second_version(args.model, args.deployment)
    live, previous = (store.read_alias(args.model, a) for a in ("live", "previous"))
    print(f"{args.model}: live {live}, previous {previous}")
    assert fleet.find(settings, args.model, previous), "the previous version is not warm"
    timed_rollback(args.model, settings.gateway_url, previous, "warm")
    fleet.release(settings, fleet.find(settings, args.model, live))
    timed_rollback(args.model, settings.gateway_url, live, "cold")


if __name__ == "__main__":
    main()
