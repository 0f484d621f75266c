"""Where alerts go is configured in one place (Settings): Slack for teams on Slack, any JSON
webhook otherwise, nothing when neither is set. The delivery itself is tested on the stack
(test_pipeline.py::test_gate_failure_publishes_nothing), and once per event under concurrent
load below (issue 26)."""

import os
import time
import uuid

import pytest
from prefect.blocks.notifications import SlackWebhook
from prefect.blocks.webhook import Webhook

from llmship.alerts import FLOWS, RUN_END_STATES, alert_automations, notification_block
from llmship.settings import Settings


def settings(**alerts) -> Settings:
    return Settings(**({"alert_webhook_url": None, "alert_slack_webhook_url": None} | alerts))


def test_slack_url_makes_a_slack_block_and_wins_over_a_webhook():
    url = "https://hooks.slack.com/services/T000/B000/XXXX"
    block = notification_block(
        settings(alert_slack_webhook_url=url, alert_webhook_url="http://127.0.0.1:9/x")
    )
    assert isinstance(block, SlackWebhook)
    assert block.url.get_secret_value() == url
    assert url not in repr(block)  # a secret: kept out of logs and reprs


def test_webhook_url_makes_a_webhook_posting_json():
    block = notification_block(settings(alert_webhook_url="http://127.0.0.1:9/alerts"))
    assert isinstance(block, Webhook)
    assert block.url.get_secret_value() == "http://127.0.0.1:9/alerts"
    assert block.headers.get_secret_value() == {"Content-Type": "application/json"}


def test_a_webhook_alert_carries_the_event_id_as_its_idempotency_key():
    """The payload as Prefect renders it (Jinja) for one event: subject, body, text, and the
    key a receiver drops Prefect's repeats of that event by (issue 26)."""
    import json

    import jinja2.sandbox
    from prefect.events.actions import CallWebhook

    gate = alert_automations(uuid.uuid4())[0]
    [action] = gate.actions
    assert isinstance(action, CallWebhook)  # its failures are never resent (llmship/alerts.py)
    event_id = uuid.uuid4()
    rendered = (
        jinja2.sandbox.ImmutableSandboxedEnvironment()
        .from_string(action.payload)
        .render(
            event={
                "id": event_id,
                "payload": {
                    "model": "tiny-llama",
                    "candidate_version": 'v"1',  # quoted in the JSON, not breaking it
                    "rule": "r",
                    "report": "stages/gate/k",
                    "failing": [{"task": "t", "measured": 0.1, "threshold": 0.5, "baseline": 0.6}],
                },
            }
        )
    )
    alert = json.loads(rendered)
    assert alert["idempotency_key"] == f"llmship-gate-failed:{event_id}"
    assert alert["event_id"] == str(event_id)
    assert alert["subject"] == "llmship: accuracy gate failed for tiny-llama"
    assert alert["body"].startswith('Candidate v"1 of tiny-llama failed the gate (r)')
    assert alert["text"] == alert["subject"] + "\n" + alert["body"]


def test_slack_alerts_are_notifications():
    from prefect.events.actions import SendNotification

    actions = [a.actions[0] for a in alert_automations(uuid.uuid4(), to_slack=True)]
    assert all(isinstance(a, SendNotification) for a in actions)


def test_no_url_no_alerts():
    assert notification_block(settings()) is None


def test_automations_cover_failed_gates_rolled_back_canaries_and_every_failed_run():
    gate, perf, rolled_back, waiting, run, refused = alert_automations(uuid.uuid4())
    assert refused.trigger.expect == {"llmship.serving.refused"}
    assert waiting.trigger.expect == {"prefect.flow-run.Late"}
    assert gate.trigger.expect == {"llmship.gate.failed"}
    assert perf.trigger.expect == {"llmship.perf.failed"}
    assert rolled_back.trigger.expect == {"llmship.rollout.rolled-back"}
    assert "{{ event.payload.reason }}" in rolled_back.actions[0].payload
    assert (
        run.trigger.expect
        == RUN_END_STATES
        >= {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    )
    assert run.trigger.match_related.root["prefect.resource.name"] == FLOWS
    assert set(FLOWS) == {"build-and-serve", "recalibrate", "rollback", "restore"}
    assert "{{ flow_run|ui_url }}" in run.actions[0].payload


def test_a_restore_rolls_back_only_the_version_that_went_down():
    from prefect.events.actions import CallWebhook, RunDeployment

    from llmship.alerts import restore_automation
    from llmship.events import SERVING_DOWN

    deployment = uuid.uuid4()
    quiet = restore_automation("tiny-llama", deployment, block_id=None)
    assert quiet.name == "llmship-restore-tiny-llama"
    assert quiet.trigger.expect == {SERVING_DOWN}
    assert quiet.trigger.match.root["prefect.resource.id"] == "llmship.model.tiny-llama"
    [run] = quiet.actions  # no alert URL: the rollback still runs
    assert isinstance(run, RunDeployment) and run.deployment_id == deployment
    assert run.parameters["down_version"] == "{{ event.payload.version }}"
    # Exactly what restore/<model> takes: the deployment's schema refuses anything else.
    from prefect.utilities.callables import parameter_schema

    from flows.rollback import restore

    assert set(run.parameters) == set(parameter_schema(restore).properties)
    loud = restore_automation("tiny-llama", deployment, block_id=uuid.uuid4())
    assert isinstance(loud.actions[1], CallWebhook)


def test_a_run_whose_heartbeats_stop_is_marked_crashed_after_three():
    from datetime import timedelta

    from llmship.alerts import crashed_runs_automation

    automation = crashed_runs_automation(heartbeat_s=30)
    trigger = automation.trigger
    assert trigger.posture == "Proactive" and trigger.within == timedelta(seconds=90)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    # A run that ends (any final state) is not a zombie.
    assert {
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
        "prefect.flow-run.Crashed",
    } <= trigger.expect
    assert automation.actions[0].state.value == "CRASHED"


def test_a_failed_performance_gate_alert_names_each_figure_against_its_limit():
    """The alert's text, rendered as Prefect renders it (Jinja) from the event's payload."""
    import jinja2

    from llmship.alerts import PERF_BODY
    from tasks.perf_rule import PerfVerdict

    failing = [
        PerfVerdict(
            load="production",
            metric="output tokens/s",
            baseline=1000.0,
            candidate=1100.0,
            ratio=1.1,
            limit=">= 1.2x",
            passed=False,
        )
    ]
    body = jinja2.Template(PERF_BODY).render(
        event={
            "payload": {
                "model": "llama3-70b",
                "candidate_version": "abc123",
                "report": "stages/perf/k",
                "failing": [v.model_dump() for v in failing],
            }
        }
    )
    assert body.startswith("Candidate abc123 of llama3-70b is slower than its policy allows")
    assert (
        "production output tokens/s: candidate 1100.00, baseline 1000.00 (1.10x, limit >= 1.2x)"
    ) in body and body.endswith("report: stages/perf/k")


@pytest.mark.stack
def test_one_alert_per_event_while_the_server_is_busy_writing(alert_receiver, tmp_path):
    """Issue 26: under concurrent runs one failed gate sent four identical alerts. Twenty
    gate-failed events from four processes while eight threads create and move flow runs:
    every event is alerted, and each alert arrives once (by its idempotency key)."""
    from collections import Counter

    from tests.helpers.control_plane import concurrent_load, prefect_only_stack, wait_for

    # The session's receiver (tests/conftest.py: alert_receiver).
    receiver_url = os.environ["LLMSHIP_ALERT_WEBHOOK_URL"]
    with prefect_only_stack(tmp_path / "state", 14310, alert_webhook_url=receiver_url) as settings:
        from llmship.alerts import ensure_automations

        ensure_automations(settings)
        started = time.time()
        load = concurrent_load(settings, events=20, emitters=4, writers=8, runs_per_writer=3)
        emitted = set(load.event_ids)
        assert len(emitted) == 20

        def alerted() -> list[dict]:
            return [
                a
                for a in alert_receiver
                if a["received_at"] >= started and a.get("event_id") in emitted
            ]

        wait_for("alert for every event", lambda: {a["event_id"] for a in alerted()} == emitted, 90)
        time.sleep(10)  # Prefect redelivers within seconds: give a repeat time to arrive
        sent = Counter(a["idempotency_key"] for a in alerted())
        assert {key for key, n in sent.items() if n > 1} == set(), sent
        assert set(sent) == {f"llmship-gate-failed:{e}" for e in emitted}
