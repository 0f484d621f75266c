"""Where alerts go is configured in one place (Settings): Slack for teams on Slack, any JSON
webhook otherwise, nothing when neither is set. The delivery itself is tested on the stack
(test_pipeline.py::test_gate_failure_publishes_nothing)."""

import uuid

from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook

from llmship.alerts import FLOWS, RUN_END_STATES, alert_automations, notification_block
from llmship.settings import Settings


def settings(**alerts) -> Settings:
    return Settings(**({"alert_webhook_url": None, "alert_slack_webhook_url": None} | alerts))


def test_slack_url_makes_a_slack_block_and_wins_over_a_webhook():
    url = "https://hooks.slack.com/services/T000/B000/XXXX"
    block = notification_block(settings(alert_slack_webhook_url=url,
                                        alert_webhook_url="http://127.0.0.1:9/x"))
    assert isinstance(block, SlackWebhook)
    assert block.url.get_secret_value() == url
    assert url not in repr(block)  # a secret: kept out of logs and reprs


def test_webhook_url_makes_a_custom_webhook_posting_subject_and_body():
    block = notification_block(settings(alert_webhook_url="http://127.0.0.1:9/alerts"))
    assert isinstance(block, CustomWebhookNotificationBlock)
    assert block.url == "http://127.0.0.1:9/alerts"
    assert block.json_data == {"text": "{{subject}}\n{{body}}", "subject": "{{subject}}",
                               "body": "{{body}}"}


def test_no_url_no_alerts():
    assert notification_block(settings()) is None


def test_automations_cover_failed_gates_and_every_failed_run_of_the_flows():
    gate, run = alert_automations(uuid.uuid4())
    assert gate.trigger.expect == {"llmship.gate.failed"}
    assert run.trigger.expect == RUN_END_STATES >= {"prefect.flow-run.Failed",
                                                    "prefect.flow-run.Crashed"}
    assert run.trigger.match_related.root["prefect.resource.name"] == FLOWS
    assert set(FLOWS) == {"build-and-serve", "recalibrate", "rollback"}
    assert "{{ flow_run|ui_url }}" in run.actions[0].body
