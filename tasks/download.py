"""Stage 1, download: a model source to a verified snapshot in the artifact store.

Sources:
    hf://org/name@revision   the Hugging Face hub through huggingface_hub, pinned to a revision
    s3://bucket/prefix       a team's mirror of hub models
    /a/local/path            a directory on the worker
The snapshot is stored under stages/download/<key>/ with a manifest holding every file's sha256.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

from prefect import get_run_logger, task

from llmship.contracts import DownloadInputs, Snapshot, SnapshotDetails
from llmship.errors import DiskFull, SourceNotFound
from llmship.hub import hub_errors, hub_offline, split_hf
from llmship.settings import get_settings
from llmship.store import ArtifactStore, parse_s3_uri
from tasks.common import (
    RETRIES,
    RETRY_DELAYS,
    cache_key,
    produce,
    record_stage_artifact,
    retry_unless_permanent,
)

# Weights, config and tokenizer only: hub repos also carry original/ checkpoints (Llama 3's
# consolidated.pth doubles the download) and assets no stage reads.
ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.txt",
    "*.py",
]
IGNORE_PATTERNS = ["original/*", "*.pth", "*.bin", "*.gguf", "*.onnx"]


def download_inputs(source: str) -> DownloadInputs:
    """The source and what identifies its content, cheaply: a hub revision pinned to a commit
    is immutable; a mirror is identified by its objects' ETags, a local directory by its
    files' sizes and modification times."""
    if source.startswith("hf://"):
        return DownloadInputs(source=source, fingerprint={})
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_uri(source)
        objects = ArtifactStore(get_settings()).list_mirror(bucket, prefix)
        return DownloadInputs(source=source, fingerprint={"objects": objects})
    if not Path(source).is_dir():
        raise SourceNotFound(
            f"{source} is not a directory: give a model directory, "
            "hf://org/name@revision or s3://bucket/prefix"
        )
    root = Path(source)
    return DownloadInputs(
        source=str(root.resolve()),
        fingerprint={
            "files": sorted(
                (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file()
            )
        },
    )


def fetch_hf(source: str, dest: Path) -> dict:
    from huggingface_hub import snapshot_download

    repo, revision = split_hf(source)
    with hub_errors(repo, revision, "the snapshot", offline=hub_offline()):
        # Through the hub cache (HF_HUB_CACHE): a worker fetches each revision once, and an
        # offline worker can use what a team pre-seeded there.
        path = snapshot_download(
            repo_id=repo,
            revision=revision,
            allow_patterns=ALLOW_PATTERNS,
            ignore_patterns=IGNORE_PATTERNS,
        )
    # The cache holds symlinks into its blob store; the snapshot gets the files themselves.
    shutil.copytree(
        path, dest, symlinks=False, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".cache")
    )
    return {"repo": repo, "revision": revision}


def fetch_s3(source: str, dest: Path) -> dict:
    bucket, prefix = parse_s3_uri(source)
    keys = ArtifactStore(get_settings()).download_mirror(bucket, prefix, dest)
    return {"bucket": bucket, "prefix": prefix, "objects": len(keys)}


def fetch_path(source: str, dest: Path) -> dict:
    root = Path(source)
    if not root.is_dir():
        raise SourceNotFound(
            f"{source} is not a directory: give a model directory, "
            "hf://org/name@revision or s3://bucket/prefix"
        )
    shutil.copytree(root, dest, dirs_exist_ok=True)
    return {"path": str(root.resolve())}


def _out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT (a full disk or quota) or EFBIG (a file-size limit), however wrapped."""
    full = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in full:
            return True
        if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list):
            # copytree: [(src, dst, "[Errno 28] No space left on device: ..."), ...]
            if any(f"[Errno {code}]" in str(why) for *_, why in e.args[0] for code in full):
                return True
        todo += [e.__cause__, e.__context__]
    return False


def fetch(source: str, dest: Path) -> SnapshotDetails:
    """Fetch the source into dest and check it is a model."""
    fetch_from = (
        fetch_hf
        if source.startswith("hf://")
        else (fetch_s3 if source.startswith("s3://") else fetch_path)
    )
    try:
        origin = fetch_from(source, dest)
    except OSError as exc:
        # copytree gathers its failures into one shutil.Error; s3transfer wraps the OSError.
        if not _out_of_space(exc):
            raise
        shutil.rmtree(dest, ignore_errors=True)
        free = shutil.disk_usage(dest.parent).free
        raise DiskFull(
            f"the disk ran out while downloading {source} into {dest} ({free / 1e6:.0f} MB "
            f"free now, after removing the partial copy): free space there or point "
            f"LLMSHIP_STATE_DIR at a larger disk, then run again. Nothing was kept"
        ) from exc
    if not (dest / "config.json").is_file():
        raise SourceNotFound(f"{source} holds no config.json: it is not a model directory")
    return SnapshotDetails(origin=origin)


def download(source: str) -> Snapshot:
    """The source as a verified snapshot in the store, with its manifest."""

    def make(dest: Path):
        started = time.monotonic()
        return fetch(source, dest), {"fetch": time.monotonic() - started}

    return produce(download_inputs(source), Snapshot, make)


@task(
    name="download",
    retries=RETRIES,
    retry_delay_seconds=RETRY_DELAYS,
    retry_condition_fn=retry_unless_permanent,
    cache_key_fn=cache_key(lambda p: download_inputs(p["source"]).key),
    persist_result=True,
)
def download_task(source: str, model: str) -> Snapshot:
    out = download(source)
    get_run_logger().info(
        "snapshot of %s: %d files, %.1f MB, sha256 %s",
        source,
        out.files,
        out.bytes / 1e6,
        out.digest[:16],
    )
    record_stage_artifact(
        model, out, {"source": source}, f"Snapshot of {source}, every file hashed"
    )
    return out
