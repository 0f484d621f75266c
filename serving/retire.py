"""Stop a kept-warm model server when its warm period ends, unless traffic came back to it.

    python -m serving.retire <server record name> <deadline, unix seconds>

Started by the rollout (serving/model_server.retire_after) for the version traffic left.
"Traffic came back" means the gateway routes to that version again (live or canary); when the
gateway cannot be asked, the S3 `live` alias decides; when neither answers, the server is left
running: stopping a server that serves is worse than leaving one up.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import httpx

from llmship import processes
from llmship.settings import Settings, get_settings
from serving import model_server
from serving.gateway_admin import gateway_routes

log = logging.getLogger("llmship.retire")


def serves_traffic(settings: Settings, server: model_server.ModelServer) -> bool | None:
    """Whether the gateway (or, failing that, the live alias) sends traffic to server's
    version; None when neither can be asked."""
    try:
        route = gateway_routes(settings).get(server.model) or {}
        canary = route.get("canary") or {}
        return server.version in (route.get("version"), canary.get("version"))
    except httpx.HTTPError as exc:
        log.warning("gateway not reachable (%s): asking S3 instead", exc)
    try:
        from llmship.store import ArtifactStore

        return ArtifactStore(settings).read_alias(server.model, "live") == server.version
    except Exception as exc:  # noqa: BLE001 - S3 down too: the caller keeps the server
        log.warning("S3 not reachable either (%s)", exc)
        return None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    name, deadline = argv[0], float(argv[1])
    time.sleep(max(0.0, deadline - time.time()))
    settings = get_settings()
    server = model_server.find_by_name(settings, name)
    if server is None:
        log.info("%s is already gone", name)
    elif (serving := serves_traffic(settings, server)) is not False:
        log.info("%s keeps running: %s", name, "traffic is back on it" if serving else
                 "cannot tell whether it serves")
    else:
        log.info("stopping %s: its warm period is over", name)
        # Not model_server.stop: that would cancel this very process first.
        rec = processes.find(settings, name)
        if rec:
            processes.stop(settings, rec)
    own = processes.find(settings, f"retire-{name}")
    if own and own.pid == os.getpid():
        processes.forget(settings, own.name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
