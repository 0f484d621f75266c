"""The events llmship emits to Prefect, named once: emitted by the stages and the gateway,
listened to by the automations in llmship/alerts.py.

Every event is about one model: its resource is `llmship.model.<model>`, which is what the
automations match on.
"""

from __future__ import annotations

from typing import Any

GATE_FAILED = "llmship.gate.failed"  # the accuracy gate refused a candidate
PERF_FAILED = "llmship.perf.failed"  # the performance gate refused a candidate
ROLLED_BACK = "llmship.rollout.rolled-back"  # a canary breached; traffic went back
SERVING_DOWN = "llmship.serving.down"  # the live version has had no replica for too long
# A starting gateway refused a live alias's version (not published, or ungated without an
# override recorded): it serves the version before it, or nothing, for that model.
SERVING_REFUSED = "llmship.serving.refused"

MODEL_RESOURCE = "llmship.model.{model}"


def model_resource(model: str, **labels: str) -> dict[str, str]:
    return {
        "prefect.resource.id": MODEL_RESOURCE.format(model=model),
        "llmship.model": model,
        **{f"llmship.{k}": v for k, v in labels.items()},
    }


def emit(event: str, model: str, payload: dict[str, Any], **labels: str) -> None:
    """Send one of the events above about `model` (Prefect's emit_event)."""
    from prefect.events import emit_event

    emit_event(event=event, resource=model_resource(model, **labels), payload=payload)
