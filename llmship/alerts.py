"""Alerts: the team hears within seconds when a gate fails or a run of llmship fails.

Two Prefect automations, created (or replaced) by `llmship up`, send through one notification
block:
- `llmship-gate-failed`, on the gate's event `llmship.gate.failed` (model, candidate version,
  failing tasks with their numbers, where the report is);
- `llmship-run-failed`, on any flow run of build-and-serve, recalibrate or rollback that ends
  Failed, Crashed or TimedOut.

The block is configured in one place, Settings: a Slack incoming webhook
(LLMSHIP_ALERT_SLACK_WEBHOOK_URL, a SlackWebhook block) for teams on Slack, or any URL that
takes a JSON POST (LLMSHIP_ALERT_WEBHOOK_URL, a CustomWebhook block; the tests point it at a
local receiver).
"""

from __future__ import annotations

from prefect.automations import Automation
from prefect.blocks.notifications import (
    CustomWebhookNotificationBlock, NotificationBlock, SlackWebhook,
)
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.settings import PREFECT_API_URL, temporary_settings

from llmship.settings import Settings

BLOCK_NAME = "llmship-alerts"
GATE_FAILED = "llmship-gate-failed"
RUN_FAILED = "llmship-run-failed"
FLOWS = ["build-and-serve", "recalibrate", "rollback"]
RUN_END_STATES = {"prefect.flow-run.Failed", "prefect.flow-run.Crashed",
                  "prefect.flow-run.TimedOut"}

GATE_SUBJECT = "llmship: accuracy gate failed for {{ event.payload.model }}"
GATE_BODY = (
    "Candidate {{ event.payload.candidate_version }} of {{ event.payload.model }} failed the "
    "gate ({{ event.payload.rule }}); nothing was published. Failing tasks: "
    "{% for t in event.payload.failing %}{{ t.task }} {{ '%.3f' % t.measured }} < "
    "{{ '%.3f' % t.threshold }} (baseline {{ '%.3f' % t.baseline }}); {% endfor %}"
    "report: {{ event.payload.report }}"
)
# No deployment in these: a recalibrate run's build-and-serve subflow run has none.
RUN_SUBJECT = "llmship: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
RUN_BODY = ("{{ flow.name }} run {{ flow_run.name }} "
            "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
            "{{ flow_run|ui_url }}")


def notification_block(settings: Settings) -> NotificationBlock | None:
    if settings.alert_slack_webhook_url:
        return SlackWebhook(url=settings.alert_slack_webhook_url)
    if settings.alert_webhook_url:
        return CustomWebhookNotificationBlock(
            name=BLOCK_NAME, url=settings.alert_webhook_url,
            json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}",
                       "body": "{{body}}"})
    return None


def alert_automations(block_id) -> list[Automation]:
    return [
        Automation(
            name=GATE_FAILED,
            description="Notify the team when a candidate fails the accuracy gate",
            trigger=EventTrigger(expect={"llmship.gate.failed"}, posture=Posture.Reactive,
                                 threshold=1, match={"prefect.resource.id": "llmship.model.*"}),
            actions=[SendNotification(block_document_id=block_id, subject=GATE_SUBJECT,
                                      body=GATE_BODY)],
        ),
        Automation(
            name=RUN_FAILED,
            description="Notify the team when any run of llmship's flows fails",
            trigger=EventTrigger(expect=RUN_END_STATES, posture=Posture.Reactive, threshold=1,
                                 match={"prefect.resource.id": "prefect.flow-run.*"},
                                 match_related={"prefect.resource.role": "flow",
                                                "prefect.resource.name": FLOWS}),
            actions=[SendNotification(block_document_id=block_id, subject=RUN_SUBJECT,
                                      body=RUN_BODY)],
        ),
    ]


def ensure_alerts(settings: Settings) -> bool:
    """Create (or replace) the block and the automations; False if no alert URL is set."""
    block = notification_block(settings)
    if block is None:
        return False
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        block_id = block.save(BLOCK_NAME, overwrite=True)
        for automation in alert_automations(block_id):
            try:
                Automation.read(name=automation.name).delete()
            except ValueError:
                pass
            automation.create()
    return True
