"""Each byte of a file read once in a transfer: the file hashed as boto3's transfer manager reads
it for an upload (HashingReader; a safetensors file's tensors too, each alone), and as it
writes it on a download (HashingWriter), both given as streams so that s3transfer reads and
writes them in order; the sha256 and size are checked against the manifest's entry before the
file is used."""

from __future__ import annotations

import hashlib
from pathlib import Path

from s3transfer.subscribers import BaseSubscriber

from llmship.errors import IntegrityError
from llmship.manifest import FileEntry
from llmship.tensor_hashes import TensorHashes


class HashingReader:
    """A file as a stream that hashes what is read from it. Not seekable, so s3transfer reads
    it once, front to back, and keeps each part in memory for its retries."""

    def __init__(self, path: Path) -> None:
        self.path, self.size, self._sha = path, 0, hashlib.sha256()
        self._file = None  # opened on the first read: hundreds of files wait in the queue
        self._tensors = TensorHashes() if path.suffix == ".safetensors" else None

    def read(self, amount: int = -1) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb")
        data = self._file.read(amount)
        self._sha.update(data)
        if self._tensors is not None:
            self._tensors.update(data)
        self.size += len(data)
        return data

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def entry(self, relative: str) -> FileEntry:
        tensors = self._tensors.result() if self._tensors is not None else None
        return FileEntry(
            path=relative, size=self.size, sha256=self._sha.hexdigest(), tensors=tensors
        )


class HashingWriter(BaseSubscriber):
    """A file being downloaded, hashing what is written to it. Not seekable, so s3transfer
    writes the parts in order (it holds early ones in memory, a bounded number).

    A retried GET must not add its bytes after those of the attempt it replaces. For an object
    fetched in ranged parts s3transfer's own queue drops the bytes a retried part sends again.
    An object under the multipart threshold is fetched by one GET whose bytes s3transfer
    writes straight through, and a retry starts that GET again from byte 0: what it tells
    its subscribers then (negative progress) restarts this file."""

    def __init__(self, path: Path, *, single_get: bool) -> None:
        self.path, self.size, self._sha = path, 0, hashlib.sha256()
        self._file = None
        self._single_get = single_get

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
        if bytes_transferred < 0 and self._single_get:
            self.restart()

    def restart(self) -> None:
        """Forget what was written: the next write is byte 0 again."""
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
        self.size, self._sha = 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self._file is None:
            self._file = self.path.open("wb")
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        """Finish the file once its download completed: an empty object has no write."""
        if self._file is None:
            self.path.touch()
        else:
            self._file.close()

    def abandon(self) -> None:
        """Let go of the file of a download that failed (it is deleted with the rest)."""
        if self._file is not None:
            self._file.close()

    def check(self, entry: FileEntry) -> None:
        actual = self._sha.hexdigest()
        if self.size != entry.size or actual != entry.sha256:
            raise IntegrityError(
                f"{self.path} has sha256 {actual} ({self.size} bytes), the manifest says "
                f"{entry.sha256} ({entry.size} bytes): the stored file was changed or "
                "corrupted, and nothing fetched was kept. Publish it again from its source"
            )
