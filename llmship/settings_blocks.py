"""The blocks of llmship's Settings (llmship/settings.py, the one place configuration lives):
the gateway's, S3's, Ray's, the stage environments' and signing's settings, each read from
flat LLMSHIP_* variables (LLMSHIP_GATEWAY_PORT -> settings.gateway.port)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.types import PositiveFloat, StringConstraints

REPO_ROOT = Path(__file__).resolve().parents[1]


class _Block(BaseModel):
    """One block of Settings. Its fields keep the flat environment variables they had before
    the blocks: env_prefix and the field's name in capitals, or the name in env_names."""

    # Blocks hold secrets too (keys, the admin token): a refused value is never echoed back.
    # A misspelt field is refused, not ignored: the setting would silently keep its default.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)
    env_prefix: ClassVar[str]
    env_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.env_names.get(field, f"{cls.env_prefix}{field.upper()}")


class GatewaySettings(_Block):
    """The gateway (serving/gateway/): its port, how it follows the fleet, its limits, its
    health checks of the live versions, and shadow traffic."""

    env_prefix: ClassVar[str] = "LLMSHIP_GATEWAY_"

    port: int = 8000
    # How often the gateway asks the fleet where each version's replicas are, and how long a
    # starting gateway waits for the first answer before it takes requests.
    endpoint_refresh_s: float = Field(0.5, gt=0)
    # Several gateways can relay to one fleet (behind a load balancer): each tells the fleet
    # it is up at every refresh, and the rollout drives and judges those heard from within
    # this long. A gateway stopped or dead drops out after it.
    seen_within_s: float = Field(10.0, gt=0)
    fleet_wait_s: float = Field(20.0, ge=0)
    admin_token: str | None = None
    # Past this many requests in flight the gateway answers 429 at once rather than queueing
    # without bound: memory stays bounded and clients back off (Retry-After). A request takes
    # one slot per completion it asks for (prompts x n): the engine's work, not the request,
    # is what fills the batch everyone shares.
    max_in_flight: int = Field(256, ge=1)
    # At most this many completions (prompts x n) in one request, else 400: one request of
    # 512 prompts x n=2 made a concurrent 8-token request wait 10 s. Clients split a big batch
    # into several requests, which the in-flight limit then shares out fairly.
    max_choices_per_request: int = Field(64, ge=1)
    # A response write (a relayed chunk, an answer) the client does not take within this is
    # given up: the connection is dropped, the model server's answer abandoned, the slot
    # freed. A client that never reads held its slots, and the engine's work, for ever.
    send_timeout_s: float = Field(30.0, gt=0)
    # A request body past this is refused with 413 before it is read into memory. A long
    # context (128k tokens) of text is some 0.5 MB: this leaves room for that and no more.
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # A client must send its request line and headers within this (else 408, closed), and
    # its body within body_timeout_s. A slow client holds its connection, never an in-flight
    # slot: a request takes one only once it is read whole.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    # The request line and headers together; past this, 431 and the connection closed.
    # nginx's default is 4 x 8 KiB, Node's 16 KiB.
    max_header_bytes: int = Field(64 * 1024, ge=4096)
    # Ray restarts a replica that fails its health check. A live version with no healthy
    # replica at all, for down_after checks health_interval_s apart on top of the time its
    # replicas took to start, is declared down, once: the event llmship.serving.down, which
    # the automation llmship-restore-<model> answers by rolling back to the previous version
    # (llmship/alerts.py). A replica Ray is replacing does not start a rollback.
    health_interval_s: float = Field(5.0, gt=0)
    down_after: int = Field(3, ge=1)
    # Shadow traffic (serving/shadow.py), during a rollout whose policy asks for it: copies
    # wait in a queue of this many (past it they are dropped, never waited for), this many
    # are sent to the candidate at once, each may take this long, and a request or streamed
    # live answer past this many bytes is not copied: the queue holds at most
    # queue x max_bytes.
    shadow_queue: int = Field(64, ge=1)
    shadow_concurrency: int = Field(2, ge=1)
    shadow_timeout_s: float = Field(60.0, gt=0)
    shadow_max_bytes: int = Field(256 * 1024, ge=1024)
    # The hashes of this many scored pairs per shadowed version are kept for the rollout
    # to read (GET /admin/shadow/<model>); the oldest go first.
    shadow_kept_pairs: int = Field(2000, ge=1)


class S3Settings(_Block):
    """S3: the local SeaweedFS by default; point these at AWS S3 in production."""

    env_prefix: ClassVar[str] = "LLMSHIP_S3_"
    # Named before the block: the buckets' variables have no S3_ in them.
    env_names: ClassVar[dict[str, str]] = {
        "artifacts_bucket": "LLMSHIP_ARTIFACTS_BUCKET",
        "mirror_bucket": "LLMSHIP_MIRROR_BUCKET",
    }

    # The local store's port, on Settings.host; endpoint_url, set, replaces both.
    port: int = 8333
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key: str | None = None
    secret_key: str | None = None
    # Which of the local store's identities (llmship/stack.py) this process signs with:
    # "writer" (the pipeline), "reader" (what only serves: the gateway, retirements; it can
    # read and list, never write or delete), "admin" (`llmship up` creating the buckets).
    identity: Literal["writer", "reader", "admin"] = "writer"
    artifacts_bucket: str = "llmship-artifacts"
    mirror_bucket: str = "llmship-mirror"
    # boto3's transfer manager: parts in flight at once (one pooled connection each) and the
    # part size. 64 MiB parts keep a 5 GB shard at some 80 parts, far under S3's 10,000.
    max_concurrency: int = Field(16, ge=1)
    part_mib: int = Field(64, ge=5)


class RaySettings(_Block):
    """The serving plane (serving/fleet.py): a Ray cluster. Unset address, `llmship up` starts
    a one-node cluster whose GCS listens on port, and its other ports follow it
    (llmship/ray_cluster.py). Set (host:port of a GCS), an existing cluster is used: KubeRay's,
    or one started with `ray start` on GPU hosts (docs/GPU.md)."""

    env_prefix: ClassVar[str] = "LLMSHIP_RAY_"
    env_names: ClassVar[dict[str, str]] = {"node_cache_dir": "LLMSHIP_NODE_CACHE_DIR"}

    address: str | None = None
    port: int = 6379
    # The local head's logical CPUs: what Ray schedules by, not cores. A model server asks for
    # none on CPU (vLLM's CPU engine takes what the OS gives it); evaluation and serving
    # replicas of a rollout run side by side.
    num_cpus: int = Field(8, ge=1)
    # Where a node keeps the versions its replicas serve, one folder per manifest digest: no
    # disk is shared between nodes. Default: <state>/node-cache (Settings.node_cache).
    node_cache_dir: Path | None = None
    # Each replica keeps what its engine compiled (torch.compile, Inductor, Triton,
    # FlashInfer's JIT) beside its version in S3, once per version, engine version, device
    # type and tensor parallel size, and the next replica of the key restores it before its
    # engine starts (serving/compile_cache.py).
    compile_caches: bool = True
    # A replica's engine streams its version's weights from S3, each tensor checked against
    # the signed manifest as it arrives (serving/weight_stream.py), where the version's
    # manifest has the tensors' digests and the engine is vLLM; off, or elsewhere, the
    # replica fetches the version to its node's disk first.
    stream_weights: bool = True


class StageSettings(_Block):
    """Stage environments (docs/FINDINGS.md: vLLM and the quantizers cannot share one), and
    what the stages read and need."""

    # Named before the block: LLMSHIP_QUANTIZE_PYTHON, LLMSHIP_DISK_HEADROOM, ...
    env_prefix: ClassVar[str] = "LLMSHIP_"

    quantize_python: Path = REPO_ROOT / ".venv" / "quantize" / "bin" / "python"
    serve_python: Path = REPO_ROOT / ".venv" / "serve" / "bin" / "python"
    # TensorRT-LLM is a third environment (CUDA only; an NGC image on a cluster). trtllm-serve
    # and trtllm-build are its console scripts: in trtllm_bin_dir, else beside trtllm_python.
    trtllm_python: Path = REPO_ROOT / ".venv" / "trtllm" / "bin" / "python"
    trtllm_bin_dir: Path | None = None
    # Preflight: the free disk a run needs is the estimate times this (downloads resume,
    # stage outputs are written beside their inputs, the local cache keeps both).
    disk_headroom: float = Field(1.2, ge=1.0)
    calibration_data_dir: Path = Field(
        REPO_ROOT / "calibration_data", description="domain datasets, one folder each"
    )
    # LLMSHIP_HOURLY_USD='{"H100": 2.99, "cpu": 0.20}': what one GPU of a type costs per hour
    # (a part of the GPU's name, as nvidia-smi gives it), and "cpu" for a CPU host. The
    # performance report prices each build's output tokens with it; unset, it shows no cost.
    hourly_usd: dict[Annotated[str, StringConstraints(min_length=1)], PositiveFloat] = Field(
        default_factory=dict,
        description="hourly price of one GPU by type (part of its name), 'cpu' for a CPU host",
    )


class SigningSettings(_Block):
    """Signed versions (llmship/signing.py, docs/SECURITY.md): every version the pipeline
    publishes is signed with key_file, and served only where a public key in trusted_keys_dir
    verifies it. Unset: <state>/signing/key.pem (mode 600, made by `llmship up`) and
    <state>/signing/trusted/, where `llmship up` puts its public key."""

    env_prefix: ClassVar[str] = "LLMSHIP_SIGNING_"

    key_file: Path | None = None
    trusted_keys_dir: Path | None = None
