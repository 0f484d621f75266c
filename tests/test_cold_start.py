"""A replica's cold start, phase by phase, from its engine's log (issue 32,
serving/cold_start.py): the lines as the installed vLLM writes them, on CPU (a real log of the
suite's CPU engine) and on CUDA (vLLM's own format strings, filled in)."""

from __future__ import annotations

import glob
from pathlib import Path

from llmship.serving_messages import Endpoint, EnginePhases
from serving.cold_start import engine_phases

REPO = Path(__file__).resolve().parents[1]

# The CPU engine's start, as the suite's tiny-llama server logged it (enforce_eager: no
# compile, no graphs).
P = "(EngineCore pid=27197) INFO 12-07 19:26:5"
CPU_LOG = f"""\
{P}7 [base_loader.py:82] Initializing model took 0.158587 seconds
{P}7 [default_loader.py:501] Loading weights took 0.01 seconds
{P}8 [kv_cache_utils.py:2327] CPU KV cache size: 524,288 tokens
{P}8 [core.py:402] init engine (profile, create kv cache, warmup model) took 0.42 s
"""

# A CUDA engine's start: vLLM's format strings (vllm/v1/worker/gpu_model_runner.py,
# compilation/monitor.py, v1/engine/core.py), filled in as an 8B start on an H200 would be.
CUDA_LINES = {
    "Model loading took %s GiB memory and %.6f seconds": ("14.99", 4.812345),
    "Loading weights took %.2f seconds": (3.9,),
    "%storch.compile took %.2f s in total": ("", 21.37),
    "Graph capturing finished in %.0f secs, took %.2f GiB": (6.0, 0.91),
    "init engine (profile, create kv cache, warmup model) took %.2f s (compilation: %.2f s)": (
        38.5,
        21.37,
    ),
}


def test_the_cpu_engine_s_log_gives_its_load_and_init():
    phases = engine_phases(CPU_LOG)
    assert phases == EnginePhases(load_s=0.01, init_s=0.42)
    replica = Endpoint(url="u", replica="r", node_ip="n", node_id="i", fetch_s=1.25)
    replica.engine_start_s, replica.phases = 9.0, phases
    assert replica.cold_start() == "10.2 s: fetch 1.2, load 0.0, init 0.4, other 8.6"


def test_a_cuda_engine_s_log_gives_every_phase_and_init_is_what_compile_and_graphs_leave():
    log = "\n".join(f"INFO [x.py:1] {fmt % args}" for fmt, args in CUDA_LINES.items())
    phases = engine_phases(log + "\nDirectly load the compiled graph(s) for compile range")
    assert phases == EnginePhases(
        load_s=4.812345, compile_s=21.37, graphs_s=6.0, init_s=38.5, compile_cache_hit=True
    )
    replica = Endpoint(
        url="u", replica="r", node_ip="n", node_id="i", fetch_s=12.0, engine_start_s=60.0
    )
    replica.phases = phases
    assert replica.cold_start() == (
        "72.0 s: fetch 12.0, load 4.8, compile 21.4, graphs 6.0, init 11.1, other 16.7 "
        "(compile cache hit)"
    )
    # A restarted engine appends to its log: the last start counts.
    again = engine_phases(log + "\n" + CPU_LOG)
    assert again.init_s == 0.42 and again.compile_s == 21.37


def test_the_formats_are_the_installed_vllm_s_own():
    """The patterns were written against these strings: a vLLM that rewords one fails here."""
    sources = "".join(
        Path(f).read_text()
        for pattern in ("v1/worker/gpu_model_runner.py", "compilation/monitor.py")
        for f in glob.glob(str(REPO / f".venv/serve/lib/python*/site-packages/vllm/{pattern}"))
    )
    assert sources, "the serve environment's vLLM is not installed (make setup)"
    for fmt in ("Model loading took %s GiB memory and %.6f seconds", "Graph capturing finished in"):
        assert fmt in sources
    assert "torch.compile took %.2f s in total" in sources


def test_an_engine_that_says_nothing_has_no_phases():
    assert engine_phases("TensorRT-LLM server listening") == EnginePhases()
    assert Endpoint(url="u", replica="r", node_ip="n", node_id="i").cold_start() == ""
