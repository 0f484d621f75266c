"""A Ray client that stays connected and answers questions about the cluster, one JSON line per
question read from stdin, marked with MARK: `running` (the fleet's servers) or `nodes` (the live
nodes' addresses).
The multi-host tests keep one on the head host, so that each look at the fleet costs
milliseconds, not a new process joining the cluster."""

from __future__ import annotations

import json
import sys

from llmship import ray_cluster
from llmship.settings import get_settings

MARK = "ANSWER "


def main() -> int:
    settings = get_settings()
    ray_cluster.connect(settings)
    import ray

    from serving import fleet

    for line in sys.stdin:
        question = line.strip()
        if question == "running":
            answer = [s.model_dump() for s in fleet.running(settings)]
        elif question == "nodes":
            answer = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
        else:
            answer = {"error": f"unknown question {question!r}"}
        # Marked: Ray prints its own notices (a node lost) to this process's stdout too.
        print(MARK + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
