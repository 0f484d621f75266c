"""Alerts: a failed accuracy gate reaches the team within seconds, through a Prefect automation.

The gate emits `llmship.gate.failed` (model, candidate, failing tasks, report). `llmship up`
creates a webhook notification block from settings.alert_webhook_url and an automation that
sends it on every such event. A Slack incoming webhook works as the URL for real teams; the
tests point it at a local HTTP receiver.
"""

from __future__ import annotations

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.settings import PREFECT_API_URL, temporary_settings

from llmship.settings import Settings

BLOCK_NAME = "llmship-alerts"
GATE_FAILED = "llmship-gate-failed"
SUBJECT = "llmship: accuracy gate failed for {{ event.payload.model }}"
BODY = (
    "Candidate {{ event.payload.candidate }} of {{ event.payload.model }} failed the gate; "
    "nothing was published. Failing tasks: {% for t in event.payload.failing %}"
    "{{ t.task }} {{ '%.3f' % t.candidate }} < {{ '%.3f' % t.threshold }} "
    "(baseline {{ '%.3f' % t.baseline }}); {% endfor %}report: {{ event.payload.report }}"
)


def ensure_gate_alerts(settings: Settings) -> bool:
    """Create (or replace) the webhook block and the automation; False if no URL is set."""
    if not settings.alert_webhook_url:
        return False
    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_api_url}):
        block = CustomWebhookNotificationBlock(
            name=BLOCK_NAME, url=settings.alert_webhook_url,
            json_data={"text": "{{subject}}\n{{body}}", "subject": "{{subject}}",
                       "body": "{{body}}"})
        block_id = block.save(BLOCK_NAME, overwrite=True)
        try:
            Automation.read(name=GATE_FAILED).delete()
        except ValueError:
            pass
        Automation(
            name=GATE_FAILED,
            description="Notify the team when a candidate fails the accuracy gate",
            trigger=EventTrigger(expect={"llmship.gate.failed"}, posture=Posture.Reactive,
                                 threshold=1, match={"prefect.resource.id": "llmship.model.*"}),
            actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
        ).create()
    return True
