"""Signed versions on the real stack (issue 31): nothing is served that llmship did not build
and gate. Anyone with the writer's S3 keys can publish files and a manifest consistent with
each other; the rollback (through Prefect, as the UI starts it) and a replica refuse such a
version, and one signed with a key no longer trusted; a replica refuses a signed version with
one byte changed in one file. `llmship verify` reports each case, and the gateway serves the
live version throughout. After the serving modules in file order: these tests change no
alias."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from llmship import signing
from llmship.store import ArtifactStore
from llmship.versions import read_version, sign_version
from tests.helpers.prefect_api import run_deployment

pytestmark = [pytest.mark.stack, pytest.mark.slow]
MODEL = "tiny-llama"
BIN = Path(__file__).resolve().parents[1] / ".venv" / "orchestrator" / "bin"


def copy_version(store, source: str, version: str, note: str | None = None) -> str:
    """source's files and manifest under another id, written with the writer's keys only: a
    consistent version that no publish made (a note file makes its content, and so its node
    cache folder, its own)."""
    manifest = store.get_json(f"versions/{MODEL}/{source}/manifest.json")[0]
    manifest["key"] = version
    manifest["created_at"] = datetime.now(UTC).isoformat()  # the newest: first in the form
    for f in manifest["files"]:
        store.client.copy_object(
            Bucket=store.bucket,
            CopySource={
                "Bucket": store.bucket,
                "Key": f"versions/{MODEL}/{source}/files/{f['path']}",
            },
            Key=f"versions/{MODEL}/{version}/files/{f['path']}",
        )
    if note is not None:
        import hashlib

        store.client.put_object(
            Bucket=store.bucket,
            Key=f"versions/{MODEL}/{version}/files/note.txt",
            Body=note.encode(),
        )
        manifest["files"].append(
            {
                "path": "note.txt",
                "size": len(note),
                "sha256": hashlib.sha256(note.encode()).hexdigest(),
            }
        )
    store.put_json(f"versions/{MODEL}/{version}/manifest.json", manifest)
    return version


def llmship_verify(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "llmship"), "verify", MODEL, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def live_answers(stack, store, live: str) -> None:
    assert store.read_alias(MODEL, "live") == live
    resp = httpx.post(
        f"{stack.gateway_url}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": "Clause: The Vendor shall pay", "max_tokens": 4},
    )
    assert resp.status_code == 200 and resp.headers["x-llmship-version"] == live, resp.text


def refused_rollback(stack, version: str) -> str:
    """A rollback to version through its Prefect deployment, which must fail: its message.
    The form offers it (as it does every published version), saying it will be refused."""
    from prefect.client.orchestration import get_client

    from llmship.forms import offer_published_versions

    offer_published_versions(stack, MODEL)
    with get_client(sync_client=True) as client:
        form = client.read_deployment_by_name(f"rollback/{MODEL}").parameter_openapi_schema
    description = form["properties"]["target_version"]["description"]
    [line] = [line for line in description.splitlines() if f"`{version}`" in line]
    assert "NOT signed by a trusted key: refused" in line, description
    run = run_deployment(
        f"rollback/{MODEL}",
        timeout=300,
        parameters={
            "reason": "issue 31: a version llmship did not sign",
            "target_version": version,
        },
    )
    assert run.state.is_failed(), run.state
    return run.state.message


def replica_refusal(stack, version: str) -> str:
    """A replica of version deployed straight through the fleet (no rollout's check first):
    the error it stops with."""
    from llmship.errors import ServingError
    from serving import fleet

    spec = fleet.spec_for_version(
        MODEL, version, read_version(ArtifactStore(stack), MODEL, version).serve
    )
    with pytest.raises(ServingError) as refused:
        fleet.acquire(stack, spec, timeout_s=240)
    assert fleet.find(stack, MODEL, version) is None  # nothing of it left running
    return str(refused.value)


def test_a_version_published_with_the_writers_keys_alone_is_refused(
    first_run, stack, store, tmp_path
):
    live = store.read_alias(MODEL, "live")
    forged = copy_version(store, live, "unsigned0001")
    verify = llmship_verify(forged, cwd=tmp_path)
    assert verify.returncode == 2, verify.stdout + verify.stderr
    assert f"{MODEL} version {forged} is not signed" in verify.stdout
    message = refused_rollback(stack, forged)
    assert f"{forged} is not signed" in message, message
    live_answers(stack, store, live)
    assert "is not signed" in replica_refusal(stack, forged)
    live_answers(stack, store, live)


def test_a_signed_version_with_one_byte_changed_is_refused_where_it_is_loaded(
    first_run, stack, store, tmp_path
):
    live = store.read_alias(MODEL, "live")
    version = copy_version(store, live, "tampered0001", note="tampered0001")
    sign_version(store, MODEL, version)
    assert llmship_verify(version, cwd=tmp_path).returncode == 0
    key = f"versions/{MODEL}/{version}/files/config.json"
    data = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[10] ^= 1
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))
    verify = llmship_verify(version, cwd=tmp_path)
    assert verify.returncode == 2
    assert f"missing or changed since signed: {key}" in verify.stdout, verify.stdout
    # The manifest and its signature are intact: the replica's download finds the file.
    refusal = replica_refusal(stack, version)
    assert "config.json has sha256" in refusal and "the manifest says" in refusal, refusal
    live_answers(stack, store, live)


def test_a_streamed_version_with_one_byte_of_its_weights_changed_is_refused(
    first_run, stack, store
):
    """The replica streams the weights into the engine (serving/weight_stream.py): the file is
    never whole on the node to hash, and each tensor is checked against the signed manifest
    as it arrives. One flipped bit in one tensor stops the engine's start, naming it."""
    live = store.read_alias(MODEL, "live")
    version = copy_version(store, live, "tampered0002", note="tampered0002")
    sign_version(store, MODEL, version)
    manifest = store.read_manifest(f"versions/{MODEL}/{version}")
    [weights] = [f for f in manifest.files if f.path.endswith(".safetensors")]
    assert weights.tensors, "the publish recorded no tensor digests"
    key = f"versions/{MODEL}/{version}/files/{weights.path}"
    data = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
    data[len(data) - 100] ^= 1  # in the last tensor's bytes, past the header
    store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(data))
    refusal = replica_refusal(stack, version)
    assert "has BLAKE3" in refusal and "the manifest says" in refusal, refusal
    assert re.search(r"tensor \S+ has BLAKE3", refusal), refusal
    live_answers(stack, store, live)


def test_a_version_signed_by_a_key_no_longer_trusted_is_refused(first_run, stack, store, tmp_path):
    """Rotation: a new key signs while the old one's versions still serve; once a key is
    removed from the trusted ones, its versions are refused."""
    live = store.read_alias(MODEL, "live")
    new_key = stack.updated(signing={"key_file": tmp_path / "new-key.pem"})
    signing.ensure_signing_key(new_key)  # made, and trusted beside the pipeline's own key
    version = copy_version(store, live, "rotated00001")
    new_id = sign_version(ArtifactStore(new_key), MODEL, version)
    assert new_id != signing.key_id(signing.public_key_of(stack.signing_key_file))
    ok = llmship_verify(version, cwd=tmp_path)
    assert ok.returncode == 0 and f"key {new_id[:16]}" in ok.stdout, ok.stdout + ok.stderr
    # Both keys trusted at once: the live version, signed by the old one, verifies too.
    assert llmship_verify(live, cwd=tmp_path).returncode == 0
    signing.trusted_keys(stack)[new_id].unlink()
    verify = llmship_verify(version, cwd=tmp_path)
    assert verify.returncode == 2 and "not trusted" in verify.stdout, verify.stdout
    message = refused_rollback(stack, version)
    assert f"signed by key {new_id[:16]}" in message and "not trusted" in message, message
    live_answers(stack, store, live)
