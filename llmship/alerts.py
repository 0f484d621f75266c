"""Alerts, and the automations that act on events: created (or replaced) by `llmship up`.

Alerts, through one notification block; the team hears within seconds:
- `llmship-gate-failed`, on the gate's event `llmship.gate.failed` (model, candidate version,
  failing tasks with their numbers, where the report is);
- `llmship-perf-failed`, on the performance gate's `llmship.perf.failed` (the same, with each
  failing figure against its limit);
- `llmship-rolled-back`, on the rollout's `llmship.rollout.rolled-back` (a canary step
  breached: its error rate, latency or, with the quality policy, the agreement of its
  shadowed answers with the live version's, with the numbers; traffic went back);
- `llmship-run-failed`, on any flow run of build-and-serve, recalibrate, rollback or restore
  that ends Failed, Crashed or TimedOut.
- `llmship-run-waiting`, on any such run that Prefect marks Late (due 15 s ago, no worker has
  taken it): names its work pool, the pool's status (NOT_READY: no worker polls it) and the
  command that starts one. A GPU deployment run where no GPU worker runs said nothing before.

Acting, with or without an alert URL:
- `llmship-crashed-runs`: a flow run whose heartbeats stop (its worker, pod or host died) is
  marked Crashed after three missed beats, Prefect's recipe for zombie runs; the run-failed
  alert then fires. Rerun it: every stage that finished is reused.
- `llmship-restore-<model>`, one per restore deployment: on the gateway's
  `llmship.serving.down` for that model, run `restore/<model>` with the version that went
  down, which rolls back while that version is still live (and alert, where alerts are set
  up).

The block is configured in one place, Settings: a Slack incoming webhook
(LLMSHIP_ALERT_SLACK_WEBHOOK_URL, a SlackWebhook block, sent by SendNotification) for teams on
Slack, or any URL that takes a JSON POST (LLMSHIP_ALERT_WEBHOOK_URL, a Webhook block, called by
CallWebhook; the tests point it at a local receiver).

Once per event (issue 26). A JSON alert carries `idempotency_key`, `<automation>:<event id>`:
whatever Prefect delivers twice for one event has the same key, and a receiver drops the
repeat. Prefect may deliver twice: its event consumer redelivers a message up to 3 times when
its handler raises (prefect/server/utilities/messaging/memory.py, `_consume_loop`), and each
redelivery of an event that had already fired an automation fires it again, as a new action
(prefect/server/events/triggers.py: `act` publishes the action before the bucket's transaction
commits; docs/FINDINGS.md). CallWebhook, unlike SendNotification with a custom webhook block,
turns every failure of the POST into the action's failure (a `prefect.automation.action.failed`
event), never into a redelivery of the action: a POST that reached the receiver but whose
answer came late (a server stalled on SQLite's lock) is not sent again.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.blocks.core import Block
from prefect.blocks.notifications import SlackWebhook
from prefect.blocks.webhook import Webhook
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.objects import StateType
from prefect.events.actions import (
    CallWebhook,
    ChangeFlowRunState,
    RunDeployment,
    SendNotification,
)
from prefect.events.schemas.automations import EventTrigger, Posture

from llmship import events
from llmship.credentials import prefect_client_settings
from llmship.settings import Settings

BLOCK_NAME = "llmship-alerts"
GATE_FAILED = "llmship-gate-failed"
PERF_FAILED = "llmship-perf-failed"
RUN_FAILED = "llmship-run-failed"
RUN_WAITING = "llmship-run-waiting"
ROLLED_BACK = "llmship-rolled-back"
SERVING_REFUSED = "llmship-serving-refused"
CRASHED_RUNS = "llmship-crashed-runs"
RESTORE = "llmship-restore-{model}"
FLOWS = ["build-and-serve", "recalibrate", "rollback", "restore"]
RUN_END_STATES = {
    "prefect.flow-run.Failed",
    "prefect.flow-run.Crashed",
    "prefect.flow-run.TimedOut",
}

GATE_SUBJECT = "llmship: accuracy gate failed for {{ event.payload.model }}"
GATE_BODY = (
    "Candidate {{ event.payload.candidate_version }} of {{ event.payload.model }} failed the "
    "gate ({{ event.payload.rule }}); nothing was published. Failing tasks: "
    "{% for t in event.payload.failing %}{{ t.task }} {{ '%.3f' % t.measured }} < "
    "{{ '%.3f' % t.threshold }} (baseline {{ '%.3f' % t.baseline }}); {% endfor %}"
    "report: {{ event.payload.report }}"
)
PERF_SUBJECT = "llmship: performance gate failed for {{ event.payload.model }}"
PERF_BODY = (
    "Candidate {{ event.payload.candidate_version }} of {{ event.payload.model }} is slower "
    "than its policy allows; nothing was published. Failing figures: "
    "{% for v in event.payload.failing %}{{ v.load }} {{ v.metric }}: candidate "
    "{{ '%.2f' % v.candidate }}, baseline {{ '%.2f' % v.baseline }} ({{ '%.2f' % v.ratio }}x, "
    "limit {{ v.limit }}); {% endfor %}report: {{ event.payload.report }}"
)
ROLLED_BACK_SUBJECT = (
    "llmship: canary of {{ event.payload.model }} {{ event.payload.version }} rolled back"
)
ROLLED_BACK_BODY = "{{ event.payload.reason }}"
REFUSED_SUBJECT = (
    "llmship: a gateway refused {{ event.payload.model }}'s live version "
    "{{ event.payload.version }}"
)
REFUSED_BODY = (
    "{{ event.payload.reason }}. "
    "{% if event.payload.serving %}It serves {{ event.payload.serving }}, the version live "
    "before it.{% else %}Nothing else may serve the model: its requests are refused.{% endif %} "
    "Move the live alias with `llmship rollback {{ event.payload.model }} --to VERSION`."
)
# No deployment in these: a recalibrate run's build-and-serve subflow run has none.
RUN_SUBJECT = "llmship: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
RUN_BODY = (
    "{{ flow.name }} run {{ flow_run.name }} "
    "ended {{ flow_run.state.name }}: {{ flow_run.state.message }}\n"
    "{{ flow_run|ui_url }}"
)

WAITING_SUBJECT = (
    "llmship: {{ flow.name }} run {{ flow_run.name }} is waiting for a worker of pool "
    "{{ work_pool.name }}"
)
WAITING_BODY = (
    "{{ flow.name }}/{{ deployment.name }} run {{ flow_run.name }} was due at "
    "{{ flow_run.expected_start_time }} and no worker has taken it. Work pool "
    "{{ work_pool.name }} is {{ work_pool.status }}"
    "{% if work_pool.status == 'NOT_READY' %} (no worker polls it){% endif %}. Start one where "
    "the deployment can run: `prefect worker start --pool {{ work_pool.name }}` (a GPU pool's "
    "worker on a GPU host, with LLMSHIP_DEVICE=cuda: README, 'GPU path'), or cancel the run.\n"
    "{{ flow_run|ui_url }}"
)


def notification_block(settings: Settings) -> Block | None:
    """Where alerts go: a Slack webhook, or a Webhook block for any JSON receiver; None: no
    alerts."""
    if settings.alert_slack_webhook_url:
        return SlackWebhook(url=settings.alert_slack_webhook_url)
    if settings.alert_webhook_url:
        return Webhook(
            method="POST",
            url=settings.alert_webhook_url,
            headers={"Content-Type": "application/json"},
        )
    return None


def webhook_payload(automation: str, subject: str, body: str) -> str:
    """The JSON an alert POSTs, as the template Prefect renders for each event: the rendered
    subject and body (and both as `text`, what chat webhooks show), the event's id, and the
    key a receiver drops repeats by. `tojson` quotes whatever the rendered text holds."""
    return (
        "{% set subject %}" + subject + "{% endset %}"
        "{% set body %}" + body + "{% endset %}"
        "{{ {'subject': subject, 'body': body, 'text': subject ~ '\\n' ~ body, "
        "'event_id': event.id|string, "
        f"'idempotency_key': '{automation}:' ~ event.id}}|tojson }}}}"
    )


def alert_action(
    automation: str, subject: str, body: str, block_id, *, to_slack: bool
) -> SendNotification | CallWebhook:
    """One alert through the block: Slack renders subject and body itself; a JSON receiver
    gets webhook_payload."""
    if to_slack:
        return SendNotification(block_document_id=block_id, subject=subject, body=body)
    return CallWebhook(
        block_document_id=block_id, payload=webhook_payload(automation, subject, body)
    )


def notify_on(
    event: str, name: str, description: str, subject: str, body: str, block_id, to_slack: bool
):
    """An alert: one notification through the block for every `event` about any model."""
    return Automation(
        name=name,
        description=description,
        trigger=EventTrigger(
            expect={event},
            posture=Posture.Reactive,
            threshold=1,
            match={"prefect.resource.id": events.MODEL_RESOURCE.format(model="*")},
        ),
        actions=[alert_action(name, subject, body, block_id, to_slack=to_slack)],
    )


def alert_automations(block_id, to_slack: bool = False) -> list[Automation]:
    return [
        notify_on(
            events.GATE_FAILED,
            GATE_FAILED,
            "Notify the team when a candidate fails the accuracy gate",
            GATE_SUBJECT,
            GATE_BODY,
            block_id,
            to_slack,
        ),
        notify_on(
            events.PERF_FAILED,
            PERF_FAILED,
            "Notify the team when a candidate fails the performance gate",
            PERF_SUBJECT,
            PERF_BODY,
            block_id,
            to_slack,
        ),
        notify_on(
            events.ROLLED_BACK,
            ROLLED_BACK,
            "Notify the team when a canary breaches and traffic goes back",
            ROLLED_BACK_SUBJECT,
            ROLLED_BACK_BODY,
            block_id,
            to_slack,
        ),
        Automation(
            name=RUN_WAITING,
            description="Notify the team when a run of llmship's flows waits for a worker "
            "(no worker on its pool)",
            trigger=EventTrigger(
                expect={"prefect.flow-run.Late"},
                posture=Posture.Reactive,
                threshold=1,
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
            ),
            actions=[
                alert_action(
                    RUN_WAITING, WAITING_SUBJECT, WAITING_BODY, block_id, to_slack=to_slack
                )
            ],
        ),
        Automation(
            name=RUN_FAILED,
            description="Notify the team when any run of llmship's flows fails",
            trigger=EventTrigger(
                expect=RUN_END_STATES,
                posture=Posture.Reactive,
                threshold=1,
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOWS},
            ),
            actions=[alert_action(RUN_FAILED, RUN_SUBJECT, RUN_BODY, block_id, to_slack=to_slack)],
        ),
        notify_on(
            events.SERVING_REFUSED,
            SERVING_REFUSED,
            "Notify the team when a starting gateway refuses a live alias's version",
            REFUSED_SUBJECT,
            REFUSED_BODY,
            block_id,
            to_slack,
        ),
    ]


def crashed_runs_automation(heartbeat_s: int) -> Automation:
    silent_s = 3 * heartbeat_s
    return Automation(
        name=CRASHED_RUNS,
        description="Mark a flow run Crashed when its heartbeats stop: its worker or host died",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silent_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silent_s} s: the worker or host running it died. Run "
                "the deployment again: every stage that finished is reused",
            )
        ],
    )


def restore_automation(
    model: str, restore_deployment_id, block_id, to_slack: bool = False
) -> Automation:
    actions = [
        RunDeployment(
            source="selected",
            deployment_id=restore_deployment_id,
            parameters={
                "model": model,
                "down_version": "{{ event.payload.version }}",
                "reason": "the gateway declared the live version "
                "{{ event.payload.version }} down after "
                "{{ event.payload.seconds }} s without a running replica",
            },
        )
    ]
    if block_id:
        actions.append(
            alert_action(
                RESTORE.format(model=model),
                subject="llmship: {{ event.payload.model }}'s live version is down; rolling back",
                body="{{ event.payload.model }} {{ event.payload.version }} has had no running "
                "replica for {{ event.payload.seconds }} s (Ray could not keep one up: "
                "`llmship status` names each replica's engine log). Clients get 503s until "
                f"restore/{model} has moved the traffic to the previous version.",
                block_id=block_id,
                to_slack=to_slack,
            )
        )
    return Automation(
        name=RESTORE.format(model=model),
        description=f"When {model}'s live version cannot stay up, roll back to the previous "
        "version",
        trigger=EventTrigger(
            expect={events.SERVING_DOWN},
            posture=Posture.Reactive,
            threshold=1,
            match={"prefect.resource.id": events.MODEL_RESOURCE.format(model=model)},
        ),
        actions=actions,
    )


def restore_deployments() -> dict[str, object]:
    """{model: deployment id} of every deployment of the restore flow."""
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["restore"]))
        )
    return {d.parameters["model"]: d.id for d in deployments if d.parameters.get("model")}


def _replace(automation: Automation) -> None:
    try:
        Automation.read(name=automation.name).delete()
    except ValueError:
        pass
    automation.create()


def ensure_automations(settings: Settings) -> list[str]:
    """Create (or replace) the block and every automation; the names of those created."""
    block = notification_block(settings)
    automations = [crashed_runs_automation(settings.run_heartbeat_s)]
    with prefect_client_settings(settings):
        block_id = block.save(BLOCK_NAME, overwrite=True) if block else None
        to_slack = isinstance(block, SlackWebhook)
        if block_id:
            automations += alert_automations(block_id, to_slack)
        automations += [
            restore_automation(model, deployment_id, block_id, to_slack)
            for model, deployment_id in sorted(restore_deployments().items())
        ]
        for automation in automations:
            _replace(automation)
    return [a.name for a in automations]
