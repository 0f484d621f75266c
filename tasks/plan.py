"""The plan of a deployment: what each stage needs (GPU memory, disk, time) and whether this
machine's GPUs and disk have it. Arithmetic only, on the model's config.json and the
assumptions below: `llmship plan` prints it, the preflight refuses on it.

The assumptions are figures measured on the lent H200 (docs/gpu/h200-8b-stages.json,
docs/gpu/h200-8b-serve.json) or stated as assumptions.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from llmship.errors import UnsupportedConfiguration
from llmship.gpus import Gpu
from llmship.pipeline_config import (
    FP8_MIN_COMPUTE_CAPABILITY,
    PipelineConfig,
    Scheme,
    ServingConfig,
    Target,
)
from llmship.settings import Settings
from serving.engines import builds_engine, engine_for
from tasks.plan_gpus import (
    VLLM_GPU_MEMORY_UTILIZATION,
    default_share,
    fitted_serving,
    servers_at_once,
    servers_per_gpu,
    serving_servers,
    shares_gpus,
    whole_gpus_needed,
)

GIB = 2**30


class PlanAssumptions(BaseModel):
    """Factors behind the estimates. Measured ones say where; the rest are assumptions."""

    # Peak GPU memory of calibration over the model's 16-bit weights. Measured on an H200 on
    # an 8B-shaped Llama, 512 samples x 512 tokens (docs/gpu/h200-8b-stages.json): 15.1 GiB
    # (llmcompressor FP8), 23.6 GiB (ModelOpt FP8), 34.6 GiB (ModelOpt FP8 exported for
    # trtllm-build), over 15.0 GiB of weights. NVIDIA puts ModelOpt's 70B FP8 peak above
    # 210 GB, 1.5 x its 141 GB: the same factor.
    calibration_peak_llmcompressor: float = 1.05
    calibration_peak_modelopt: float = 1.6
    calibration_peak_modelopt_trtllm: float = 2.35
    # Calibration seconds per billion parameters: a fixed part (loading, compressing and
    # saving the model) and a part per 512 samples of 512 tokens. Measured on an H200 at 8.0 B
    # (llmcompressor FP8): 94 s at 512 x 512 (docs/gpu/h200-8b-stages.json), 85 and 89 s at
    # 256 x 512 (docs/gpu/h200-8b-serve.json): most of it does not grow with the samples.
    calibration_fixed_seconds_per_b: float = 9.8
    calibration_sample_seconds_per_b: float = 1.9
    # Per GPU, beside weights and KV cache: activations, CUDA graphs, NCCL buffers (assumed;
    # measured at 8B, TP 1 on an H200: 1.4 GiB, 0.9-1.0 of it CUDA graphs; TP 4 adds NCCL's).
    serving_overhead_gib: float = 4.0
    gpu_memory_utilization: float = VLLM_GPU_MEMORY_UTILIZATION  # vLLM's default share
    download_gbit_s: float = Field(2.0, description="hub to worker (assumed)")
    s3_gbit_s: float = Field(4.0, description="worker to S3, upload and fetch (assumed)")
    load_gib_s: float = Field(2.0, description="a server reading its weights (assumed)")
    server_start_seconds: float = Field(
        90.0,
        description="beside the weights (measured at 8B on an H200, caches warm: 57-72 s "
        "to healthy; a host's first start, with FlashInfer's JIT: 240 s)",
    )


class ModelShape(BaseModel):
    """What the estimates need of a model, from its config.json."""

    parameters: int
    embedding_parameters: int  # embed_tokens + lm_head (twice the table unless tied)
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        if "LlamaForCausalLM" not in config.get("architectures", ["LlamaForCausalLM"]):
            raise UnsupportedConfiguration(
                f"architecture {config.get('architectures')} is not supported: llmship's "
                "recipes (ModelOpt's llama export, the FP8 ignore lists) and estimates are for "
                "LlamaForCausalLM models"
            )
        h, layers, v = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or h // heads
        inter = config["intermediate_size"]
        attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2  # q, o; k, v
        per_layer = attention + 3 * h * inter + 2 * h  # + gate/up/down, two norms
        tables = v * h * (1 if config.get("tie_word_embeddings") else 2)
        return cls(
            parameters=layers * per_layer + tables + h,
            embedding_parameters=tables,
            layers=layers,
            kv_heads=kv_heads,
            head_dim=head_dim,
        )

    @property
    def billions(self) -> float:
        return self.parameters / 1e9

    def weights_gib(self, scheme: Scheme) -> float:
        """Served weights: quantized linear layers, 16-bit embeddings and norms."""
        linear = self.parameters - self.embedding_parameters
        bytes_per_linear = {Scheme.W4A16: 0.5, Scheme.UNQUANTIZED: 2.0}.get(scheme, 1.0)
        return (linear * bytes_per_linear + self.embedding_parameters * 2) / GIB

    def kv_gib_per_token(self, fp8: bool) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * (1 if fp8 else 2) / GIB


class StagePlan(BaseModel):
    stage: str
    where: str
    gpu_memory_gib: float | None = None  # in all, over the GPUs the stage uses
    disk_gib: float | None = None  # new on the worker's disk
    seconds: float | None = None


class Check(BaseModel):
    name: str
    ok: bool | None  # None: could not be checked from here
    detail: str


class Plan(BaseModel):
    model: str
    source: str
    billions: float
    stages: list[StagePlan]
    checks: list[Check]
    # What the run builds and serves with: the deployment's serving, with each server's share
    # of a GPU where the servers share GPUs (fitted_serving).
    serving: ServingConfig
    trials_at_once: int = 1  # of a search's candidates (plan_gpus.trials_at_once)

    @property
    def refusals(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


def needs_gpu(config: PipelineConfig) -> str | None:
    """Why this deployment cannot run on CPUs, or None where it can."""
    if refusal := engine_for(config.target).cpu_refusal:
        return refusal
    if config.calibration.scheme is Scheme.FP8:
        return "static FP8 has no CPU kernels in vLLM (docs/FINDINGS.md)"
    if config.serving.tensor_parallel_size > 1:
        return f"tensor_parallel_size {config.serving.tensor_parallel_size} spans GPUs"
    return None


def check_gpu_presence(config: PipelineConfig, gpus: list[Gpu], device: str) -> Check | None:
    """The refusal of a GPU deployment on a worker without GPUs, or None. It needs nothing
    of the model, so the preflight asks it before any hub or store call: a GPU run that
    landed on the wrong worker says so first, not after a download or a hub error."""
    why_gpu = needs_gpu(config)
    if why_gpu is None:
        return None
    if device != "cuda":
        return Check(
            name="GPUs",
            ok=False,
            detail=f"this deployment needs CUDA GPUs ({why_gpu}); LLMSHIP_DEVICE is "
            f"{device!r}: run it on a GPU work pool whose workers set "
            "LLMSHIP_DEVICE=cuda (README, 'GPU path')",
        )
    if not gpus:
        return Check(
            name="GPUs",
            ok=False,
            detail=f"this deployment needs CUDA GPUs ({why_gpu}); LLMSHIP_DEVICE is 'cuda' but "
            "nvidia-smi lists no GPU on this worker: start the worker on a GPU host",
        )
    return None


def calibration_peak_gib(config: PipelineConfig, shape: ModelShape, a: PlanAssumptions) -> float:
    if config.calibration.scheme is Scheme.UNQUANTIZED:
        return 0.0
    if config.target is Target.VLLM:
        factor = a.calibration_peak_llmcompressor
    elif builds_engine(config.target, config.serving):
        factor = a.calibration_peak_modelopt_trtllm
    else:
        factor = a.calibration_peak_modelopt
    return shape.weights_gib(Scheme.UNQUANTIZED) * factor


def estimate_stages(
    config: PipelineConfig, shape: ModelShape, a: PlanAssumptions | None = None
) -> list[StagePlan]:
    a = a or PlanAssumptions()
    bf16 = shape.weights_gib(Scheme.UNQUANTIZED)
    cand = shape.weights_gib(config.calibration.scheme)
    cal = config.calibration
    tp = config.serving.tensor_parallel_size
    kv = shape.kv_gib_per_token(cal.kv_cache_fp8) * config.serving.max_model_len
    gbit = 2**30 * 8 / 1e9  # GiB -> Gbit
    calib_s = shape.billions * (
        a.calibration_fixed_seconds_per_b
        + a.calibration_sample_seconds_per_b * cal.num_samples / 512 * cal.max_seq_length / 512
    )
    serve_s = a.server_start_seconds + cand / tp / a.load_gib_s
    return [
        StagePlan(
            stage="download",
            where="hub or mirror -> worker",
            disk_gib=bf16,
            seconds=bf16 * gbit / a.download_gbit_s,
        ),
        StagePlan(
            stage="calibrate",
            where=f"{config.target.quantizer}, {cal.scheme.value}, all GPUs",
            gpu_memory_gib=calibration_peak_gib(config, shape, a),
            disk_gib=cand,
            seconds=0 if cal.scheme is Scheme.UNQUANTIZED else calib_s,
        ),
        StagePlan(
            stage="build",
            where=f"{config.target.value}: candidate and BF16 baseline",
            disk_gib=cand if builds_engine(config.target, config.serving) else 0.0,
            seconds=(bf16 + cand) / a.load_gib_s,
        ),
        StagePlan(
            stage="gate",
            where=f"{tp} GPU(s) per server, "
            + ("both builds at once" if config.perf.enabled else "one build at a time"),
            gpu_memory_gib=bf16
            + kv
            + a.serving_overhead_gib * tp
            + (cand + kv + a.serving_overhead_gib * tp if config.perf.enabled else 0),
            seconds=2 * (a.server_start_seconds + bf16 / tp / a.load_gib_s),
        ),
        StagePlan(stage="publish", where="worker -> S3", seconds=cand * gbit / a.s3_gbit_s),
        StagePlan(
            stage="rollout",
            where=f"{tp} GPU(s) beside the live version's",
            gpu_memory_gib=cand + kv + a.serving_overhead_gib * tp,
            seconds=serve_s,
        ),
    ]


def check_disk(
    config: PipelineConfig,
    shape: ModelShape,
    free_disk_gib: float,
    settings: Settings,
    a: PlanAssumptions,
) -> Check:
    """Free disk in the state directory against every stage's new files, with headroom."""
    stages = estimate_stages(config, shape, a)
    disk = sum(s.disk_gib or 0 for s in stages) * settings.stages.disk_headroom
    return Check(
        name="disk",
        ok=free_disk_gib >= disk,
        detail=f"{free_disk_gib:.0f} GiB free in {settings.state_dir}; {disk:.0f} GiB needed "
        f"(snapshot, calibrated checkpoint, builds, x{settings.stages.disk_headroom} headroom)"
        + (
            ""
            if free_disk_gib >= disk
            else ": free space or point LLMSHIP_STATE_DIR at a larger volume"
        ),
    )


def check_cpu_run(config: PipelineConfig, gpus: list[Gpu], device: str) -> Check:
    """On a worker that is not a CUDA one: the refusal of a GPU deployment, or a CPU run."""
    return check_gpu_presence(config, gpus, device) or Check(name="GPUs", ok=True, detail="CPU run")


def gpu_names(gpus: list[Gpu]) -> str:
    """The GPUs found, one entry per kind, as the GPU checks name them."""
    kinds = {
        f"{g.name} ({g.memory_gib:.0f} GiB, cc {g.compute_capability[0]}.{g.compute_capability[1]})"
        for g in gpus
    }
    return ", ".join(sorted(kinds)) or "none"


def check_gpu_count(config: PipelineConfig, gpus: list[Gpu], live: bool) -> Check:
    """Where each server has GPUs of its own: enough of them for the run's servers at once."""
    tp = config.serving.tensor_parallel_size
    needed = whole_gpus_needed(config, live)
    return Check(
        name="GPU count",
        ok=len(gpus) >= needed,
        detail=f"{len(gpus)} found: {gpu_names(gpus)}; {needed} needed (tensor parallel {tp}"
        + (
            f", beside the {tp} of the live version, which keeps serving until the switch"
            if live
            else (
                ", for the baseline's and the candidate's servers at once in the performance gate"
                if needed > tp
                else ""
            )
        )
        + ")",
    )


def check_gpu_sharing(
    config: PipelineConfig, gpus: list[Gpu], serving: ServingConfig, a: PlanAssumptions
) -> Check:
    """Where servers share GPUs: their shares of one GPU add up to no more than the GPU."""
    at_once = servers_at_once(config)
    per_gpu = servers_per_gpu(config, gpus)
    share = serving.gpu_memory_utilization or 0.0
    ok = share * per_gpu <= 1.0
    warm = config.rollout.keep_previous_warm_seconds > 0
    return Check(
        name="GPU sharing",
        ok=ok,
        detail=f"{len(gpus)} found: {gpu_names(gpus)}; {at_once} servers at once (the gate's or "
        "the new version's, the live version's"
        + (", the previous version's kept warm" if warm else "")
        + f"), {per_gpu} to a GPU, each held to {share:g} of its memory "
        "(--gpu-memory-utilization, and Ray's count of the GPU)"
        + (
            ""
            if ok
            else f": {per_gpu} x {share:g} is more than one GPU; leave "
            "serving.gpu_memory_utilization unset (llmship sizes it), lower it to "
            f"{default_share(per_gpu, a.gpu_memory_utilization):g}, or set "
            "rollout.keep_previous_warm_seconds to 0"
        ),
    )


def check_serving_memory(
    config: PipelineConfig,
    shape: ModelShape,
    gpus: list[Gpu],
    serving: ServingConfig,
    shared: bool,
    a: PlanAssumptions,
) -> Check:
    """The BF16 baseline's server (the larger build) in the usable memory of the smallest GPU."""
    tp = config.serving.tensor_parallel_size
    per_gpu = min(g.memory_gib for g in gpus)
    util = serving.gpu_memory_utilization or a.gpu_memory_utilization
    bf16 = shape.weights_gib(Scheme.UNQUANTIZED)
    kv_seq = shape.kv_gib_per_token(config.calibration.kv_cache_fp8) * config.serving.max_model_len
    need_per_gpu = (bf16 + kv_seq) / tp + a.serving_overhead_gib
    room = per_gpu * util
    seqs = int((room - bf16 / tp - a.serving_overhead_gib) * tp / kv_seq) if kv_seq else 0
    return Check(
        name="GPU memory (serving)",
        ok=need_per_gpu <= room,
        detail=f"the BF16 baseline needs {need_per_gpu:.1f} GiB per GPU "
        f"(weights {bf16:.0f} GiB / {tp}, one {config.serving.max_model_len}-token "
        "sequence's KV cache, "
        f"{a.serving_overhead_gib:g} GiB overhead); {room:.1f} GiB usable of "
        f"{per_gpu:.0f}"
        + (f" (its share, {util:g}, of a GPU it shares)" if shared else "")
        + (
            f": room for {seqs} full-length sequences"
            if need_per_gpu <= room
            else (
                ": give the servers GPUs of their own (more GPUs), set "
                "rollout.keep_previous_warm_seconds to 0 (one server fewer), or lower "
                "max_model_len"
                if shared
                else ": raise tensor_parallel_size or lower max_model_len"
            )
        ),
    )


def check_calibration_memory(
    config: PipelineConfig,
    shape: ModelShape,
    gpus: list[Gpu],
    live: bool,
    serving: ServingConfig,
    shared: bool,
    a: PlanAssumptions,
) -> Check:
    """Calibration's peak in the GPU memory the servers up beside it leave."""
    if shared:
        # Calibration runs beside the live version's servers and the warm previous one's.
        util = serving.gpu_memory_utilization or a.gpu_memory_utilization
        serving_now = serving_servers(config)
        per_gpu = min(g.memory_gib for g in gpus)
        total = max(0.0, sum(g.memory_gib for g in gpus) - serving_now * util * per_gpu)
        where = f"beside {serving_now} serving share(s) of {util:g}"
    else:
        usable = gpus[config.serving.tensor_parallel_size if live else 0 :]
        total = sum(g.memory_gib for g in usable)
        where = f"on the {len(usable)} GPU(s) not serving"
    calib = calibration_peak_gib(config, shape, a)
    return Check(
        name="GPU memory (calibration)",
        ok=calib <= total,
        detail=f"peak {calib:.0f} GiB estimated, {total:.0f} GiB {where}"
        + (
            ""
            if calib <= total
            else ": calibrate on a larger node, or with llmcompressor "
            "(target vllm), whose peak is lower"
        ),
    )


def check_compute_capability(config: PipelineConfig, gpus: list[Gpu]) -> Check | None:
    """FP8 tensor cores where the scheme computes in FP8; None where it does not."""
    fp8 = config.calibration.scheme.needs_fp8_tensor_cores or (
        config.target is Target.TRTLLM and config.calibration.scheme is Scheme.FP8
    )
    if not fp8:
        return None
    low = min(g.compute_capability for g in gpus)
    ok = low >= FP8_MIN_COMPUTE_CAPABILITY
    return Check(
        name="compute capability",
        ok=ok,
        detail=f"{config.calibration.scheme.value} on {config.target.value} computes "
        f"in FP8 (W8A8): it needs compute capability 8.9 or higher (Ada, Hopper); the "
        f"lowest here is {low[0]}.{low[1]}"
        + (
            ""
            if ok
            else ". On A100 (8.0) use calibration.scheme FP8_WEIGHT_ONLY (FP8 weights, "
            "vLLM's Marlin kernels) or W8A8 (INT8) with target vllm, or UNQUANTIZED "
            "for the FP16/BF16 build"
        ),
    )


def check_resources(
    config: PipelineConfig,
    shape: ModelShape,
    gpus: list[Gpu],
    device: str,
    free_disk_gib: float,
    live: bool,
    settings: Settings,
    a: PlanAssumptions | None = None,
) -> list[Check]:
    """GPU count, memory and compute capability, and disk: arithmetic only (tested as such)."""
    a = a or PlanAssumptions()
    disk = check_disk(config, shape, free_disk_gib, settings, a)
    if device != "cuda":
        return [disk, check_cpu_run(config, gpus, device)]
    serving = fitted_serving(config, gpus, device, a.gpu_memory_utilization)
    shared = shares_gpus(config, gpus, device)
    if shared:
        count = check_gpu_sharing(config, gpus, serving, a)
    else:
        count = check_gpu_count(config, gpus, live)
    if not gpus:
        return [disk, count]
    checks = [
        disk,
        count,
        check_serving_memory(config, shape, gpus, serving, shared, a),
        check_calibration_memory(config, shape, gpus, live, serving, shared, a),
        check_compute_capability(config, gpus),
    ]
    return [c for c in checks if c is not None]


def render(plan_: Plan, config: PipelineConfig) -> str:
    def num(v: float | None, unit: str) -> str:
        return "-" if not v else f"{v:,.1f} {unit}"

    def dur(s: float | None) -> str:
        return "-" if not s else (f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s")

    s = config.serving
    lines = [
        f"{plan_.model}: {plan_.source}, {plan_.billions:.1f} B parameters",
        f"target {config.target.value}, {config.calibration.scheme.value}"
        f"{' + FP8 KV cache' if config.calibration.kv_cache_fp8 else ''}, tensor parallel "
        f"{s.tensor_parallel_size}, max_model_len {s.max_model_len}",
    ]
    if plan_.serving.gpu_memory_utilization != s.gpu_memory_utilization:
        lines.append(
            f"servers share GPUs: each takes {plan_.serving.gpu_memory_utilization:g} of one "
            "(its engine's gpu_memory_utilization, and Ray's count)"
        )
    lines += [
        "",
        f"{'stage':10s} {'where':44s} {'GPU memory':>12s} {'disk':>11s} {'time':>8s}",
    ]
    for st in plan_.stages:
        lines.append(
            f"{st.stage:10s} {st.where[:44]:44s} {num(st.gpu_memory_gib, 'GiB'):>12s} "
            f"{num(st.disk_gib, 'GiB'):>11s} {dur(st.seconds):>8s}"
        )
    lines += ["", "(estimates: tasks/plan.py, PlanAssumptions)", ""]
    for c in plan_.checks:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[c.ok]
        lines.append(f"{mark} {c.name}: {c.detail}")
    return "\n".join(lines)
