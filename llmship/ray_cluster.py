"""The Ray cluster the serving plane runs on: the local one-node head `llmship up` starts, or an
existing cluster (LLMSHIP_RAY_ADDRESS: KubeRay's, or `ray start` on GPU hosts, docs/GPU.md).

Every port the local head opens is fixed from settings.ray.port, so two stacks on one host
(`make demo` and `make test`) never collide and nothing takes a random port:

    ray.port      GCS                      +6  metrics export (off, below)
    +1            dashboard (loopback)     +7  object manager
    +2            Ray Client server        +8  node manager
    +3            dashboard agent (HTTP)   +9  dashboard's own exporter (below)
    +4            dashboard agent (gRPC)   +10 autoscaler monitor's exporter (below)
    +5            runtime-env agent        +100 .. +299  worker processes

Token authentication is on (llmship/credentials.py: RAY_AUTH_MODE=token and the token's file):
a process without the token cannot join the cluster, submit work or read its state.

Ray's Prometheus exporter (the dashboard agent's, on the metrics export port) takes no token and
named every Serve application in its labels, every served and evaluated build: the head turns
Ray's metrics off for the whole cluster (METRICS_OFF; a node that joins reads the cluster's
system config from the GCS, ray/_private/node.py), so each raylet starts its agent with
--disable-metrics-collection and nothing listens there. llmship scrapes the gateway and the
engines (docs/grafana/prometheus.yml), never Ray, and Serve's autoscaling takes the replicas'
stats by actor calls, not from these metrics. Two small exporters Ray starts regardless (the
dashboard's and the autoscaler monitor's) count API requests and nodes: no build is named there
(tests/test_host_security.py asks every port). Ray puts them on 44227 and 44217 unless told
(exporter_ports): a second head on the host found them taken.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path

from llmship.credentials import ray_env
from llmship.errors import StackError
from llmship.settings import Settings


class ClusterError(StackError):
    pass


# Named actors and Serve applications of llmship live here (serving/fleet.py).
NAMESPACE = "llmship"
WORKER_PORTS = (100, 299)  # offsets from ray.port
# Ray's system config (`ray start --head --system-config`, the cluster's): with metrics
# collection off the raylet starts its dashboard agent with --disable-metrics-collection, so
# no exporter listens on the metrics export port.
METRICS_OFF = {"enable_metrics_collection": False}


def address(settings: Settings) -> str:
    """The GCS address clients connect to: the existing cluster's, or the local head's."""
    return settings.ray.address or f"{settings.host}:{settings.ray.port}"


def private_dir(settings: Settings) -> Path:
    """The owner-only folder (mode 700) that holds Ray's session folder: Ray makes that one
    readable and writable by everyone (it chmods it 777), so this one keeps others out of its
    logs and Unix sockets."""
    digest = hashlib.sha256(str(settings.state_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"llmship-ray-{digest}"


def temp_dir(settings: Settings) -> Path:
    """Ray's session folder. Short, because Ray puts Unix sockets inside it (a socket path has
    at most 107 bytes), and one per stack, so two stacks on a host keep their own."""
    return private_dir(settings) / "r"


def _node_ports(port: int) -> list[str]:
    """The ports every node opens (offsets from port, as the module's table says)."""
    low, high = WORKER_PORTS
    return [
        "--dashboard-agent-listen-port",
        str(port + 3),
        "--dashboard-agent-grpc-port",
        str(port + 4),
        "--runtime-env-agent-port",
        str(port + 5),
        "--metrics-export-port",
        str(port + 6),
        "--object-manager-port",
        str(port + 7),
        "--node-manager-port",
        str(port + 8),
        "--min-worker-port",
        str(port + low),
        "--max-worker-port",
        str(port + high),
    ]


def exporter_ports(settings: Settings) -> dict[str, str]:
    """The environment that puts the head's two fixed-port exporters on the stack's ports (Ray
    reads these variables in ray/dashboard/consts.py and ray/autoscaler/_private/constants.py)."""
    return {
        "DASHBOARD_METRIC_PORT": str(settings.ray.port + 9),
        "AUTOSCALER_METRIC_PORT": str(settings.ray.port + 10),
    }


def head_argv(ray_bin: Path, settings: Settings) -> list[str]:
    """`ray start --head` on this stack's address, in the foreground (the stack stops it)."""
    return [
        str(ray_bin),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address",
        settings.host,
        "--dashboard-host",
        settings.host,
        "--num-cpus",
        str(settings.ray.num_cpus),
        # On CUDA, Ray counts the GPUs itself and hands each replica its own.
        *(["--num-gpus", "0"] if settings.device == "cpu" else []),
        "--temp-dir",
        str(temp_dir(settings)),
        "--system-config",
        json.dumps(METRICS_OFF),
        "--port",
        str(settings.ray.port),
        "--dashboard-port",
        str(settings.ray.port + 1),
        "--ray-client-server-port",
        str(settings.ray.port + 2),
        *_node_ports(settings.ray.port),
    ]


def worker_argv(
    ray_bin: Path, head: str, node_ip: str, port: int, num_cpus: int, num_gpus: int = 0
) -> list[str]:
    """`ray start` of a worker node joining head (host:port), its own ports from port."""
    return [
        str(ray_bin),
        "start",
        "--block",
        "--disable-usage-stats",
        "--address",
        head,
        "--node-ip-address",
        node_ip,
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        str(num_gpus),
        *_node_ports(port),
    ]


def _check_reachable(gcs: str) -> None:
    """Fail in seconds, naming the address, where ray.init would retry for a minute."""
    host, _, port = gcs.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3.0).close()
    except (OSError, ValueError) as exc:
        raise ClusterError(
            f"no Ray cluster answers at {gcs} ({exc}): start the stack "
            "(`llmship up`), or point LLMSHIP_RAY_ADDRESS at a running "
            "cluster"
        ) from None


def uses_ray(settings: Settings) -> bool:
    """A cluster to ask: one named, or the local stack's (its token exists once it is up)."""
    return bool(settings.ray.address) or settings.ray_auth_token_file.exists()


def connect(settings: Settings) -> None:
    """Join this stack's cluster as a client (a driver), once per process."""
    env = ray_env(settings)
    if "ray" not in sys.modules:
        os.environ.update(env)
    elif any(os.environ.get(k) != v for k, v in env.items()):
        raise ClusterError(
            "ray was imported before the cluster's settings were in this "
            "process's environment (Ray reads them at import): call "
            "llmship.ray_cluster.connect before importing ray"
        )
    import ray

    if ray.is_initialized():
        return
    if not (settings.ray.address or "").startswith("ray://"):  # Ray Client: its own check
        _check_reachable(address(settings))
    ray.init(
        address=address(settings),
        namespace=NAMESPACE,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=False,
        # A client of the local stack is on the head's node; elsewhere Ray finds it.
        _node_ip_address=None if settings.ray.address else settings.host,
    )
