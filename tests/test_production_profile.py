"""The production profile, checked on CPU: the llama3-70b deployments' parameters, the exact
command lines of both engines, which environment runs what, GPU allocation, and every
preflight refusal. No stack: these need none (the GPU runs are in docs/gpu/, see README)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate
from pydantic import ValidationError

from flows.cli import deployment_config
from llmship.errors import SourceNotFound, UnsupportedConfiguration
from llmship.gpus import Gpu, parse_nvidia_smi
from llmship.pipeline_config import PipelineConfig, Scheme, ServingConfig, Target
from llmship.settings import Settings
from serving import autoscale, engines, replica
from tasks.plan import ModelShape, check_resources
from tasks.preflight import check_environments, read_model_config

REPO = Path(__file__).resolve().parents[1]
SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())
REVISION = "7129260dd854a80eb10ace5f61c20324b472b31c"
# Meta-Llama-3-70B-Instruct's config.json, as the hub serves it.
LLAMA3_70B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
}
H200_RUN = json.loads((REPO / "docs" / "gpu" / "h200-8b-stages.json").read_text())


def deployment(flow: str, name: str) -> dict:
    entry = {
        "build-and-serve": "flows/build_and_serve.py:build_and_serve",
        "recalibrate": "flows/recalibrate.py:recalibrate",
        "rollback": "flows/rollback.py:rollback",
    }[flow]
    return next(d for d in SPEC["deployments"] if d["entrypoint"] == entry and d["name"] == name)


def config_of(flow: str, name: str) -> PipelineConfig:
    return deployment_config(f"{flow}/{name}")  # as `llmship plan` reads it


def gpus(n: int, memory_gib: float = 80.0, cc: tuple[int, int] = (9, 0)) -> list[Gpu]:
    return [
        Gpu(index=i, name="NVIDIA H100 80GB HBM3", memory_gib=memory_gib, compute_capability=cc)
        for i in range(n)
    ]


SHAPE_70B = ModelShape.from_config(LLAMA3_70B_CONFIG)
SETTINGS = Settings(state_dir=Path("/srv/llmship"))


def refusals(checks) -> dict[str, str]:
    return {c.name: c.detail for c in checks if c.ok is False}


# ------------------------------------------------------------------ the deployments


@pytest.mark.parametrize(
    "d", SPEC["deployments"], ids=lambda d: d["entrypoint"].split(":")[1] + "/" + d["name"]
)
def test_every_deployment_matches_its_flows_parameter_schema(d):
    """What `enforce_parameter_schema` checks on the server, checked here: a deployment the
    server would refuse to run never reaches a cluster."""
    import importlib

    module, _, fn = d["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
    schema = parameter_schema(flow).model_dump_for_openapi()
    parameters = d["parameters"]
    if flow.name == "restore":
        # Run by its automation only, which adds the version that went down and why.
        from llmship.alerts import restore_automation

        [run] = restore_automation(d["name"], uuid.uuid4(), block_id=None).actions
        parameters = {**parameters, **run.parameters}
    assert validate(parameters, schema, raise_on_error=False) == []


@pytest.mark.parametrize("flow_name", ["build-and-serve", "recalibrate"])
@pytest.mark.parametrize("steps", [[50, 150], [-5], [10, 10]])
def test_canary_steps_out_of_range_are_refused_by_the_parameter_schema(flow_name, steps):
    """What the server's `enforce_parameter_schema` (the UI's form, `prefect deployment run`)
    checks: before, [50, 150] and [-5] passed it and made a flow run that then failed."""
    import importlib

    d = deployment(flow_name, "tiny-llama" if flow_name == "build-and-serve" else "llama3-70b")
    module, _, fn = d["entrypoint"].partition(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), fn)
    parameters = json.loads(json.dumps(d["parameters"]))
    parameters["config"].setdefault("rollout", {})["canary_steps"] = steps
    errors = validate(parameters, parameter_schema(flow).model_dump_for_openapi(), False)
    assert errors and all("canary_steps" in list(e.path) for e in errors), errors


def test_llama3_70b_is_pinned_fp8_tensor_parallel_on_the_gpu_pool():
    d = deployment("build-and-serve", "llama3-70b")
    config = config_of("build-and-serve", "llama3-70b")
    assert re.fullmatch(r"hf://meta-llama/Meta-Llama-3-70B-Instruct@[0-9a-f]{40}", config.source)
    assert (config.target, config.calibration.scheme) == (Target.VLLM, Scheme.FP8)
    assert config.calibration.num_samples == 512 and config.calibration.dataset == "contracts"
    assert config.serving.tensor_parallel_size == 4
    assert config.gate.standard_tasks == ["gsm8k"] and config.rollout.canary_steps
    assert d["work_pool"]["name"] == "gpu"
    assert d["work_pool"]["job_variables"]["env"]["LLMSHIP_DEVICE"] == "cuda"
    trt = config_of("build-and-serve", "llama3-70b-trtllm")
    assert trt.target is Target.TRTLLM and trt.calibration.kv_cache_fp8
    assert trt.source == config.source  # two targets from one pinned model
    # The same model rolls back and recalibrates from the UI on the same pool.
    assert deployment("rollback", "llama3-70b")["work_pool"]["name"] == "gpu"
    assert config_of("recalibrate", "llama3-70b").rollout.require_approval


def test_the_deployments_search_the_recipes_their_engines_serve():
    """The demo searches what vLLM's CPU build serves; the 70B what the GPUs do (issue 30)."""

    def recipes(flow: str, name: str) -> list[str]:
        return [r.describe() for r in config_of(flow, name).recipes]

    cpu = ["W8A8, SmoothQuant 0.8", "W8A8, no SmoothQuant", "UNQUANTIZED"]
    assert recipes("build-and-serve", "tiny-llama") == recipes("recalibrate", "tiny-llama") == cpu
    gpu = ["FP8", "FP8, FP8 KV cache", "FP8_DYNAMIC", "W4A16"]
    assert recipes("build-and-serve", "llama3-70b") == recipes("recalibrate", "llama3-70b") == gpu
    # TensorRT-LLM takes ModelOpt's FP8 alone; the GPU host's first run builds one recipe.
    assert recipes("build-and-serve", "llama3-70b-trtllm") == ["FP8, FP8 KV cache"]
    assert recipes("build-and-serve", "tiny-llama-fp8") == ["FP8, FP8 KV cache"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target": "trtllm", "calibration": {"scheme": "W8A8"}}, "target trtllm takes"),
        ({"source": "hf://meta-llama/Meta-Llama-3-70B-Instruct"}, "has no revision"),
        ({"serving": {"trtllm": {"backend": "tensorrt"}}}, "vLLM cannot load"),
        ({"calibration": {"scheme": "UNQUANTIZED", "kv_cache_fp8": True}}, "needs a calibrated"),
        ({"serving": {"tensor_parallel_size": 0}}, "greater than or equal to 1"),
        ({"serving": {"trtllm": {"backend": "onnx"}}}, "pytorch"),
        (
            {"serving": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
            "max_replicas 2 is below min_replicas 3",
        ),
        (
            {"target": "trtllm", "search": [], "serving": {"autoscaling": {"max_replicas": 2}}},
            "trtllm-serve does not report",
        ),
        # A recipe of the search is held to the same rules as calibration.
        ({"target": "trtllm"}, "not FP8_DYNAMIC; for FP8_DYNAMIC use target vllm"),
        ({"search": [{"scheme": "W4A16"}, {"scheme": "W4A16"}]}, "each recipe once"),
    ],
)
def test_impossible_combinations_are_refused_before_a_run(change, message):
    params = deployment("build-and-serve", "llama3-70b")["parameters"]["config"]
    merged = {
        **params,
        **{
            k: ({**params.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()
        },
    }
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(merged)


# ------------------------------------------------------------------ command lines


def test_vllm_command_line_for_the_70b_fp8_candidate():
    config = config_of("build-and-serve", "llama3-70b")
    args = engines.engine_args(Target.VLLM, config.serving, kv_cache_fp8=True)
    cmd = engines.server_command(SETTINGS, Target.VLLM, Path("/art/v1"), "llama3-70b", 8101, args)
    assert cmd == [
        str(SETTINGS.stages.serve_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/art/v1",
        "--served-model-name",
        "llama3-70b",
        "--host",
        "127.0.0.1",
        "--port",
        "8101",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "8192",
        "--tensor-parallel-size",
        "4",
        "--gpu-memory-utilization",
        "0.9",
        "--kv-cache-dtype",
        "fp8",
    ]


def test_tiny_llama_engine_arguments_are_unchanged_by_the_gpu_options():
    config = config_of("build-and-serve", "tiny-llama")
    assert engines.engine_args(Target.VLLM, config.serving) == [
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "512",
        "--enforce-eager",
    ]


def test_trtllm_serve_command_line_for_the_modelopt_checkpoint():
    config = config_of("build-and-serve", "llama3-70b-trtllm")
    settings = Settings(stages={"trtllm_python": Path("/opt/trt/bin/python")})
    args = engines.engine_args(Target.TRTLLM, config.serving, kv_cache_fp8=True)
    cmd = engines.server_command(
        settings, Target.TRTLLM, Path("/state/serving/x/llama3-70b"), "llama3-70b", 8102, args
    )
    # No KV-cache flag: trtllm-serve reads FP8 KV from hf_quant_config.json.
    assert cmd == [
        "/opt/trt/bin/trtllm-serve",
        "serve",
        "/state/serving/x/llama3-70b",
        "--host",
        "127.0.0.1",
        "--port",
        "8102",
        "--backend",
        "pytorch",
        "--tp_size",
        "4",
        "--max_seq_len",
        "8192",
        "--max_batch_size",
        "256",
        "--max_num_tokens",
        "8192",
        "--kv_cache_free_gpu_memory_fraction",
        "0.9",
    ]


def test_trtllm_engine_build_and_serve_command_lines():
    serving = ServingConfig(
        max_model_len=8192, tensor_parallel_size=4, trtllm={"backend": "tensorrt"}
    )
    settings = Settings(
        stages={"trtllm_python": Path("/usr/bin/python3"), "trtllm_bin_dir": Path("/usr/local/bin")}
    )
    assert engines.builds_engine(Target.TRTLLM, serving)
    assert engines.trtllm_build_command(
        settings, Path("/c/trtllm-checkpoint"), Path("/c/engine"), serving
    ) == [
        "/usr/local/bin/trtllm-build",
        "--checkpoint_dir",
        "/c/trtllm-checkpoint",
        "--output_dir",
        "/c/engine",
        "--gemm_plugin",
        "auto",
        "--max_batch_size",
        "256",
        "--max_num_tokens",
        "8192",
        "--max_seq_len",
        "8192",
        "--workers",
        "4",
        "--use_fp8_context_fmha",
        "enable",
    ]
    args = engines.engine_args(Target.TRTLLM, serving)
    cmd = engines.server_command(
        settings,
        Target.TRTLLM,
        Path("/s/llama3-70b"),
        "llama3-70b",
        8103,
        args,
        tokenizer_dir=Path("/c"),
    )
    assert cmd[:7] == [
        "/usr/local/bin/trtllm-serve",
        "serve",
        "/s/llama3-70b",
        "--host",
        "127.0.0.1",
        "--port",
        "8103",
    ]
    assert cmd[7:11] == ["--tokenizer", "/c", "--backend", "tensorrt"]
    assert engines.tensor_parallel_size(args) == 4


def test_trtllm_serves_through_a_link_named_after_the_model(tmp_path):
    """trtllm-serve names the model after the directory it loads: the link gives it the
    served name, and for an engine points into the artifact."""
    artifact = tmp_path / "artifact"
    (artifact / "engine").mkdir(parents=True)
    link = replica.trtllm_model_path(tmp_path / "links" / "r1", "llama3-70b", artifact, "engine")
    assert link.name == "llama3-70b" and link.resolve() == (artifact / "engine").resolve()


# ------------------------------------------------------------------ environments and GPUs


def test_each_target_resolves_its_own_environment(monkeypatch):
    monkeypatch.setenv("LLMSHIP_TRTLLM_PYTHON", "/opt/trtllm/bin/python")
    monkeypatch.setenv("LLMSHIP_SERVE_PYTHON", "/opt/vllm/bin/python")
    settings = Settings()
    assert engines.python_for(settings, Target.TRTLLM) == Path("/opt/trtllm/bin/python")
    assert engines.python_for(settings, Target.VLLM) == Path("/opt/vllm/bin/python")
    assert engines.trtllm_script(settings.stages, "trtllm-serve") == Path(
        "/opt/trtllm/bin/trtllm-serve"
    )
    cpu = replica.server_env(settings.model_copy(update={"device": "cpu"}), Target.VLLM)
    assert cpu["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    gpu = replica.server_env(settings.model_copy(update={"device": "cuda"}), Target.VLLM)
    assert "VLLM_CPU_KVCACHE_SPACE" not in gpu and gpu["HF_HUB_OFFLINE"] == "1"


def test_an_engine_gets_none_of_the_stacks_secrets(monkeypatch):
    """The engine reads nothing from S3 and joins no cluster: no key or token reaches its
    environment, however the replica's own environment got them."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/state/ray-auth-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("LLMSHIP_S3_SECRET_KEY", "secret")
    env = replica.server_env(Settings(), Target.VLLM)
    assert not [k for k in env if k.startswith(("RAY_AUTH", "AWS_")) or "SECRET" in k]


def test_an_engine_keeps_no_responses_whatever_the_host_says(monkeypatch):
    """A stored response would live in one engine's memory, out of the gateway's reach
    (serving/gateway/schemas.py: ResponsesRequest): the store is off even where the host turns
    it on."""
    monkeypatch.setenv("VLLM_ENABLE_RESPONSES_API_STORE", "1")
    assert replica.server_env(Settings(), Target.VLLM)["VLLM_ENABLE_RESPONSES_API_STORE"] == "0"


def test_a_missing_trtllm_environment_is_a_refusal_that_says_which_setting(tmp_path):
    config = config_of("build-and-serve", "llama3-70b-trtllm")
    settings = Settings(stages={"trtllm_python": tmp_path / "none" / "python"})
    checks = {c.name: c for c in check_environments(config, settings)}
    serving = checks["serving (trtllm) environment"]
    assert serving.ok is False and "LLMSHIP_TRTLLM_PYTHON" in serving.detail


def test_nvidia_smi_output_from_the_lent_h200_parses():
    text = (REPO / "docs" / "gpu" / "nvidia-smi-h200.csv").read_text()
    assert parse_nvidia_smi(text) == [
        Gpu(index=0, name="NVIDIA H200", memory_gib=140.4, compute_capability=(9, 0))
    ]


# ------------------------------------------------------------------ estimates and refusals


def test_parameter_count_from_config_matches_the_model_built_on_the_gpu():
    """The 8B shape's count from config.json equals what torch counted on the H200."""
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_stages import SHAPES

    shape = ModelShape.from_config({**SHAPES["8b"], "tie_word_embeddings": False})
    assert shape.parameters == H200_RUN["steps"]["make-model"]["parameters"] == 8_030_261_248
    assert 70.4e9 < SHAPE_70B.parameters < 70.7e9  # Meta: 70.6 B
    assert SHAPE_70B.weights_gib(Scheme.UNQUANTIZED) == pytest.approx(131.4, abs=0.1)
    # KV cache per token: 2 (k, v) x 80 layers x 8 heads x 128 x 2 bytes = 320 KiB
    assert SHAPE_70B.kv_gib_per_token(fp8=False) * 2**30 == 327_680


def test_the_70b_plan_fits_eight_h100s_and_not_fewer():
    config = config_of("build-and-serve", "llama3-70b")
    ok = check_resources(config, SHAPE_70B, gpus(8), "cuda", 2000, live=True, settings=SETTINGS)
    assert refusals(ok) == {}
    tight = check_resources(config, SHAPE_70B, gpus(4), "cuda", 2000, live=True, settings=SETTINGS)
    assert "8 needed" in refusals(tight)["GPU count"]
    assert "beside the 4 of the live version" in refusals(tight)["GPU count"]


def test_gpus_without_fp8_tensor_cores_are_told_what_to_use_instead():
    config = config_of("build-and-serve", "llama3-70b")
    a100 = check_resources(
        config, SHAPE_70B, gpus(8, cc=(8, 0)), "cuda", 2000, live=False, settings=SETTINGS
    )
    detail = refusals(a100)["compute capability"]
    assert "8.9" in detail and "8.0" in detail and "FP8_WEIGHT_ONLY" in detail
    assert "UNQUANTIZED" in detail
    weight_only = config.model_copy(
        update={
            "calibration": config.calibration.model_copy(update={"scheme": Scheme.FP8_WEIGHT_ONLY})
        }
    )
    assert (
        refusals(
            check_resources(
                weight_only,
                SHAPE_70B,
                gpus(8, cc=(8, 0)),
                "cuda",
                2000,
                live=False,
                settings=SETTINGS,
            )
        )
        == {}
    )


def test_small_gpus_are_refused_for_serving_with_the_numbers():
    config = config_of("build-and-serve", "llama3-70b")
    checks = check_resources(
        config, SHAPE_70B, gpus(8, memory_gib=40), "cuda", 2000, live=False, settings=SETTINGS
    )
    detail = refusals(checks)["GPU memory (serving)"]
    assert "37.5 GiB per GPU" in detail and "36.0 GiB usable of 40" in detail
    assert "raise tensor_parallel_size" in detail


def test_modelopt_calibration_needs_more_gpu_memory_than_llmcompressor():
    """NVIDIA: ModelOpt's 70B FP8 calibration peaks above 210 GB; llmcompressor's stays near
    the weights (both factors measured on the H200)."""
    trt = config_of("build-and-serve", "llama3-70b-trtllm")
    vllm = config_of("build-and-serve", "llama3-70b")
    two = gpus(2, memory_gib=94)  # H100 NVL: 188 GiB in all, between the two peaks
    assert "GPU memory (calibration)" in refusals(
        check_resources(
            trt.model_copy(
                update={"serving": trt.serving.model_copy(update={"tensor_parallel_size": 2})}
            ),
            SHAPE_70B,
            two,
            "cuda",
            2000,
            False,
            SETTINGS,
        )
    )
    assert "GPU memory (calibration)" not in refusals(
        check_resources(
            vllm.model_copy(
                update={"serving": vllm.serving.model_copy(update={"tensor_parallel_size": 2})}
            ),
            SHAPE_70B,
            two,
            "cuda",
            2000,
            False,
            SETTINGS,
        )
    )


def test_a_cpu_worker_is_refused_for_the_gpu_profile_but_not_for_the_demo():
    checks = check_resources(
        config_of("build-and-serve", "llama3-70b"),
        SHAPE_70B,
        [],
        "cpu",
        2000,
        live=False,
        settings=SETTINGS,
    )
    assert "LLMSHIP_DEVICE=cuda" in refusals(checks)["GPUs"]
    tiny = ModelShape(
        parameters=1_000_000, embedding_parameters=100_000, layers=4, kv_heads=2, head_dim=64
    )
    assert (
        refusals(
            check_resources(
                config_of("build-and-serve", "tiny-llama"),
                tiny,
                [],
                "cpu",
                10,
                live=True,
                settings=SETTINGS,
            )
        )
        == {}
    )


def test_too_little_disk_is_refused_with_the_size_needed():
    checks = check_resources(
        config_of("build-and-serve", "llama3-70b"),
        SHAPE_70B,
        gpus(8),
        "cuda",
        100,
        live=False,
        settings=SETTINGS,
    )
    assert re.search(r"100 GiB free in /srv/llmship; 239 GiB needed", refusals(checks)["disk"])


def test_an_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedConfiguration, match="MixtralForCausalLM"):
        ModelShape.from_config({**LLAMA3_70B_CONFIG, "architectures": ["MixtralForCausalLM"]})


# ------------------------------------------------------------------ `llmship plan`


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    """The 70B model's config.json where huggingface_hub's offline cache looks for it."""
    repo = tmp_path / "models--meta-llama--Meta-Llama-3-70B-Instruct"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA3_70B_CONFIG))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "plan", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=120,
    )


def test_plan_prints_stages_and_passes_on_the_planned_cluster(hub_cache):
    out = plan_cli(
        "build-and-serve/llama3-70b",
        "--gpus",
        "8",
        "--gpu-memory-gib",
        "80",
        "--free-disk-gib",
        "1000",
        "--offline",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("download", "calibrate", "build", "gate", "publish", "rollout"):
        assert re.search(rf"^{stage} ", out.stdout, re.M), out.stdout
    assert "70.5 B parameters" in out.stdout and "FAIL" not in out.stdout
    assert re.search(r"calibrate .* 138\.0 GiB", out.stdout)
    assert "ok   recipe search: 4 recipes, one at a time: 8 GPUs hold 2 servers" in out.stdout


def test_plan_refuses_with_every_reason_and_exit_status_2(hub_cache):
    out = plan_cli(
        "build-and-serve/llama3-70b-trtllm",
        "--gpus",
        "4",
        "--gpu-memory-gib",
        "40",
        "--compute-capability",
        "8.0",
        "--free-disk-gib",
        "50",
        "--offline",
    )
    assert out.returncode == 2
    for name in (
        "disk",
        "GPU count",
        "GPU memory (serving)",
        "GPU memory (calibration)",
        "compute capability",
    ):
        assert f"FAIL {name}:" in out.stdout, out.stdout
    # Tensor parallel 4 twice: the performance gate's baseline and candidate at once.
    assert "8 needed (tensor parallel 4, for the baseline's and the candidate's" in out.stdout
    assert "would be refused here: 5 check(s) failed" in out.stderr


def test_plan_names_an_unknown_deployment_and_a_revision_not_there(hub_cache, monkeypatch):
    out = plan_cli("build-and-serve/llama3-7b", "--offline")
    assert out.returncode == 2 and "build-and-serve/llama3-70b" in out.stderr
    with pytest.raises(SourceNotFound, match="Meta-Llama-3-70B-Instruct@0{40}"):
        read_model_config("hf://meta-llama/Meta-Llama-3-70B-Instruct@" + "0" * 40, SETTINGS)


# ------------------------------------------------------------------ ModelOpt on CPU


def test_modelopt_fp8_checkpoints_are_made_and_checked_on_cpu(tmp_path):
    """The ModelOpt path itself, on a small random Llama here (it ran on the H200 at 8B):
    the unified checkpoint passes the build's tensor-by-tensor check, its FP8 weights times
    their scales are the BF16 weights to FP8's precision, and the TensorRT-LLM checkpoint
    for trtllm-build is written."""
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            str(Settings().stages.quantize_python),
            str(REPO / "bench" / "gpu_stages.py"),
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--samples",
            "16",
            "--seq",
            "64",
            "--steps",
            "make-model,calibrate-mo,calibrate-mo-trt,build-trtllm,dequant-check",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert all(s["ok"] for s in steps.values()), steps
    assert steps["calibrate-mo"]["quantization_config"]["quant_algo"] == "FP8"
    assert steps["calibrate-mo"]["quantization_config"]["kv_cache_quant_algo"] == "FP8"
    assert "hf_quant_config.json" in steps["calibrate-mo"]["files"]
    assert "trtllm-checkpoint" in steps["calibrate-mo-trt"]["files"]
    assert steps["build-trtllm"]["quantization_format"] == "modelopt"
    assert "FP8 weights with weight and input scales" in steps["build-trtllm"]["smoke_output"]
    assert steps["dequant-check"]["dtype"] == "torch.float8_e4m3fn"
    assert 0.005 < steps["dequant-check"]["relative_error"] < 0.06


def test_the_bucket_policy_in_the_docs_is_what_the_preflight_recognises():
    """docs/SECURITY.md's policy, as a team would paste it, is read by the preflight as
    denying overwrites of published versions; the same policy without its condition (a
    plain deny of every write) or on another prefix is not."""
    from tasks.preflight import overwrites_denied_by

    text = (REPO / "docs" / "SECURITY.md").read_text()
    policy = json.loads(re.search(r"<!-- policy:.*?-->\n```json\n(.*?)```", text, re.S)[1])
    assert overwrites_denied_by(policy, "llmship-artifacts")
    assert not overwrites_denied_by(policy, "another-bucket")
    unconditional = json.loads(json.dumps(policy))
    del unconditional["Statement"][0]["Condition"]
    assert not overwrites_denied_by(unconditional, "llmship-artifacts")
    elsewhere = json.loads(json.dumps(policy))
    elsewhere["Statement"][0]["Resource"] = "arn:aws:s3:::llmship-artifacts/stages/*"
    assert not overwrites_denied_by(elsewhere, "llmship-artifacts")
    allowed = json.loads(json.dumps(policy))
    allowed["Statement"][0]["Effect"] = "Allow"
    assert not overwrites_denied_by(allowed, "llmship-artifacts")


def test_plan_offline_makes_no_network_call_and_says_how_to_fill_the_cache(tmp_path):
    """`llmship plan --offline` for a hub model not in the cache tried the hub five times,
    and the message blamed the repository name: now no connection is made at all (a listener
    standing in for the hub counts them) and the message names the cache and how to fill it."""
    import socket
    import threading
    import time

    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(16)
    connections = []

    def count():
        while True:
            try:
                conn, _ = hub.accept()
            except OSError:
                return
            connections.append(conn)

    threading.Thread(target=count, daemon=True).start()
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}",
    }
    started = time.monotonic()
    out = subprocess.run(
        # For a GPU host (this one has none: without --gpus, the GPU refusal comes first).
        [
            sys.executable,
            "-m",
            "flows.cli",
            "plan",
            "build-and-serve/llama3-70b",
            "--offline",
            "--gpus",
            "8",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    hub.close()
    assert out.returncode == 2, out.stdout + out.stderr
    assert connections == [], "plan --offline called the hub"
    assert "config.json of meta-llama/Meta-Llama-3-70B-Instruct@" in out.stderr
    assert "is not in the local hub cache" in out.stderr and "hf download" in out.stderr
    assert str(tmp_path) in out.stderr and "check the repository name" not in out.stderr
    assert elapsed < 60


def test_an_offline_worker_is_told_the_file_is_not_cached_not_that_the_name_is_wrong(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SourceNotFound,
        match=r"config.json of org/never-cached@main is not in "
        r"the local hub cache .*`hf download "
        r"org/never-cached",
    ):
        read_model_config("hf://org/never-cached@main", SETTINGS)


def test_an_engines_load_is_read_from_vllms_own_queue_gauges():
    # As vLLM's /metrics writes them (one series per engine of a data-parallel server).
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny-llama"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny-llama"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-llama"} 0.5
"""
    assert autoscale.engine_load(text) == 9.0
    assert autoscale.engine_load('{"iter": 1, "numActiveRequests": 3}') is None


def test_a_gpu_worker_waits_long_enough_for_vllms_first_start(monkeypatch):
    """On the H200 an 8B server's first start took 240 s (FlashInfer's JIT, torch.compile,
    CUDA graphs): the CPU default would have given up at that moment. A value set is kept."""
    monkeypatch.setenv("LLMSHIP_DEVICE", "cuda")
    assert Settings().server_start_timeout_s == 1200
    monkeypatch.setenv("LLMSHIP_SERVER_START_TIMEOUT_S", "333")
    assert Settings().server_start_timeout_s == 333
    monkeypatch.delenv("LLMSHIP_DEVICE")
    monkeypatch.delenv("LLMSHIP_SERVER_START_TIMEOUT_S")
    assert Settings().server_start_timeout_s == 240


def test_gpu_deployments_beat_as_often_as_the_crash_automation_expects():
    """A GPU worker is started by hand (docs/GPU.md), without the environment `llmship up`
    gives its own worker: at Prefect's default heartbeat (180 s) the crash automation, which
    waits three beats of LLMSHIP_RUN_HEARTBEAT_S, would mark every healthy run Crashed."""
    gpu = [d for d in SPEC["deployments"] if d["work_pool"]["name"] != "local-process"]
    assert gpu, "no deployment on a GPU pool"
    expected = Settings.model_fields["run_heartbeat_s"].default
    for d in gpu:
        env = d["work_pool"]["job_variables"]["env"]
        beat = int(env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", 180))
        assert beat <= expected, (d["name"], d["entrypoint"], beat)
