"""What a flow run on the head host does, as a process of its own there (the multi-host tests
start it inside the head's network namespace): roll a published version out with llmship's own
rollout (or only start its servers), and print the result as JSON.

    python -m tests.helpers.multihost_driver rollout MODEL VERSION [--replicas N]
           [--per-node N] [--canary PERCENT --bake S]
    python -m tests.helpers.multihost_driver acquire MODEL VERSION
        (the version's servers started and left up, as the gate leaves a candidate's)
"""

from __future__ import annotations

import argparse
import logging
import sys

from llmship.pipeline_config import RolloutConfig, ServingConfig
from llmship.settings import get_settings
from llmship.store import ArtifactStore


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    roll = sub.add_parser("rollout")
    roll.add_argument("model")
    roll.add_argument("version")
    roll.add_argument("--replicas", type=int, default=1)
    roll.add_argument("--per-node", type=int, default=None)
    roll.add_argument("--canary", type=float, default=None)
    roll.add_argument("--bake", type=float, default=8.0)
    warm = sub.add_parser("acquire")
    warm.add_argument("model")
    warm.add_argument("version")
    args = parser.parse_args(argv)

    from llmship.versions import read_version
    from tasks.rollout import rollout

    store = ArtifactStore(get_settings())
    version = read_version(store, args.model, args.version)
    if args.command == "acquire":
        from serving import fleet

        spec = fleet.spec_for_version(args.model, args.version, version.serve)
        server, _ = fleet.acquire(get_settings(), spec, ServingConfig(replicas=1))
        print(server.model_dump_json())
        return 0
    cfg = RolloutConfig(
        canary_steps=[args.canary] if args.canary else [],
        bake_seconds=args.bake,
        max_p99_seconds=30,
    )
    serving = ServingConfig(replicas=args.replicas, max_replicas_per_node=args.per_node)
    result = rollout(version, cfg, serving=serving, log=logging.getLogger("rollout"))
    print(result.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
