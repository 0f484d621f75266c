"""Rollback runs that do not finish, on the real stack, with the live version serving all along:
one cancelled through Prefect's API while its target's replica deploys, one whose worker and
flow-run process are killed then (its host died), and one to a version whose manifest asks
its engine to listen on every interface. Each leaves the live version serving, the model's
serving slot free and no server of the target behind (issue 27).

The target is a copy of the live version under another name, published with the writer's
keys and signed with the pipeline's key (its files are the live version's, so a replica finds
them in its node's cache and the engine's ~35 s start is the only wait; what an unsigned
version meets is tests/test_signed_versions.py's). After test_serving_lifecycle
in file order: these tests change no alias.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelling

from tests.helpers.prefect_api import run_deployment
from tests.helpers.procs import descendants
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MODEL = "tiny-llama"
SLOT = f"llmship-serving-{MODEL}"


def publish_copy(store, source: str, version: str, change=None) -> str:
    """source published again as version (server-side copies of its files, then the
    manifest), its manifest changed by change(manifest) first, and signed as a publish
    signs."""
    from llmship.versions import sign_version

    manifest = store.get_json(f"versions/{MODEL}/{source}/manifest.json")[0]
    manifest["key"] = version
    if change:
        change(manifest)
    for f in manifest["files"]:
        key = f"versions/{MODEL}/{source}/files/{f['path']}"
        store.client.copy_object(
            Bucket=store.bucket,
            CopySource={"Bucket": store.bucket, "Key": key},
            Key=f"versions/{MODEL}/{version}/files/{f['path']}",
        )
    store.put_json(f"versions/{MODEL}/{version}/manifest.json", manifest)
    sign_version(store, MODEL, version)
    return version


@pytest.fixture(scope="module")
def live(first_run, stack, store) -> dict:
    """The live version, and two copies of it: a plain one to roll back to, and one whose
    manifest adds `--host 0.0.0.0` to its engine's arguments."""
    from llmship.forms import offer_published_versions

    a = store.read_alias(MODEL, "live")
    copy = publish_copy(store, a, "stoppedcopy01")

    def listen_everywhere(manifest):
        manifest["details"]["serve"]["engine_args"] += ["--host", "0.0.0.0"]

    exposed = publish_copy(store, a, "hostallif001", listen_everywhere)
    # The rollback form lists published versions only once refreshed.
    offer_published_versions(stack, MODEL)
    return {"a": a, "copy": copy, "exposed": exposed}


def answers_with(stack, version: str) -> bool:
    resp = httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": "Clause: The Vendor shall pay", "max_tokens": 4},
    )
    return resp.status_code == 200 and resp.headers["x-llmship-version"] == version


def server_of(stack, version: str):
    from serving import fleet

    return fleet.find(stack, MODEL, version)


def start_rollback_to(prefect_client, stack, target: str):
    """A rollback run to target, returned once it runs and the fleet deploys target's replica
    (the engine not yet healthy)."""
    assert server_of(stack, target) is None, f"{target} has servers before the test"
    run = run_deployment(
        f"rollback/{MODEL}",
        parameters={"reason": "issue 27: a run that does not finish", "target_version": target},
        timeout=0,
    )

    def deploying() -> bool:
        server = server_of(stack, target)
        return (
            server is not None
            and server.status != "RUNNING"
            and prefect_client.read_flow_run(run.id).state.is_running()
        )

    wait_for(f"{target}'s replica deploying", deploying, timeout=120, every=0.5)
    return run


def slot_free(prefect_client) -> bool:
    return prefect_client.read_global_concurrency_limit_by_name(SLOT).active_slots == 0


def assert_live_kept(stack, store, a: str) -> None:
    # Who moved it, if anyone did: the alias document says which run and why.
    alias = store.read_alias_record(MODEL, "live")
    assert alias is not None and alias.version == a, alias
    models = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["version"]) for m in models] == [(MODEL, a)]
    assert answers_with(stack, a)


def test_a_manifest_engine_argument_llmship_did_not_choose_is_refused(live, stack, store):
    """Engine arguments come from the version's manifest: `--host 0.0.0.0` would put the
    engine on every interface. The signature stops a manifest written with the writer's keys
    alone; this stops one signed with a stolen or misused signing key too."""
    refused = run_deployment(
        f"rollback/{MODEL}",
        timeout=300,
        parameters={"reason": "try the exposed copy", "target_version": live["exposed"]},
    )
    assert refused.state.is_failed()
    message = refused.state.message
    assert "--host" in message and live["exposed"] in message, message
    assert "not an engine argument llmship sets" in message, message
    assert server_of(stack, live["exposed"]) is None
    assert_live_kept(stack, store, live["a"])


def test_a_cancelled_rollback_leaves_no_server_behind(live, stack, store, prefect_client):
    a, target = live["a"], live["copy"]
    wait_for("the serving slot free", lambda: slot_free(prefect_client), timeout=120)
    run = start_rollback_to(prefect_client, stack, target)
    # As the UI's Cancel button does it.
    prefect_client.set_flow_run_state(run.id, Cancelling(), force=True)
    cancelled_at = time.monotonic()
    wait_for(
        "the run Cancelled",
        lambda: prefect_client.read_flow_run(run.id).state.type == StateType.CANCELLED,
        timeout=90,
        every=1.0,
    )
    wait_for(
        f"{target}'s server gone",
        lambda: server_of(stack, target) is None,
        timeout=120,
        every=1.0,
    )
    print(f"cancelled -> {target}'s server gone: {time.monotonic() - cancelled_at:.0f} s")
    wait_for("the serving slot free", lambda: slot_free(prefect_client), timeout=120)
    assert_live_kept(stack, store, a)


def test_a_rollback_whose_worker_dies_crashes_and_gives_back_its_slot_and_server(
    live, stack, store, prefect_client
):
    from llmship import processes
    from llmship import stack as local_stack

    a, target = live["a"], live["copy"]
    wait_for("the serving slot free", lambda: slot_free(prefect_client), timeout=120)
    run = start_rollback_to(prefect_client, stack, target)
    assert not slot_free(prefect_client)
    # The host dies: the worker and the flow-run process, at once.
    worker = processes.find(stack, "prefect-worker")
    for pid in [worker.pid, *descendants(worker.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.monotonic()
    # Once it is gone (a SIGKILLed process is not dead at once): a worker that still looks
    # alive is not started again.
    wait_for("the worker gone", lambda: not processes.find(stack, "prefect-worker"), timeout=30)
    local_stack.start_worker(stack, local_stack.child_env(stack))
    # Watched together, each within its bound: the heartbeats stop (Crashed after 3 missed
    # beats of 30 s), the slot's lease runs out, the target's hold in the fleet runs out.
    bounds = {"server gone": 120, "slot free": 120, "Crashed": 90 + 60}
    seen: dict[str, float] = {}
    state = None
    while len(seen) < len(bounds) and time.monotonic() - killed_at < max(bounds.values()):
        checks = {
            "server gone": lambda: server_of(stack, target) is None,
            "slot free": lambda: slot_free(prefect_client),
            "Crashed": lambda: prefect_client.read_flow_run(run.id).state.type == StateType.CRASHED,
        }
        for what, check in checks.items():
            try:
                if what not in seen and check():
                    seen[what] = time.monotonic() - killed_at
            except httpx.HTTPError:
                pass
        time.sleep(2.0)
    state = prefect_client.read_flow_run(run.id).state
    print(f"killed -> {seen}; the run: {state.type.value} {json.dumps(state.message)}")
    late = {what: bound for what, bound in bounds.items() if seen.get(what, 1e9) > bound}
    assert not late, f"not within their bounds (s): {late}; seen (s): {seen}; run {state.type}"
    assert "no heartbeat" in state.message
    assert_live_kept(stack, store, a)
