"""A replica's cold start, phase by phase, from its engine's own log (issue 32): what the time
from fetched to healthy went on. vLLM logs each phase once per start (its messages in
vllm/v1/worker/gpu_model_runner.py, v1/engine/core.py, compilation/); the patterns take both
the CPU build's and the CUDA build's wording. Pure: text in, phases out."""

from __future__ import annotations

import re

from llmship.serving_messages import EnginePhases

_SECONDS = r"([0-9]+(?:\.[0-9]+)?)"
PATTERNS: dict[str, list[str]] = {
    # The CUDA runner's line covers the weights onto the GPU; the loader's, the read alone.
    "load_s": [
        rf"Model loading took [0-9.]+ GiB(?: memory)? and {_SECONDS} s",
        rf"Loading weights took {_SECONDS} s",
    ],
    "compile_s": [
        rf"torch\.compile (?:takes|took) {_SECONDS} s in total",
        rf"warmup model\) took [0-9.]+ s \(compilation: {_SECONDS} s",
    ],
    "graphs_s": [rf"Graph capturing finished in {_SECONDS} sec"],
    "init_s": [rf"init engine \(profile, create kv cache, warmup model\) took {_SECONDS} s"],
}
CACHE_HIT = "Directly load the compiled graph"


def engine_phases(log_text: str) -> EnginePhases:
    """The phases of the last start in log_text (an engine log holds one start; a restarted
    engine's log is appended to, so the last of each line is this start's)."""
    found: dict[str, float] = {}
    for phase, patterns in PATTERNS.items():
        for pattern in patterns:
            matches = re.findall(pattern, log_text)
            if matches:
                found[phase] = float(matches[-1])
                break
    return EnginePhases(**found, compile_cache_hit=CACHE_HIT in log_text)
