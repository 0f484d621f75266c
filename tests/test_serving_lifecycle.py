"""Switching versions on the real stack, with clients sending requests all along.

After test_pipeline.py (the first version, A, is live): new domain data makes the nightly
recalibration build version B, which waits for approval, then takes traffic through a canary
step without a single failed client request; a rollback through `prefect deployment run`
returns to the warm A; B, rolled out again, crashes during its canary and traffic goes back to
A by itself; a build without a passing gate record needs the override, and one whose server
cannot start leaves A serving. The tests run in file order: each starts where the one before
left off.
"""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import ArtifactSort
from prefect.flow_runs import resume_flow_run

from llmship.versions import list_versions, read_version, sign_version
from tests.helpers.engines import (
    engine_pids,
    kill_engines,
    live_groups,
    replica_actor_pids,
)
from tests.helpers.load import SteadyLoad
from tests.helpers.prefect_api import events_named, run_deployment
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "orchestrator" / "bin"
RECALIBRATE = "recalibrate/tiny-llama"


def prompts(n: int = 8) -> list[str]:
    lines = (REPO / "calibration_data" / "contracts" / "eval.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


def recalibrate_config(prefect_client, **rollout) -> dict:
    config = prefect_client.read_deployment_by_name(RECALIBRATE).parameters["config"]
    config = json.loads(json.dumps(config))
    # One recipe: the new data makes a new version of it, whatever the search would pick.
    config["search"] = []
    # Shorter than the demo's two 30 s steps; a p99 limit loose enough for 2 busy cores.
    config["rollout"].update(
        {"canary_steps": [50], "bake_seconds": 8, "max_p99_seconds": 20, **rollout}
    )
    return config


def finished(prefect_client, flow_run, timeout: float):
    return wait_for(
        f"{flow_run.name} finished",
        lambda: (
            run if (run := prefect_client.read_flow_run(flow_run.id)).state.is_final() else None
        ),
        timeout,
        every=2.0,
    )


def servers(stack, version: str):
    """The fleet's servers of a version (None when it has none)."""
    from serving import fleet

    return fleet.find(stack, "tiny-llama", version)


def replica_ids(stack, version: str) -> list[str]:
    server = servers(stack, version)
    return sorted(e.replica for e in server.endpoints) if server else []


def answers(stack, version: str) -> bool:
    """A completion through the gateway, answered by version."""
    resp = httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": prompts(1)[0], "max_tokens": 8, "temperature": 0},
    )
    return resp.status_code == 200 and resp.headers["x-llmship-version"] == version


def digest_of(store, version: str) -> str:
    return store.read_manifest(f"versions/tiny-llama/{version}").digest


@pytest.fixture
def second_gateway(stack):
    """Another gateway of the stack, as a second host (or a load balancer's second backend)
    would run it: its own port, the same fleet, routes from S3. Its URL, once it relays."""
    from llmship import stack as local_stack
    from serving import fleet

    settings = stack.updated(gateway={"port": stack.gateway.port + 1})
    env = {**local_stack.child_env(settings), "LLMSHIP_S3_IDENTITY": "reader"}
    proc = subprocess.Popen(
        local_stack.gateway_argv(BIN / "python", settings),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            "the second gateway known to the fleet",
            lambda: settings.gateway_url in fleet.gateways(stack),
            timeout=90,
            every=1.0,
        )
        yield settings.gateway_url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    # It said so as it stopped: rollouts no longer drive it.
    assert settings.gateway_url not in fleet.gateways(stack)


@pytest.fixture(scope="module")
def versions(first_run, stack, store) -> dict:
    """A (live after the first run), and B once the recalibration has rolled it out."""
    return {"A": store.read_alias("tiny-llama", "live")}


def test_recalibration_waits_for_approval_then_canaries_without_a_failed_request(
    versions, stack, store, prefect_client, second_gateway
):
    """Behind two gateways: the rollout moves the route on both, and judges the canary on
    the requests of both."""
    a = versions["A"]
    # The team's data was refreshed: the first 256 samples, the ones calibrated on, are new.
    data = stack.stages.calibration_data_dir / "contracts" / "calibration.jsonl"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[256:] + lines[:256]) + "\n")

    parent = run_deployment(
        RECALIBRATE, timeout=0, parameters={"config": recalibrate_config(prefect_client)}
    )
    paused_filter = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
    )
    paused = wait_for(
        "paused for approval",
        lambda: prefect_client.read_flow_runs(flow_run_filter=paused_filter),
        timeout=600,
        every=3.0,
    )[0]
    # Published and gated, but nobody has approved: A still takes all the traffic.
    published = [v.version for v in list_versions(store, "tiny-llama")]
    assert len(published) == 2 and a in published
    b = versions["B"] = next(v for v in published if v != a)
    assert store.read_alias("tiny-llama", "live") == a
    for gateway in (stack.gateway_url, second_gateway):
        assert httpx.get(f"{gateway}/v1/models").json()["data"][0]["version"] == a

    # Steady, not saturating: on 2 cores a saturating load would starve B's server start.
    with (
        SteadyLoad(stack.gateway_url, "tiny-llama", prompts(), workers=1, pause_s=0.25) as load,
        SteadyLoad(second_gateway, "tiny-llama", prompts(), workers=1, pause_s=0.25) as load2,
    ):
        time.sleep(3)
        resume_flow_run(paused.id, run_input={"approve": True, "note": "looks good"})
        done = finished(prefect_client, parent, timeout=600)
        time.sleep(3)
    assert done.state.is_completed(), done.state.message
    result = done.state.result()
    # B's server is the one its gate evaluated, kept through the approval: no second start.
    assert (result.version, result.previous, result.started_server) == (b, a, False)
    [step] = result.steps
    assert step.percent == 50 and step.breach is None and step.requests > 0

    # Not one client request failed while B started, took half the traffic, then all of it,
    # through either gateway.
    for clients in (load, load2):
        assert clients.failures() == [], clients.failures()[:5]
        seen = [o.version for o in clients.outcomes]
        assert len(seen) > 15 and {a, b} <= set(seen)
        tail = [o.version for o in clients.outcomes if o.started > done.state.timestamp.timestamp()]
        assert tail and set(tail) == {b}
    # The step was judged on both gateways' requests: more of B's than either one relayed
    # while it was a canary (its requests started before the last of A's).
    in_canary = [
        sum(
            1
            for o in clients.outcomes
            if o.version == b
            and o.started < max(p.started for p in clients.outcomes if p.version == a)
        )
        for clients in (load, load2)
    ]
    assert min(in_canary) > 0 and step.requests > max(in_canary), (step.requests, in_canary)
    assert (store.read_alias("tiny-llama", "live"), store.read_alias("tiny-llama", "previous")) == (
        b,
        a,
    )
    # A stays warm: its servers keep running, the fleet stopping them 15 minutes out.
    warm = servers(stack, a)
    assert warm and warm.endpoints and warm.warm_until
    assert 800 < warm.warm_until - time.time() <= 900

    listing = subprocess.run(
        [str(BIN / "llmship"), "versions", "tiny-llama"], capture_output=True, text=True, check=True
    ).stdout
    header, *lines = listing.splitlines()
    rows = {line.split()[0]: line for line in lines}
    assert rows[b].rstrip().endswith("live") and rows[a].rstrip().endswith("previous")
    # The recipe that won each version's search (B's, the recalibration's one recipe); the
    # accuracy gate's verdict, and the candidate's tokens/s over the baseline's: measured, not
    # judged, on CPU (the demo's policy sets no limit), so no perf verdict ("-").
    recipe, gate = header.index("recipe"), header.index("gate")
    assert header[gate:].split()[:4] == ["gate", "perf", "tok/s", "x"]
    first_search = store.get_json(f"versions/tiny-llama/{a}/candidates.json")[0]
    for row, won in ((rows[a], first_search["winner_recipe"]), (rows[b], "W8A8, SmoothQuant 0.8")):
        assert row[recipe:gate].strip() == won, row
        verdicts = row[gate:].split()
        assert verdicts[:2] == ["pass", "-"] and float(verdicts[2]) > 0, row


def test_rollback_through_prefect_deployment_run_takes_the_warm_version(
    versions, stack, store, prefect_client
):
    a, b = versions["A"], versions["B"]
    a_replicas = replica_ids(stack, a)
    assert a_replicas
    run = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "rollback/tiny-llama",
            "--param",
            "reason=B answers dates worse on the new contracts",
            "--watch",
            "--watch-timeout",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (store.read_alias("tiny-llama", "live"), store.read_alias("tiny-llama", "previous")) == (
        a,
        b,
    )
    alias = store.get_json("aliases/tiny-llama/live.json")[0]
    assert alias["reason"] == "rollback: B answers dates worse on the new contracts"
    # The kept-warm servers took the traffic: no start, the same replicas, no longer retiring.
    assert replica_ids(stack, a) == a_replicas and servers(stack, a).warm_until is None
    models = httpx.get(f"{stack.gateway_url}/v1/models").json()["data"]
    assert [(m["id"], m["version"]) for m in models] == [("tiny-llama", a)]
    artifact = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-llama-rollback"])),
        sort=ArtifactSort.CREATED_DESC,  # this run's: earlier tests' rollbacks wrote it too
    )[0]
    assert "B answers dates worse" in artifact.data and f"| from | {b} |" in artifact.data


def test_a_canary_that_dies_is_rolled_back_by_itself(versions, stack, store, prefect_client):
    a, b = versions["A"], versions["B"]
    assert replica_ids(stack, b), "B was kept warm by the rollback"
    # The data still differs from A's: the recalibration rolls B out again, this time with
    # no approval, a long canary step, and B's server about to die in the middle of it.
    config = recalibrate_config(prefect_client, bake_seconds=300, require_approval=False)
    killed = {}

    def kill_b_once_it_has_traffic():
        def has_canary():
            routes = httpx.get(f"{stack.gateway_url}/v1/models").json()["data"]
            return bool(routes and routes[0].get("canary"))

        wait_for("a canary route", has_canary, timeout=300, every=0.5)
        time.sleep(3)
        killed["at"] = time.time()
        assert kill_engines(digest_of(store, b))

    with SteadyLoad(stack.gateway_url, "tiny-llama", prompts(), workers=2, pause_s=0.25) as load:
        killer = threading.Thread(target=kill_b_once_it_has_traffic)
        killer.start()
        flow_run = run_deployment(RECALIBRATE, parameters={"config": config}, timeout=600)
        killer.join()
        time.sleep(3)
    assert flow_run.state.is_failed()
    done_at = flow_run.state.timestamp.timestamp()
    # Judged on the gateway's metrics within seconds, not at the end of the 300 s bake.
    assert done_at - killed["at"] < 60
    assert f"CanaryFailed: canary of tiny-llama {b} at 50% breached after" in flow_run.state.message
    assert "error rate" in flow_run.state.message
    assert f"traffic is back on {a}" in flow_run.state.message
    assert store.read_alias("tiny-llama", "live") == a
    models = httpx.get(f"{stack.gateway_url}/v1/models").json()["data"]
    assert [(m["id"], m["version"], m.get("canary")) for m in models] == [("tiny-llama", a, None)]
    # B's servers are stopped (Ray was replacing the crashed one: that stops too).
    wait_for(
        "B's servers gone",
        lambda: servers(stack, b) is None and not engine_pids(digest_of(store, b)),
        timeout=60,
        every=1.0,
    )
    # Clients: only requests B had in hand when it died can fail; all after went to A.
    failures = load.failures()
    assert all(abs(f.started - killed["at"]) < 5 for f in failures), failures
    assert len(failures) <= load.workers
    after = [o for o in load.outcomes if o.started > killed["at"] + 5]
    assert after and all(o.ok and o.version == a for o in after)

    def rolled_back_event():
        events = events_named(stack, "llmship.rollout.rolled-back", limit=5)
        return [e["payload"] for e in events if e["payload"]["version"] == b]

    [payload] = wait_for("a rolled-back event", rolled_back_event, timeout=30)
    assert payload["back_on"] == a and payload["steps"][0]["errors"] >= 1


def test_an_ungated_version_needs_the_override_and_one_that_cannot_start_changes_nothing(
    versions, stack, store
):
    from llmship.forms import offer_published_versions
    from serving import fleet

    a = versions["A"]
    # A build that reached the store some other way: no passing gate record, and engine
    # arguments its model cannot take (a context past its 512 positions).
    ungated = "ungated000001"
    manifest = store.get_json(f"versions/tiny-llama/{a}/manifest.json")[0]
    args = manifest["details"]["serve"]["engine_args"]
    args[args.index("--max-model-len") + 1] = "4096"
    manifest["details"]["gate_passed"] = False
    manifest["key"] = ungated
    for f in manifest["files"]:
        source = {"Bucket": store.bucket, "Key": f"versions/tiny-llama/{a}/files/{f['path']}"}
        store.client.copy_object(
            Bucket=store.bucket,
            CopySource=source,
            Key=f"versions/tiny-llama/{ungated}/files/{f['path']}",
        )
    store.put_json(f"versions/tiny-llama/{ungated}/manifest.json", manifest)
    # Signed with the pipeline's key: the gate's record and the engine's start are what this
    # test is about (tests/test_signed_versions.py: what an unsigned version meets).
    sign_version(store, "tiny-llama", ungated)
    # Published by another writer: the rollback form lists it once refreshed (`llmship up`
    # or the next publish does that; `llmship rollback` does it itself).
    offer_published_versions(stack, "tiny-llama")

    refused = run_deployment(
        "rollback/tiny-llama",
        timeout=300,
        parameters={"reason": "try the imported build", "target_version": ungated},
    )
    assert refused.state.is_failed()
    assert f"tiny-llama {ungated} has no passing gate record" in refused.state.message
    assert "allow_ungated" in refused.state.message

    overridden = run_deployment(
        "rollback/tiny-llama",
        timeout=600,
        parameters={
            "reason": "try the imported build",
            "target_version": ungated,
            "allow_ungated": True,
        },
    )
    assert overridden.state.is_failed()
    # vLLM refused to start it: the message says so in vLLM's words; nothing moved.
    message = overridden.state.message
    assert f"tiny-llama--{ungated} could not start" in message and "exited" in message
    assert "max_model_len" in message or "max-model-len" in message, message
    assert store.read_alias("tiny-llama", "live") == a
    assert [s.version for s in fleet.running(stack, "tiny-llama")] == [a]
    resp = httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": prompts(1)[0], "max_tokens": 8, "temperature": 0},
    )
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == a


def test_a_prompt_past_the_context_is_an_openai_400(versions, stack):
    resp = httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": "clause " * 2000, "max_tokens": 8},
    )
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert "context length" in err["message"] or "maximum" in err["message"], err
    assert {"message", "type"} <= set(err)


def test_a_live_version_that_cannot_stay_up_is_replaced_by_the_previous_version(
    versions, stack, store, prefect_client, alert_receiver
):
    """Ray replaces a replica that crashes; a version whose every replica keeps crashing
    (here: killed whenever one comes up, as a bad GPU or an OOM at load would) has no replica
    at all for a while: the gateway declares it down and the automation rolls back."""
    a, b = versions["A"], versions["B"]
    assert (store.read_alias("tiny-llama", "live"), store.read_alias("tiny-llama", "previous")) == (
        a,
        b,
    )
    a_digest = digest_of(store, a)
    crashing, first_kill = threading.Event(), {}

    def crash_loop():
        while not crashing.is_set():
            kill_engines(a_digest)
            first_kill.setdefault("at", time.time())
            time.sleep(0.2)

    with SteadyLoad(stack.gateway_url, "tiny-llama", prompts(), workers=2, pause_s=0.25) as load:
        time.sleep(3)
        killer = threading.Thread(target=crash_loop, daemon=True)
        killer.start()
        # Once its first round has killed every process of A's engines: a stream that
        # began while one still ran may fail mid-answer.
        killed_at = wait_for(
            "A's engines killed", lambda: first_kill.get("at"), timeout=30, every=0.05
        )
        # The gateway says so at once to a load balancer, and on its metrics.
        wait_for(
            "/ready answering 503",
            lambda: httpx.get(f"{stack.gateway_url}/ready", timeout=10).status_code == 503,
            timeout=30,
        )
        assert a in httpx.get(f"{stack.gateway_url}/ready", timeout=10).json()["error"]["message"]
        # Declared down after A's replica start (as the gateway saw it) and 3 missed checks
        # more; the automation rolls back to B, with no one at the keyboard. B's server was
        # stopped when its canary died: it starts again.
        wait_for(
            "B live again",
            lambda: store.read_alias("tiny-llama", "live") == b,
            timeout=420,
            every=2.0,
        )
        restored_at = time.time()
        crashing.set()
        wait_for(
            "B serving",
            lambda: any(o.ok and o.version == b and o.started > restored_at for o in load.outcomes),
            timeout=30,
            every=0.5,
        )
        time.sleep(5)
    metrics = httpx.get(f"{stack.gateway_url}/metrics").text
    assert f'llmship_gateway_upstream_up{{model="tiny-llama",version="{a}"}} 0.0' in metrics
    models = httpx.get(f"{stack.gateway_url}/v1/models").json()["data"]
    assert [(m["id"], m["version"]) for m in models] == [("tiny-llama", b)]
    # Clients: clean OpenAI-style 503s while no server answered (a stream A had begun ends
    # with the same error as an event), nothing hung, and every request after the switch
    # answered by B.
    failures = load.failures()
    assert failures and all(killed_at - 2 < f.started < restored_at + 2 for f in failures)
    for f in failures:
        assert f.status == 503 or (f.stream and f.status == 200 and f.started < killed_at), f
        error = json.loads(f.detail)["error"]
        assert error["code"] == "upstream_unavailable" and "retry shortly" in error["message"]
    assert all(f.ended - f.started < 10 for f in failures)
    after = [o for o in load.outcomes if o.started > restored_at + 2]
    assert after and all(o.ok and o.version == b for o in after)
    # What happened is on record: the event, the rollback run with its reason, the alert.
    alias = store.get_json("aliases/tiny-llama/live.json")[0]
    assert f"the gateway declared the live version {a} down" in alias["reason"]
    events = events_named(stack, "llmship.serving.down", limit=5)
    assert [e["payload"]["version"] for e in events if e["payload"]["model"] == "tiny-llama"] == [a]
    wait_for(
        "the alert",
        lambda: [
            x
            for x in alert_receiver
            if x.get("subject") == "llmship: tiny-llama's live version is down; rolling back"
            and a in x["body"]
        ],
        timeout=30,
    )
    print(
        f"killed -> B live: {restored_at - killed_at:.0f} s; {len(failures)} requests "
        f"answered 503 meanwhile"
    )


def test_two_identical_runs_at_once_end_as_one_rollout(versions, stack, store, prefect_client):
    """Two build-and-serve runs of the same new config started together: each gate's and
    rollout's servers are the model's, and interleaved they stopped each other's (one run
    failed with "exited before healthy", the other's rollout with FileNotFoundError), and
    both calibrated at once, the second failing to store different bytes (VersionConflict).
    Runs of one model now take turns at building and at the gate and the rollout (Prefect's
    global concurrency limits llmship-build-tiny-llama and llmship-serving-tiny-llama): one
    rolls the new version out, the other finds it made and live."""
    from prefect.client.schemas.objects import FlowRun

    config = json.loads(
        json.dumps(
            prefect_client.read_deployment_by_name("build-and-serve/tiny-llama").parameters[
                "config"
            ]
        )
    )
    config["calibration"]["num_samples"] = 96  # a new candidate: nothing of it is cached
    config["search"] = []  # the one recipe: the search's winner could be the live version
    config["rollout"].update({"canary_steps": [], "require_approval": False})
    runs = [
        run_deployment("build-and-serve/tiny-llama", parameters={"config": config}, timeout=0)
        for _ in range(2)
    ]
    done: list[FlowRun] = [finished(prefect_client, r, timeout=900) for r in runs]
    for flow_run in done:
        assert flow_run.state.is_completed(), (flow_run.name, flow_run.state.message)
    results = sorted((r.state.result() for r in done), key=lambda r: not r.changed)
    assert [r.changed for r in results] == [True, False], results
    new = results[0].version
    assert results[1].version == new
    assert store.read_alias("tiny-llama", "live") == new
    models = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["version"]) for m in models] == [("tiny-llama", new)]
    for name in ("llmship-build-tiny-llama", "llmship-serving-tiny-llama"):
        limit = prefect_client.read_global_concurrency_limit_by_name(name)
        assert limit.limit == 1 and limit.active_slots == 0


# Last of the module: it leaves the live version as the tests above left it, at one replica,
# but with a replica's worker killed along the way.
def test_an_autoscaled_version_scales_out_and_back_and_a_killed_replica_leaves_nothing(
    versions, stack, store
):
    """serving.autoscaling: Ray Serve's autoscaler on the engines' own queues (requests go
    to the engines directly, so Serve's count of them stays 0). The live version, switched in
    place to autoscale between 1 and 2, gets a second replica while a client keeps its engine
    busy, and goes back to one once it stops.

    Then, at two replicas, a replica's Ray worker killed outright (SIGKILL: the OOM killer, a
    crashed raylet's clean-up), which runs no clean-up of its own. Before, Ray then killed the
    guard with it and the kernel the API server, and vLLM's engine core and workers (1.6 GB
    each on CPU) lived on, orphaned: 14 GB of them piled up on this machine. Now nothing of
    its engine is left, the other replica serves on, and Serve replaces the killed one."""
    from llmship.pipeline_config import AutoscalingBlock, ServingConfig
    from serving import fleet

    live = store.read_alias("tiny-llama", "live")
    spec = fleet.spec_for_version("tiny-llama", live, read_version(store, "tiny-llama", live).serve)
    # Half a request per engine: one client asks for two. (Two clients at a target of one
    # did too, but on 2 cores they starved the second engine's start past four minutes.)
    autoscaled = ServingConfig(
        autoscaling=AutoscalingBlock(
            min_replicas=1,
            max_replicas=2,
            target_ongoing_requests=0.5,
            upscale_delay_s=0,
            downscale_delay_s=10,
            metrics_interval_s=1,
            look_back_period_s=5,
        )
    )
    before = replica_ids(stack, live)
    server, started = fleet.acquire(stack, spec, autoscaled)
    # In place: the running replica serves on. (A second one may be starting already: the
    # policy takes the engine's peak load over the look-back period, and the gate's
    # evaluation of this version, moments ago, sent it several requests at once.)
    assert not started and set(before) <= {e.replica for e in server.endpoints}
    stop, answered, failed = threading.Event(), [], []

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                resp = http.post(
                    f"{stack.gateway_url}/v1/completions",
                    json={
                        "model": "tiny-llama",
                        "prompt": prompts(1)[0],
                        "max_tokens": 100,
                        "ignore_eos": True,
                        "temperature": 0,
                    },
                )
                (answered if resp.status_code == 200 else failed).append(resp.text)

    clients = [threading.Thread(target=client)]
    loaded = time.time()
    for thread in clients:
        thread.start()
    try:
        # A vLLM CPU engine starting while another serves shares 2 cores with it: 130 to
        # 200 s here in the whole suite, once about 400 s with this module alone. (The second
        # may be up at once, from the gate's load: then the wait is for the client's first
        # answer through the pair.)
        wait_for(
            "a second replica under load, and an answer",
            lambda: len(replica_ids(stack, live)) == 2 and answered,
            timeout=600,
            every=1.0,
        )
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    scaled_out = time.time() - loaded
    assert answered and not failed, failed
    wait_for(
        "one replica, once idle", lambda: len(replica_ids(stack, live)) == 1, timeout=120, every=1.0
    )
    scaled_in = time.time() - loaded
    assert answers(stack, live)

    # A replica's worker killed at a fixed count of two. Killed while the autoscaler scaled in
    # (as this test did before), Serve once stopped the other replica too, 3 s after the kill,
    # and started a new one: the live version had none for 16 s, the gateway declared it down
    # and the restore automation rolled it back under the next test module.
    fleet.acquire(stack, spec, ServingConfig(replicas=2))
    wait_for(
        "two replica processes, each with its engine",
        lambda: (
            len(engine_pids(digest_of(store, live)))
            == len(replica_actor_pids(fleet.app_name("tiny-llama", live)))
            == 2
        ),
        timeout=300,
        every=0.5,
    )
    groups = engine_pids(digest_of(store, live))
    actors = replica_actor_pids(fleet.app_name("tiny-llama", live))
    two = replica_ids(stack, live)
    assert len(groups) == len(actors) == len(two) == 2
    os.kill(actors[0], signal.SIGKILL)
    killed = time.time()
    wait_for(
        "the killed replica's whole engine process group gone",
        lambda: len(live_groups(groups)) == 1,
        timeout=30,
        every=0.5,
    )
    gone = time.time() - killed
    assert answers(stack, live)  # the other replica serves on
    wait_for(
        "the killed replica replaced, the other one kept",
        lambda: len(now := replica_ids(stack, live)) == 2 and len(set(now) & set(two)) == 1,
        timeout=300,
        every=1.0,
    )
    fleet.acquire(stack, spec, ServingConfig())  # a fixed replica again, for what follows
    assert len(replica_ids(stack, live)) == 1
    # Serve may keep the replacement and stop the other: a request the gateway sent to the
    # stopping one in the moment before its next look at the fleet fails (seen once in the
    # suite, 2026-12-07; issue 29's note). What follows needs the one replica answering.
    scaled_to_one = time.time()
    wait_for(
        "the one replica left answering",
        lambda: answers(stack, live),
        timeout=60,
        retry_on=(httpx.HTTPError,),
    )
    print(
        f"autoscaling: 2 replicas {scaled_out:.0f} s after the load began, 1 again "
        f"{scaled_in:.0f} s after; the killed replica's engine gone {gone:.1f} s after its "
        f"worker, replaced {scaled_to_one - killed:.0f} s after; one replica answering "
        f"{time.time() - scaled_to_one:.1f} s after the scale-in"
    )
