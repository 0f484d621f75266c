"""The engine arguments a version may carry to its engine (issue 27): only those llmship sets,
each value of its type and in its range, checked where the command line is built. A manifest
is writable by anyone with the pipeline's S3 keys; `--host 0.0.0.0` in it put a rolled-back
version's engine on every interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import deployment_config
from llmship.errors import EngineArgumentRefused
from llmship.pipeline_config import ServingConfig, Target
from llmship.settings import Settings
from serving import engines

SETTINGS = Settings(state_dir=Path("/srv/llmship"))


@pytest.mark.parametrize(
    "deployment",
    [
        "build-and-serve/tiny-llama",
        "build-and-serve/llama3-70b",
        "build-and-serve/llama3-70b-trtllm",
    ],
)
@pytest.mark.parametrize("kv_cache_fp8", [False, True])
def test_every_argument_llmship_sets_reaches_the_engine(deployment, kv_cache_fp8):
    config = deployment_config(deployment)
    args = engines.engine_args(config.target, config.serving, kv_cache_fp8)
    cmd = engines.server_command(SETTINGS, config.target, Path("/m"), "m", 8100, args)
    assert cmd[-len(args) :] == args


def test_every_option_of_the_serving_block_is_allowed():
    serving = ServingConfig(
        dtype="float16",
        max_model_len=32768,
        tensor_parallel_size=8,
        gpu_memory_utilization=1.0,
        max_num_seqs=512,
        trtllm={"backend": "tensorrt", "kv_cache_free_gpu_memory_fraction": 0.5},
    )
    for target in Target:
        args = engines.engine_args(target, serving, kv_cache_fp8=True)
        assert engines.refusal(target, args) is None, args


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--host", "0.0.0.0"], "'--host' is not an engine argument llmship sets"),
        (["--host=0.0.0.0"], "'--host' is not an engine argument llmship sets"),
        (["--port", "80"], "'--port' is not"),
        (["--trust-remote-code"], "'--trust-remote-code' is not"),
        (["--chat-template", "/etc/shadow"], "'--chat-template' is not"),
        (["0.0.0.0"], "'0.0.0.0' is not"),
        (["--dtype", "bfloat16", "--api-key", "x"], "'--api-key' is not"),
        (["--dtype", "bf16"], "--dtype 'bf16': not one of auto, bfloat16"),
        (["--max-model-len", "-1"], "--max-model-len '-1': outside [16, 1.04858e+06]"),
        (["--max-model-len", "--host"], "--max-model-len '--host': not an integer"),
        (["--max-model-len"], "--max-model-len has no value"),
        (["--max-model-len=1e9"], "--max-model-len '1e9': not an integer"),
        (["--gpu-memory-utilization", "0"], "outside (0, 1]"),
        (["--gpu-memory-utilization", "nan"], "outside (0, 1]"),
        (["--tensor-parallel-size", "4.0"], "not an integer"),
        (["--enforce-eager=false"], "--enforce-eager takes no value"),
    ],
)
def test_an_argument_llmship_does_not_set_is_refused_naming_it_and_the_version(args, why):
    with pytest.raises(EngineArgumentRefused) as refused:
        engines.server_command(
            SETTINGS,
            Target.VLLM,
            Path("/m"),
            "tiny-llama",
            8100,
            ["--dtype", "bfloat16", *args],
            source="tiny-llama 3f2a9c",
        )
    message = str(refused.value)
    assert message.startswith("tiny-llama 3f2a9c: ") and why in message, message
    assert "Nothing was started" in message


def test_trtllm_takes_only_its_own_flags():
    assert "'--enforce-eager' is not" in engines.refusal(Target.TRTLLM, ["--enforce-eager"])
    assert "'--host' is not" in engines.refusal(Target.TRTLLM, ["--host", "0.0.0.0"])
    assert "not one of pytorch, tensorrt" in engines.refusal(Target.TRTLLM, ["--backend", "x"])
