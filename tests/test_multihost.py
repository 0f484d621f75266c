"""The serving plane across two hosts: network namespaces standing in for machines.

Host "head" runs the whole stack (`llmship up` with LLMSHIP_HOST set to its address: SeaweedFS,
Prefect, its worker, the Ray head, the gateway); host "worker" runs a Ray worker node only,
joined to the head with the cluster's token, with a cache of its own and the store's read-only
key in its environment (what a KubeRay worker pod gets from a Secret). No disk is shared that
the serving path reads: each replica fetches its version from S3 over the network.

A version of the demo model with two replicas, one per host, answers through the gateway; the
worker host is lost under client load (every process on it killed) and comes back; a canary
crosses hosts; a rollback runs through Prefect, and the version it restores keeps serving
after the flow run's process has ended. The tests run in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmship.manifest import Manifest, hash_dir
from llmship.settings import Settings
from tests.helpers.fleet_probe import MARK
from tests.helpers.hosts import TestHosts
from tests.helpers.load import SteadyLoad
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "orchestrator" / "bin"
MODEL = "tiny-llama"
PORTS = {
    "LLMSHIP_PREFECT_PORT": "24200",
    "LLMSHIP_S3_PORT": "28333",
    "LLMSHIP_GATEWAY_PORT": "28000",
    "LLMSHIP_RAY_PORT": "26379",
}
ENGINE_ARGS = ["--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager"]
PROMPTS = [
    "Clause: The Vendor shall pay the Buyer $12,500 no later than March 3, 2027.\n"
    "Question: What amount does the clause state?\nAnswer:",
    "Payment is due",
]


def clean_env(**settings: str) -> dict[str, str]:
    """This machine's environment without the test stack's own settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLMSHIP_", "PREFECT_", "RAY_", "HF_"))
    }
    return {**env, "HF_HUB_OFFLINE": "1", **settings}


class Cluster:
    def __init__(self, hosts: TestHosts, root: Path) -> None:
        self.hosts = hosts
        self.head_ip = hosts.ip("head")
        self.state = root / "head"
        self.gateway = self.settings.gateway_url
        self.worker_state = root / "worker"
        self.probe: subprocess.Popen | None = None
        self.lost_replica = ""  # hostv1's replica on the worker host when it was lost
        self.head_env = clean_env(
            LLMSHIP_STATE_DIR=str(self.state),
            LLMSHIP_HOST=self.head_ip,
            LLMSHIP_RAY_NUM_CPUS="4",
            **PORTS,
        )

    @property
    def settings(self) -> Settings:
        """The head's settings, as its processes read them (credentials once it is up)."""
        return Settings(
            state_dir=self.state,
            host=self.head_ip,
            prefect_port=int(PORTS["LLMSHIP_PREFECT_PORT"]),
            s3={"port": int(PORTS["LLMSHIP_S3_PORT"])},
            gateway={"port": int(PORTS["LLMSHIP_GATEWAY_PORT"])},
            ray={"port": int(PORTS["LLMSHIP_RAY_PORT"])},
        )

    def up(self) -> None:
        proc = self.hosts.run(
            "head",
            [str(BIN / "llmship"), "up"],
            env=self.head_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def start_worker(self) -> None:
        """A Ray worker node on the worker host: the cluster's token, the store's read-only
        key and its address, the trusted public keys, a node cache of its own."""
        from llmship import ray_cluster

        creds = json.loads(self.settings.credentials_file.read_text())
        self.worker_state.mkdir(exist_ok=True)
        env = clean_env(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.settings.ray_auth_token_file),
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(REPO),
            LLMSHIP_STATE_DIR=str(self.worker_state),
            LLMSHIP_HOST=self.hosts.ip("worker"),
            LLMSHIP_S3_IDENTITY="reader",
            LLMSHIP_S3_ENDPOINT_URL=self.settings.s3_url,
            LLMSHIP_S3_ACCESS_KEY=creds["s3_read_access_key"],
            LLMSHIP_S3_SECRET_KEY=creds["s3_read_secret_key"],
            # The public keys its replicas trust: a file that the team's config management
            # puts on every host (here the head's folder: the namespaces share one disk).
            LLMSHIP_SIGNING_TRUSTED_KEYS_DIR=str(self.settings.trusted_keys_dir),
        )
        argv = ray_cluster.worker_argv(
            BIN / "ray",
            ray_cluster.address(self.settings),
            self.hosts.ip("worker"),
            self.settings.ray.port,
            num_cpus=4,
        )
        log = (self.worker_state / "ray-worker.log").open("ab")
        self.hosts.popen("worker", argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for(
            "the worker node in the cluster",
            lambda: len(self.alive_nodes()) == 2,
            timeout=120,
            every=1.0,
        )

    def driver(self, *args: str, timeout: float = 600) -> dict:
        """A process on the head host running llmship's own code (a flow run's stand-in)."""
        proc = self.hosts.run(
            "head",
            [str(BIN / "python"), "-m", "tests.helpers.multihost_driver", *args],
            env={
                **self.head_env,
                "PYTHONPATH": str(REPO),
                "PREFECT_API_URL": self.settings.prefect_api_url,
                "PREFECT_HOME": str(self.state / "prefect"),
            },
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def ask(self, question: str):
        """The fleet probe's answer (tests/helpers/fleet_probe.py, started once, on the head)."""
        if self.probe is None or self.probe.poll() is not None:
            self.probe = self.hosts.popen(
                "head",
                [str(BIN / "python"), "-m", "tests.helpers.fleet_probe"],
                env=self.head_env,
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        self.probe.stdin.write(question + "\n")
        self.probe.stdin.flush()
        while True:  # Ray's own notices come on the same stdout
            line = self.probe.stdout.readline()
            if not line:
                raise AssertionError("the fleet probe on the head host exited")
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])

    def fleet(self) -> dict:
        """What `llmship status` shows, as data: app -> the fleet's Server."""
        return {s["app"]: s for s in self.ask("running")}

    def replicas_of(self, version: str) -> list[dict]:
        server = self.fleet().get(f"{MODEL}--{version}")
        return server["endpoints"] if server else []

    def nodes_of(self, version: str) -> list[str]:
        return sorted(e["node_ip"] for e in self.replicas_of(version))

    def alive_nodes(self) -> list[str]:
        return self.ask("nodes")

    def publish(self, version: str, note: str) -> None:
        """A gated version of the demo model in the head's store (a note file makes each
        version's content, and so its digest, its own)."""
        from llmship.store import ArtifactStore

        folder = self.state.parent / f"model-{version}"
        shutil.copytree(REPO / "demo" / "tiny-llama", folder)
        (folder / "llmship-note.txt").write_text(note)
        from llmship.contracts import ServeSpec
        from llmship.versions import VersionDetails, sign_version

        manifest = Manifest(
            kind="version",
            key=version,
            files=hash_dir(folder),
            details=VersionDetails(
                model=MODEL,
                version=version,
                gate_passed=True,
                scheme="UNQUANTIZED",
                serve=ServeSpec(engine_args=ENGINE_ARGS),
            ).model_dump(mode="json"),
        )
        store = ArtifactStore(self.settings)
        store.upload_dir(folder, f"versions/{MODEL}/{version}", manifest)
        sign_version(store, MODEL, version)  # with the head's key, as a publish there signs

    def engine_requests(self, url: str) -> float:
        """Completions the engine at url has finished (its own Prometheus counter)."""
        text = httpx.get(f"{url}/metrics", timeout=10).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("vllm:request_success_total")
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the multi-host tests need root and iproute2 (`ip netns`)")
    with TestHosts(["head", "worker"]) as hosts:
        cluster = Cluster(hosts, tmp_path_factory.mktemp("multihost"))
        # Leaving the block kills every process of both hosts (the hosts' power goes off):
        # nothing of theirs outlives the tests, and no orderly stop is waited for.
        cluster.up()
        cluster.start_worker()
        cluster.publish("hostv1", "first")
        cluster.publish("hostv2", "second")
        yield cluster
    from llmship import ray_cluster

    for state in (cluster.state, cluster.worker_state):  # Ray's logs, outside the state
        shutil.rmtree(ray_cluster.private_dir(Settings(state_dir=state)), ignore_errors=True)


def test_two_replicas_run_one_on_each_host_behind_the_gateway(cluster):
    result = cluster.driver("rollout", MODEL, "hostv1", "--replicas", "2", "--per-node", "1")
    assert result["changed"] and result["version"] == "hostv1"
    head, worker = cluster.head_ip, cluster.hosts.ip("worker")
    assert cluster.nodes_of("hostv1") == sorted([head, worker])
    # Each replica fetched the version onto its own host, into its own node cache.
    assert list((cluster.worker_state / "node-cache").glob("*.complete"))
    assert list((cluster.state / "node-cache").glob("*.complete"))
    # Clients of the gateway are answered by both replicas.
    endpoints = [e["url"] for e in cluster.fleet()[f"{MODEL}--hostv1"]["endpoints"]]
    before = {url: cluster.engine_requests(url) for url in endpoints}
    for i in range(20):
        resp = httpx.post(
            f"{cluster.gateway}/v1/completions",
            timeout=60,
            json={"model": MODEL, "prompt": PROMPTS[i % 2], "max_tokens": 4, "temperature": 0},
        )
        assert resp.status_code == 200 and resp.headers["x-llmship-version"] == "hostv1"
    served = {url: cluster.engine_requests(url) - before[url] for url in endpoints}
    assert all(n >= 3 for n in served.values()), served
    status = cluster.hosts.run(
        "head",
        [str(BIN / "llmship"), "status"],
        env=cluster.head_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"node {worker}" in status.stdout and f"node {head}" in status.stdout, status.stdout


def test_a_lost_host_costs_only_its_in_flight_requests_and_its_replica_comes_back(cluster):
    worker = cluster.hosts.ip("worker")
    [lost] = [e["replica"] for e in cluster.replicas_of("hostv1") if e["node_ip"] == worker]
    with SteadyLoad(cluster.gateway, MODEL, PROMPTS, workers=3, pause_s=0.05) as load:
        time.sleep(3)
        lost_at = time.time()
        assert cluster.hosts.kill_all("worker")
        time.sleep(10)
    failures = load.failures()
    # Only requests the worker's replica had in hand when the host died can fail.
    assert len(failures) <= load.workers, failures
    assert all(abs(f.started - lost_at) < 2 for f in failures), failures
    after = [o for o in load.outcomes if o.started > lost_at + 2]
    assert len(after) > 20 and all(o.ok for o in after)
    # The host comes back (Ray places the missing replica on it again: the next test
    # checks that, while its own servers start).
    cluster.start_worker()
    cluster.lost_replica = lost


def test_a_canary_across_hosts_and_a_rollback_through_prefect_lose_no_request(cluster):
    # Ray places hostv1's lost replica on the returning worker host.
    rejoined = time.time()
    worker = cluster.hosts.ip("worker")
    wait_for(
        "a new replica of hostv1 on the worker host",
        lambda: [
            e
            for e in cluster.replicas_of("hostv1")
            if e["node_ip"] == worker and e["replica"] != cluster.lost_replica
        ],
        timeout=300,
        every=2.0,
    )
    print(f"hostv1's replica re-placed on the returning host within {time.time() - rejoined:.0f} s")
    # The new version's server is up before the load starts, as a gate leaves a candidate's
    # (on 2 cores, a vLLM start beside two busy engines takes minutes). Started only now: the
    # process that acquires it exits, and its hold lapses after server_hold_lease_s, as a
    # killed run's does; a re-placement slower than that used to leave nothing to reuse.
    cluster.driver("acquire", MODEL, "hostv2")
    with SteadyLoad(cluster.gateway, MODEL, PROMPTS, workers=2, pause_s=0.2) as load:
        result = cluster.driver(
            "rollout", MODEL, "hostv2", "--replicas", "1", "--canary", "50", "--bake", "8"
        )
        assert result["changed"] and result["previous"] == "hostv1"
        assert result["started_server"] is False
        assert [s["percent"] for s in result["steps"]] == [50]
        assert result["steps"][0]["requests"] > 0 and result["steps"][0]["breach"] is None
        # The rollback, as the UI or `llmship rollback` starts it: a flow run on the head
        # host's worker, in a process of its own that ends when the run does.
        env = {**cluster.head_env, "PREFECT_HOME": str(cluster.state / "prefect")}
        run = subprocess.run(
            [
                str(BIN / "prefect"),
                "deployment",
                "run",
                f"rollback/{MODEL}",
                "--param",
                "reason=multi-host test",
                "--watch",
                "--watch-timeout",
                "300",
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        time.sleep(5)
    assert load.failures() == [], load.failures()[:5]
    seen = {o.version for o in load.outcomes}
    assert seen == {"hostv1", "hostv2"}
    # The version the run restored serves after the run's process has gone, on both hosts.
    assert cluster.nodes_of("hostv1") == sorted([cluster.head_ip, cluster.hosts.ip("worker")])
    time.sleep(3)
    resp = httpx.post(
        f"{cluster.gateway}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0},
    )
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == "hostv1"
