"""What the stages hand each other: typed inputs and outputs, stored in the manifests.

Every content-addressed stage (download, calibrate, build) has
    an inputs model   everything its output depends on; the digest of it is the output's
                      content address (`key`), and its manifest records that same model;
    an output model   where the output is in the store and what it holds (`details`, typed).
A stage reads another's output through these models, never through a manifest's keys.
The version a build becomes, and its lineage back to the calibration data, are in
llmship/versions.py.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel

from llmship.manifest import Manifest, digest_of
from llmship.pipeline_config import CalibrationConfig, Scheme, Target


class ServeSpec(BaseModel):
    """What a build hands to serving: the engine, its arguments (what follows the model path,
    host and port) and the part of the artifact the server loads. Carried by the build, the
    version's manifest and the published version."""

    target: Target = Target.VLLM
    engine_args: list[str] = []
    serve_subdir: str | None = None  # inside the artifact, if not all of it


class Side(str, Enum):
    """Which side of the gates a build is on. The candidate's server, as it will serve, is
    kept for the rollout; the baseline's only for the performance gate."""

    CANDIDATE = "candidate"
    BASELINE = "baseline"


# ------------------------------------------------------------------ inputs


class StageInputs(BaseModel):
    """Everything a stage's output depends on."""

    stage: ClassVar[str]
    tools: dict[str, str] = {}  # versions of the libraries that make the output

    @property
    def key(self) -> str:
        """The content address: the same inputs give the same output, wherever made."""
        return digest_of({"stage": self.stage, **self.model_dump(mode="json")})[:24]

    @property
    def prefix(self) -> str:
        return f"stages/{self.stage}/{self.key}"


class DownloadInputs(StageInputs):
    stage: ClassVar[str] = "download"
    source: str
    # What identifies the source's content, cheaply: a pinned hub revision is immutable; a
    # mirror has its objects' ETags, a local directory its files' sizes and times.
    fingerprint: dict[str, Any]


class CalibrateInputs(StageInputs):
    stage: ClassVar[str] = "calibrate"
    snapshot: str  # prefix of the download stage's output
    snapshot_digest: str
    calibration: CalibrationConfig
    target: Target
    export: dict[str, Any]  # what of the serving config shapes the checkpoint itself
    calibration_data: str  # <dataset>/calibration.jsonl
    calibration_data_sha256: str
    device: str


class BuildInputs(StageInputs):
    stage: ClassVar[str] = "build"
    checkpoint: str  # prefix of the calibrated checkpoint (the snapshot, for the baseline)
    checkpoint_digest: str
    target: Target
    serving: dict[str, Any]  # ServingConfig.build_inputs(): what of serving shapes a build
    device: str


# ------------------------------------------------------------------ outputs


class SnapshotDetails(BaseModel):
    origin: dict[str, Any]  # repo and revision, bucket and prefix, or path


class CheckpointDetails(BaseModel):
    scheme: Scheme
    samples: int = 0
    quantizer: str | None = None  # None: UNQUANTIZED, the snapshot itself
    kv_cache_fp8: bool = False
    peak_gpu_memory_gib: float | None = None
    quantization_config: dict[str, Any] = {}


class BuildDetails(BaseModel):
    scheme: Scheme
    precision: str  # "bfloat16", or the quantization's weight/activation format
    quantization_format: str | None  # compressed-tensors format, or "modelopt"
    serve: ServeSpec
    smoke_output: str


class StageOutput(BaseModel):
    """A finished stage's output in the store: where it is and what it holds."""

    stage: str
    key: str  # content address of the inputs
    prefix: str  # in the artifacts bucket
    digest: str  # of the files' content
    files: int
    bytes: int

    @classmethod
    def from_manifest(cls, prefix: str, manifest: Manifest):
        return cls(
            stage=manifest.kind,
            key=manifest.key,
            prefix=prefix,
            digest=manifest.digest,
            files=len(manifest.files),
            bytes=manifest.total_bytes,
            **({"details": manifest.details} if "details" in cls.model_fields else {}),
        )


class Snapshot(StageOutput):
    details: SnapshotDetails


class Checkpoint(StageOutput):
    details: CheckpointDetails


class Build(StageOutput):
    details: BuildDetails

    @property
    def version(self) -> str:
        """The id a build is published under: its content digest, so the same bytes are the
        same version wherever and whenever they were built."""
        return self.digest[:12]
