"""Signed versions, without a stack (llmship/signing.py): the pipeline's key, the trusted keys
and their rotation, and that the signature is the OpenSSF Model Signing library's own: its
CLI verifies a folder holding a version's objects, and refuses it with one byte changed. The
stack tests (tests/test_signed_versions.py) take it through publish, the rollout, the
rollback, a replica and `llmship verify`."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmship import signing
from llmship.errors import SignatureRefused
from llmship.manifest import hash_dir
from llmship.settings import Settings

MODEL_SIGNING_CLI = Path(sys.executable).parent / "model_signing"


def version_folder(root: Path) -> Path:
    """What a downloaded version holds: files/, the reports, manifest.json."""
    folder = root / "tiny-llama-v1"
    (folder / "files" / "sub").mkdir(parents=True)
    (folder / "files" / "model.safetensors").write_bytes(os.urandom(4096))
    (folder / "files" / "sub" / "config.json").write_text('{"layers": 2}')
    (folder / "gate-report.json").write_text('{"passed": true}')
    (folder / "manifest.json").write_text('{"kind": "version", "key": "v1"}')
    return folder


def objects_of(folder: Path) -> dict[str, str]:
    return {e.path: e.sha256 for e in hash_dir(folder) if e.path != signing.SIGNATURE}


def settings_in(tmp_path: Path, **signing_settings) -> Settings:
    return Settings(state_dir=tmp_path / "state", signing=signing_settings)


def test_llmship_up_makes_a_private_key_and_trusts_its_public_key(tmp_path):
    settings = settings_in(tmp_path)
    key = signing.ensure_signing_key(settings)
    assert key == tmp_path / "state" / "signing" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    [(key_id, public)] = signing.trusted_keys(settings).items()
    assert key_id == signing.key_id(signing.public_key_of(key))
    assert b"PRIVATE" not in public.read_bytes()
    before = key.read_bytes()
    signing.ensure_signing_key(settings)  # a second `llmship up` keeps the key
    assert key.read_bytes() == before and len(signing.trusted_keys(settings)) == 1


def test_the_model_signing_cli_verifies_what_llmship_signed_and_refuses_a_changed_byte(tmp_path):
    settings = settings_in(tmp_path)
    key = signing.ensure_signing_key(settings)
    folder = version_folder(tmp_path)
    bundle = signing.sign(key, objects_of(folder), "tiny-llama")
    (folder / signing.SIGNATURE).write_bytes(bundle)
    [public] = signing.trusted_keys(settings).values()

    def cli_verify() -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                str(MODEL_SIGNING_CLI),
                "verify",
                "key",
                "--signature",
                str(folder / signing.SIGNATURE),
                "--public_key",
                str(public),
                str(folder),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    ok = cli_verify()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    weights = folder / "files" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    changed = cli_verify()
    assert changed.returncode != 0
    assert "files/model.safetensors" in changed.stdout + changed.stderr


def test_a_signature_verifies_with_any_trusted_key_and_not_after_its_key_is_removed(tmp_path):
    old = settings_in(tmp_path, key_file=tmp_path / "old.pem")
    new = settings_in(tmp_path, key_file=tmp_path / "new.pem")
    signing.ensure_signing_key(old)
    signing.ensure_signing_key(new)  # rotation: both trusted at once
    folder = version_folder(tmp_path)
    objects = objects_of(folder)
    signed_old = signing.sign(old.signing_key_file, objects, "m")
    signed_new = signing.sign(new.signing_key_file, objects, "m")
    trusted = signing.trusted_keys(old)
    assert len(trusted) == 2
    assert signing.verify(signed_old, trusted, "m v1").objects == objects
    assert signing.verify(signed_new, trusted, "m v1").objects == objects
    old_id = signing.key_id(signing.public_key_of(old.signing_key_file))
    trusted[old_id].unlink()  # the old key retired
    trusted = signing.trusted_keys(old)
    assert signing.verify(signed_new, trusted, "m v1").key_id != old_id
    with pytest.raises(SignatureRefused, match=f"m v1 is signed by key {old_id[:16]}.*not trusted"):
        signing.verify(signed_old, trusted, "m v1")


def test_a_bundle_changed_after_signing_or_not_a_bundle_is_refused(tmp_path):
    settings = settings_in(tmp_path)
    key = signing.ensure_signing_key(settings)
    trusted = signing.trusted_keys(settings)
    bundle = signing.sign(key, {"files/a": "00" * 32, "manifest.json": "11" * 32}, "m")
    # Someone with the writer's keys swaps a digest in the statement for their file's.
    import base64
    import json

    doc = json.loads(bundle)
    payload = json.loads(base64.b64decode(doc["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "22" * 32
    doc["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(SignatureRefused, match="does not verify.*changed after it was signed"):
        signing.verify(json.dumps(doc).encode(), trusted, "m v1")
    with pytest.raises(SignatureRefused, match="not a Sigstore bundle"):
        signing.verify(b'{"mediaType": "x"}', trusted, "m v1")
    with pytest.raises(SignatureRefused, match="no public key is trusted"):
        signing.verify(bundle, {}, "m v1")


def test_the_manifest_and_its_files_must_be_the_signed_ones(tmp_path):
    from llmship.manifest import FileEntry

    settings = settings_in(tmp_path)
    key = signing.ensure_signing_key(settings)
    manifest = b'{"kind": "version"}'
    files = [FileEntry(path="a.safetensors", size=3, sha256="ab" * 32)]
    objects = {
        "manifest.json": hashlib.sha256(manifest).hexdigest(),
        "files/a.safetensors": "ab" * 32,
    }
    verified = signing.verify(signing.sign(key, objects, "m"), signing.trusted_keys(settings), "v")
    signing.check_manifest(verified, manifest, files, "m v1")
    with pytest.raises(SignatureRefused, match="manifest.json is not the one that was signed"):
        signing.check_manifest(verified, manifest + b" ", files, "m v1")
    other = [FileEntry(path="a.safetensors", size=3, sha256="cd" * 32)]
    with pytest.raises(SignatureRefused, match="files differ from the signed ones.*a.safetensors"):
        signing.check_manifest(verified, manifest, other, "m v1")


def test_an_unreadable_signing_key_says_how_to_give_one(tmp_path):
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    with pytest.raises(SignatureRefused, match="LLMSHIP_SIGNING_KEY_FILE"):
        signing.public_key_of(bad)
