"""One fixed load against one model server, sent by vLLM's own benchmark client (the library
behind `vllm bench serve`): the performance gate's measurement. Runs in the engine's
environment, where vLLM is installed:

    python -m jobs.benchmark --request R.json --result S.json   # a MeasureRequest

Random-token prompts of a fixed length from a fixed seed, EOS ignored: every build gets the
same requests and generates the same number of tokens, so the figures compare engines, not
answers.
"""

from __future__ import annotations

import contextlib
import io
import sys

from pydantic import BaseModel

from llmship.errors import BenchmarkFailed
from llmship.subprocess_stage import stage_main

PERCENTILES = (50, 99)


class Load(BaseModel):
    """A load: how many requests, how many at once, how long each is."""

    name: str  # "production" or "single-stream"
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0


class LoadRequest(BaseModel):
    base_url: str  # the engine's own URL, as an evaluation talks to it
    served_name: str
    tokenizer_dir: str  # the build's own tokenizer: prompts of exactly input_len tokens
    load: Load


class MeasureRequest(BaseModel):
    """Loads sent one after the other to one server, from one process (vLLM's import takes
    seconds: once per server, not once per load)."""

    base_url: str
    served_name: str
    tokenizer_dir: str
    loads: list[Load]


class LoadFigures(BaseModel):
    load: Load
    completed: int
    failed: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_median_ms: float
    errors: list[str] = []  # the first few failed requests' errors, as the client saw them


def client_argv(req: LoadRequest) -> list[str]:
    """`vllm bench serve`'s own options, as its command line would take them."""
    load = req.load
    return [
        "--backend",
        "vllm",
        "--base-url",
        req.base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        req.served_name,
        "--tokenizer",
        req.tokenizer_dir,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(load.input_len),
        "--random-output-len",
        str(load.output_len),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(load.num_prompts),
        "--max-concurrency",
        str(load.concurrency),
        "--request-rate",
        "inf",
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        str(load.seed),
        "--percentile-metrics",
        "ttft,tpot,itl",
        "--metric-percentiles",
        ",".join(str(p) for p in PERCENTILES),
        "--num-warmups",
        str(min(load.concurrency, 4)),
        "--disable-tqdm",
        "--save-detailed",
    ]


def measure(req: LoadRequest) -> LoadFigures:
    """Send the load and read back vLLM's own figures."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(client_argv(req))
    print(
        f"vllm bench serve: {req.load.num_prompts} requests, {req.load.concurrency} at once, "
        f"{req.load.input_len} tokens in, {req.load.output_len} out, to {req.base_url}",
        flush=True,
    )
    # Its report goes to our log; the per-request lists stay out of it.
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        result = main(args)
    text = report.getvalue()
    start = text.find("Serving Benchmark Result")
    if start >= 0:
        print(text[text.rfind("\n", 0, start) + 1 :].strip(), flush=True)
    errors = [e for e in result.get("errors", []) if e]
    figures = LoadFigures(
        load=req.load,
        completed=int(result["completed"]),
        failed=int(result.get("failed", req.load.num_prompts - result["completed"])),
        duration_s=float(result["duration"]),
        output_tokens_per_s=float(result["output_throughput"]),
        requests_per_s=float(result["request_throughput"]),
        ttft_p50_ms=float(result["p50_ttft_ms"]),
        ttft_p99_ms=float(result["p99_ttft_ms"]),
        itl_p50_ms=float(result["p50_itl_ms"]),
        itl_p99_ms=float(result["p99_itl_ms"]),
        tpot_median_ms=float(result["median_tpot_ms"]),
        errors=[e.strip().splitlines()[-1][:300] for e in errors[:3]],
    )
    if figures.completed == 0:
        raise BenchmarkFailed(
            f"the server at {req.base_url} answered none of {req.load.num_prompts} requests of "
            f"the performance gate's {req.load.name} load (first error: "
            f"{figures.errors[0] if figures.errors else 'none reported'}); its engine log is "
            "named in `llmship status`"
        )
    return figures


class Measurement(BaseModel):
    figures: list[LoadFigures]  # one per load, in the request's order
    # The measured server's cold start, seconds (its slowest replica's fetch and engine start
    # to healthy): set by the performance gate's task, which knows the server, not the client.
    cold_start_s: float | None = None


def measure_all(req: MeasureRequest) -> Measurement:
    return Measurement(
        figures=[
            measure(
                LoadRequest(
                    base_url=req.base_url,
                    served_name=req.served_name,
                    tokenizer_dir=req.tokenizer_dir,
                    load=load,
                )
            )
            for load in req.loads
        ]
    )


if __name__ == "__main__":
    sys.exit(stage_main(measure_all, MeasureRequest))
