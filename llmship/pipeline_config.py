"""What a deployment builds: the pipeline's parameters.

A `PipelineConfig` (model, precision, calibration, gate, serving and rollout options) is the
flows' one parameter, set per deployment in prefect.yaml and editable in the Prefect UI's run
form, whose fields this module's descriptions label. The stack a run runs on is configured
apart, by `LLMSHIP_*` variables (llmship/settings.py).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator


class Scheme(str, Enum):
    """Quantization schemes (llmcompressor's preset names where it has one)."""

    FP8 = "FP8"  # static per-tensor activation scales from calibration: GPU (Ada/Hopper)
    FP8_DYNAMIC = "FP8_DYNAMIC"  # per-token dynamic activations: serves on vLLM's CPU build
    FP8_WEIGHT_ONLY = "FP8_WEIGHT_ONLY"  # FP8 weights, 16-bit activations: Ampere (A100) too
    W8A8 = "W8A8"  # INT8 weights by GPTQ on the domain data, dynamic INT8 activations
    W4A16 = "W4A16"  # INT4 weight-only by GPTQ
    UNQUANTIZED = "UNQUANTIZED"  # the checkpoint's own 16-bit weights: the FP16/BF16 build

    @property
    def needs_fp8_tensor_cores(self) -> bool:
        """FP8 activations: FP8 matrix multiplies, compute capability 8.9 (Ada) and up."""
        return self in (Scheme.FP8, Scheme.FP8_DYNAMIC)


# FP8 W8A8 kernels need FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


class Target(str, Enum):
    """The engine a build is for; it decides the quantizer and the server."""

    VLLM = "vllm"  # llmcompressor -> compressed-tensors checkpoint -> vllm serve
    TRTLLM = "trtllm"  # ModelOpt -> unified HF checkpoint (or TRT engine) -> trtllm-serve

    @property
    def quantizer(self) -> str:
        """The library that calibrates for this engine (also its import name)."""
        return "modelopt" if self is Target.TRTLLM else "llmcompressor"


class TrtllmBackend(str, Enum):
    PYTORCH = "pytorch"  # TensorRT-LLM 1.x default: serves the checkpoint directly
    TENSORRT = "tensorrt"  # a prebuilt TensorRT engine (trtllm-build): legacy, opt-in


class CalibrationConfig(BaseModel, extra="forbid"):
    scheme: Scheme = Scheme.W8A8
    dataset: str = Field("contracts", description="folder under calibration_data/")
    num_samples: int = Field(256, ge=1)
    max_seq_length: int = Field(256, ge=16)
    smoothing_strength: float = Field(
        0.8,
        ge=0.0,
        lt=1.0,
        description="W8A8 only: SmoothQuant's strength, moving activation outliers into the "
        "weights before GPTQ; 0 turns SmoothQuant off",
    )
    kv_cache_fp8: bool = Field(
        False,
        description="also calibrate FP8 scales for the KV cache (halves its memory); "
        "the server then keeps its KV cache in FP8",
    )

    def describe(self) -> str:
        """The recipe in a few words: what the candidates table names it by."""
        if self.scheme is Scheme.UNQUANTIZED:
            return "UNQUANTIZED"
        words = [self.scheme.value]
        if self.scheme is Scheme.W8A8:
            words.append(
                f"SmoothQuant {self.smoothing_strength:g}"
                if self.smoothing_strength
                else "no SmoothQuant"
            )
        if self.kv_cache_fp8:
            words.append("FP8 KV cache")
        return ", ".join(words)


class EvalBackend(str, Enum):
    """How the gate runs the models it compares."""

    # lm-eval's local-completions against the build's own server: vLLM, or trtllm-serve for
    # target trtllm. What users get.
    SERVED = "served"
    HF = "hf"  # lm-eval's hf backend: transformers in the quantize environment

    @classmethod
    def _missing_(cls, value):
        # "vllm" was this option's name while vLLM was the only engine.
        return cls.SERVED if value == "vllm" else None


class TaskPolicy(BaseModel, extra="forbid"):
    """One task's own thresholds; what is left unset falls back to the gate's defaults."""

    rtol: float | None = Field(None, ge=0.0, le=1.0)
    atol: float | None = Field(None, ge=0.0, le=1.0)
    floor: float | None = Field(
        None, ge=0.0, le=1.0, description="the candidate must score at least this, always"
    )
    metric: str | None = Field(None, description="lm-eval metric key, e.g. 'acc,none'")


class GateConfig(BaseModel, extra="forbid"):
    """The accuracy gate's policy: which tasks, which thresholds, which rule."""

    dataset: str = Field("contracts", description="folder under calibration_data/ with eval.jsonl")
    domain_tasks: list[str] | None = Field(
        None, description="task kinds of eval.jsonl to gate on (default: every kind in it)"
    )
    standard_tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks such as mmlu or gsm8k; their data must be in the local "
        "Hugging Face datasets cache (README: 'Standard tasks')",
    )
    rtol: float = Field(
        0.05, ge=0.0, le=1.0, description="candidate >= baseline * (1 - rtol) - atol, per task"
    )
    # On a small set one item is a large fraction, and a task the baseline nearly never gets
    # right has a threshold a single item can cross: atol absorbs that much noise.
    atol: float = Field(0.0, ge=0.0, le=1.0, description="absolute slack, in score units")
    per_task: dict[str, TaskPolicy] = Field(
        default_factory=dict,
        description="per-task rtol, atol, floor or metric, by task kind or lm-eval task name",
    )
    strict: bool = Field(
        False,
        description="judge the candidate by the one-sided Wilson lower "
        "bound of its score over the n items",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="for strict mode")
    backend: EvalBackend = EvalBackend.SERVED
    limit: int | None = Field(None, ge=1, description="items per task (default: all)")


class PerfConfig(BaseModel, extra="forbid"):
    """The performance gate's policy: one fixed load, sent by vLLM's own benchmark client to
    the candidate's and the baseline's servers in turn, and how the candidate may compare.
    A limit left unset is measured and reported, not judged."""

    enabled: bool = Field(True, description="run the performance gate after the accuracy gate")
    concurrency: int = Field(
        32, ge=1, description="requests in flight at once: the deployment's production concurrency"
    )
    num_prompts: int = Field(128, ge=1, description="requests sent at that concurrency")
    single_stream_prompts: int = Field(
        8, ge=0, description="requests sent one at a time after it (0: no one-stream load)"
    )
    # With output_len, within the default max_model_len (512): the defaults pass their own check.
    input_len: int = Field(384, ge=1, description="prompt tokens per request (random tokens)")
    output_len: int = Field(128, ge=1, description="tokens generated per request (EOS ignored)")
    min_throughput_ratio: float | None = Field(
        None,
        gt=0,
        description="candidate output tokens/s / the baseline's, at each load; "
        "e.g. 1.2 for FP8 against BF16 on a GPU",
    )
    max_ttft_regression: float | None = Field(
        None,
        ge=0,
        description="the candidate's p50 and p99 time to first token may exceed "
        "the baseline's by at most this fraction, e.g. 0.1",
    )
    max_itl_regression: float | None = Field(
        None, ge=0, description="the same for the inter-token latency"
    )
    seed: int = Field(0, description="the random prompts' seed: both builds get the same ones")
    max_cold_start_s: float | None = Field(
        None,
        gt=0,
        description="the candidate's server may take at most this many seconds from its "
        "replica's start to healthy (the version fetched to the node, then the engine "
        "started); unset: measured and reported, not judged",
    )
    throughput_tie: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="recipe search: candidates within this fraction of the fastest one's output "
        "tokens/s are tied, and the smaller memory footprint (weights + KV cache) wins",
    )


class TrtllmConfig(BaseModel, extra="forbid"):
    """TensorRT-LLM's own options (target: trtllm)."""

    backend: TrtllmBackend = Field(
        TrtllmBackend.PYTORCH,
        description="pytorch serves the ModelOpt checkpoint as it is; tensorrt builds a "
        "TensorRT engine with trtllm-build first (legacy, opt-in)",
    )
    max_batch_size: int = Field(256, ge=1)
    max_num_tokens: int = Field(8192, ge=1)
    kv_cache_free_gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    use_fp8_context_fmha: bool = Field(
        True,
        description="engine build: FP8 attention in the context phase (NVIDIA's FP8 "
        "Llama recipe turns it on)",
    )


class AutoscalingBlock(BaseModel, extra="forbid"):
    """Replicas from load (serving/autoscale.py): Ray Serve's autoscaler on the engines'
    running and waiting requests."""

    min_replicas: int = Field(1, ge=1, description="replicas at the least (and at the start)")
    max_replicas: int = Field(2, ge=1, description="replicas at the most")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="running + waiting requests per engine to scale to"
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="load this long above target before a replica is added"
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="load this long below target before a replica is removed"
    )
    metrics_interval_s: float = Field(5.0, gt=0, description="how often each replica reports")
    look_back_period_s: float = Field(
        30.0, gt=0, description="an engine's load is its peak over this period"
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingBlock:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}"
            )
        return self


class ServingConfig(BaseModel, extra="forbid"):
    dtype: str = "bfloat16"
    max_model_len: int = Field(512, ge=16)
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one server spans")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM: share of each GPU's memory it may take"
    )
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM: sequences in one batch")
    trtllm: TrtllmConfig = Field(default_factory=TrtllmConfig)
    extra_args: list[str] = Field(default_factory=list)
    replicas: int = Field(
        1,
        ge=1,
        description="model servers of a served version, each with "
        "tensor_parallel_size GPUs, placed by Ray",
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="spread replicas over nodes: a node lost costs at most this many"
    )
    autoscaling: AutoscalingBlock | None = Field(
        None,
        description="replicas from load, between min and max; set, it takes the place of replicas",
    )

    def build_inputs(self) -> dict[str, Any]:
        """What a build depends on: the engine's settings, not how many replicas run it or
        where (changing those must not make a new build, nor a new version)."""
        return self.model_dump(
            mode="json", exclude={"replicas", "max_replicas_per_node", "autoscaling"}
        )


class QualityPolicy(BaseModel, extra="forbid"):
    """Shadow traffic scored against the live version: a canary that answers 200 OK, fast
    and wrong is rolled back (serving/shadow.py)."""

    enabled: bool = Field(False, description="copy live requests to the new version and score")
    sample_fraction: float = Field(
        0.1, gt=0, le=1, description="share of the live version's requests copied, by request id"
    )
    min_pairs: int = Field(
        30, ge=1, description="a step that scored fewer pairs is a breach: too little evidence"
    )
    agreement_floor: float = Field(
        0.9, ge=0, le=1, description="the agreement rate's lower bound must stay above this"
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="of the one-sided Wilson lower bound of the agreement"
    )
    compare: Literal["answer", "exact"] = Field(
        "answer",
        description="answer: the same answer as the accuracy gate extracts it (the first "
        "line, stripped); exact: the whole text, whitespace normalised",
    )
    shadow_bake_seconds: float = Field(
        0.0, ge=0, description="a shadow-only step before any traffic moves; 0: none"
    )
    max_shadow_rps: float = Field(
        5.0, gt=0, description="copies per second each gateway sends at most: the shadow's cost"
    )
    keep_examples: int = Field(
        0,
        ge=0,
        le=100,
        description="disagreeing prompts and answers kept per step, in the artifacts bucket; "
        "0: counts and hashes only",
    )


class RolloutConfig(BaseModel, extra="forbid"):
    """How traffic moves to a new version, and what makes it go back."""

    # The validator's rule, as far as JSON schema can say it (each step's bounds, no step
    # twice), is in the schema too: the deployment's parameter schema, which Prefect's UI and
    # `prefect deployment run` check, refuses [50, 150] or [-5] before a flow run exists.
    canary_steps: list[float] = Field(
        default_factory=list,
        description="percent of the traffic sent to the new version, step by step, before all "
        "of it, e.g. [10, 50]; empty: all at once (blue/green)",
        json_schema_extra={
            "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
            "uniqueItems": True,
        },
    )
    bake_seconds: float = Field(60.0, ge=0, description="how long each canary step is watched")
    max_error_rate: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="the new version's 5xx and unanswered requests / its requests, per step",
    )
    max_p99_seconds: float | None = Field(
        None, gt=0, description="the new version's p99 request latency at the gateway, per step"
    )
    min_requests: int = Field(
        0,
        ge=0,
        description="a step that saw fewer requests to the new version is a breach: "
        "too little evidence to move on",
    )
    keep_previous_warm_seconds: float = Field(
        900.0,
        ge=0,
        description="the version traffic left keeps its server this long: a rollback within "
        "it takes a second, not a cold start",
    )
    require_approval: bool = Field(
        False,
        description="pause the run before traffic moves, until someone approves it in "
        "the Prefect UI",
    )
    approval_timeout_seconds: int = Field(86400, ge=1)
    quality: QualityPolicy = Field(default_factory=QualityPolicy)

    @field_validator("canary_steps")
    @classmethod
    def _steps_rise_below_100(cls, v: list[float]) -> list[float]:
        if any(not 0 < p < 100 for p in v) or v != sorted(set(v)):
            raise ValueError(
                f"canary_steps {v} must rise strictly, each above 0 and below 100 "
                "(the last step, 100, is the switch itself)"
            )
        return v

    @model_validator(mode="after")
    def _quality_has_a_step_to_judge(self) -> RolloutConfig:
        if self.quality.enabled and not (self.canary_steps or self.quality.shadow_bake_seconds):
            raise ValueError(
                "quality.enabled judges the new version's answers during a step, and this "
                "rollout has none: set canary_steps or quality.shadow_bake_seconds"
            )
        return self


class PipelineConfig(BaseModel, extra="forbid"):
    """What one build-and-serve run makes: a flow parameter, set per deployment."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="served model name")
    source: str = Field(..., description="hf://org/name@revision, s3://bucket/prefix, or a path")
    target: Target = Target.VLLM
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    search: list[CalibrationConfig] = Field(
        default_factory=list,
        description="more recipes to build and gate beside calibration: of those that pass "
        "both gates, the one with the most output tokens/s at perf.concurrency is published "
        "(README, 'Recipe search')",
    )
    gate: GateConfig = Field(default_factory=GateConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    perf: PerfConfig = Field(default_factory=PerfConfig)

    @model_validator(mode="after")
    def _perf_load_fits_the_context(self) -> PipelineConfig:
        if (
            self.perf.enabled
            and self.perf.input_len + self.perf.output_len > self.serving.max_model_len
        ):
            raise ValueError(
                f"perf.input_len + perf.output_len ({self.perf.input_len} + "
                f"{self.perf.output_len}) exceed serving.max_model_len "
                f"({self.serving.max_model_len}): the servers would refuse every request; "
                "shorten the load or raise max_model_len"
            )
        return self

    @property
    def recipes(self) -> list[CalibrationConfig]:
        """Every recipe the run builds and gates: calibration first, then the search's."""
        return [self.calibration, *self.search]

    def for_recipe(self, recipe: CalibrationConfig) -> PipelineConfig:
        """This deployment with one recipe: what the plan checks, recipe by recipe."""
        return self.model_copy(update={"calibration": recipe, "search": []})

    @model_validator(mode="after")
    def _target_can_serve_the_scheme(self) -> PipelineConfig:
        for recipe in self.recipes:
            scheme = recipe.scheme
            if self.target is Target.TRTLLM and scheme not in (Scheme.FP8, Scheme.UNQUANTIZED):
                raise ValueError(
                    f"target trtllm takes calibration.scheme FP8 (ModelOpt) or UNQUANTIZED, "
                    f"not {scheme.value}; for {scheme.value} use target vllm"
                )
            if recipe.kv_cache_fp8 and scheme is Scheme.UNQUANTIZED:
                raise ValueError(
                    "calibration.kv_cache_fp8 needs a calibrated scheme (FP8, ...): "
                    "an UNQUANTIZED build has no calibration to take KV scales from"
                )
        seen = [r.model_dump_json() for r in self.recipes]
        if len(set(seen)) != len(seen):
            raise ValueError(
                "search lists a recipe twice (or repeats calibration): each recipe once"
            )
        if self.target is Target.VLLM and self.serving.trtllm.backend is TrtllmBackend.TENSORRT:
            raise ValueError(
                "serving.trtllm.backend tensorrt builds a TensorRT engine, which "
                "vLLM cannot load: set target trtllm, or leave the backend pytorch"
            )
        if self.target is Target.TRTLLM and self.serving.autoscaling:
            raise ValueError(
                "serving.autoscaling scales on vLLM's queue gauges, which "
                "trtllm-serve does not report: set serving.replicas instead"
            )
        return self

    @field_validator("source")
    @classmethod
    def _source_has_a_revision(cls, v: str) -> str:
        if v.startswith("hf://") and "@" not in v:
            raise ValueError(
                f"{v!r} has no revision: pin one, e.g. hf://org/name@<commit sha or tag>"
            )
        return v
