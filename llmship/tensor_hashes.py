"""The BLAKE3 of each tensor of a safetensors file, taken from the file's bytes in order as the
upload reads them (llmship/hashing_io.py: HashingReader), so that publishing reads no weight
twice. A replica that streams a version's weights from S3 (serving/weight_stream.py) checks
each tensor it receives against these, without a second read of the file: the file's own
sha256 cannot be checked by a reader that gets tensors, not the file's bytes in order.

A safetensors file is 8 bytes (the header's length, little-endian), a JSON header naming each
tensor's dtype, shape and [begin, end) byte offsets in the data that follows, then the data.
A file whose header is not that (or whose tensors overlap or run past its end) gets no tensor
digests: it is still uploaded, hashed and served, only not streamed.
"""

from __future__ import annotations

import json
import struct

import blake3

from llmship.manifest import TensorDigest

# safetensors' own limit on the header (its Rust parser's MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000


class _Tensor:
    def __init__(self, name: str, dtype: str, shape: list[int], begin: int, end: int) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape
        self.begin, self.end = begin, end
        self.hash = blake3.blake3()


def parse_header(header: bytes) -> list[_Tensor] | None:
    """The tensors a header names, sorted by where their bytes start; None if it is not a
    safetensors header whose tensors tile the data without overlapping."""
    try:
        document = json.loads(header)
        tensors = [
            _Tensor(name, str(t["dtype"]), [int(d) for d in t["shape"]], *t["data_offsets"])
            for name, t in document.items()
            if name != "__metadata__"
        ]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    tensors.sort(key=lambda t: (t.begin, t.end))
    previous_end = 0
    for t in tensors:
        if not (isinstance(t.begin, int) and isinstance(t.end, int)) or t.begin < previous_end:
            return None
        if t.end < t.begin or any(d < 0 for d in t.shape):
            return None
        previous_end = t.end
    return tensors


class TensorHashes:
    """Fed a safetensors file's bytes in order (update), the digest of each tensor (result)."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._tensors: list[_Tensor] | None = None
        self._data_start = 0
        self._position = 0  # offset in the file of the next byte update gets
        self._next = 0  # index of the first tensor not yet hashed to its end
        self._refused = False

    def update(self, data: bytes) -> None:
        if self._refused or not data:
            return
        view = memoryview(data)
        if self._tensors is None:
            view = self._read_header(view)
            if view is None:
                return
        self._hash_data(view)

    def _read_header(self, view: memoryview) -> memoryview | None:
        """The bytes of view after the header once the header is complete, else None."""
        needed = 8 if len(self._head) < 8 else 8 + struct.unpack("<Q", self._head[:8])[0]
        while True:
            take = max(0, needed - len(self._head))
            self._head += view[:take]
            view = view[take:]
            self._position += take
            if len(self._head) < needed:
                return None
            if needed > 8:
                break
            length = struct.unpack("<Q", self._head[:8])[0]
            if length > MAX_HEADER_BYTES:
                self._refused = True
                return None
            needed = 8 + length
        self._tensors = parse_header(bytes(self._head[8:]))
        self._head = bytearray()
        if self._tensors is None:
            self._refused = True
            return None
        self._data_start = self._position
        return view

    def _hash_data(self, view: memoryview) -> None:
        start = self._position - self._data_start  # offset in the data section
        stop = start + len(view)
        tensors = self._tensors
        i = self._next
        while i < len(tensors) and tensors[i].begin < stop:
            t = tensors[i]
            low, high = max(t.begin, start), min(t.end, stop)
            if high > low:
                t.hash.update(view[low - start : high - start])
            if t.end > stop:
                break
            i += 1
        self._next = i
        self._position += len(view)

    def result(self) -> dict[str, TensorDigest] | None:
        """Each tensor's digest, once every tensor's bytes were fed; None otherwise."""
        if self._refused or self._tensors is None:
            return None
        data_length = self._position - self._data_start
        if any(t.end > data_length for t in self._tensors):
            return None
        return {
            t.name: TensorDigest(dtype=t.dtype, shape=t.shape, blake3=t.hash.hexdigest())
            for t in self._tensors
        }
