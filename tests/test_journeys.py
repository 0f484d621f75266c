"""llmship used the way its README tells people to, not the way its code is written: the
installed `llmship` command from another directory, Prefect's own scheduler making the nightly
recalibration's runs, `prefect deployment run` of a GPU deployment on a stack with no GPU
worker, and the rollback form as the Prefect UI draws and submits it.

Each of these was broken while the suite passed (issue 26): the console script could not
import `jobs`, the scheduler failed every minute on SQLAlchemy 2.1, a GPU run sat Late with no
word, the form exposed the automation's parameter and offered no versions.
"""

from __future__ import annotations

import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.helpers.prefect_api import prefect_auth
from tests.helpers.waiting import wait_for

pytestmark = pytest.mark.stack

BIN = Path(__file__).resolve().parents[1] / ".venv" / "orchestrator" / "bin"


def run_installed(*args: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """A command of the orchestrator environment, as a user in another folder types it."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_every_llmship_subcommand_works_from_another_directory(first_run, stack, store, tmp_path):
    live = store.read_alias("tiny-llama", "live")

    def llmship(*args, expect=0):
        out = run_installed("llmship", *args, cwd=tmp_path)
        assert "Traceback" not in out.stderr, out.stderr
        assert out.returncode == expect, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

    usage = llmship("--help")
    subcommands = ("up", "down", "status", "scale", "versions", "candidates", "verify", "rollback")
    for sub in (*subcommands, "plan"):
        assert sub in usage
    assert "stack is up" in llmship("up")  # idempotent: what runs is kept
    status = llmship("status")
    assert f"serving    tiny-llama version {live}" in status
    assert stack.gateway_url in status
    versions = llmship("versions", "tiny-llama")
    assert any(line.startswith(live) and line.endswith("live") for line in versions.splitlines())
    # The recipe search that picked the live version: each recipe's line, and the chart.
    search = llmship("candidates", "tiny-llama")
    assert "# Recipe search: tiny-llama" in search and "| UNQUANTIZED |" in search
    assert "* " in search and "B baseline (BF16)" in search
    assert "no live version" in llmship("candidates", "no-such-model", expect=2)
    # The demo's versions are signed, and every object of the live one reads back as signed.
    verified = llmship("verify", "tiny-llama", live)
    assert f"verified: {live}" in verified and "FAIL" not in verified, verified
    assert "plan for build-and-serve/tiny-llama" in llmship("plan", "build-and-serve/tiny-llama")
    # The 70B on this CPU worker: refused at once, for the GPUs, before the hub is asked.
    refused = llmship("plan", "build-and-serve/llama3-70b", expect=2)
    assert "PreflightFailed" in refused and "needs CUDA GPUs" in refused
    assert "LLMSHIP_DEVICE=cuda" in refused and "hub" not in refused
    assert f"tiny-llama {live}: 1 replica(s)" in llmship("scale", "tiny-llama", "1")
    # Through the rollback deployment, and its result read back: this printed a traceback.
    back = llmship("rollback", "tiny-llama", "--to", live, "--reason", "journey test")
    assert f"tiny-llama: {live} is live" in back
    typo = llmship("rollback", "tiny-llama", "--to", "nosuchversion", expect=2)
    assert "no published version 'nosuchversion'" in typo and "llmship versions" in typo


def upcoming_runs(prefect_client, deployment_id) -> list:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    return prefect_client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        ),
    )


def test_prefect_s_scheduler_runs_the_recalibration_on_its_schedule(
    first_run, stack, prefect_client
):
    from prefect.client.schemas.schedules import IntervalSchedule

    deployment = prefect_client.read_deployment_by_name("recalibrate/tiny-llama")
    [nightly] = [s for s in deployment.schedules if s.active]
    assert nightly.schedule.cron == "0 3 * * *"
    # What the UI shows under Upcoming: the scheduler's runs at 03:00 UTC, none made by hand.
    upcoming = wait_for(
        "the nightly runs under Upcoming",
        lambda: upcoming_runs(prefect_client, deployment.id),
        timeout=90,
    )
    nights = sorted(r.expected_start_time for r in upcoming)
    assert (nights[0].hour, nights[0].minute) == (3, 0) and all(r.auto_scheduled for r in upcoming)

    # A schedule due in seconds: the scheduler makes the run, the worker runs it.
    due = datetime.now(UTC) + timedelta(seconds=30)
    [added] = prefect_client.create_deployment_schedules(
        deployment.id, [(IntervalSchedule(interval=timedelta(days=1), anchor_date=due), True)]
    )
    try:

        def the_due_run():
            return [
                r
                for r in prefect_client.read_flow_runs(limit=200)
                if r.deployment_id == deployment.id
                and r.auto_scheduled
                and abs((r.expected_start_time - due).total_seconds()) < 1
            ]

        [run] = wait_for("the scheduler's run", the_due_run, timeout=60)
        run = wait_for(
            "the scheduled recalibration to end",
            lambda: (r := prefect_client.read_flow_run(run.id)).state.is_final() and r,
            timeout=240,
        )
        assert run.state.is_completed(), run.state.message
        assert run.start_time >= due - timedelta(seconds=1)
    finally:
        prefect_client.delete_deployment_schedule(deployment.id, added.id)
    server_log = (stack.state_dir / "logs" / "prefect-server.log").read_text(errors="replace")
    assert "schedule_deployments" not in server_log and "bulk DML" not in server_log


def test_a_gpu_run_with_no_gpu_worker_says_what_to_start_and_refuses_on_gpus_first(
    stack, alert_receiver, prefect_client, tmp_path
):
    from llmship.stack import child_env

    started = time.time()
    out = run_installed("prefect", "deployment", "run", "build-and-serve/llama3-70b", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.split("UUID:")[1].split()[0]
    name = prefect_client.read_flow_run(run_id).name

    def alert():
        return [
            a
            for a in alert_receiver
            if a["received_at"] >= started
            and f"run {name} is waiting for a worker" in a.get("subject", "")
        ]

    [waiting] = wait_for("the waiting-for-a-worker alert", alert, timeout=90)
    assert "pool gpu" in waiting["subject"]
    assert "NOT_READY (no worker polls it)" in waiting["body"]
    assert "`prefect worker start --pool gpu`" in waiting["body"]
    assert prefect_client.read_flow_run(run_id).state.name == "Late"
    # Without an alert channel, `llmship status` says the same.
    status = run_installed("llmship", "status", cwd=tmp_path).stdout
    assert f"waiting    flow run {name} since" in status
    assert "work pool gpu is NOT_READY; start a worker: prefect worker start --pool gpu" in status

    # A worker of the gpu pool comes up on a host without GPUs, and no hub: the run is
    # refused for the GPUs, before any hub call, with what to do.
    worker = subprocess.run(
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            "gpu",
            "--type",
            "process",
            "--run-once",
        ],
        env=child_env(stack),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    run = prefect_client.read_flow_run(run_id)
    assert run.state.is_failed()
    assert "nothing was downloaded" in run.state.message
    assert "nvidia-smi lists no GPU on this worker" in run.state.message
    assert "Hugging Face" not in run.state.message and "hub" not in run.state.message


def test_the_rollback_form_describes_its_fields_and_offers_the_published_versions(
    first_run, stack, store, prefect_client
):
    from llmship.versions import list_versions

    deployment = prefect_client.read_deployment_by_name("rollback/tiny-llama")
    schema = deployment.parameter_openapi_schema
    fields = schema["properties"]
    # No automation's parameter on the people's form.
    assert set(fields) == {"model", "reason", "target_version", "allow_ungated"}
    assert all(len(f.get("description", "")) > 20 for f in fields.values()), fields
    [choices] = [o["enum"] for o in fields["target_version"]["anyOf"] if "enum" in o]
    published = [v.version for v in list_versions(store, "tiny-llama")]
    assert sorted(choices) == sorted(published)
    live = store.read_alias("tiny-llama", "live")
    assert f"`{live}`" in fields["target_version"]["description"]

    # Submitted as the UI submits it.
    api, auth = stack.prefect_api_url, prefect_auth(stack)
    form = {"model": "tiny-llama", "reason": "from the form", "target_version": live}
    resp = httpx.post(
        f"{api}/deployments/{deployment.id}/create_flow_run",
        auth=auth,
        json={"parameters": {**form, "allow_ungated": False}},
    )
    assert resp.status_code == 201, resp.text
    run = wait_for(
        "the rollback run to end",
        lambda: (r := prefect_client.read_flow_run(resp.json()["id"])).state.is_final() and r,
        timeout=300,
    )
    assert run.state.is_completed(), run.state.message
    # A version the form does not list is refused when the run is asked for, naming the field.
    bad = httpx.post(
        f"{api}/deployments/{deployment.id}/create_flow_run",
        auth=auth,
        json={"parameters": {**form, "target_version": "nosuchversion"}},
    )
    assert bad.status_code == 409 and "target_version" in bad.text, bad.text


def test_the_curl_the_readme_and_llmship_status_suggest_gets_the_right_answer(
    first_run, stack, tmp_path
):
    import json

    def answer(command: str) -> str:
        out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)["choices"][0]["text"].strip()

    readme = (BIN.parents[2] / "README.md").read_text()
    demo_url = "http://127.0.0.1:8000"
    command = "curl -s " + readme.split(f"curl -s {demo_url}", 1)[1].split("```")[0]
    assert answer(command.replace("-s ", f"-s {stack.gateway_url}", 1)) == "payment"
    status = run_installed("llmship", "status", cwd=tmp_path).stdout
    assert answer(status.split("try:\n", 1)[1].strip()) == "$312,500"
    # Each replica says how long it took to start, and where the time went by its engine's log
    # (issues 28, 32; no compile or graphs on the CPU engine, which runs eager).
    # Its weights were streamed from S3 into the engine, each tensor checked (issue 32).
    phases = r"fetch [\d.]+, load [\d.]+, init [\d.]+, other [\d.]+; weights streamed from S3"
    assert re.search(rf"replica \S+ .* cold start [\d.]+ s: {phases}  log", status), status
