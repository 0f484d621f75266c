"""Published versions and their lineage: the one module that reads them back from the store.

versions/<model>/<version>/manifest.json   inputs: VersionInputs, details: VersionDetails
version -> build (BuildInputs) -> calibrated checkpoint (CalibrateInputs) -> data digest
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

from llmship.contracts import BuildInputs, CalibrateInputs, ServeSpec
from llmship.manifest import Manifest
from llmship.store import MANIFEST, ArtifactStore, key_part, version_prefix


class VersionInputs(BaseModel):
    build: str  # the build's prefix under stages/build/
    build_digest: str
    gate_report: str
    perf_report: str | None = None


class VersionDetails(BaseModel):
    model: str
    version: str
    gate_passed: bool
    perf_passed: bool | None = None  # None: no performance limit judged it (off, or none set)
    scheme: str
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
    throughput_ratio: float | None = None

    @classmethod
    def from_manifest(cls, model: str, manifest: Manifest) -> PublishedVersion:
        """A published version as its manifest in the store describes it."""
        details = VersionDetails.model_validate(manifest.details)
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
            throughput_ratio=details.throughput_ratio,
        )


def read_version(store: ArtifactStore, model: str, version: str) -> PublishedVersion | None:
    """The version, if it is published (its manifest exists)."""
    manifest = store.read_manifest(version_prefix(model, version))
    return PublishedVersion.from_manifest(model, manifest) if manifest else None


def list_versions(store: ArtifactStore, model: str) -> list[PublishedVersion]:
    """Published versions of a model, oldest first: those whose manifest exists."""
    found = []
    for key in store.list_keys(f"versions/{key_part(model, 'model')}/"):
        if key.endswith(f"/{MANIFEST}") and key.count("/") == 3:
            manifest = store.read_manifest(key.rsplit("/", 1)[0])
            if manifest:
                found.append(PublishedVersion.from_manifest(model, manifest))
    return sorted(found, key=lambda v: v.created_at)


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


def calibration_of_version(
    store: ArtifactStore, model: str, version: str
) -> CalibrateInputs | None:
    manifest = store.read_manifest(version_prefix(model, version))
    if manifest is None:
        return None
    return calibration_of_build(store, VersionInputs.model_validate(manifest.inputs).build)
