"""rollback: move a model's live traffic back to an earlier published version.

Meant to be run from the Prefect UI's form: `target_version` (empty: the `previous` alias)
and a `reason`, recorded in an artifact.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from llmship.errors import PermanentError
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from tasks.common import artifact_key
from tasks.publish import PublishedVersion, version_prefix
from tasks.rollout import RolloutResult, rollout_task


@flow(name="rollback", log_prints=True, persist_result=True)
def rollback(model: str, reason: str, target_version: str | None = None) -> RolloutResult:
    store = ArtifactStore(get_settings())
    target = target_version or store.read_alias(model, "previous")
    if not target:
        raise PermanentError(f"{model} has no previous version to roll back to: "
                             "name a target_version")
    manifest = store.read_manifest(version_prefix(model, target))
    if manifest is None:
        raise PermanentError(f"{model} has no published version {target!r}")
    get_run_logger().info("rolling %s back to %s: %s", model, target, reason)
    create_markdown_artifact(
        key=artifact_key(model, "rollback"),
        markdown=f"# Rollback of {model} to {target}\n\nReason: {reason}\n",
        description=f"rollback to {target}")
    return rollout_task(PublishedVersion.from_manifest(model, manifest))
