"""rollback: move a model's live traffic back to an earlier published version.

Meant to be run from the Prefect UI's form: `target_version` (a list of the published
versions; empty: the `previous` alias), a `reason` (kept in an artifact and in the alias's
history), and `allow_ungated`, the override for a version that never passed the gate. All
traffic moves at once: a warm version (kept by the last rollout) takes it within a second; a
cold one after its server starts.

restore: what the automation llmship-restore-<model> runs when the gateway declares the live
version's server down. It rolls back only while that version is still live: an alarm that
arrives after someone else has already moved the traffic changes nothing. It goes to a
published version whose gate passed, one already running first (restore_target). A flow of its own,
so the people's form shows none of the automation's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, get_run_logger

from llmship.errors import BadAlias, PermanentError
from llmship.pipeline_config import RolloutConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore
from llmship.versions import PublishedVersion, read_version, scan_versions, signature_problem
from serving import fleet
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


def restore_target(model: str, down_version: str, log) -> PublishedVersion:
    """Where a restore sends the traffic: a published version before the one that went down
    (or the `previous` alias's), whose gate passed; one with running servers first (it takes
    the traffic at once), then the `previous` alias, then the newest. The `previous` alias
    alone was not enough: it could name a version that does not exist, and clients got 503s
    while a warm earlier server sat there."""
    settings = get_settings()
    store = ArtifactStore(settings)
    scan = scan_versions(store, model)
    for version, problem in scan.unreadable.items():
        log.warning("%s %s cannot be restored to: %s", model, version, problem)
    try:
        previous = store.read_alias(model, "previous")
    except BadAlias as exc:
        log.warning("%s", exc)
        previous = None
    try:
        warm = {
            s.version
            for s in fleet.running(settings, model)
            if s.status == "RUNNING" and s.endpoints
        }
    except Exception as exc:  # noqa: BLE001 - Ray not answering: choose without it
        log.warning("cannot ask the fleet which versions run (%s): choosing without", exc)
        warm = set()
    # Back, not forward: versions published before the one that went down, or the previous
    # alias's (after a rollback it is the newer one). A newer candidate that waits for its
    # approval, its evaluation server still warm, is not restored to.
    down = next((v for v in scan.versions if v.version == down_version), None)
    candidates = [
        v
        for v in scan.versions
        if v.gate_passed
        and v.version != down_version
        and (v.version == previous or down is None or v.created_at < down.created_at)
    ]
    if previous and previous not in {v.version for v in candidates}:
        log.warning(
            "%s's previous alias names %s, which is not a published version with a passing "
            "gate: not restoring to it",
            model,
            previous,
        )
    candidates.sort(key=lambda v: v.created_at, reverse=True)  # newest first, then:
    candidates.sort(key=lambda v: (v.version not in warm, v.version != previous))
    for candidate in candidates:
        # Not a version the rollout would refuse.
        if (problem := signature_problem(store, candidate)) is None:
            return candidate
        log.warning("not restoring to %s: %s", candidate.version, problem)
    raise PermanentError(
        f"{model} has no signed, published version other than {down_version} with a passing "
        f"gate to restore to: roll one out, or `llmship rollback {model} --to VERSION "
        "--allow-ungated`"
    )


def move_traffic_back(
    model: str,
    choose: Callable[[str | None], PublishedVersion | None],
    reason: str,
    allow_ungated: bool,
) -> RolloutResult | None:
    """Roll model back to the version choose(live) names (None: nothing to do), asked once
    the model's serving slot is this run's, with the live version of that moment: a run may
    wait long for the slot while other runs move the traffic."""
    with serving_slot(model):
        live = ArtifactStore(get_settings()).read_alias(model, "live")
        target = choose(live)
        if target is None:
            return None
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
                f"| reason | {reason} |\n| gate | "
                f"{'passed' if target.gate_passed else 'NOT PASSED'}"
                f"{' (allow_ungated override)' if override else ''} |\n"
            ),
            f"rollback to {target.version}",
        )
        return rollout_task(
            target, RolloutConfig(), allow_ungated=allow_ungated, reason=f"rollback: {reason}"
        )


@flow(name="rollback", log_prints=True, persist_result=True)
def rollback(
    model: str,
    reason: str,
    target_version: str | None = None,
    allow_ungated: bool = False,
) -> RolloutResult:
    """Move all of a model's traffic to an earlier published version, at once.

    Args:
        model: The model whose traffic moves (the deployment's own; leave it as it is).
        reason: Why: kept with the live alias's history and in the rollback artifact.
        target_version: The published version to serve. Empty: the version that was live
            before the current one (the `previous` alias). `llmship versions MODEL` lists
            each with its gate verdict.
        allow_ungated: Serve the version even if it never passed the accuracy gate. An
            override, recorded as such.
    """
    target = rollback_target(model, target_version)  # refused before any wait, if it must be
    return move_traffic_back(model, lambda live: target, reason, allow_ungated)


@flow(name="restore", log_prints=True, persist_result=True)
def restore(model: str, down_version: str, reason: str) -> RolloutResult | None:
    """Roll back to the previous version while `down_version` is still the live one.

    Args:
        model: The model whose live version went down.
        down_version: The version the gateway declared down.
        reason: What the gateway saw.
    """

    def target_while_down_version_is_live(live: str | None) -> PublishedVersion | None:
        # Asked once the serving slot is the run's: meanwhile another run (a rollout, a
        # rollback) may have moved the traffic, and rolling that back would undo its work.
        if live != down_version:
            get_run_logger().info(
                "%s's live version is %s, not %s: nothing to roll back", model, live, down_version
            )
            return None
        return restore_target(model, down_version, get_run_logger())

    if target_while_down_version_is_live(ArtifactStore(get_settings()).read_alias(model, "live")):
        return move_traffic_back(model, target_while_down_version_is_live, reason, False)
    return None  # moved on already: no wait for the slot
