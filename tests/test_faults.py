"""Faults between the pipeline and its S3 store, on the real SeaweedFS: a proxy on loopback
answers every third request with S3's SlowDown, drops the connection, or cuts a download's
body in half. Every transfer still completes, and what arrives is checked byte for byte
against the manifest's sha256 (docs/RELIABILITY.md lists every fault and input tried)."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from llmship.manifest import Manifest
from llmship.store import ArtifactStore
from tests.helpers.fault_proxy import FaultProxy

pytestmark = pytest.mark.stack

# Past the store's multipart threshold (64 MiB): the large file goes up in parts, and each
# part is a request that can fail on its own.
FILES = {"model.safetensors": 70 * 2**20, "config.json": 2_000, "tokenizer.json": 300_000}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faulty-model")
    for name, size in FILES.items():
        (root / name).write_bytes(os.urandom(size))
    return root


def through(proxy: FaultProxy, settings) -> ArtifactStore:
    return ArtifactStore(settings.updated(s3={"endpoint_url": proxy.url}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_uploads_survive_s3_errors_and_dropped_connections(mode, stack, store, model_dir, tmp_path):
    prefix = f"test/faults/upload-{mode}-{uuid.uuid4().hex[:8]}"  # new each run: uploaded
    with FaultProxy(stack.s3.port, mode) as proxy:
        manifest = through(proxy, stack).upload_dir(
            model_dir, prefix, Manifest(kind="test", key=mode)
        )
    assert proxy.faults, "the proxy injected nothing: the test proves nothing"
    # Read back directly from SeaweedFS: every object whole, the manifest last and complete.
    got = store.download_dir(prefix, tmp_path / "back")
    assert got.digest == manifest.digest
    for name in FILES:
        assert sha256(tmp_path / "back" / name) == sha256(model_dir / name)


@pytest.mark.parametrize("mode", ["503", "reset", "truncate"])
def test_downloads_survive_faults_and_never_keep_a_cut_file(
    mode, stack, store, model_dir, tmp_path
):
    prefix = "test/faults/download"
    if store.read_manifest(prefix) is None:
        store.upload_dir(model_dir, prefix, Manifest(kind="test", key="download"))
    # Every object's first GET (each ranged part's, for the large file) gets the fault, and
    # its retry passes: each file, small and large, is fetched through a retry, every run.
    with FaultProxy(stack.s3.port, mode, first_get=True) as proxy:
        got = through(proxy, stack).download_dir(prefix, tmp_path / "dest")
    faulted_files = {
        fault.split("?")[0].rsplit("/", 1)[-1] for fault in proxy.faults if "/files/" in fault
    }
    assert faulted_files == set(FILES), proxy.faults
    assert got.digest == store.read_manifest(prefix).digest
    for name in FILES:
        assert sha256(tmp_path / "dest" / name) == sha256(model_dir / name)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"secret_key": "not-the-secret-key-at-all"}, "SignatureDoesNotMatch"),
        ({"access_key": "NOSUCHKEY", "secret_key": "x" * 40}, "InvalidAccessKeyId"),
        ({"artifacts_bucket": "no-such-bucket-here"}, "NoSuchBucket"),
    ],
)
def test_wrong_credentials_or_a_missing_bucket_are_refused_before_a_run(change, expected, stack):
    """The preflight's store check: an S3 that will not take the run's writes refuses the run
    before anything is downloaded, naming the bucket, the endpoint and S3's own error code."""
    from tasks.preflight import check_store

    check = check_store(stack.updated(s3=change))
    assert check.ok is False
    bucket = change.get("artifacts_bucket", stack.s3.artifacts_bucket)
    assert f"cannot write to s3://{bucket} at {stack.s3_url}" in check.detail
    assert expected in check.detail, check.detail
    assert stack.s3.secret_key not in check.detail


def passing_report(build):
    from tasks.gate_rule import GateReport, TaskVerdict

    verdict = TaskVerdict(
        task="clause_type",
        metric="acc",
        n=100,
        baseline=0.9,
        candidate=0.9,
        delta=0.0,
        rtol=0.05,
        atol=0.0,
        floor=None,
        threshold=0.855,
        measured=0.9,
        passed=True,
    )
    return GateReport(
        passed=True,
        rule="test: a report that passed",
        rtol=0.05,
        dataset="contracts",
        eval_data_sha256="0" * 64,
        candidate=build.prefix,
        baseline="stages/build/none",
        tasks=[verdict],
        harness={},
        seconds={},
    )


def test_seaweedfs_killed_during_publish_leaves_no_version_or_a_complete_one(
    stack, store, tmp_path
):
    from llmship import processes
    from llmship import stack as local_stack
    from llmship.contracts import Build, BuildDetails, ServeSpec
    from llmship.errors import SourceNotFound
    from llmship.pipeline_config import Scheme
    from llmship.store import version_prefix
    from llmship.versions import list_versions, read_signed_version
    from tasks.publish import publish

    # A build of 300 files: publishing copies them one by one, which leaves time to kill
    # the store in the middle.
    build_dir = tmp_path / "build"
    for i in range(300):
        (build_dir / f"shard-{i:03d}.bin").parent.mkdir(exist_ok=True)
        (build_dir / f"shard-{i:03d}.bin").write_bytes(os.urandom(32 * 1024))
    run = uuid.uuid4().hex[:8]  # the test's own names: it can run again on the same stack
    build_prefix = f"stages/build/killed-during-publish-{run}"
    details = BuildDetails(
        scheme=Scheme.UNQUANTIZED,
        precision="bfloat16",
        quantization_format=None,
        serve=ServeSpec(),
        smoke_output="",
    )
    build = Build.from_manifest(
        build_prefix,
        store.upload_dir(
            build_dir,
            build_prefix,
            Manifest(
                kind="build", key="killed-during-publish", details=details.model_dump(mode="json")
            ),
        ),
    )
    model, version = f"store-killed-{run}", build.version
    prefix = version_prefix(model, version)

    outcome: dict = {}

    def publish_in_background():
        try:
            outcome["published"] = publish(model, build, passing_report(build))
        except Exception as exc:  # noqa: BLE001 - what the test looks at
            outcome["error"] = exc

    publisher = threading.Thread(target=publish_in_background)
    publisher.start()
    deadline = time.monotonic() + 60
    while len(store.list_keys(f"{prefix}/files/")) < 10:
        assert time.monotonic() < deadline and publisher.is_alive(), outcome
        time.sleep(0.02)
    weed = processes.find(stack, "seaweedfs")
    os.killpg(weed.pid, signal.SIGKILL)
    publisher.join(timeout=300)
    # boto3 retried, then gave up: the store is gone, not the request (the task's own
    # retries come next, minutes apart).
    assert type(outcome.get("error")).__name__ == "EndpointConnectionError", outcome

    local_stack.start_s3(stack, local_stack.ensure_credentials(stack), local_stack.child_env(stack))
    # Some files were copied, but without its manifest the version does not exist: not
    # listed, not servable, not fetchable.
    copied = store.list_keys(f"{prefix}/files/")
    assert 10 <= len(copied) < 300
    assert store.read_manifest(prefix) is None
    assert list_versions(store, model) == []
    with pytest.raises(SourceNotFound, match="never completely written"):
        store.download_dir(prefix, tmp_path / "fetched")
    # Publishing again (the task's retry, or a rerun) completes the version, whole.
    published = publish(model, build, passing_report(build))
    assert (published.version, published.files) == (version, 300)
    # Signed, by the stack's key, and what it signed is what the store holds.
    assert read_signed_version(store, model, version).signed_by == published.signed_by
    assert [v.version for v in list_versions(store, model)] == [version]
    assert store.download_dir(prefix, tmp_path / "fetched").digest == build.digest
