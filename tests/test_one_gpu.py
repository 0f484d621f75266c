"""llmship on fewer GPUs than servers (issue 28): the plan decides how a run's servers fit,
before any GPU time is spent, and the fit reaches the engines and Ray.

On one GPU a run's servers share it: each is held to a share of its memory (vLLM's
--gpu-memory-utilization, in the build's engine arguments) and asks Ray for that share of the
GPU, so Ray places as many side by side as fit and no more. Where one server's share cannot
hold the model, or servers span GPUs (tensor parallel > 1), the run is refused with the
numbers. Arithmetic only: the GPU run that proves it is docs/GPU.md's "The whole flow on one
GPU" (bench/gpu_flow.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import deployment_config
from llmship.gpus import Gpu
from llmship.pipeline_config import PipelineConfig, Target
from llmship.settings import Settings
from serving import engines
from tasks.plan import ModelShape, check_resources, fitted_serving, servers_at_once

SETTINGS = Settings(state_dir=Path("/srv/llmship"))
# Llama 3 8B's shape (bench/gpu_stages.py SHAPES["8b"]): 15.0 GiB of BF16 weights.
SHAPE_8B = ModelShape.from_config(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
)


def one_h100(n: int = 1) -> list[Gpu]:
    return [
        Gpu(index=i, name="NVIDIA H100 80GB HBM3", memory_gib=79.2, compute_capability=(9, 0))
        for i in range(n)
    ]


def llama3_8b_on(tp: int = 1, keep_warm: float = 0, **serving) -> PipelineConfig:
    """The llama3-70b deployment's policy on an 8B shape, as bench/gpu_flow.py runs it (its
    gpu_memory_utilization left for llmship to size, unless given)."""
    config = deployment_config("build-and-serve/llama3-70b")
    serving = {"gpu_memory_utilization": None, **serving}
    return config.model_copy(
        update={
            "serving": config.serving.model_copy(
                update={"tensor_parallel_size": tp, "max_model_len": 4096, **serving}
            ),
            "rollout": config.rollout.model_copy(update={"keep_previous_warm_seconds": keep_warm}),
        }
    )


def by_name(checks) -> dict[str, tuple[bool | None, str]]:
    return {c.name: (c.ok, c.detail) for c in checks}


def test_the_demo_deployment_shares_one_gpu_four_ways():
    config = deployment_config("build-and-serve/tiny-llama-fp8")
    # The gate's two servers, the live version's, the previous version's kept warm.
    assert servers_at_once(config) == 4
    tiny = ModelShape(
        parameters=1_000_000, embedding_parameters=100_000, layers=4, kv_heads=4, head_dim=32
    )
    checks = by_name(check_resources(config, tiny, one_h100(), "cuda", 100, False, SETTINGS))
    assert all(ok for ok, _ in checks.values()), checks
    assert "4 servers at once" in checks["GPU sharing"][1]
    assert "each held to 0.22 of its memory" in checks["GPU sharing"][1]
    serving = fitted_serving(config, one_h100(), "cuda")
    args = engines.engine_args(Target.VLLM, serving, kv_cache_fp8=True)
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.22"
    # Ray counts each at its share: four fit on the one GPU Ray counts, a fifth would wait.
    assert engines.gpus_per_server(args) == 0.22
    assert 4 * engines.gpus_per_server(args) <= 1.0 < 5 * engines.gpus_per_server(args)


def test_an_8b_model_fits_one_h100_three_ways_but_not_four():
    # Four servers at 0.22 of 79 GiB (17.4 GiB) cannot hold 15 GiB of weights, a 4096-token
    # sequence and the overhead: refused, naming the way out.
    four = by_name(
        check_resources(
            llama3_8b_on(keep_warm=900), SHAPE_8B, one_h100(), "cuda", 500, False, SETTINGS
        )
    )
    ok, detail = four["GPU memory (serving)"]
    assert ok is False
    assert "19.5 GiB per GPU" in detail and "17.4 GiB usable of 79" in detail
    assert "its share, 0.22" in detail and "keep_previous_warm_seconds to 0" in detail
    # Without the warm previous version: three at 0.3, 23.8 GiB each.
    three = by_name(
        check_resources(llama3_8b_on(), SHAPE_8B, one_h100(), "cuda", 500, False, SETTINGS)
    )
    assert all(ok for ok, _ in three.values()), three
    assert "3 servers at once" in three["GPU sharing"][1]
    assert fitted_serving(llama3_8b_on(), one_h100(), "cuda").gpu_memory_utilization == 0.3


def test_a_share_set_by_hand_that_overfills_the_gpu_is_refused_with_the_share_that_fits():
    config = llama3_8b_on(gpu_memory_utilization=0.45)
    checks = by_name(check_resources(config, SHAPE_8B, one_h100(), "cuda", 500, False, SETTINGS))
    ok, detail = checks["GPU sharing"]
    assert ok is False
    assert "3 x 0.45 is more than one GPU" in detail and "lower it to 0.3" in detail
    # The deployment's own figure is kept, not resized behind the user's back.
    assert fitted_serving(config, one_h100(), "cuda").gpu_memory_utilization == 0.45


def test_servers_spanning_gpus_do_not_share_and_are_refused_on_one():
    checks = by_name(
        check_resources(llama3_8b_on(tp=2), SHAPE_8B, one_h100(), "cuda", 500, False, SETTINGS)
    )
    ok, detail = checks["GPU count"]
    assert ok is False and "1 found" in detail and "4 needed (tensor parallel 2" in detail
    assert "GPU sharing" not in checks


def test_enough_gpus_keep_whole_gpus_and_the_build_unchanged():
    """Whole GPUs where there are enough: the serving config (and so every build's key) is
    the deployment's, and Ray gives each server its tensor parallel size in GPUs."""
    config = llama3_8b_on()
    assert fitted_serving(config, one_h100(3), "cuda") == config.serving
    assert fitted_serving(config, [], "cpu") == config.serving
    args = engines.engine_args(Target.VLLM, config.serving)
    assert "--gpu-memory-utilization" not in args and engines.gpus_per_server(args) == 1.0
    tp4 = engines.engine_args(
        Target.VLLM,
        config.serving.model_copy(
            update={"tensor_parallel_size": 4, "gpu_memory_utilization": 0.9}
        ),
    )
    assert engines.gpus_per_server(tp4) == 4.0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--gpu-memory-utilization", "0.3"], 0.3),
        (["--gpu-memory-utilization=0.45"], 0.45),
        (["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.3"], 2.0),
        ([], 1.0),
    ],
)
def test_ray_is_asked_for_what_the_engine_arguments_say(args, expected):
    assert engines.gpus_per_server(args) == expected


def test_a_stage_does_not_inherit_the_orchestrator_s_packages(monkeypatch):
    """On a host whose environments are sites on PYTHONPATH (the GPU host of
    bench/gpu_flow.py), the orchestrator's PYTHONPATH reached the quantize environment's jobs:
    its huggingface-hub 2.4 shadowed the quantize environment's, and transformers refused to
    import. A stage's PYTHONPATH is the checkout alone; its interpreter brings the rest."""
    import subprocess

    from llmship.settings import REPO_ROOT, stage_env

    monkeypatch.setenv("PYTHONPATH", "/opt/orchestrator-site")
    env = stage_env(SETTINGS)
    assert env["PYTHONPATH"] == str(REPO_ROOT)
    quantize = REPO_ROOT / ".venv" / "quantize" / "bin" / "python"
    shown = subprocess.run(
        [str(quantize), "-c", "import sys; print(sys.path)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/opt/orchestrator-site" not in shown and str(REPO_ROOT) in shown


def test_the_share_is_the_same_whether_a_version_is_live_or_not():
    """The share is in every build's engine arguments: the first run (nothing live) must leave
    room for the next one's servers beside its version at the same share. Two GPUs hold three
    servers at once two to a GPU."""
    config = llama3_8b_on()
    config = config.model_copy(update={"perf": config.perf.model_copy(update={"enabled": False})})
    first, next_ = (
        by_name(check_resources(config, SHAPE_8B, one_h100(2), "cuda", 500, live, SETTINGS))
        for live in (False, True)
    )
    assert first["GPU sharing"] == next_["GPU sharing"]
    assert "2 to a GPU, each held to 0.45" in first["GPU sharing"][1]
    assert fitted_serving(config, one_h100(2), "cuda").gpu_memory_utilization == 0.45


def test_a_missing_module_is_not_retried():
    """On the GPU host the gate's server failed on `import numpy` (Ray Serve, an environment
    missing a package) and the task retried it three times before the run failed."""
    from prefect.states import Completed, Failed

    from llmship.errors import GateFailed
    from tasks.common import retry_unless_permanent

    def failed(exc: BaseException):
        return Failed(data=exc)

    assert retry_unless_permanent(None, None, failed(ModuleNotFoundError("numpy"))) is False
    assert retry_unless_permanent(None, None, failed(GateFailed("gate"))) is False
    assert retry_unless_permanent(None, None, failed(ConnectionResetError("s3"))) is True
    assert retry_unless_permanent(None, None, Completed()) is True


def test_a_search_tries_as_many_candidates_at_once_as_the_gpus_hold():
    """One server kept (the baseline's, then the fastest candidate's so far), the rest of the
    GPUs the live version leaves for candidates side by side; one at a time where servers
    share a device, whose load would skew each other's speed."""
    from tasks.plan_gpus import trials_at_once, trials_detail

    seventy_b = deployment_config("build-and-serve/llama3-70b")  # 4 recipes, tensor parallel 4
    eight_b = llama3_8b_on()  # the same 4 recipes at tensor parallel 1
    assert len(seventy_b.recipes) == 4
    at_once = {
        (name, gpus, live): trials_at_once(config, one_h100(gpus), "cuda", live)
        for name, config in (("70b", seventy_b), ("8b", eight_b))
        for gpus in (1, 8, 16)
        for live in (False, True)
    }
    assert at_once == {
        ("70b", 1, False): 1,  # refused by the GPU count check anyway
        ("70b", 1, True): 1,
        ("70b", 8, False): 1,  # two servers: the baseline's, and one candidate's
        ("70b", 8, True): 1,
        ("70b", 16, False): 3,
        ("70b", 16, True): 2,
        ("8b", 1, False): 1,  # servers share the GPU
        ("8b", 1, True): 1,
        ("8b", 8, False): 4,  # no more than the recipes
        ("8b", 8, True): 4,
        ("8b", 16, False): 4,
        ("8b", 16, True): 4,
    }
    assert trials_at_once(eight_b, [], "cpu", False) == 1
    assert trials_detail(seventy_b, one_h100(16), "cuda", True) == (
        "4 recipes, 2 at once: 16 GPUs, less the live version's 4, hold 3 servers at tensor "
        "parallel 4, one of them kept (the baseline's, then the fastest candidate's so far)"
    )
    assert trials_detail(eight_b, one_h100(1), "cuda", False) == (
        "4 recipes, one at a time: servers share the GPUs (speed measured alone)"
    )
    one = seventy_b.for_recipe(seventy_b.calibration)
    assert trials_detail(one, one_h100(16), "cuda", False) == "one recipe (no search)"
