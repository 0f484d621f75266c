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
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from llmship.settings_blocks import (
    REPO_ROOT,
    GatewaySettings,
    RaySettings,
    S3Settings,
    SigningSettings,
    StageSettings,
    _Block,
)

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
    signing: SigningSettings = Field(default_factory=SigningSettings)
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
    def signing_key_file(self) -> Path:
        return self.signing.key_file or self.state_dir / "signing" / "key.pem"

    @property
    def trusted_keys_dir(self) -> Path:
        return self.signing.trusted_keys_dir or self.state_dir / "signing" / "trusted"

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
