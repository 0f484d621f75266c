"""The one place llmship's configuration lives.

`Settings` describes the machine-level stack (where state lives, the Prefect server, timings,
alerts; in blocks of their own the gateway, S3, Ray and the stage environments) and reads
`LLMSHIP_*` environment variables, a block's fields from flat ones (LLMSHIP_GATEWAY_PORT ->
settings.gateway.port). What a deployment builds (model, precision, gate, serving options) is
a `PipelineConfig`: a flow parameter, set per deployment in prefect.yaml and editable in the
Prefect UI's run form.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic.types import PositiveFloat, StringConstraints
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The local store's S3 identities (llmship/seaweedfs.py) and the prefix of their keys in the
# credentials file: <prefix>_access_key, <prefix>_secret_key.
S3_IDENTITY_KEY_PREFIX = {"writer": "s3", "reader": "s3_read", "admin": "s3_admin"}


GPU_SERVER_START_TIMEOUT_S = 1200.0
# The one database URL scheme the Prefect server takes besides its SQLite default.
POSTGRES_URL_SCHEME = "postgresql+asyncpg://"


def without_password(database_url: str) -> str:
    """A database URL fit to print: the password replaced by ***."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


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


def _blocks(settings_cls: type[BaseModel]) -> dict[str, type[_Block]]:
    """The fields of settings_cls that are blocks, with their classes."""
    return {
        name: field.annotation
        for name, field in settings_cls.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, _Block)
    }


class _FlatEnvSource(EnvSettingsSource):
    """LLMSHIP_* variables, read as before the blocks: a block's field from its own flat
    variable (LLMSHIP_GATEWAY_PORT -> gateway.port), never a block from one JSON variable."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _blocks(self.settings_cls):
            return None, field_name, False  # filled in by __call__
        return super().get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        for name, block in _blocks(self.settings_cls).items():
            # A mapping (LLMSHIP_HOURLY_USD) is read from the JSON it is written in.
            found = {
                field: self.prepare_field_value(field, info, self.env_vars[env], False)
                for field, info in block.model_fields.items()
                if (env := self._apply_case_sensitive(block.env_name(field))) in self.env_vars
            }
            if found:
                data[name] = found
        return data


class Settings(BaseSettings):
    """The stack's settings, from LLMSHIP_* variables. The gateway's, S3's, Ray's and the
    stages' are blocks of their own (settings.gateway.port, read from LLMSHIP_GATEWAY_PORT);
    in Python, a block is given as a dict of the fields that differ:
    Settings(gateway={"port": 8001}) keeps the others' values from the environment."""

    # Settings hold secrets (keys, tokens, the database URL): a refused value is named, never
    # echoed back in the error.
    model_config = SettingsConfigDict(
        env_prefix="LLMSHIP_", extra="ignore", hide_input_in_errors=True
    )

    state_dir: Path = Field(REPO_ROOT / ".llmship", description="PIDs, logs, data, caches")
    host: str = Field("127.0.0.1", description="every local server binds here")
    prefect_port: int = 4200
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    ray: RaySettings = Field(default_factory=RaySettings)
    stages: StageSettings = Field(default_factory=StageSettings)
    # Where the gateway writes the engines' scrape targets (Prometheus file_sd JSON) whenever
    # the fleet's replicas change: each engine listens on a port of its own, picked when its
    # replica starts. Default: <state>/prometheus/engines.json. A Prometheus running as
    # another user cannot read the state folder (mode 700): point this where it can.
    prometheus_sd_file_path: Path | None = None
    device: str = Field("cpu", description="cpu or cuda: where calibration and evaluation run")
    work_pool: str = "local-process"
    gpu_work_pool: str = "gpu"
    # The Prefect server's database. Unset: SQLite in <state>/prefect (the local default; one
    # writer at a time, so concurrent runs meet "database is locked": docs/FINDINGS.md).
    # Production: PostgreSQL, postgresql+asyncpg://user:password@host:5432/prefect. It holds a
    # password: set LLMSHIP_PREFECT_DATABASE_URL where `llmship up` runs, or put
    # "prefect_database_url" in the credentials file; only the Prefect server gets it.
    prefect_database_url: SecretStr | None = None
    # user:password of the Prefect API (the server refuses requests without it); generated by
    # `llmship up` into the credentials file, which is where processes read it from.
    prefect_api_auth_string: str | None = None
    # Flow runs send a heartbeat this often (Prefect's minimum is 30 s); a run that misses 3
    # (its worker or host died) is marked Crashed by the automation llmship-crashed-runs,
    # which makes the run-failed alert fire. Prefect's own default is 180 s.
    run_heartbeat_s: int = Field(30, ge=30)
    # How often a canary step reads the gateway's metrics while it bakes.
    rollout_check_interval_s: float = Field(2.0, gt=0)
    # How often a run paused for approval asks the server whether it was resumed.
    approval_poll_interval_s: int = Field(5, ge=1)
    # Where alerts go (llmship/alerts.py): a failed gate, and any failed run of llmship's
    # deployments. A Slack incoming webhook (a SlackWebhook block) for teams on Slack, or any
    # URL that takes a JSON POST (a CustomWebhook block). Neither set: no alerts are set up.
    alert_slack_webhook_url: str | None = Field(None, description="https://hooks.slack.com/...")
    alert_webhook_url: str | None = None
    # A model server's start, to healthy. Unset: 240 s on CPU; on GPUs 1200 s, for what vLLM
    # does on a host's first start (FlashInfer's JIT build, torch.compile, CUDA graph capture):
    # 240 s for an 8B BF16 server on an H200, over 180 s for its FP8 build (docs/GPU.md).
    server_start_timeout_s: float = 240.0
    # The candidate's evaluation server is kept this long after its evaluation, under the
    # version's serving name: the rollout that follows takes it rather than loading the model
    # again. 0: stopped at once (the GPUs it holds are needed back before then).
    keep_evaluated_server_s: float = Field(600.0, ge=0)
    # A run holds the servers it acquires (serving/fleet.py: hold) while it brings them into
    # service, renewing the hold every third of this from a thread of its process. A hold
    # not renewed for this long (the run's process was killed, or its run cancelled) gives
    # the servers a warm deadline of now: the fleet's directory stops them unless traffic is
    # on them. Before, a cancelled or killed rollout's target ran on, with no deadline.
    server_hold_lease_s: float = Field(30.0, gt=0)
    # The serving slot's lease (tasks/common.py: serving_slot), renewed by the run while it
    # runs: a run whose process dies gives the slot back this long after (plus up to 15 s of
    # Prefect's repossessor). 300 s kept the model's next rollback waiting five minutes.
    serving_slot_lease_s: float = Field(60.0, ge=10)
    # How long a run waits for its model's serving slot (tasks/common.py: serving_slot) while
    # another run of the same model evaluates or rolls out: a 70B gate takes a while.
    serving_slot_timeout_s: float = Field(4 * 3600.0, gt=0)
    # How long a run waits for its model's build slot (tasks/common.py: build_slot) while
    # another run of the same model downloads, calibrates or builds: a 70B calibration is long.
    build_slot_timeout_s: float = Field(24 * 3600.0, gt=0)

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway.port}"

    @property
    def s3_url(self) -> str:
        # Here, not in the S3 block: the local store is on host, which a replica moves to its
        # node's address (serving/replica.py), and the S3 endpoint follows it.
        return self.s3.endpoint_url or f"http://{self.host}:{self.s3.port}"

    @property
    def credentials_file(self) -> Path:
        return self.state_dir / "credentials.json"

    @property
    def node_cache(self) -> Path:
        return self.ray.node_cache_dir or self.state_dir / "node-cache"

    @property
    def prometheus_sd_file(self) -> Path:
        return self.prometheus_sd_file_path or self.state_dir / "prometheus" / "engines.json"

    @property
    def ray_auth_token_file(self) -> Path:
        """The Ray cluster's token (RAY_AUTH_TOKEN_PATH): every Ray process and client needs it."""
        return self.state_dir / "ray-auth-token"

    @property
    def cache_dir(self) -> Path:
        """Local copies of stage outputs, keyed like their S3 prefixes."""
        return self.state_dir / "cache"

    def as_env(self) -> dict[str, Any]:
        """Every setting that is set, under its environment variable: what a process started
        with these as its environment reads back."""
        found: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, _Block):
                found |= {
                    value.env_name(field): getattr(value, field) for field in value.model_fields
                }
            else:
                found[f"{self.model_config['env_prefix']}{name.upper()}"] = value
        return {env: value for env, value in found.items() if value is not None}

    def updated(self, **changes: Any) -> Settings:
        """A copy with changes, unvalidated as model_copy's; a block's changes, given as a dict,
        are merged into it: updated(s3={"port": 9000}) keeps the other S3 settings."""
        if unknown := set(changes) - set(type(self).model_fields):
            raise ValueError(f"Settings has no {', '.join(sorted(unknown))}")
        blocks = _blocks(type(self))
        return self.model_copy(
            update={
                name: getattr(self, name).model_copy(update=value)
                if name in blocks and isinstance(value, dict)
                else value
                for name, value in changes.items()
            }
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _FlatEnvSource(settings_cls), dotenv_settings, file_secret_settings

    @model_validator(mode="before")
    @classmethod
    def _no_flat_names_of_block_fields(cls, data: Any) -> Any:
        # Settings(gateway_port=...) set the gateway's port before the blocks. Extra names are
        # ignored: without this, such a setting would keep its default without a word.
        if isinstance(data, dict):
            moved = [
                f"{env.removeprefix('LLMSHIP_').lower()} (now {name}.{field})"
                for name, block in _blocks(cls).items()
                for field in block.model_fields
                if (env := block.env_name(field)).removeprefix("LLMSHIP_").lower() in data
            ]
            if moved:
                raise ValueError(f"settings in blocks now: {', '.join(moved)}")
        return data

    @field_validator("prefect_database_url")
    @classmethod
    def _postgres_through_asyncpg(cls, v: SecretStr | None) -> SecretStr | None:
        # The message names the scheme only: the URL itself holds the password.
        if v is not None and not v.get_secret_value().startswith(POSTGRES_URL_SCHEME):
            scheme = v.get_secret_value().partition("://")[0] or "no scheme"
            raise ValueError(
                f"prefect_database_url must start with {POSTGRES_URL_SCHEME} (the Prefect "
                f"server talks to PostgreSQL through asyncpg), not {scheme}://; leave it unset "
                "for the local SQLite database"
            )
        return v

    @model_validator(mode="after")
    def _start_timeout_for_the_device(self) -> Settings:
        if "server_start_timeout_s" not in self.model_fields_set and self.device != "cpu":
            self.server_start_timeout_s = GPU_SERVER_START_TIMEOUT_S
        return self

    @model_validator(mode="after")
    def _credentials_from_setup(self) -> Settings:
        # `llmship up` generates the local store's credentials; processes it starts find them
        # here without having them in their environment or command line.
        if self.credentials_file.exists():
            creds = json.loads(self.credentials_file.read_text())
            # Copies, not the blocks changed in place: a block given in Python stays as it was.
            prefix = S3_IDENTITY_KEY_PREFIX[self.s3.identity]
            self.s3 = self.s3.model_copy(
                update={
                    "access_key": self.s3.access_key or creds.get(f"{prefix}_access_key"),
                    "secret_key": self.s3.secret_key or creds.get(f"{prefix}_secret_key"),
                }
            )
            self.gateway = self.gateway.model_copy(
                update={"admin_token": self.gateway.admin_token or creds.get("gateway_admin_token")}
            )
            self.prefect_api_auth_string = self.prefect_api_auth_string or creds.get(
                "prefect_api_auth_string"
            )
            if self.prefect_database_url is None and creds.get("prefect_database_url"):
                self.prefect_database_url = self._postgres_through_asyncpg(
                    SecretStr(creds["prefect_database_url"])
                )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


def stage_env(settings: Settings) -> dict[str, str]:
    """Environment for stage subprocesses: offline, and pointing at this stack."""
    env = dict(os.environ)
    env.update(
        {
            "LLMSHIP_STATE_DIR": str(settings.state_dir),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            # Progress bars in the flow-run log: one line every 10 s, not one per refresh.
            "TQDM_MININTERVAL": "10",
            # The checkout alone: a stage runs in another environment than the orchestrator's,
            # and packages the orchestrator's PYTHONPATH names (a host whose environments are
            # sites on PYTHONPATH, not virtual environments) would shadow its own (seen: the
            # orchestrator's huggingface-hub 2.4 broke transformers in the quantize
            # environment). An environment of that kind sets its own in its Python's wrapper.
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    return env


# Flow runs' stored results (Prefect pickles task results) name the pipeline's parameter models
# by the module they were in before llmship/pipeline_config.py: found here, a cached result of
# an earlier llmship still loads. New code imports them from llmship.pipeline_config.
from llmship.pipeline_config import (  # noqa: E402, F401
    FP8_MIN_COMPUTE_CAPABILITY,
    AutoscalingBlock,
    CalibrationConfig,
    EvalBackend,
    GateConfig,
    PerfConfig,
    PipelineConfig,
    QualityPolicy,
    RolloutConfig,
    Scheme,
    ServingConfig,
    Target,
    TaskPolicy,
    TrtllmBackend,
    TrtllmConfig,
)
