"""Stage 6, rollout: serve a published version and move the gateway's traffic to it.

Start (or find) a vLLM server for the version from a verified local copy, wait until healthy,
smoke-test one completion, point the gateway at it, move the `live` alias in S3 (the old live
becomes `previous`), then stop the servers of older versions. A version already live and
healthy is left alone. If any step fails before traffic moves, the new server is stopped and
the old version keeps serving.
"""

from __future__ import annotations

import time

import httpx
from prefect import get_run_logger, task
from pydantic import BaseModel

from llmship.errors import PermanentError, ServingError
from llmship.settings import Settings, get_settings
from llmship.store import ArtifactStore
from serving import model_server
from tasks.common import StageOutput, record_stage_artifact
from tasks.publish import PublishedVersion

SMOKE_PROMPT = "Hello"


class RolloutResult(BaseModel):
    model: str
    version: str
    previous: str | None
    upstream: str
    gateway: str
    changed: bool
    smoke_output: str = ""
    seconds: float


def gateway_routes(settings: Settings) -> dict:
    resp = httpx.get(f"{settings.gateway_url}/admin/routes", timeout=10.0,
                     headers={"authorization": f"Bearer {settings.gateway_admin_token}"})
    resp.raise_for_status()
    return resp.json()


def point_gateway(settings: Settings, model: str, version: str, upstream: str) -> None:
    resp = httpx.put(f"{settings.gateway_url}/admin/routes/{model}", timeout=10.0,
                     headers={"authorization": f"Bearer {settings.gateway_admin_token}"},
                     json={"version": version, "upstream": upstream})
    if resp.status_code != 200:
        raise ServingError(f"the gateway refused the route to {model} {version}: "
                           f"{resp.status_code} {resp.text[:300]}")


def rollout(version: PublishedVersion) -> RolloutResult:
    settings = get_settings()
    store = ArtifactStore(settings)
    started = time.monotonic()
    manifest = store.read_manifest(version.prefix)
    if manifest is None or not manifest.details.get("gate_passed"):
        raise PermanentError(f"{version.prefix} is not a published version that passed the "
                             "gate: nothing reaches traffic without a passing gate record")
    current = gateway_routes(settings).get(version.model)
    live = model_server.find(settings, version.model, version.version)
    if current and current["version"] == version.version and live and \
            model_server.is_healthy(live):
        return RolloutResult(model=version.model, version=version.version,
                             previous=None, upstream=live.url, gateway=settings.gateway_url,
                             changed=False, seconds=round(time.monotonic() - started, 3))
    model_dir = store.materialize(version.prefix)  # every file checked against the manifest
    server = model_server.start(settings, version.model, version.version, model_dir,
                                manifest.details.get("engine_args", []))
    try:
        smoke = model_server.smoke_test(server, SMOKE_PROMPT)
        point_gateway(settings, version.model, version.version, server.url)
    except Exception:
        model_server.stop(settings, server)
        raise
    previous = current["version"] if current else None
    store.move_alias(version.model, "live", version.version)
    if previous and previous != version.version:
        store.move_alias(version.model, "previous", previous)
    for other in model_server.running(settings, version.model):
        if other.version != version.version:
            model_server.stop(settings, other)
    return RolloutResult(model=version.model, version=version.version, previous=previous,
                         upstream=server.url, gateway=settings.gateway_url, changed=True,
                         smoke_output=smoke, seconds=round(time.monotonic() - started, 3))


@task(name="rollout", retries=1, retry_delay_seconds=5)
def rollout_task(version: PublishedVersion) -> RolloutResult:
    result = rollout(version)
    logger = get_run_logger()
    if result.changed:
        logger.info("%s %s is live at %s (was %s), served by %s", result.model, result.version,
                    result.gateway, result.previous or "nothing", result.upstream)
    else:
        logger.info("%s %s is already live and healthy: nothing to do", result.model,
                    result.version)
    record_stage_artifact(version.model, StageOutput(
        stage="rollout", key=version.version, prefix=version.prefix, digest=version.digest,
        files=version.files, bytes=version.bytes,
    ), {"live version": result.version, "previous": result.previous or "-",
        "changed": result.changed, "model server": result.upstream,
        "gateway": result.gateway, "seconds": result.seconds},
        f"{result.model} {result.version} live" + ("" if result.changed else " (unchanged)"))
    return result
