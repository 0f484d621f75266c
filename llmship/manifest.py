"""Manifests: what a stage made, from what, with which tools, and the sha256 of every file.

A manifest is written last. Whoever finds one knows the files it lists are complete; whoever
finds files without one knows nothing and treats them as absent.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from llmship.errors import UnsafeKey

CHUNK = 8 * 1024 * 1024


KEY_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def key_part(value: str, what: str) -> str:
    """value, if it can be one segment of a store key (a model name, a version, an alias).

    Keys are built from names that reach llmship from flow parameters and the CLI: 'a/../b'
    or '..' would read or move another model's versions or aliases.
    """
    if not isinstance(value, str) or not KEY_PART.fullmatch(value) or ".." in value:
        raise UnsafeKey(
            f"{what} {value!r} cannot name anything in the store: use letters, "
            "digits, '.', '_' and '-' (no '/' and no '..'), at most 128"
        )
    return value


def inside_path(path: str, what: str = "file path") -> str:
    """path, if it names something inside a directory: relative, forward slashes, no '..'.

    Manifests and mirror listings come from the store, which anyone with write access can
    change: a path such as '../../.ssh/authorized_keys' must not reach the local disk.
    """
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise UnsafeKey(
            f"{what} {path!r} would leave its directory: a stored file's path must "
            "be relative, with '/' between names and no '.' or '..' parts"
        )
    return path


class TensorDigest(BaseModel):
    """One tensor of a safetensors file, as its header names it, and the BLAKE3 of its bytes:
    a cryptographic hash four times sha256's speed on one core (docs/BENCHMARKS.md), which a
    replica computes for every tensor it streams (serving/weight_stream.py)."""

    dtype: str  # safetensors' name for it: "BF16", "F8_E4M3", ...
    shape: list[int]
    blake3: str = Field(pattern=r"^[0-9a-f]{64}$")


class FileEntry(BaseModel):
    path: str  # relative, with forward slashes
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # A safetensors file's tensors, each hashed as the upload read the file
    # (llmship/tensor_hashes.py): what a replica that streams the weights checks
    # (serving/weight_stream.py). None for other files, and in manifests made before.
    tensors: dict[str, TensorDigest] | None = None

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        return inside_path(v)


class Manifest(BaseModel):
    kind: str  # the stage ("download", "calibrate", ...) or "version"
    key: str  # the content address: a digest of the inputs
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    inputs: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)
    tool_versions: dict[str, str] = Field(default_factory=dict)
    timings_s: dict[str, float] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    files: list[FileEntry] = Field(default_factory=list)

    @property
    def digest(self) -> str:
        """The digest of the content: the same files give the same digest, whatever made them."""
        return files_digest(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def relative_files(root: Path) -> list[str]:
    """Every file under root, as the paths a manifest lists: relative, '/'-separated, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def hash_dir(root: Path) -> list[FileEntry]:
    return [
        FileEntry(path=path, size=(root / path).stat().st_size, sha256=sha256_file(root / path))
        for path in relative_files(root)
    ]


def files_digest(files: list[FileEntry]) -> str:
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def digest_of(obj: Any) -> str:
    """A stable digest of JSON-able data: the content address of a stage's inputs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
