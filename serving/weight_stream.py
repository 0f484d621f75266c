"""Weights streamed from S3 into the engine, each tensor checked as it arrives (issue 32).

Where a version can be streamed, a replica fetches only the small files (config, tokenizer)
to its node, checked against the manifest like any fetch, and starts vLLM on that folder with
the load format that serving/vllm_plugin.py registers: vLLM reads the weights straight from
S3 with the Run:ai Model Streamer, as the replica's read-only identity, and every tensor is
checked before the model gets it. The check needs no second read: the version's manifest
(whose signature the replica checked) records each safetensors tensor's dtype, shape and
BLAKE3, taken as the publish read the file (llmship/tensor_hashes.py), and the streamer
hands over each tensor's bytes as stored. A tensor that differs, one the manifest does not
list, and one it lists that never came all refuse the start (WeightsRefused): the engine
exits, the replica fails, Ray tries again, the version's other replicas serve on.

The plan (StreamPlan) is written by the replica, on its node, from the checked manifest:
the engine trusts nothing it reads from S3 but the tensors' bytes, and checks those.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from llmship.manifest import FileEntry, Manifest, TensorDigest

log = logging.getLogger("llmship.weight_stream")

LOAD_FORMAT = "llmship_verified_stream"
PLUGIN_ENTRY = f"{LOAD_FORMAT} = serving.vllm_plugin:register"
PLAN_FILE = "llmship-stream-plan.json"
# Tensors being hashed while the streamer reads on: their bytes held at most, and threads.
HASH_WINDOW_BYTES = 1 << 30
HASH_THREADS = 4

# torch's dtypes by safetensors' names (safetensors/src/tensor.rs), as str(torch.dtype).
TORCH_DTYPES = {
    "BOOL": "torch.bool",
    "U8": "torch.uint8",
    "I8": "torch.int8",
    "I16": "torch.int16",
    "U16": "torch.uint16",
    "I32": "torch.int32",
    "U32": "torch.uint32",
    "I64": "torch.int64",
    "U64": "torch.uint64",
    "F16": "torch.float16",
    "BF16": "torch.bfloat16",
    "F32": "torch.float32",
    "F64": "torch.float64",
    "F8_E4M3": "torch.float8_e4m3fn",
    "F8_E5M2": "torch.float8_e5m2",
}


class WeightsRefused(ValueError):
    """A streamed tensor is not the one the manifest lists: the engine does not start."""

    # How the replica finds it in the engine's log (serving/replica.py: wait_healthy).
    marker = "WeightsRefused: "


class StreamedFile(BaseModel):
    uri: str  # s3://bucket/key of the safetensors file
    tensors: dict[str, TensorDigest]


class StreamPlan(BaseModel):
    """What the engine streams, and what each tensor must be."""

    what: str  # "<model> <version>", for messages
    endpoint: str
    region: str
    files: list[StreamedFile]

    def expected(self) -> dict[str, TensorDigest]:
        names: dict[str, TensorDigest] = {}
        for f in self.files:
            for name, digest in f.tensors.items():
                if name in names:
                    raise WeightsRefused(
                        f"{self.what}: tensor {name} is in two files of the manifest; "
                        "publish the version again from its build"
                    )
                names[name] = digest
        return names


def weight_files(manifest: Manifest) -> list[FileEntry]:
    return [f for f in manifest.files if f.path.endswith(".safetensors")]


def why_not_streamed(manifest: Manifest) -> str | None:
    """Why the manifest's weights cannot be streamed and checked; None where they can."""
    weights = weight_files(manifest)
    if not weights:
        return "no safetensors files"
    unhashed = [f.path for f in weights if not f.tensors]
    if unhashed:
        return (
            f"the manifest has no tensor digests for {unhashed[0]} (published before "
            "llmship recorded them): publish the version again to stream it"
        )
    return None


def plan_for(
    manifest: Manifest, bucket: str, prefix: str, endpoint: str, region: str, what: str
) -> StreamPlan:
    return StreamPlan(
        what=what,
        endpoint=endpoint,
        region=region,
        files=[
            StreamedFile(uri=f"s3://{bucket}/{prefix}/files/{f.path}", tensors=f.tensors or {})
            for f in weight_files(manifest)
        ],
    )


def loader_args(plan_path: Path) -> list[str]:
    """vLLM's arguments that load the weights as plan_path says (serving/vllm_plugin.py)."""
    return [
        "--load-format",
        LOAD_FORMAT,
        "--model-loader-extra-config",
        json.dumps({"plan": str(plan_path)}),
    ]


def plugin_site(folder: Path) -> Path:
    """A folder that, on the engine's PYTHONPATH, makes vLLM load serving/vllm_plugin.py in
    each of its processes: the distribution metadata of an installed plugin (its entry point
    in vLLM's `vllm.general_plugins` group), without installing into the engine's
    environment, which may be a team's own image."""
    info = folder / "llmship_engine_plugins-1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llmship-engine-plugins\nVersion: 1\n"
    )
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN_ENTRY}\n")
    return folder


# ------------------------------------------------------------------ in the engine


def tensor_blake3(tensor: Any) -> str:
    """The BLAKE3 of a torch tensor's bytes as stored (blake3 lets go of the GIL)."""
    import blake3
    import torch

    return blake3.blake3(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def verified(
    tensors: Iterable[tuple[str, Any]],
    plan: StreamPlan,
    digest: Callable[[Any], str] = tensor_blake3,
    say: Callable[..., None] = log.info,
) -> Iterator[tuple[str, Any]]:
    """tensors, each given on only once its dtype, shape and BLAKE3 are the manifest's.

    Hashing runs in threads while the streamer reads on: up to HASH_WINDOW_BYTES of tensors
    wait for their digest, so checking costs the load little more than the slowest of
    reading and hashing."""
    expected = plan.expected()
    seen: set[str] = set()
    pending: deque[tuple[str, Any, Future]] = deque()
    waiting = 0
    started, total = time.monotonic(), 0
    with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="llmship-hash") as pool:
        for name, tensor in tensors:
            _check_header(plan, expected, seen, name, tensor)
            size = _size(tensor)
            pending.append((name, tensor, pool.submit(digest, tensor)))
            waiting += size
            total += size
            while pending and (waiting > HASH_WINDOW_BYTES or len(pending) > 4 * HASH_THREADS):
                waiting -= _size(pending[0][1])
                yield _checked(plan, expected, *pending.popleft())
        while pending:
            yield _checked(plan, expected, *pending.popleft())
    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightsRefused(
            f"{plan.what}: {len(missing)} tensor(s) the manifest lists never came "
            f"from S3 (first: {missing[0]}); the stored files were changed: publish the "
            "version again from its build"
        )
    say(
        "llmship: %d tensors (%.1f MB) streamed from S3 and checked against the manifest in %.2f s",
        len(seen),
        total / 1e6,
        time.monotonic() - started,
    )


def _size(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def _check_header(
    plan: StreamPlan, expected: dict[str, TensorDigest], seen: set[str], name: str, tensor: Any
) -> None:
    want = expected.get(name)
    if want is None or name in seen:
        said = "twice" if want else "but the manifest does not list it"
        raise WeightsRefused(
            f"{plan.what}: S3 sent tensor {name} {said}; the stored files were changed: "
            "publish the version again from its build"
        )
    seen.add(name)
    got_dtype, got_shape = str(tensor.dtype), list(tensor.shape)
    if TORCH_DTYPES.get(want.dtype) != got_dtype or got_shape != want.shape:
        raise WeightsRefused(
            f"{plan.what}: tensor {name} came as {got_dtype} {got_shape}, the manifest "
            f"says {want.dtype} {want.shape}; the stored files were changed: "
            "publish the version again from its build"
        )


def _checked(
    plan: StreamPlan, expected: dict[str, TensorDigest], name: str, tensor: Any, hashed: Future
) -> tuple[str, Any]:
    got = hashed.result()
    if got != expected[name].blake3:
        raise WeightsRefused(
            f"{plan.what}: tensor {name} has BLAKE3 {got[:16]}..., the manifest says "
            f"{expected[name].blake3[:16]}...; the stored weights were changed or corrupted "
            "and the engine did not start. Publish the version again from its build"
        )
    return name, tensor
