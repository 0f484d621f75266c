"""What the gateway routes: each model's route (live version, canary, shadow), as saved and as
restored at start from the S3 `live` aliases."""

from __future__ import annotations

import json
import logging

from pydantic import BaseModel

from llmship.serving_messages import Route
from llmship.settings import Settings

log = logging.getLogger("llmship.gateway")


def route_change(model: str, old: Route | None, new: Route) -> str | None:
    """One line saying what a route change moved (`route m: live v1 -> v2; canary v2
    ended`), or None when it moved nothing (a rollout gives a route again to a gateway that
    has it)."""
    moved = []
    if old is None or old.version != new.version:
        moved.append(f"live {old.version} -> {new.version}" if old else f"live {new.version}")
    was, now = (old.canary if old else None), new.canary
    if now and (was is None or (was.version, was.percent) != (now.version, now.percent)):
        moved.append(f"canary {now.version} at {now.percent:g}%")
    elif was and not now:
        moved.append(f"canary {was.version} ended")
    was_shadow, shadow = (old.shadow if old else None), new.shadow
    if shadow and shadow != was_shadow:
        moved.append(
            f"shadow {shadow.version}: {shadow.fraction:.0%} of requests copied, "
            f"at most {shadow.max_rps:g}/s"
        )
    elif was_shadow and not shadow:
        moved.append(f"shadow {was_shadow.version} off")
    return f"route {model}: " + "; ".join(moved) if moved else None


def read_saved_routes(path) -> dict[str, Route]:
    """The routes saved at the last change; none where the file is missing or unreadable (a
    starting gateway then routes by the aliases alone: it always starts)."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {m: Route.model_validate(r) for m, r in raw.items()}
    except (ValueError, AttributeError, OSError) as exc:  # ValidationError is a ValueError
        log.error("saved routes %s ignored: %s", path, exc)
        return {}


class RestoredRoutes(BaseModel):
    """What a starting gateway routes by: each model's route, and what it refused on the way
    (reported in its log, on /ready and as an event), keyed by alias key or model."""

    routes: dict[str, Route] = {}
    problems: dict[str, str] = {}
    # Models whose live version an operator's allow_ungated override put there (its alias
    # says so): the fleet's reconcile deploys them too.
    ungated_override: set[str] = set()
    # (model, refused version, why, what serves instead): one event each.
    refused: list[tuple[str, str, str, str | None]] = []


def restore_routes(settings: Settings, saved: dict[str, Route]) -> RestoredRoutes:
    """Each model's live alias, as a route (what was saved, when S3 cannot be read).

    Each alias is taken on its own, so one bad one costs only its own model: an alias that
    cannot be read is skipped, and a version the rollout's rule (versions.check_servable)
    would refuse (not published, no passing gate and no override recorded) gives way to the
    version live before it, if that one may serve."""
    from llmship.store import ArtifactStore
    from llmship.versions import choose_live

    if not (settings.s3.access_key and settings.s3.secret_key):
        return RestoredRoutes(routes=saved)
    try:
        store = ArtifactStore(settings)
        scan = store.read_live_aliases()
    except Exception as exc:  # noqa: BLE001 - S3 down: keep serving what was routed before
        log.warning(
            "cannot read the live aliases from S3 (%s: %s): keeping the last saved routes",
            type(exc).__name__,
            exc,
        )
        return RestoredRoutes(routes=saved)
    restored = RestoredRoutes(problems=dict(scan.problems))
    for key, problem in scan.problems.items():
        log.error("alias %s skipped: %s", key, problem)
    for model, alias in scan.aliases.items():
        try:
            choice = choose_live(store, model, alias)
        except Exception as exc:  # noqa: BLE001 - S3 failed now: what was routed, if anything
            log.warning(
                "cannot check %s's live version %s (%s: %s): keeping its saved route",
                model,
                alias.version,
                type(exc).__name__,
                exc,
            )
            if model in saved:
                restored.routes[model] = saved[model]
            continue
        if choice.version != alias.version:
            why = choice.refused[alias.version]
            instead = (
                f"serving {choice.version}, the version live before it, instead"
                if choice.version
                else "nothing else may serve it: requests for it are refused"
            )
            restored.problems[model] = f"live version {alias.version} refused: {why}; {instead}"
            restored.refused.append((model, alias.version, why, choice.version))
            log.error("%s: %s", model, restored.problems[model])
        if choice.version is None:
            continue
        if choice.ungated_override:
            restored.ungated_override.add(model)
        kept = saved.get(model)
        restored.routes[model] = (
            kept
            if kept and kept.version == choice.version and not (kept.canary or kept.shadow)
            else Route(version=choice.version)
        )
    return restored
