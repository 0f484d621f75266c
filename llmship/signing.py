"""Signed versions: nothing is served that llmship did not build and gate (docs/SECURITY.md).

At publish the pipeline signs each version with the OpenSSF Model Signing library
(model_signing): a Sigstore bundle, stored beside the version as signature.sig, whose in-toto
statement lists every object of the version with its sha256: the files, the gate's and the
performance gate's reports, and manifest.json, which records the inputs' digests, the tools'
versions, both gates' verdicts and the engine's settings (so the signature is the version's
provenance). The files' digests are the ones the publish already has: signing reads no
weight again, a 70B version is signed in milliseconds. The statement is the one
model_signing makes hashing a folder that holds the version's objects, so its own CLI checks a
downloaded copy:
`model_signing verify key --signature signature.sig --public_key key.pub <folder>`.

Where a version is loaded (a replica's fetch, a rollout or rollback before any traffic
moves, a restarted gateway's reconcile, `llmship verify`) the signature is checked against
the trusted public keys (every *.pub in settings.trusted_keys_dir; more than one at once, so a
new key can sign while versions signed with the old one still serve; a key removed refuses
its versions), then the manifest's bytes against their signed digest and its list of files
against the signed one. The download checks every file's sha256 against that list as it
writes the file.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from pydantic import BaseModel

from llmship.errors import SignatureRefused
from llmship.manifest import FileEntry
from llmship.processes import write_private
from llmship.settings import Settings

log = logging.getLogger("llmship.signing")

SIGNATURE = "signature.sig"
MANIFEST_OBJECT = "manifest.json"
HASH = "sha256"


def key_id(public_key) -> str:
    """model_signing's name for a public key (its bundles' key hint): the sha256 of its PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def ensure_signing_key(settings: Settings) -> Path:
    """The pipeline's signing key (EC P-256, PEM, mode 600), made at the first `llmship up`,
    and its public key among the trusted ones."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = settings.signing_key_file
    if not path.exists():
        private = ec.generate_private_key(ec.SECP256R1())
        write_private(
            path,
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        )
        log.info("made the signing key %s", path)
    trust(settings, public_key_of(path))
    return path


def public_key_of(key_file: Path):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(key_file.read_bytes(), None).public_key()
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureRefused(
            f"cannot read the signing key {key_file} ({type(exc).__name__}): nothing can be "
            "published. `llmship up` makes one; elsewhere set LLMSHIP_SIGNING_KEY_FILE to a "
            "PEM EC private key (P-256, unencrypted) from where the team keeps keys"
        ) from None


def trust(settings: Settings, public_key) -> Path:
    """Add a public key to the trusted ones (as <key id>.pub): versions it signed may serve."""
    from cryptography.hazmat.primitives import serialization

    folder = settings.trusted_keys_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key_id(public_key)[:16]}.pub"
    if not path.exists():
        path.write_bytes(
            public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    return path


def trusted_keys(settings: Settings) -> dict[str, Path]:
    """Key id -> the file of every trusted public key; an unreadable file is skipped, said."""
    from cryptography.hazmat.primitives import serialization

    found: dict[str, Path] = {}
    folder = settings.trusted_keys_dir
    for path in sorted(folder.glob("*.pub")) if folder.is_dir() else []:
        try:
            found[key_id(serialization.load_pem_public_key(path.read_bytes()))] = path
        except (OSError, ValueError) as exc:
            log.warning("%s is not a PEM public key (%s): not trusted", path, exc)
    return found


def statement_of(objects: dict[str, str], name: str):
    """The model_signing manifest of a version's objects (name -> sha256 hex): what
    model_signing's file serialization makes of a folder holding them, without reading them."""
    from model_signing import manifest as ms_manifest
    from model_signing._hashing.hashing import Digest

    # model_signing builds these from a folder it hashes; llmship has the digests already.
    serialization = ms_manifest._FileSerialization(HASH, allow_symlinks=False)
    return ms_manifest.Manifest(
        name,
        [
            ms_manifest.FileManifestItem(path=Path(path), digest=Digest(HASH, bytes.fromhex(d)))
            for path, d in sorted(objects.items())
        ],
        serialization,
    )


def sign(key_file: Path, objects: dict[str, str], name: str) -> bytes:
    """A Sigstore bundle over objects (name -> sha256 hex), signed with key_file."""
    from model_signing._signing import sign_ec_key, signing

    signature = sign_ec_key.Signer(key_file).sign(signing.Payload(statement_of(objects, name)))
    return signature.bundle.to_json().encode()


class Verified(BaseModel):
    """What a good signature says: the key that made it, and every object it covers."""

    key_id: str
    objects: dict[str, str]  # name -> sha256 hex


def verify(bundle: bytes, trusted: dict[str, Path], what: str) -> Verified:
    """The objects a bundle signs, if one of the trusted keys made it; SignatureRefused
    naming what failed otherwise."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SIGNATURE
        path.write_bytes(bundle)
        try:
            signature = sign_sigstore_pb.Signature.read(path)
            hint = signature.bundle.verification_material.public_key.hint
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SignatureRefused(
                f"{what}: its {SIGNATURE} is not a Sigstore bundle ({type(exc).__name__})"
            ) from None
    if not trusted:
        raise SignatureRefused(
            f"{what}: no public key is trusted (the folder LLMSHIP_SIGNING_TRUSTED_KEYS_DIR "
            "holds none): `llmship up` trusts the pipeline's own"
        )
    if hint not in trusted:
        raise SignatureRefused(
            f"{what} is signed by key {str(hint)[:16]}, which is not trusted (trusted: "
            f"{', '.join(k[:16] for k in trusted)}): it was not published by this pipeline, "
            "or its key was removed"
        )
    try:
        statement = sign_ec_key.Verifier(trusted[hint]).verify(signature)
    except Exception as exc:  # noqa: BLE001 - the library raises several kinds on a bad bundle
        raise SignatureRefused(
            f"{what}: its signature does not verify with key {hint[:16]} "
            f"({type(exc).__name__}): it was changed after it was signed"
        ) from None
    return Verified(
        key_id=hint,
        objects={r.identifier: r.digest.digest_hex for r in statement.resource_descriptors()},
    )


def check_manifest(
    verified: Verified, manifest_bytes: bytes, files: list[FileEntry], what: str
) -> None:
    """The manifest is the one signed, byte for byte, and lists the signed files with the
    signed digests: the download then checks every file against it."""
    if verified.objects.get(MANIFEST_OBJECT) != sha256_hex(manifest_bytes):
        raise SignatureRefused(
            f"{what}: its {MANIFEST_OBJECT} is not the one that was signed: it was changed "
            "after publish (republish from its build)"
        )
    listed = {f"files/{f.path}": f.sha256 for f in files}
    signed = {k: v for k, v in verified.objects.items() if k.startswith("files/")}
    if listed != signed:
        changed = sorted(set(listed.items()) ^ set(signed.items()))
        raise SignatureRefused(
            f"{what}: its manifest's files differ from the signed ones "
            f"({', '.join(sorted({k for k, _ in changed})[:5])})"
        )


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
