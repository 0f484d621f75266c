"""Published versions and their lineage: the one module that reads them back from the store.

versions/<model>/<version>/manifest.json   inputs: VersionInputs, details: VersionDetails
versions/<model>/<version>/signature.sig   the pipeline's signature of it all (llmship/signing.py)
version -> build (BuildInputs) -> calibrated checkpoint (CalibrateInputs) -> data digest
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator

from llmship import signing
from llmship.contracts import BuildInputs, CalibrateInputs, ServeSpec
from llmship.errors import (
    BadAlias,
    BadVersionManifest,
    IntegrityError,
    SignatureRefused,
    UngatedVersion,
    UnpublishedVersion,
    UnsafeKey,
)
from llmship.manifest import Manifest
from llmship.store import MANIFEST, Alias, ArtifactStore, key_part, version_prefix


class VersionInputs(BaseModel):
    build: str  # the build's prefix under stages/build/
    build_digest: str
    gate_report: str
    perf_report: str | None = None
    candidates_report: str | None = None  # the recipe search that picked it


class VersionDetails(BaseModel):
    model: str
    version: str
    gate_passed: bool
    perf_passed: bool | None = None  # None: no performance limit judged it (off, or none set)
    scheme: str
    recipe: str | None = None  # the recipe that won its search (CalibrationConfig.describe)
    # The domain data its search's calibrated recipes saw, dataset file -> sha256: what
    # recalibrate compares (an UNQUANTIZED winner was calibrated on nothing itself).
    calibration_data: dict[str, str] = {}
    precision: str | None = None
    serve: ServeSpec
    gate: dict[str, dict[str, float]] = {}  # task -> baseline, candidate, threshold
    perf: dict[str, dict[str, Any]] | None = None  # "<load> <figure>" -> baseline, candidate

    @model_validator(mode="before")
    @classmethod
    def _serve_from_flat_details(cls, data: Any) -> Any:
        """Versions published before ServeSpec kept target, engine_args and serve_subdir flat."""
        if isinstance(data, dict) and "serve" not in data:
            data = data | {
                "serve": {
                    k: data[k] for k in ("target", "engine_args", "serve_subdir") if k in data
                }
            }
        return data

    @property
    def throughput_ratio(self) -> float | None:
        """The candidate's output tokens/s over the baseline's, at the production load."""
        figure = (self.perf or {}).get("production output tokens/s")
        return figure["candidate"] / figure["baseline"] if figure and figure["baseline"] else None


class PublishedVersion(BaseModel):
    model: str
    version: str
    prefix: str
    digest: str
    files: int
    bytes: int
    gate_passed: bool
    perf_passed: bool | None  # None: no performance limit judged it (off, or none set)
    scheme: str
    serve: ServeSpec
    created_at: str
    recipe: str | None = None
    throughput_ratio: float | None = None
    # The trusted key whose signature it carries, where that was checked (read_signed_version).
    signed_by: str | None = None

    @classmethod
    def from_manifest(cls, model: str, manifest: Manifest) -> PublishedVersion:
        """A published version as its manifest in the store describes it."""
        try:
            details = VersionDetails.model_validate(manifest.details)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in ("details", *first["loc"]))
            raise BadVersionManifest(
                f"{model} version {manifest.key} cannot be served: its manifest "
                f"({version_prefix(model, manifest.key)}/{MANIFEST}) has no valid {where} "
                f"({first['msg']}; {exc.error_count()} problem(s)). Publish it again from its "
                "build, or pick another version (`llmship versions "
                f"{model}`)"
            ) from exc
        return cls(
            model=model,
            version=manifest.key,
            prefix=version_prefix(model, manifest.key),
            digest=manifest.digest,
            files=len(manifest.files),
            bytes=manifest.total_bytes,
            gate_passed=details.gate_passed,
            perf_passed=details.perf_passed,
            scheme=details.scheme,
            serve=details.serve,
            created_at=manifest.created_at,
            recipe=details.recipe,
            throughput_ratio=details.throughput_ratio,
        )


def read_version(store: ArtifactStore, model: str, version: str) -> PublishedVersion | None:
    """The version, if it is published (its manifest exists)."""
    manifest = store.read_manifest(version_prefix(model, version))
    return PublishedVersion.from_manifest(model, manifest) if manifest else None


def read_signed_version(store: ArtifactStore, model: str, version: str) -> PublishedVersion | None:
    """The version, if it is published, signed by a trusted key, and its manifest and files
    are the ones signed (llmship/signing.py); SignatureRefused says what failed."""
    found = store.read_manifest_bytes(version_prefix(model, version))
    if found is None:
        return None
    manifest, raw = found
    published = PublishedVersion.from_manifest(model, manifest)
    verified = check_signature(store, model, version, manifest, raw)
    return published.model_copy(update={"signed_by": verified.key_id})


def signature_problem(store: ArtifactStore, version: PublishedVersion) -> str | None:
    """Why the rollout would refuse version for its signature; None when it would take it."""
    try:
        read_signed_version(store, version.model, version.version)
    except SignatureRefused as exc:
        return str(exc)
    return None


def check_signature(
    store: ArtifactStore, model: str, version: str, manifest: Manifest, raw: bytes
) -> signing.Verified:
    prefix = version_prefix(model, version)
    what = f"{model} version {version}"
    bundle = store.get_bytes(f"{prefix}/{signing.SIGNATURE}")
    if bundle is None:
        raise SignatureRefused(
            f"{what} is not signed (no {prefix}/{signing.SIGNATURE}): llmship's pipeline signs "
            "every version it publishes, so this one was written by someone else. Publish it "
            f"from its build (a build-and-serve run), or pick a signed one (`llmship versions "
            f"{model}`)"
        )
    verified = signing.verify(bundle[0], signing.trusted_keys(store.settings), what)
    signing.check_manifest(verified, raw, manifest.files, what)
    return verified


def version_objects(
    store: ArtifactStore, prefix: str, manifest: Manifest, raw: bytes
) -> dict[str, str]:
    """Every object of a published version but its signature, name -> sha256: the files'
    from the manifest (the publish checked them), the manifest's and the reports' read."""
    objects = {f"files/{f.path}": f.sha256 for f in manifest.files}
    objects[MANIFEST] = signing.sha256_hex(raw)
    for key in store.list_keys(f"{prefix}/"):
        name = key.removeprefix(f"{prefix}/")
        if not name.startswith("files/") and name not in (MANIFEST, signing.SIGNATURE):
            objects[name] = signing.sha256_hex(store.get_bytes(key)[0])
    return objects


def sign_version(store: ArtifactStore, model: str, version: str) -> str:
    """Sign a published version with the pipeline's key (settings.signing_key_file), unless a
    trusted key signed it as it is already: a publish run again signs nothing twice. Returns
    the key id that signs it."""
    prefix = version_prefix(model, version)
    found = store.read_manifest_bytes(prefix)
    if found is None:
        raise UnpublishedVersion(f"{model} {version} has no manifest under {prefix}: not signed")
    manifest, raw = found
    try:
        return check_signature(store, model, version, manifest, raw).key_id
    except SignatureRefused as exc:
        if store.get_bytes(f"{prefix}/{signing.SIGNATURE}") is not None:
            # A version's objects are written once (a production bucket enforces it).
            raise SignatureRefused(
                f"{exc}. Its signature is not replaced: delete {prefix}/{signing.SIGNATURE} "
                "with the admin's keys to sign it again"
            ) from None
    key_file = store.settings.signing_key_file
    key_id = signing.key_id(signing.public_key_of(key_file))
    bundle = signing.sign(key_file, version_objects(store, prefix, manifest, raw), model)
    store.put_json(f"{prefix}/{signing.SIGNATURE}", json.loads(bundle), if_none_match=True)
    return key_id


class VersionScan(BaseModel):
    """A model's published versions that can be read, oldest first, and what is wrong with
    each one that cannot (its id -> the problem)."""

    versions: list[PublishedVersion] = []
    unreadable: dict[str, str] = {}


def scan_versions(store: ArtifactStore, model: str) -> VersionScan:
    """Every published version of a model, each read on its own: one bad manifest is named,
    not a reason to show none."""
    scan = VersionScan()
    for key in store.list_keys(f"versions/{key_part(model, 'model')}/"):
        if key.endswith(f"/{MANIFEST}") and key.count("/") == 3:
            name = key.split("/")[2]
            try:
                manifest = store.read_manifest(key.rsplit("/", 1)[0])
                if manifest:
                    scan.versions.append(PublishedVersion.from_manifest(model, manifest))
            except (IntegrityError, ValueError) as exc:  # ValueError: not JSON at all
                scan.unreadable[name] = str(exc)
    scan.versions.sort(key=lambda v: v.created_at)
    return scan


def list_versions(store: ArtifactStore, model: str) -> list[PublishedVersion]:
    """Published versions of a model, oldest first: those whose manifest exists and reads."""
    return scan_versions(store, model).versions


def check_servable(
    stored: PublishedVersion | None, model: str, version: str, allow_ungated: bool
) -> PublishedVersion:
    """The one rule for what may take traffic, for a rollout or rollback and for a gateway
    that starts from the live alias: a published version whose gate passed, or one an
    operator's allow_ungated override put there. UngatedVersion says why not."""
    if stored is None:
        raise UngatedVersion(
            f"{model} {version} is not a published version (no manifest under "
            f"{version_prefix(model, version)}): nothing reaches traffic without one"
        )
    if not stored.gate_passed and not allow_ungated:
        raise UngatedVersion(
            f"{model} {version} has no passing gate record: nothing reaches "
            "traffic without one. Pass allow_ungated=true (the rollback form's override) to "
            "serve it anyway"
        )
    return stored


class LiveChoice(BaseModel):
    """What a gateway that starts serves of a model, from its live alias: the version, or
    None, and each version refused on the way, with why."""

    version: str | None = None
    refused: dict[str, str] = {}  # version -> why it may not serve
    ungated_override: bool = False  # the version is served by an operator's override


def choose_live(store: ArtifactStore, model: str, alias: Alias) -> LiveChoice:
    """The alias's version if check_servable lets it serve (the alias's own record of an
    allow_ungated override counts as the override); else the version live before it (the
    alias's `previous`, then the `previous` alias), which must have passed its gate."""
    choice = LiveChoice()
    candidates = [(alias.version, alias.ungated_override)]
    try:
        earlier = [alias.previous, store.read_alias(model, "previous")]
    except BadAlias as exc:
        earlier = [alias.previous]
        choice.refused["previous alias"] = str(exc)
    candidates += [(v, False) for v in earlier if v and v != alias.version]
    for version, override in dict.fromkeys(candidates):
        try:
            check_servable(read_signed_version(store, model, version), model, version, override)
        except (UngatedVersion, IntegrityError, UnsafeKey) as exc:
            choice.refused[version] = str(exc)
            continue
        choice.version, choice.ungated_override = version, override
        break
    return choice


def calibration_of_build(store: ArtifactStore, build_prefix: str) -> CalibrateInputs | None:
    """What a build's checkpoint was calibrated from; None for a build of the snapshot itself
    (UNQUANTIZED, or the baseline), which saw no calibration data."""
    build = store.read_manifest(build_prefix)
    if build is None:
        return None
    checkpoint = store.read_manifest(BuildInputs.model_validate(build.inputs).checkpoint)
    if checkpoint is None or checkpoint.kind != CalibrateInputs.stage:
        return None
    return CalibrateInputs.model_validate(checkpoint.inputs)


class Check(BaseModel):
    """One finding of `llmship verify`."""

    what: str
    ok: bool
    detail: str


def verify_stored(store: ArtifactStore, model: str, version: str) -> list[Check]:
    """What `llmship verify` finds of a version in the store: its signature against the
    trusted keys, its manifest against the signed bytes, every stored object read again and
    hashed against the signed digest (and nothing else under the version), its gates'
    verdicts."""
    prefix = version_prefix(key_part(model, "model"), key_part(version, "version"))
    found = store.read_manifest_bytes(prefix)
    if found is None:
        return [Check(what="published", ok=False, detail=f"no {prefix}/{MANIFEST}")]
    manifest, raw = found
    try:
        verified = check_signature(store, model, version, manifest, raw)
    except SignatureRefused as exc:
        return [Check(what="signature", ok=False, detail=str(exc))]
    key_file = signing.trusted_keys(store.settings)[verified.key_id]
    checks = [
        Check(what="signature", ok=True, detail=f"key {verified.key_id[:16]} ({key_file})"),
        Check(what="manifest", ok=True, detail="the signed bytes, listing the signed files"),
    ]
    stored = set(store.list_keys(f"{prefix}/")) - {f"{prefix}/{signing.SIGNATURE}"}
    signed = {f"{prefix}/{name}": digest for name, digest in verified.objects.items()}
    changed = [
        key
        for key, digest in sorted(signed.items())
        if key not in stored
        or (not key.endswith(f"/{MANIFEST}") and store.sha256_of(key) != digest)
    ]
    unsigned = sorted(stored - set(signed))
    problems = [f"missing or changed since signed: {', '.join(changed)}"] if changed else []
    problems += [f"not signed: {', '.join(unsigned)}"] if unsigned else []
    mb = manifest.total_bytes / 1e6
    checks.append(
        Check(
            what="objects",
            ok=not problems,
            detail="; ".join(problems) or f"{len(signed)} read again, each as signed ({mb:.1f} MB)",
        )
    )
    details = VersionDetails.model_validate(manifest.details)
    scores = ", ".join(
        f"{task} {v['candidate']:.3f} (baseline {v['baseline']:.3f})"
        for task, v in details.gate.items()
    )
    gate = "passed" if details.gate_passed else "FAILED"
    checks.append(Check(what="gate", ok=details.gate_passed, detail=f"{gate} {scores}".strip()))
    perf = {None: "off or not judged", True: "passed", False: "FAILED"}[details.perf_passed]
    checks.append(Check(what="performance gate", ok=details.perf_passed is not False, detail=perf))
    return checks
