"""What an engine compiled for a version, kept beside the version in S3 for the next replica.

A vLLM server's cold start is mostly compilation: torch.compile's graphs, Inductor's kernels,
Triton's, FlashInfer's JIT modules (docs/GPU.md: 240 s for an 8B server's first start on an
H200, 56-72 s with warm caches). The engine keeps all of them in directories that the
replica points at one node folder per key (engine_cache_env). The key is what a compiled
artifact depends on: the version, the engine's and torch's versions, the device type, the
tensor parallel size and the engine's arguments. The first replica that compiles for a key
saves the folder to
s3://<artifacts>/compile-caches/<model>/<version>/<key>/; the next replica of the key, on any
node, restores it before its engine starts.

Never trusted blindly: a cache is restored only where its record names this exact key (a
record copied from another engine version or GPU is ignored, with the reason) and the archive's
sha256 matches the record. The engines check their own keys inside too (vLLM hashes its config
and code, Inductor its graph and ISA): a stale entry is recompiled, never run. Whether the
engine found what it needed shows without its log: a hit writes nothing new into the folder.

What this does not defend against: anyone who can write the compile-caches prefix can put
compiled code there that a replica loads (versions are signed, caches are not: a replica has
no signing key). Give that prefix the same write access as the versions.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import platform
import re
import shutil
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from llmship.contracts import ServeSpec
from llmship.errors import VersionConflict
from llmship.manifest import key_part, sha256_file
from llmship.serving_messages import CompileCacheUse
from llmship.settings import Settings
from llmship.store import COMPILE_CACHES_PREFIX, ArtifactStore
from llmship.subprocess_stage import tool_versions
from serving import engines

log = logging.getLogger("llmship.compile_cache")

RECORD = "record.json"
# What the engines compile, in the folder engine_cache_env gives them (vLLM's own folder also
# holds its model-inspection notes, which are no compilation and not kept).
COMPILED = ("vllm/torch_compile_cache", "inductor", "triton", "flashinfer")


class CacheKey(BaseModel):
    """What a compiled artifact depends on; one saved cache per key."""

    model: str
    version: str
    engine: str  # the target: vllm, trtllm
    engine_versions: dict[str, str]  # the engine's packages, as the serve environment has them
    device: str  # "nvidia-h200", "cpu-x86_64"
    tensor_parallel: int
    # The engine's arguments (the build's): the context length, the KV cache's dtype, the
    # batch size and eager or not change what is compiled.
    engine_args: list[str] = []

    @property
    def engine_part(self) -> str:
        """What every key of one engine build on one device type shares."""
        versions = "-".join(f"{p}{v}" for p, v in sorted(self.engine_versions.items()))
        return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.engine}-{versions}-{self.device}")

    @property
    def name(self) -> str:
        args = hashlib.sha256("\0".join(self.engine_args).encode()).hexdigest()[:8]
        return f"{self.engine_part}-tp{self.tensor_parallel}-args{args}"

    @property
    def prefix(self) -> str:
        model, version = key_part(self.model, "model"), key_part(self.version, "version")
        return f"{COMPILE_CACHES_PREFIX}/{model}/{version}/{self.name}"


class CacheRecord(BaseModel):
    """Written last, once, beside the archive: the commit mark of a saved cache."""

    key: CacheKey
    archive: str  # the archive's S3 key
    sha256: str
    files: int
    bytes: int
    made_by: str  # the replica that compiled it
    made_at: str


def device_type(settings: Settings, gpu_ids: list[str]) -> str:
    """The replica's device, as a key part: its first GPU's name, or the CPU's architecture."""
    if settings.device == "cpu" or not gpu_ids:
        return f"cpu-{platform.machine()}"
    from llmship.gpus import detect_gpus

    gpus = {str(g.index): g.name for g in detect_gpus()}
    name = gpus.get(gpu_ids[0], "gpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def engine_cache_env(folder: Path) -> dict[str, str]:
    """Where the engine writes what it compiles: every cache vLLM's start fills, in folder."""
    return {
        "VLLM_CACHE_ROOT": str(folder / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
        "FLASHINFER_WORKSPACE_BASE": str(folder / "flashinfer"),
    }


def files_in(folder: Path) -> set[str]:
    """The compiled files in a node folder, by their paths in it."""
    found = set()
    for part in COMPILED:
        for path in (folder / part).rglob("*"):
            if path.is_file():
                found.add(str(path.relative_to(folder)))
    return found


def node_folder(settings: Settings, key: CacheKey) -> Path:
    """The key's folder on this node: <node cache>/compile/<model>/<version>/<key name>."""
    return settings.node_cache / "compile" / key.prefix.removeprefix(f"{COMPILE_CACHES_PREFIX}/")


def restore(store: ArtifactStore, key: CacheKey, folder: Path) -> str:
    """The key's saved cache into folder, unless the node has it already; with none saved,
    the folder starts as a copy of the node's last used one of the same engine and device
    (seed_from_node). What happened beside a restore, or "" (files_in says what is there)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas of a node restore once, one at a time
        if files_in(folder):
            return ""
        found = store.get_json(f"{key.prefix}/{RECORD}")
        if found is None:
            return seed_from_node(key, folder)
        record = CacheRecord.model_validate(found[0])
        if record.key != key:
            return f"ignored the saved cache: made for {record.key.name}, not {key.name}"
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            archive = Path(tmp) / "cache.tar"
            store.client.download_file(
                store.bucket, record.archive, str(archive), Config=store.transfer
            )
            digest = sha256_file(archive)
            if digest != record.sha256:
                return (
                    f"ignored the saved cache: its archive's sha256 {digest[:12]} is not its "
                    f"record's {record.sha256[:12]}"
                )
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        return ""


def seed_from_node(key: CacheKey, folder: Path) -> str:
    """Copy into folder the node's most recently used compile folder of the same engine build
    and device: a new version of a model compiles mostly what the last one did (the engines
    find their own entries by their own hashes and leave the others unused), as the host-wide
    caches the engines keep by default would have let it. Copied, not linked: a JIT build may
    rewrite its output in place. "" where there is none, else what it started from."""
    root = folder.parents[2]  # <node cache>/compile
    others = [
        p
        for p in root.glob(f"*/*/{key.engine_part}-*")
        if p.is_dir() and p != folder and files_in(p)
    ]
    if not others:
        return ""
    last = max(others, key=lambda p: Path(f"{p}.lock").stat().st_mtime)
    shutil.copytree(last, folder, dirs_exist_ok=True)
    return f"started from this node's {last.relative_to(root)}"


def save(store: ArtifactStore, key: CacheKey, folder: Path, made_by: str) -> tuple[bool, str]:
    """The folder as the key's cache, unless one is saved already: (saved, why not)."""
    if store.get_json(f"{key.prefix}/{RECORD}") is not None:
        return False, ""
    files = sorted(files_in(folder))
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        archive = Path(tmp) / "cache.tar"
        with tarfile.open(archive, "w") as tar:
            for name in files:
                tar.add(folder / name, arcname=name, recursive=False)
        digest = sha256_file(archive)
        # Named by content: two replicas saving at once never overwrite each other's archive.
        archive_key = f"{key.prefix}/cache-{digest[:16]}.tar"
        store.client.upload_file(str(archive), store.bucket, archive_key, Config=store.transfer)
        record = CacheRecord(
            key=key,
            archive=archive_key,
            sha256=digest,
            files=len(files),
            bytes=archive.stat().st_size,
            made_by=made_by,
            made_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
    try:
        store.put_json(f"{key.prefix}/{RECORD}", record.model_dump(mode="json"), if_none_match=True)
    except VersionConflict:
        return False, "another replica saved its cache first"
    log.info("saved %d compiled files as %s (%d bytes)", len(files), archive_key, record.bytes)
    return True, ""


class ReplicaCompileCache:
    """One replica's part: restore before its engine starts, save once it is healthy. A cache
    is a shortcut, never a condition: S3 failing here costs the engine its compile, not the
    replica its start."""

    def __init__(self, settings: Settings, key: CacheKey) -> None:
        self.key = key
        self.folder = node_folder(settings, key)
        self.store = ArtifactStore(settings)
        self.restored: set[str] = set()
        self.note = ""

    @property
    def env(self) -> dict[str, str]:
        return engine_cache_env(self.folder)

    def restore(self) -> None:
        started = time.monotonic()
        try:
            self.note = restore(self.store, self.key, self.folder)
        except Exception as exc:  # noqa: BLE001 - the engine compiles instead
            self.note = f"could not restore: {type(exc).__name__}: {exc}"
        self.restored = files_in(self.folder)
        log.info(
            "compile cache %s: %d files ready in %.1f s%s",
            self.key.name,
            len(self.restored),
            time.monotonic() - started,
            f" ({self.note})" if self.note else "",
        )

    def keep(self, made_by: str) -> CompileCacheUse:
        """Save the folder where S3 has no cache for the key yet: what this engine compiled,
        or what it found on the node (a folder seeded, or left by a replica before)."""
        present = files_in(self.folder)
        added = present - self.restored
        saved = False
        if present:
            try:
                saved, why_not = save(self.store, self.key, self.folder, made_by)
            except Exception as exc:  # noqa: BLE001 - the next replica compiles too
                why_not = f"could not save: {type(exc).__name__}: {exc}"
            self.note = self.note or why_not
        return CompileCacheUse(
            key=self.key.name,
            restored_files=len(self.restored),
            added_files=len(added),
            saved=saved,
            note=self.note,
        )


def for_replica(
    settings: Settings, model: str, version: str, serve: ServeSpec, gpu_ids: list[str]
) -> ReplicaCompileCache | None:
    """The replica's compile cache, restored; None where settings turn caches off."""
    if not settings.ray.compile_caches:
        return None
    engine = engines.engine_for(serve.target)
    key = CacheKey(
        model=model,
        version=version,
        engine=serve.target.value,
        engine_versions=tool_versions(engines.python_for(settings, serve.target), engine.tools),
        device=device_type(settings, gpu_ids),
        tensor_parallel=engines.tensor_parallel_size(serve.engine_args),
        engine_args=serve.engine_args,
    )
    cache = ReplicaCompileCache(settings, key)
    cache.restore()
    return cache
