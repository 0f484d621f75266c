"""Faults between the pipeline and its S3 store, on the real SeaweedFS: a proxy on loopback
answers every third request with S3's SlowDown, drops the connection, or cuts a download's
body in half. Every transfer still completes, and what arrives is checked byte for byte
against the manifest's sha256 (docs/RELIABILITY.md lists every fault and input tried)."""

from __future__ import annotations

import hashlib
import os
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
    return ArtifactStore(settings.model_copy(update={"s3_endpoint_url": proxy.url}))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["503", "reset"])
def test_uploads_survive_s3_errors_and_dropped_connections(mode, stack, store, model_dir,
                                                           tmp_path):
    prefix = f"test/faults/upload-{mode}"
    with FaultProxy(stack.s3_port, mode) as proxy:
        manifest = through(proxy, stack).upload_dir(model_dir, prefix,
                                                    Manifest(kind="test", key=mode))
    assert proxy.faults, "the proxy injected nothing: the test proves nothing"
    # Read back directly from SeaweedFS: every object whole, the manifest last and complete.
    got = store.download_dir(prefix, tmp_path / "back")
    assert got.digest == manifest.digest
    for name in FILES:
        assert sha256(tmp_path / "back" / name) == sha256(model_dir / name)


@pytest.mark.parametrize("mode", ["503", "reset", "truncate"])
def test_downloads_survive_faults_and_never_keep_a_cut_file(mode, stack, store, model_dir,
                                                            tmp_path):
    prefix = "test/faults/download"
    if store.read_manifest(prefix) is None:
        store.upload_dir(model_dir, prefix, Manifest(kind="test", key="download"))
    with FaultProxy(stack.s3_port, mode) as proxy:
        got = through(proxy, stack).download_dir(prefix, tmp_path / "dest")
    assert proxy.faults, "the proxy injected nothing: the test proves nothing"
    assert got.digest == store.read_manifest(prefix).digest
    for name in FILES:
        assert sha256(tmp_path / "dest" / name) == sha256(model_dir / name)


@pytest.mark.parametrize("change, expected", [
    ({"s3_secret_key": "not-the-secret-key-at-all"}, "SignatureDoesNotMatch"),
    ({"s3_access_key": "NOSUCHKEY", "s3_secret_key": "x" * 40}, "InvalidAccessKeyId"),
    ({"artifacts_bucket": "no-such-bucket-here"}, "NoSuchBucket"),
])
def test_wrong_credentials_or_a_missing_bucket_are_refused_before_a_run(change, expected, stack):
    """The preflight's store check: an S3 that will not take the run's writes refuses the run
    before anything is downloaded, naming the bucket, the endpoint and S3's own error code."""
    from tasks.preflight import check_store

    check = check_store(stack.model_copy(update=change))
    assert check.ok is False
    bucket = change.get("artifacts_bucket", stack.artifacts_bucket)
    assert f"cannot write to s3://{bucket} at {stack.s3_url}" in check.detail
    assert expected in check.detail, check.detail
    assert stack.s3_secret_key not in check.detail
