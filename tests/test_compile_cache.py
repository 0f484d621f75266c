"""A replica keeps what its engine compiled beside the version in S3, and the next replica of
the same key, on another node, starts from it (serving/compile_cache.py; issue 32 item 2).

The engines here are the real vLLM CPU server, started as a replica starts it (start_engine,
wait_healthy), without --enforce-eager so that it compiles (torch.compile with Inductor's C++
kernels); two node caches stand in for two nodes. The store is the stack's SeaweedFS.
"""

from __future__ import annotations

import json
import tarfile
import uuid
from pathlib import Path

import httpx
import pytest

from llmship.contracts import ServeSpec
from llmship.stack import as_identity
from serving import compile_cache
from serving.cold_start import engine_phases
from serving.replica import ReplicaSpec, start_engine, wait_healthy

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "demo" / "tiny-llama"
# The demo's arguments less --enforce-eager: the engine compiles.
SERVE = ServeSpec(engine_args=["--dtype", "bfloat16", "--max-model-len", "512"])


def on_node(settings, node: Path):
    """A replica's settings on a node: its own node cache, and the serving identity (S3's
    reader, whose one write is the compile caches' prefix), as a replica under Ray has."""
    creds = json.loads(settings.credentials_file.read_text())
    return as_identity(settings, creds, "reader").updated(ray={"node_cache_dir": node})


def start_replica(settings, spec: ReplicaSpec, work: Path, name: str):
    """A replica's start, as serving/replica.py does it: (what it did with the cache, the
    engine's init seconds by its own log)."""
    cache = compile_cache.for_replica(settings, spec.model, spec.version, spec.serve, [])
    log_path = work / f"{name}.log"
    engine, url = start_engine(settings, spec, MODEL_DIR, log_path, work / name, cache.env)
    try:
        wait_healthy(settings, spec, engine, url, log_path)
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": spec.model, "prompt": "Clause 1:", "max_tokens": 4},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
    finally:
        engine.terminate()
        engine.wait(timeout=60)
    return cache.keep(name), engine_phases(log_path.read_text(errors="replace")).init_s


def test_a_second_replica_starts_from_what_the_first_compiled(stack, store, tmp_path):
    version = f"cc-{uuid.uuid4().hex[:8]}"
    spec = ReplicaSpec(
        app="compile-cache",
        model="cc-model",
        version=version,
        role="serving",
        prefix="-",
        serve=SERVE,
    )

    first, first_init = start_replica(on_node(stack, tmp_path / "node-a"), spec, tmp_path, "a")
    assert first.restored_files == 0 and first.added_files > 0 and first.saved, first
    assert first.describe() == f"miss: {first.added_files} files compiled, saved"
    key = compile_cache.CacheKey.model_validate(
        store.get_json(f"compile-caches/cc-model/{version}/{first.key}/record.json")[0]["key"]
    )
    assert key.engine_versions["vllm"] and key.device.startswith("cpu-")
    assert key.tensor_parallel == 1 and key.engine_args == SERVE.engine_args

    # Another node: nothing of the first's on its disk; the cache comes from S3, and the
    # engine finds in it all it needs (it compiles nothing: no file added to the folder).
    second, second_init = start_replica(on_node(stack, tmp_path / "node-b"), spec, tmp_path, "b")
    assert second.restored_files == first.added_files and second.added_files == 0, second
    assert not second.saved and second.describe().startswith("hit: ")

    # A new version on the first node: nothing saved for it yet, so its folder starts from
    # the node's last one of the same engine (a new version compiles what the last did); the
    # engine compiles nothing, and the folder is saved as the new version's cache.
    newer = spec.model_copy(update={"version": f"{version}-2"})
    third, third_init = start_replica(on_node(stack, tmp_path / "node-a"), newer, tmp_path, "c")
    assert third.restored_files == first.added_files and third.added_files == 0, third
    assert third.saved and third.note == f"started from this node's cc-model/{version}/{first.key}"
    print(
        f"engine init: {first_init} s compiling, {second_init} s from the restored cache, "
        f"{third_init} s from the node's last folder"
    )


def test_a_cache_that_does_not_match_its_key_is_ignored(stack, store, tmp_path):
    """A cache saved for another engine version is not this one's; a record copied under this
    key from another, or an archive that is not the one its record names, is ignored."""
    made = tmp_path / "made"
    (made / "inductor" / "ab").mkdir(parents=True)
    (made / "inductor" / "ab" / "kernel.so").write_bytes(b"compiled")
    ours = compile_cache.CacheKey(
        model="cc-model",
        version=f"cc-{uuid.uuid4().hex[:8]}",
        engine="vllm",
        engine_versions={"torch": "2.10.0", "vllm": "0.32.0"},
        device="cpu-x86_64",
        tensor_parallel=1,
    )
    other_engine = ours.model_copy(update={"engine_versions": {"torch": "2.10.0", "vllm": "0.33"}})
    assert compile_cache.save(store, other_engine, made, "replica-x") == (True, "")

    # Another engine version's cache is under another key: nothing to restore.
    assert compile_cache.restore(store, ours, tmp_path / "n1") == ""
    assert compile_cache.files_in(tmp_path / "n1") == set()

    # Its record copied under this key: ignored, and said why.
    copied = store.get_json(f"{other_engine.prefix}/record.json")[0]
    store.put_json(f"{ours.prefix}/record.json", copied)
    note = compile_cache.restore(store, ours, tmp_path / "n2")
    assert note.startswith(f"ignored the saved cache: made for {other_engine.name},")
    assert "vllm0.33" in other_engine.name
    assert compile_cache.files_in(tmp_path / "n2") == set()

    # A record naming this key whose archive was replaced: ignored, by the archive's digest.
    third = ours.model_copy(update={"tensor_parallel": 2})
    assert compile_cache.save(store, third, made, "replica-y")[0]
    record = store.get_json(f"{third.prefix}/record.json")[0]
    swapped = tmp_path / "swapped.tar"
    (tmp_path / "evil.so").write_bytes(b"not what was compiled")
    with tarfile.open(swapped, "w") as tar:
        tar.add(tmp_path / "evil.so", arcname="inductor/ab/kernel.so")
    store.client.upload_file(str(swapped), store.bucket, record["archive"])
    note = compile_cache.restore(store, third, tmp_path / "n3")
    assert "sha256" in note and compile_cache.files_in(tmp_path / "n3") == set()

    # The one saved first stays: a second save of a key changes nothing.
    assert compile_cache.save(store, other_engine, made, "replica-z") == (False, "")
