"""rollback: move a model's live traffic back to an earlier published version.

Meant to be run from the Prefect UI's form: `target_version` (empty: the `previous` alias), a
`reason` (kept in an artifact and in the alias's history), and `allow_ungated`, the override
for a version that never passed the gate. All traffic moves at once: a warm version (kept by
the last rollout) takes it within a second; a cold one after its server starts.

The automation llmship-restore-<model> runs it when the gateway declares the live version's
server down, with `only_if_live` set to that version: an alarm that arrives after someone
else has already moved the traffic changes nothing.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from llmship.errors import PermanentError
from llmship.settings import RolloutConfig, get_settings
from llmship.store import ArtifactStore
from llmship.versions import PublishedVersion, read_version
from tasks.common import record_markdown, serving_slot
from tasks.rollout import RolloutResult, rollout_task


def rollback_target(model: str, target_version: str | None) -> PublishedVersion:
    store = ArtifactStore(get_settings())
    target = target_version or store.read_alias(model, "previous")
    if not target:
        raise PermanentError(
            f"{model} has no previous version to roll back to: name a target_version"
        )
    version = read_version(store, model, target)
    if version is None:
        raise PermanentError(
            f"{model} has no published version {target!r}; `llmship versions {model}` lists them"
        )
    return version


@flow(name="rollback", log_prints=True, persist_result=True)
def rollback(
    model: str,
    reason: str,
    target_version: str | None = None,
    allow_ungated: bool = False,
    only_if_live: str | None = None,
) -> RolloutResult | None:
    live = ArtifactStore(get_settings()).read_alias(model, "live")
    if only_if_live and live != only_if_live:
        get_run_logger().info(
            "%s's live version is %s, not %s: nothing to roll back", model, live, only_if_live
        )
        return None
    target = rollback_target(model, target_version)
    override = allow_ungated and not target.gate_passed
    get_run_logger().info(
        "rolling %s back from %s to %s%s: %s",
        model,
        live,
        target.version,
        " (no passing gate record: overridden)" if override else "",
        reason,
    )
    record_markdown(
        model,
        "rollback",
        (
            f"# Rollback of {model} to {target.version}\n\n"
            f"| | |\n|---|---|\n| from | {live or '-'} |\n| to | {target.version} |\n"
            f"| reason | {reason} |\n| gate | {'passed' if target.gate_passed else 'NOT PASSED'}"
            f"{' (allow_ungated override)' if override else ''} |\n"
        ),
        f"rollback to {target.version}",
    )
    with serving_slot(model):
        return rollout_task(
            target, RolloutConfig(), allow_ungated=allow_ungated, reason=f"rollback: {reason}"
        )
