"""The download stage against real sources: the local S3 mirror, a local path, and the
Hugging Face hub client reading a local hub cache (no network here: HF_HUB_OFFLINE=1)."""

import contextlib
import os
import resource
import shutil
import subprocess
from pathlib import Path

import pytest

from llmship.errors import SourceNotFound
from llmship.manifest import sha256_file
from tasks.download import download

pytestmark = pytest.mark.stack
DEMO = Path(__file__).resolve().parents[1] / "demo" / "tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"


def test_mirror_download_hashes_every_file(stack, store):
    out = download(f"s3://{stack.s3.mirror_bucket}/tiny-llama")
    manifest = store.read_manifest(out.prefix)
    local = {p.name: sha256_file(p) for p in DEMO.iterdir()}
    assert {f.path: f.sha256 for f in manifest.files} == local
    assert out.digest == manifest.digest and out.files == len(local)


def test_same_source_same_key_and_the_manifest_records_what_it_is_the_digest_of(
    stack, store, tmp_path
):
    from llmship.contracts import DownloadInputs
    from tasks.download import download_inputs

    a = download(str(DEMO))
    b = download(str(DEMO))  # in the store already: used, not fetched again
    assert (a.key, a.digest, a.prefix) == (b.key, b.digest, b.prefix)
    manifest = store.read_manifest(a.prefix)
    # The content address is the digest of the inputs model the manifest records.
    recorded = DownloadInputs.model_validate(manifest.inputs)
    expected = download_inputs(str(DEMO))
    assert recorded.model_dump(mode="json") == expected.model_dump(mode="json")
    assert recorded.key == expected.key == a.key == manifest.key
    assert recorded.source == str(DEMO.resolve())
    # A changed file is a changed source: another key.
    changed = tmp_path / "model"
    shutil.copytree(DEMO, changed)
    (changed / "generation_config.json").write_text("{}")
    assert download_inputs(str(changed)).key != a.key


def test_missing_mirror_prefix_and_bucket(stack):
    with pytest.raises(SourceNotFound, match="holds no files"):
        download(f"s3://{stack.s3.mirror_bucket}/no-such-model")
    with pytest.raises(SourceNotFound, match="does not exist"):
        download("s3://no-such-bucket/tiny-llama")


def test_path_that_is_not_a_model(tmp_path, stack):
    with pytest.raises(SourceNotFound, match="not a directory"):
        download(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFound, match="no config.json"):
        download(str(tmp_path / "empty"))


@pytest.fixture()
def hub_cache():
    """A hub cache holding llmship/tiny-llama at one commit, laid out as huggingface_hub does."""
    repo = Path(os.environ["HF_HUB_CACHE"]) / "models--llmship--tiny-llama"
    shutil.copytree(DEMO, repo / "snapshots" / SHA, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo


def test_hub_revision_pinned(hub_cache, stack, store):
    out = download(f"hf://llmship/tiny-llama@{SHA}")
    names = {f.path for f in store.read_manifest(out.prefix).files}
    assert "model.safetensors" in names and "config.json" in names
    assert out.details.origin == {"repo": "llmship/tiny-llama", "revision": SHA}


def test_wrong_hub_revision_names_the_revision(hub_cache, stack):
    # Offline here: a revision not in the cache is named, with how to fill the cache.
    with pytest.raises(
        SourceNotFound,
        match=r"the snapshot of llmship/tiny-llama@deadbeef is "
        r"not in the local hub cache .*`hf download "
        r"llmship/tiny-llama --revision deadbeef`",
    ):
        download("hf://llmship/tiny-llama@deadbeef")


def test_an_unknown_hub_model_names_the_repository(hub_cache, stack):
    with pytest.raises(
        SourceNotFound,
        match=r"of nobody/no-such-model@[0-9a-f]{40} is not in the "
        r"local hub cache and this worker does not go to "
        r"the hub \(offline: HF_HUB_OFFLINE",
    ):
        download(f"hf://nobody/no-such-model@{SHA}")


def test_source_without_revision_is_refused():
    from pydantic import ValidationError

    from llmship.pipeline_config import PipelineConfig

    with pytest.raises(ValidationError, match="has no revision"):
        PipelineConfig(name="m", source="hf://org/model")


@contextlib.contextmanager
def disk_of(folder: Path, size_bytes: int):
    """folder on a disk that holds size_bytes: a tmpfs mounted there where the machine lets
    root mount one (the write fails with ENOSPC), else a file-size limit on this process
    (EFBIG): either way a real write of the stage fails the way a full disk makes it fail."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if not mounted:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, limit[1]))
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)


def test_a_full_disk_during_download_is_named_and_leaves_nothing(stack, store):
    from llmship.errors import DiskFull
    from llmship.store import MANIFEST
    from tasks.download import download_inputs

    source = f"s3://{stack.s3.mirror_bucket}/tiny-llama"
    prefix = download_inputs(source).prefix
    # An earlier test stored this snapshot: without its manifest the store has none.
    store.client.delete_object(Bucket=store.bucket, Key=f"{prefix}/{MANIFEST}")
    downloads = store.local_path(prefix).parent
    # The model's weights are 1.97 MB; the disk holds 1 MB.
    with disk_of(downloads, 1024 * 1024):
        with pytest.raises(DiskFull) as refused:
            download(source)
        assert not store.local_path(prefix).exists()  # the partial copy is gone
    message = str(refused.value)
    assert f"the disk ran out while downloading {source}" in message
    assert "free space there or point LLMSHIP_STATE_DIR at a larger disk" in message
    # Not retried: the task's retry condition lets a permanent error through at once.
    from llmship.errors import PermanentError

    assert isinstance(refused.value, PermanentError)
    # With room again, the same download works.
    assert download(source).files == len(list(DEMO.iterdir()))
