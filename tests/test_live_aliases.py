"""The `live` aliases and published manifests as a careless operator (or an attacker) with the
pipeline writer's keys can leave them, on the real stack (issue 27): a gateway that starts
serves every good alias and reports each bad one; a live version that never passed its gate
is not served at a restart unless an operator's override put it there; a restore goes to a
published, gated version (a warm one first), and aliases name only published versions; one
bad manifest costs `llmship versions` only its own line.

Every test puts the store back as it found it (aliases, versions) and restarts the gateway
on it: the suite's later tests start where the earlier ones left off.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest

from llmship.versions import sign_version
from tests.helpers.prefect_api import events_named, run_deployment
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.stack]
REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "orchestrator" / "bin" / "python"
MODEL = "tiny-llama"
PROMPT = "Clause: The Vendor shall pay the Buyer the sum of $312,500.\nQuestion: What amount?\n"


def restart_gateway(stack) -> None:
    """Stop the stack's gateway and start it again, as `llmship up` does after a crash."""
    from llmship import processes
    from llmship.stack import child_env, start_gateway

    processes.stop(stack, processes.find(stack, "gateway"))
    start_gateway(stack, child_env(stack))


def complete(stack) -> httpx.Response:
    return httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0},
    )


def gateway_log(stack) -> str:
    return (stack.state_dir / "logs" / "gateway.log").read_text(errors="replace")


def llmship(*args: str) -> subprocess.CompletedProcess:
    """The command line, as a user runs it (this checkout's code)."""
    return subprocess.run(
        [str(PYTHON), "-m", "flows.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def rollback_to(version: str, **parameters) -> None:
    run = run_deployment(
        f"rollback/{MODEL}",
        timeout=600,
        parameters={"reason": "test", "target_version": version, **parameters},
    )
    assert run.state.is_completed(), run.state.message


class StoreState:
    """The tiny-llama aliases as they were, and the objects a test adds: put back at the end."""

    def __init__(self, store) -> None:
        self.store = store
        self.aliases = {
            name: (found[0] if (found := store.get_json(store.alias_key(MODEL, name))) else None)
            for name in ("live", "previous")
        }
        self.added: list[str] = []
        self.versions: list[str] = []

    def put(self, key: str, body) -> None:
        """Written as the writer's keys can: no compare-and-swap, no checks (a str: as it is,
        JSON or not)."""
        self.added.append(key)
        if isinstance(body, str):
            self.store.put_text(key, body, content_type="application/json")
        else:
            self.store.put_json(key, body)

    def twin(
        self, of: str, version: str, *, gate_passed: bool, older_by_s: float = 0, signed=True
    ) -> str:
        """A published copy of version `of` under another id (server-side copies of its files,
        then its manifest), with the gate verdict asked for, signed as a publish signs (or
        not: as anyone with the writer's keys can publish)."""
        store = self.store
        manifest = store.get_json(f"versions/{MODEL}/{of}/manifest.json")[0]
        manifest["key"] = version
        manifest["details"]["gate_passed"] = gate_passed
        created = datetime.fromisoformat(manifest["created_at"]) - timedelta(seconds=older_by_s)
        manifest["created_at"] = created.isoformat()
        for f in manifest["files"]:
            key = f"versions/{MODEL}/{version}/files/{f['path']}"
            source = f"versions/{MODEL}/{of}/files/{f['path']}"
            store.client.copy_object(
                Bucket=store.bucket, CopySource={"Bucket": store.bucket, "Key": source}, Key=key
            )
            self.added.append(key)
        self.put(f"versions/{MODEL}/{version}/manifest.json", manifest)
        if signed:
            sign_version(store, MODEL, version)
            self.added.append(f"versions/{MODEL}/{version}/signature.sig")
        self.versions.append(version)
        self.offer()
        return version

    def offer(self) -> None:
        """The rollback form's list of versions, as published now (`llmship up` or the next
        publish would refresh it)."""
        from llmship.forms import offer_published_versions

        offer_published_versions(self.store.settings, MODEL)

    def restore(self, stack) -> None:
        from serving import fleet

        store = self.store
        for version in self.versions:  # servers a test (or a failing gateway) started
            if server := fleet.find(stack, MODEL, version):
                fleet.release(stack, server)
        for key in self.added:
            store.client.delete_object(Bucket=store.bucket, Key=key)
        for name, body in self.aliases.items():
            key = store.alias_key(MODEL, name)
            if body is None:
                store.client.delete_object(Bucket=store.bucket, Key=key)
            else:
                store.put_json(key, body)
        if self.versions:
            self.offer()


@pytest.fixture
def state(first_run, stack, store):
    kept = StoreState(store)
    yield kept
    kept.restore(stack)
    restart_gateway(stack)
    ready = httpx.get(f"{stack.gateway_url}/ready", timeout=10)
    assert ready.status_code == 200 and "alias_problems" not in ready.json(), ready.text


# ------------------------------------------------------------------ item 2


def test_a_malformed_live_alias_is_skipped_and_reported_and_the_gateway_starts(state, stack):
    """Before: `"version": 123` in one alias failed the gateway's start (ValidationError for
    Route; `llmship up` exit 2), and an alias key whose model is no name made it ignore every
    alias (tiny-llama 404, /ready 200 with no models)."""
    live = state.aliases["live"]["version"]
    bad = {
        "aliases/broken-model/live.json": {"model": "broken-model", "version": 123},
        "aliases/Other Model/live.json": {"model": "Other Model", "version": live},
        "aliases/garbled/live.json": "{not an alias",  # not JSON at all
    }
    for key, body in bad.items():
        state.put(key, body)
    restart_gateway(stack)
    resp = complete(stack)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-llmship-version"] == live
    ready = httpx.get(f"{stack.gateway_url}/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"][MODEL] == live
    problems = ready.json()["alias_problems"]
    assert set(bad) <= set(problems), problems
    assert "version: Input should be a valid string" in problems["aliases/broken-model/live.json"]
    assert "cannot name anything" in problems["aliases/Other Model/live.json"]
    log = gateway_log(stack)
    for key in bad:
        assert f"alias {key} skipped" in log
    status = llmship("status")
    assert "REFUSED    aliases/broken-model/live.json" in status.stdout, status.stdout


# ------------------------------------------------------------------ item 5


def test_a_restarted_gateway_refuses_a_live_version_no_trusted_key_signed(state, stack, store):
    """Issue 31: the live alias moved, with the writer's keys, to a version they published
    themselves (consistent files and manifest, no signature). A restarted gateway neither
    serves nor deploys it: the version before it serves, and /ready says why."""
    from serving import fleet

    live = state.aliases["live"]["version"]
    unsigned = state.twin(live, "unsignedlive", gate_passed=True, signed=False)
    state.put(
        store.alias_key(MODEL, "live"),
        {"model": MODEL, "alias": "live", "version": unsigned, "previous": live, "reason": "hand"},
    )
    restart_gateway(stack)
    resp = complete(stack)
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == live, resp.text
    problem = httpx.get(f"{stack.gateway_url}/ready", timeout=10).json()["alias_problems"][MODEL]
    assert f"live version {unsigned} refused" in problem and "is not signed" in problem, problem
    assert fleet.find(stack, MODEL, unsigned) is None


def test_a_restarted_gateway_serves_an_ungated_live_version_only_by_an_override(
    state, stack, store, alert_receiver
):
    """Before: with `live` on a version whose gate failed, a restarted gateway's reconcile
    deployed and served it, which the rollback flow refuses. Now one rule (check_servable)
    for both: the version before it serves, the refusal is logged, on /ready, an event and
    an alert; an alias that an allow_ungated rollback wrote (it records the override) is
    served as the operator asked."""
    from serving import fleet

    live = state.aliases["live"]["version"]
    ungated = state.twin(live, "ungatedlive1", gate_passed=False)
    state.put(
        store.alias_key(MODEL, "live"),
        {"model": MODEL, "alias": "live", "version": ungated, "previous": live, "reason": "hand"},
    )
    restart_gateway(stack)
    resp = complete(stack)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-llmship-version"] == live
    ready = httpx.get(f"{stack.gateway_url}/ready", timeout=10).json()
    assert ready["models"][MODEL] == live
    problem = ready["alias_problems"][MODEL]
    assert f"live version {ungated} refused" in problem and "no passing gate record" in problem
    assert f"serving {live}" in problem
    assert f"live version {ungated} refused" in gateway_log(stack)
    assert fleet.find(stack, MODEL, ungated) is None
    [event] = wait_for(
        "the refused event",
        lambda: [
            e
            for e in events_named(stack, "llmship.serving.refused", limit=10)
            if e["payload"]["version"] == ungated
        ][:1],
        timeout=30,
    )
    assert event["payload"]["serving"] == live
    wait_for(
        "the alert",
        lambda: [
            x
            for x in alert_receiver
            if x.get("subject") == f"llmship: a gateway refused {MODEL}'s live version {ungated}"
        ],
        timeout=30,
    )

    # The operator's override, through the rollback flow: recorded in the alias, and a
    # restarted gateway serves the version.
    rollback_to(ungated, allow_ungated=True)
    alias = store.get_json(store.alias_key(MODEL, "live"))[0]
    assert alias["version"] == ungated and alias["ungated_override"] is True
    restart_gateway(stack)
    resp = complete(stack)
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == ungated, resp.text
    rollback_to(live)
    assert store.get_json(store.alias_key(MODEL, "live"))[0]["ungated_override"] is False


# ------------------------------------------------------------------ item 9


def test_a_restore_goes_to_a_gated_published_version_a_warm_one_first(state, stack, store):
    """Before: the `previous` alias could name a version that does not exist (the writer did
    not check); the restore rolled back to it, failed, and clients got 503s while a warm
    earlier server was there. Now aliases name only published versions, and the restore
    picks a published version whose gate passed, a warm one first."""
    from serving import fleet

    live = state.aliases["live"]["version"]
    earlier = state.twin(live, "earlierwarm1", gate_passed=True, older_by_s=3600)
    # The earlier version served, then left: kept warm, as a rollout leaves it.
    for target in (earlier, live):
        rollback_to(target)
    assert fleet.find(stack, MODEL, earlier).warm_until
    # As the writer's keys can leave it: `previous` on a version that does not exist.
    state.put(
        store.alias_key(MODEL, "previous"),
        {"model": MODEL, "alias": "previous", "version": "gone00000000"},
    )
    # What the automation llmship-restore-tiny-llama runs on llmship.serving.down.
    restore = run_deployment(
        f"restore/{MODEL}",
        timeout=600,
        parameters={"down_version": live, "reason": "test: the live version went down"},
    )
    assert restore.state.is_completed(), restore.state.message
    result = restore.state.result()
    assert (result.version, result.changed, result.started_server) == (earlier, True, False)
    assert store.read_alias(MODEL, "live") == earlier
    assert store.read_alias(MODEL, "previous") == live
    resp = complete(stack)
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == earlier
    rollback_to(live)
    # The alias writer itself refuses what the hand edit above wrote.
    from llmship.errors import UnpublishedVersion

    with pytest.raises(UnpublishedVersion, match="no published version 'gone00000000'"):
        store.move_alias(MODEL, "previous", "gone00000000", reason="test")


def test_a_restore_that_waited_for_the_serving_slot_undoes_no_later_move(
    state, stack, store, prefect_client
):
    """The automation starts a restore the moment the gateway declares the live version down;
    the restore then waits for the model's serving slot while another run holds it, and that
    run may move the traffic. Before, the restore checked that the version that went down was
    live before that wait, not after: once the slot was its, it rolled back what the other
    run had just done (seen in the suite: a live version moved under a later test)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.concurrency.sync import concurrency

    live = state.aliases["live"]["version"]
    state.twin(live, "restorable01", gate_passed=True, older_by_s=3600)  # what it would take
    later = state.twin(live, "movedmeanwh1", gate_passed=True)
    # Another run's rollout holds the slot.
    with concurrency(f"llmship-serving-{MODEL}", occupy=1, strict=True, lease_duration=60):
        restore = run_deployment(
            f"restore/{MODEL}",
            timeout=0,
            parameters={"down_version": live, "reason": "test: the live version went down"},
        )
        only_its = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[restore.id]))
        wait_for(
            "the restore waiting for the serving slot",
            lambda: any(
                "serving slot" in log.message
                for log in prefect_client.read_logs(log_filter=only_its)
            ),
            timeout=120,
            every=1.0,
        )
        # ... and moves the traffic to a version of its own before it lets go.
        store.move_alias(MODEL, "live", later, reason="test: another run's rollout")
    done = wait_for(
        "the restore finished",
        lambda: r if (r := prefect_client.read_flow_run(restore.id)).state.is_final() else None,
        timeout=120,
        every=1.0,
    )
    assert done.state.is_completed(), done.state.message
    assert done.state.result() is None  # nothing rolled back
    assert store.read_alias(MODEL, "live") == later
    # Its log says why (the server may store the run's last lines after its final state).
    wait_for(
        "the restore's reason in its log",
        lambda: any(
            f"live version is {later}, not {live}: nothing to roll back" in log.message
            for log in prefect_client.read_logs(log_filter=only_its)
        ),
        timeout=30,
        every=1.0,
    )


# ------------------------------------------------------------------ item 12


def test_one_bad_manifest_is_named_and_the_other_versions_listed(state, stack, store):
    """Before: one bad manifest made `llmship versions` fail for every version (exit 2, or a
    traceback), and a rollback to a manifest without `details` failed with pydantic's
    words."""
    live = state.aliases["live"]["version"]
    manifest = store.get_json(f"versions/{MODEL}/{live}/manifest.json")[0]
    manifest["key"] = "nodetails001"
    del manifest["details"]
    state.put(f"versions/{MODEL}/nodetails001/manifest.json", manifest)
    state.put(f"versions/{MODEL}/garbled00001/manifest.json", {"kind": 5})
    out = llmship("versions", MODEL)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(live) and line.endswith("live") for line in lines), out.stdout
    [nodetails] = [line for line in lines if line.startswith("nodetails001")]
    assert "UNREADABLE" in nodetails and "details" in nodetails
    [garbled] = [line for line in lines if line.startswith("garbled00001")]
    assert "UNREADABLE" in garbled and "not a manifest llmship can trust" in garbled
    out = llmship("rollback", MODEL, "--to", "nodetails001")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert (
        f"BadVersionManifest: {MODEL} version nodetails001 cannot be served: its manifest"
        in out.stderr
    )
    assert "no valid details" in out.stderr and "Publish it again" in out.stderr


# ------------------------------------------------------------------ item 17


@pytest.mark.parametrize("steps", [[50, 150], [-5]])
def test_canary_steps_out_of_range_are_refused_before_a_run_exists(
    steps, first_run, stack, prefect_client
):
    import json

    config = json.loads(
        json.dumps(prefect_client.read_deployment_by_name("build-and-serve/tiny-llama").parameters)
    )["config"]
    config.setdefault("rollout", {})["canary_steps"] = steps
    before = len(prefect_client.read_flow_runs())
    proc = subprocess.run(
        [
            str(PYTHON.parent / "prefect"),
            "deployment",
            "run",
            "build-and-serve/tiny-llama",
            "--params",
            json.dumps({"config": config}),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, output
    assert "canary_steps" in output, output
    assert len(prefect_client.read_flow_runs()) == before
