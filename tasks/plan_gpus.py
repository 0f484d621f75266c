"""How many of a run's servers are up at once and, where they outnumber the GPUs, the share of
one GPU each server is held to (issue 28): the plan's GPU-sharing rule, arithmetic only."""

from __future__ import annotations

import math

from llmship.gpus import Gpu
from llmship.pipeline_config import EvalBackend, PipelineConfig, ServingConfig

# vLLM's default share of each GPU (its --gpu-memory-utilization); tasks/plan.py's
# PlanAssumptions starts from it.
VLLM_GPU_MEMORY_UTILIZATION = 0.9


def new_servers(config: PipelineConfig) -> int:
    """The run's own servers up together: the gate's (the candidate's, kept for the rollout,
    and the baseline's), or the new version's replicas in the rollout."""
    s = config.serving
    replicas = s.autoscaling.max_replicas if s.autoscaling else s.replicas
    two_builds = config.perf.enabled or config.gate.backend is EvalBackend.SERVED
    return max(2 if two_builds else 1, replicas)


def serving_servers(config: PipelineConfig) -> int:
    """The servers already up beside a run: the live version's replicas and, kept warm after
    the last switch, the previous version's."""
    s = config.serving
    replicas = s.autoscaling.max_replicas if s.autoscaling else s.replicas
    return replicas * (2 if config.rollout.keep_previous_warm_seconds > 0 else 1)


def servers_at_once(config: PipelineConfig) -> int:
    """The model's servers up together at the busiest moment of a run."""
    return new_servers(config) + serving_servers(config)


def servers_per_gpu(config: PipelineConfig, gpus: list[Gpu]) -> int:
    return math.ceil(servers_at_once(config) / len(gpus))


def default_share(per_gpu: int, utilization: float = VLLM_GPU_MEMORY_UTILIZATION) -> float:
    """vLLM's default share of a GPU over the servers it holds, down to a hundredth."""
    return math.floor(utilization / per_gpu * 100) / 100


def whole_gpus_needed(config: PipelineConfig, live: bool) -> int:
    """GPUs the run needs when each server has tensor_parallel_size GPUs of its own: two
    servers' worth, the live version's and the candidate's, or, in the performance gate of a
    baseline not measured before (no version is live then, as a rule), the baseline's and the
    candidate's (kept for the rollout)."""
    tp = config.serving.tensor_parallel_size
    return tp * (2 if live or config.perf.enabled else 1)


def shares_gpus(config: PipelineConfig, gpus: list[Gpu], device: str) -> bool:
    """Servers share GPUs where they can outnumber them and each fits on one (tensor parallel
    1): Ray counts each at its memory share (serving/engines.py, gpus_per_server). Whether a
    version is live now does not enter: the share is in every build's engine arguments, and the
    next run, beside this one's version, must find room at the same share."""
    return (
        device == "cuda"
        and bool(gpus)
        and config.serving.tensor_parallel_size == 1
        and len(gpus) < servers_at_once(config)
    )


def fitted_serving(
    config: PipelineConfig,
    gpus: list[Gpu],
    device: str,
    utilization: float = VLLM_GPU_MEMORY_UTILIZATION,
) -> ServingConfig:
    """The serving config a run builds with. Where servers share GPUs and the deployment names
    no gpu_memory_utilization, each server's share is vLLM's default over the servers one GPU
    holds at once (two at 0.45, four at 0.22): the engine takes that share of the GPU's memory
    and Ray counts it as that share of the GPU, so a server that would not fit waits for room
    instead of failing on memory the others hold. Every version served on these GPUs carries its
    share in its engine arguments: a rollback or a restore comes back at the share it had."""
    s = config.serving
    if s.gpu_memory_utilization is not None or not shares_gpus(config, gpus, device):
        return s
    share = default_share(servers_per_gpu(config, gpus), utilization)
    return s.model_copy(update={"gpu_memory_utilization": share})


def free_servers(config: PipelineConfig, gpus: list[Gpu], live: bool) -> int:
    """Servers of tensor_parallel_size GPUs each on the GPUs the live version leaves (as
    whole_gpus_needed counts them)."""
    tp = config.serving.tensor_parallel_size
    return max(0, len(gpus) - (tp if live else 0)) // tp


def shares_a_device(config: PipelineConfig, gpus: list[Gpu], device: str) -> bool:
    """The run's servers share CPUs, or GPUs (shares_gpus): one's load slows another's."""
    return device != "cuda" or not gpus or shares_gpus(config, gpus, device)


def trials_at_once(config: PipelineConfig, gpus: list[Gpu], device: str, live: bool) -> int:
    """How many of a search's candidates are tried (gated, then measured) at once. Where each
    server has GPUs of its own: as many as the GPUs the live version leaves hold servers, less
    one for the server kept (the baseline's in the first wave, the fastest candidate's so far
    after it). One at a time where servers share a device, CPUs or a GPU: a candidate's speed
    would be measured under another's load."""
    if shares_a_device(config, gpus, device):
        return 1
    return max(1, min(len(config.recipes), free_servers(config, gpus, live) - 1))


def trials_detail(config: PipelineConfig, gpus: list[Gpu], device: str, live: bool) -> str:
    """The plan's line on the search: how many recipes, how many at once, and why."""
    n = len(config.recipes)
    if n == 1:
        return "one recipe (no search)"
    if shares_a_device(config, gpus, device):
        shared = "GPUs" if device == "cuda" and gpus else "CPUs"
        return f"{n} recipes, one at a time: servers share the {shared} (speed measured alone)"
    at_once = trials_at_once(config, gpus, device, live)
    tp = config.serving.tensor_parallel_size
    return (
        f"{n} recipes, {'one at a time' if at_once == 1 else f'{at_once} at once'}: "
        f"{len(gpus)} GPUs"
        + (f", less the live version's {tp}," if live else "")
        + f" hold {free_servers(config, gpus, live)} servers at tensor parallel {tp}, one of "
        "them kept (the baseline's, then the fastest candidate's so far)"
    )
