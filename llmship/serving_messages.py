"""The messages of the serving control path, typed, in one place: the routes a rollout gives
the gateways (Route, Canary, Shadow), the shadow pairs the gateways keep for it, the fleet's
directory's records, and the `live`/`previous` alias documents in S3. The gateway, its admin
client, the fleet and the rollout all read them through these models, never by string key.

On the wire (JSON over HTTP, documents in S3) each dumps as the dicts it replaces did: a
document an earlier llmship wrote still reads.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmship.manifest import key_part

# ------------------------------------------------------------------ routes


def _a_time(since: str) -> str:
    """An ISO 8601 time /v1/models can give as a unix time: `since: "x"` was taken, and every
    /v1/models after it answered 500."""
    try:
        datetime.fromisoformat(since).timestamp()
    except (ValueError, OverflowError, OSError):
        raise PydanticCustomError(
            "iso_time", "an ISO 8601 time, as 2026-01-31T12:00:00+00:00"
        ) from None
    return since


# Strict, as the requests are: an admin field of the wrong type is refused, never converted.
class Canary(BaseModel):
    """A new version taking a share of a model's traffic while a rollout watches it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1)
    percent: float = Field(gt=0, lt=100)


class Shadow(BaseModel):
    """A route's shadow: what share of the live version's requests is copied to whom.
    Strict: it comes in the gateway's admin API, which converts no field's type."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1)
    fraction: float = Field(gt=0, le=1)
    max_rps: float = Field(gt=0)
    keep_examples: int = Field(0, ge=0, le=100)


class RouteOrder(BaseModel):
    """What a rollout asks a gateway to route (PUT /admin/routes/{model}); the gateway stamps
    the time it takes it (Route.since)."""

    version: str
    canary: Canary | None = None
    shadow: Shadow | None = None


class Route(BaseModel):
    """A model's route on a gateway: its live version, a canary's share, a shadow."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: str = Field(min_length=1)
    since: Annotated[str, AfterValidator(_a_time)] = Field(
        default_factory=lambda: datetime.now(UTC).isoformat()
    )
    canary: Canary | None = None
    # Copies of a share of the live version's requests, scored against the candidate's
    # answers (serving/shadow.py): during a canary, and in a shadow-only step before it.
    shadow: Shadow | None = None

    @model_validator(mode="after")
    def _shadow_is_the_candidate(self) -> Route:
        if self.shadow and self.shadow.version == self.version:
            raise ValueError("the shadow must be another version than the live one")
        if self.shadow and self.canary and self.shadow.version != self.canary.version:
            raise ValueError("the shadow must be the canary's version")
        return self

    def versions(self) -> list[str]:
        """The versions that take the model's traffic: the live one and a canary's."""
        return [self.version, *([self.canary.version] if self.canary else [])]

    def order(self) -> RouteOrder:
        return RouteOrder(version=self.version, canary=self.canary, shadow=self.shadow)


# ------------------------------------------------------------------ shadow pairs

Agreement = Literal["exact", "answer", "none"]


class ScoredPair(BaseModel):
    """One live request and the candidate's answer to its copy, as hashes."""

    at: float
    request_sha256: str
    live_sha256: str
    candidate_sha256: str
    agreement: Agreement


class Example(BaseModel):
    """A disagreeing pair in full: kept only when the policy asks for examples."""

    at: float
    request_sha256: str
    prompt: Any
    live: str
    candidate: str


class KeptPairs(BaseModel):
    """What gateways kept of one version's shadow pairs (GET /admin/shadow/{model}, one per
    version), and what the rollout stores of a step's."""

    pairs: list[ScoredPair] = []
    examples: list[Example] = []

    def __add__(self, other: KeptPairs) -> KeptPairs:
        return KeptPairs(pairs=self.pairs + other.pairs, examples=self.examples + other.examples)


# ------------------------------------------------------------------ the fleet's directory


class EnginePhases(BaseModel):
    """What the engine's own log says its start spent, seconds (serving/cold_start.py); None
    where the engine does not say (TensorRT-LLM, or a phase it skipped: compile and graphs
    under enforce_eager)."""

    load_s: float | None = None  # the weights read into device memory
    compile_s: float | None = None  # torch.compile (vLLM), inside init
    graphs_s: float | None = None  # CUDA graph capture, inside init
    init_s: float | None = None  # profile, KV cache, warmup: vLLM's "init engine"
    compile_cache_hit: bool = False  # vLLM loaded its compiled graphs from its cache


class CompileCacheUse(BaseModel):
    """What one replica's start did with its key's compile cache (serving/compile_cache.py)."""

    key: str
    restored_files: int = 0  # in the node's folder before the engine started (S3 or the node)
    added_files: int = 0  # what the engine compiled that the cache lacked
    saved: bool = False
    note: str = ""  # why a saved cache was not restored, or not saved

    def describe(self) -> str:
        """`hit: 24 files restored, nothing compiled`; "" where the engine compiled nothing."""
        if self.restored_files and not self.added_files:
            said = f"hit: {self.restored_files} files restored, nothing compiled"
        elif self.restored_files:
            said = f"partial: {self.restored_files} files restored, {self.added_files} compiled"
        elif self.added_files:
            said = f"miss: {self.added_files} files compiled"
        else:
            said = ""
        said += ", saved" if self.saved else ""
        return f"{said} ({self.note})".lstrip() if self.note else said


class Endpoint(BaseModel):
    """One replica's engine, as the gateway reaches it."""

    url: str
    replica: str
    node_ip: str
    node_id: str
    gpus: list[str] = []
    log: str = ""  # the engine's log, on its node
    # The replica's cold start, seconds: the version fetched to the node's cache (0 when a
    # replica before it on the node fetched it), then the engine started to healthy.
    fetch_s: float | None = None
    engine_start_s: float | None = None
    phases: EnginePhases | None = None  # what engine_start_s spent, by the engine's log
    compile_cache: CompileCacheUse | None = None  # None where compile caches are off
    # "streamed from S3", "node cache", or "fetched to the node (why not streamed)"
    weights: str = ""

    @property
    def cold_start_s(self) -> float | None:
        """The replica's start to healthy, seconds; None where not recorded."""
        if self.fetch_s is None or self.engine_start_s is None:
            return None
        return self.fetch_s + self.engine_start_s

    def cold_start(self) -> str:
        """`31.0 s: fetch 1.2, load 4.0, compile 10.1, graphs 3.2, other 12.5`; "" unknown."""
        if self.cold_start_s is None:
            return ""
        p = self.phases or EnginePhases()
        # compile and graphs are part of vLLM's init: "init" is the rest of it.
        init = None
        if p.init_s is not None:
            init = max(0.0, p.init_s - (p.compile_s or 0.0) - (p.graphs_s or 0.0))
        engine = {"load": p.load_s, "compile": p.compile_s, "graphs": p.graphs_s, "init": init}
        other = max(0.0, self.engine_start_s - sum(v for v in engine.values() if v is not None))
        named = {"fetch": self.fetch_s, **engine, "other": other}
        parts = ", ".join(f"{k} {v:.1f}" for k, v in named.items() if v is not None)
        hit = " (compile cache hit)" if p.compile_cache_hit else ""
        kept = self.compile_cache.describe() if self.compile_cache else ""
        kept = f"; compile cache {kept}" if kept else ""
        weights = f"; weights {self.weights}" if self.weights else ""
        return f"{self.cold_start_s:.1f} s: {parts}{hit}{kept}{weights}"


class Snapshot(BaseModel):
    """What the directory knows of the fleet: where each application's replicas' engines
    listen, and until when the kept-warm ones are kept."""

    endpoints: dict[str, list[Endpoint]] = {}
    warm_until: dict[str, float] = {}


class GatewayReport(BaseModel):
    """What a gateway routes, as it tells the directory at each refresh: for each model, the
    versions that take its traffic (Route.versions)."""

    url: str
    routed: dict[str, list[str]] = {}

    def routes_to(self, model: str, version: str) -> bool:
        return version in self.routed.get(model, [])


class Deployed(BaseModel):
    """How an application was last deployed: the replica's spec (serving/replica.py:
    ReplicaSpec, as JSON) and its serving block (llmship/pipeline_config.py: ServingConfig, as
    JSON); a redeploy in place runs the same."""

    spec: dict[str, Any]
    serving: dict[str, Any]


# ------------------------------------------------------------------ aliases


class Alias(BaseModel):
    """An alias document, aliases/<model>/<alias>.json, as ArtifactStore.move_alias writes it.
    What routes is `version`; a hand-edited note beside it (a number as the reason) drops that
    note, not the alias."""

    model: str | None = None
    alias: str | None = None
    version: Annotated[str, AfterValidator(lambda v: key_part(v, "version"))]
    previous: str | None = None  # what the alias named before this move
    updated_at: str | None = None
    reason: str = ""
    # An operator's allow_ungated override put a version without a passing gate record here.
    ungated_override: bool = False

    @field_validator("model", "alias", "previous", "updated_at", mode="before")
    @classmethod
    def _a_note(cls, value: Any) -> str | None:
        return value if isinstance(value, str) else None

    @field_validator("reason", mode="before")
    @classmethod
    def _a_reason(cls, value: Any) -> str:
        return value if isinstance(value, str) else str(value)

    @field_validator("ungated_override", mode="before")
    @classmethod
    def _an_override(cls, value: Any) -> bool:
        return value if isinstance(value, bool) else False


class AliasScan(BaseModel):
    """Every `live` alias that could be read, and what is wrong with each one that could not."""

    aliases: dict[str, Alias] = {}  # model -> its live alias
    problems: dict[str, str] = {}  # key -> what is wrong with it
