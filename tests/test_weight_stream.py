"""Streamed weights, checked tensor by tensor (serving/weight_stream.py; issue 32 item 1),
short of a server: the tensor digests the upload takes as it reads a safetensors file
(llmship/tensor_hashes.py), and, in the serve environment with the real Run:ai Model Streamer
and vLLM, the check a streaming engine runs and the plugin that gives vLLM its load format.
tests/test_signed_versions.py streams a published version from the stack's S3 into a replica;
tests/test_pipeline.py checks the demo's rollout streamed."""

from __future__ import annotations

import json
import random
import struct
import subprocess
from pathlib import Path

import blake3
import pytest

from llmship.hashing_io import HashingReader
from llmship.manifest import FileEntry, Manifest
from llmship.tensor_hashes import TensorHashes
from serving import weight_stream

REPO = Path(__file__).resolve().parents[1]
SERVE_PYTHON = REPO / ".venv" / "serve" / "bin" / "python"


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file as its format says: header length, JSON header, data."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


TENSORS = {
    "embed": ("BF16", [16, 8], random.Random(1).randbytes(256)),
    "norm": ("F32", [8], random.Random(2).randbytes(32)),
    "empty": ("F16", [0, 4], b""),
    "scale": ("F32", [], random.Random(3).randbytes(4)),
    "proj": ("BF16", [8, 64], random.Random(4).randbytes(1024)),
}


def digests_of(data: bytes, chunks: list[int]) -> dict | None:
    hashes, at = TensorHashes(), 0
    for size in chunks:
        hashes.update(data[at : at + size])
        at += size
    hashes.update(data[at:])
    return hashes.result()


@pytest.mark.parametrize("seed", range(8))
def test_each_tensor_is_hashed_from_the_file_read_in_any_pieces(seed):
    data = safetensors_bytes(TENSORS)
    rng = random.Random(seed)
    chunks = [rng.choice([1, 3, 7, 8, 64, 500]) for _ in range(200)]
    found = digests_of(data, chunks)
    assert set(found) == set(TENSORS)
    for name, (dtype, shape, raw) in TENSORS.items():
        assert (found[name].dtype, found[name].shape) == (dtype, shape)
        assert found[name].blake3 == blake3.blake3(raw).hexdigest()


def test_a_file_that_is_not_whole_safetensors_gets_no_tensor_digests():
    data = safetensors_bytes(TENSORS)
    assert digests_of(data[:-1], []) is None  # cut short: the last tensor is not all there
    assert digests_of(b"not a safetensors file, though named one", []) is None
    assert digests_of(struct.pack("<Q", 2**40) + b"{}", []) is None  # a header past the limit
    overlapping = data.replace(b'"data_offsets": [256, 288]', b'"data_offsets": [200, 232]')
    assert overlapping != data and digests_of(overlapping, []) is None


def test_the_upload_reader_records_a_safetensors_file_s_tensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(TENSORS))
    (tmp_path / "config.json").write_text("{}")
    entries = {}
    for name in ("model.safetensors", "config.json"):
        reader = HashingReader(tmp_path / name)
        while reader.read(100):
            pass
        reader.close()
        entries[name] = reader.entry(name)
    assert set(entries["model.safetensors"].tensors) == set(TENSORS)
    assert entries["config.json"].tensors is None


def test_a_version_without_tensor_digests_is_not_streamed_and_says_why():
    files = [FileEntry(path="model.safetensors", size=1, sha256="0" * 64)]
    reason = weight_stream.why_not_streamed(Manifest(kind="version", key="v", files=files))
    assert "publish the version again to stream it" in reason


CHECK = r"""
import json, sys
from pathlib import Path
from runai_model_streamer import SafetensorsStreamer
from serving.weight_stream import StreamPlan, WeightsRefused, verified

path, plan = sys.argv[1], StreamPlan.model_validate_json(Path(sys.argv[2]).read_text())
got = []
try:
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([path], device="cpu")
        for name, tensor in verified(streamer.get_tensors(), plan):
            got.append(name)
    print(json.dumps({"loaded": sorted(got)}))
except WeightsRefused as exc:
    print(json.dumps({"refused": str(exc), "loaded": got}))
"""


def stream_check(tmp_path: Path, data: bytes, expected: dict) -> dict:
    """verified() over the real streamer's read of data, in the serve environment."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    plan = weight_stream.StreamPlan(
        what="m v1", endpoint="", region="", files=[{"uri": str(path), "tensors": expected}]
    )
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    out = subprocess.run(
        [str(SERVE_PYTHON), "-c", CHECK, str(path), str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_streaming_engine_gets_only_tensors_the_manifest_lists_as_they_are(tmp_path):
    data = safetensors_bytes(TENSORS)
    expected = digests_of(data, [])
    assert stream_check(tmp_path, data, expected) == {"loaded": sorted(TENSORS)}

    # One bit of one tensor: refused, naming it, before the model has it.
    changed = bytearray(data)
    changed[len(data) - 1] ^= 1  # proj's last byte
    result = stream_check(tmp_path, bytes(changed), expected)
    assert "tensor proj has BLAKE3" in result["refused"] and "proj" not in result["loaded"]

    # A tensor the manifest does not list, one it lists that never comes, a changed dtype.
    fewer = {k: v for k, v in expected.items() if k != "norm"}
    assert (
        "tensor norm but the manifest does not list it"
        in stream_check(tmp_path, data, fewer)["refused"]
    )
    more = {**expected, "extra": expected["norm"]}
    assert (
        "1 tensor(s) the manifest lists never came" in stream_check(tmp_path, data, more)["refused"]
    )
    retyped = {**expected, "norm": expected["norm"].model_copy(update={"dtype": "I32"})}
    refused = stream_check(tmp_path, data, retyped)["refused"]
    assert "tensor norm came as torch.float32 [8], the manifest says I32 [8]" in refused


PLUGIN = r"""
import sys
from vllm.config.load import LoadConfig
from vllm.plugins import load_general_plugins
from vllm.model_executor.model_loader import get_model_loader
load_general_plugins()
loader = get_model_loader(
    LoadConfig(load_format=sys.argv[1], model_loader_extra_config={"plan": sys.argv[2]})
)
print(type(loader).__name__, loader.plan.what)
"""


def test_vllm_finds_the_load_format_through_the_plugin_folder_a_replica_gives_it(tmp_path):
    site = weight_stream.plugin_site(tmp_path / "plugins")
    plan = weight_stream.StreamPlan(what="m v1", endpoint="", region="", files=[])
    (tmp_path / "plan.json").write_text(plan.model_dump_json())
    run = [str(SERVE_PYTHON), "-c", PLUGIN, weight_stream.LOAD_FORMAT, str(tmp_path / "plan.json")]
    found = subprocess.run(
        run,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{site}:{REPO}", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert found.returncode == 0, found.stderr[-3000:]
    assert "VerifiedStreamLoader m v1" in found.stdout, found.stdout[-2000:]
    # Without the folder on its path, vLLM has no such load format: what a replica reports.
    without = subprocess.run(
        run,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert f"`{weight_stream.LOAD_FORMAT}` is not supported" in without.stderr, without.stderr[
        -2000:
    ]
