"""The recipe search's policy and comparison on their own (tasks/choose_rule.py), from the
reports the real gates' pure functions make; the stack tests in test_pipeline.py run a search
end to end (the demo deployment's)."""

import pytest

from llmship.contracts import Build, BuildDetails, ServeSpec
from llmship.pipeline_config import CalibrationConfig, GateConfig, PerfConfig, Scheme
from tasks import gate, perf
from tasks.choose_rule import (
    GIB,
    CandidatesReport,
    Trial,
    compare,
    render_markdown,
    svg_chart,
    table_rows,
    text_chart,
)
from tasks.gating import Verdict
from tasks.perf_rule import ServerPrice, loads
from tests.test_gate_rule import TASKS
from tests.test_gate_rule import scores as evaluation
from tests.test_perf_gate import figures

BASELINE_SCORES = {"a": 0.95, "b": 0.90}
PRICE = ServerPrice(hardware="cpu", gpus=0, price_key="cpu", usd_per_hour=0.2)


def build(name: str, gib: float, scheme: Scheme = Scheme.W8A8) -> Build:
    return Build(
        stage="build",
        key=name,
        prefix=f"stages/build/{name}",
        digest=name.ljust(64, "0"),
        files=3,
        bytes=int(gib * GIB),
        details=BuildDetails(
            scheme=scheme,
            precision="int8",
            quantization_format=None,
            serve=ServeSpec(),
            smoke_output="ok",
        ),
    )


BASELINE = build("base", 2.0, Scheme.UNQUANTIZED)


def gated(candidate: Build, **candidate_scores: float) -> Verdict:
    report = gate.gate_report(
        candidate,
        BASELINE,
        GateConfig(rtol=0.05),
        TASKS,
        evaluation(**BASELINE_SCORES),
        evaluation(**candidate_scores),
        harness={},
    )
    judged = gate.judged("k", "m", report)
    return Verdict(report=report, stored=f"stages/gate/{candidate.key}", refusal=judged.refusal)


def measured(
    candidate: Build, tok_s: float, policy: PerfConfig, base_tok_s=100.0, cold_start_s=None
) -> Verdict:
    production, single = loads(policy)
    report = perf.perf_report(
        candidate,
        BASELINE,
        policy,
        {
            "baseline": [figures(production, base_tok_s), figures(single, base_tok_s / 4)],
            "candidate": [figures(production, tok_s), figures(single, tok_s / 4)],
        },
        client={},
        device="cpu",
        price=PRICE,
        cold_start_s=cold_start_s,
    )
    judged = perf.judged("k", "m", report)
    return Verdict(report=report, stored=f"stages/perf/{candidate.key}", refusal=judged.refusal)


def trial(name: str, gib: float, tok_s: float | None, policy: PerfConfig, **scores) -> Trial:
    """A candidate scoring scores (the baseline's, unless given), measured at tok_s when it
    passes the accuracy gate (None: the performance gate is off)."""
    candidate = build(name, gib)
    accuracy = gated(candidate, **(scores or BASELINE_SCORES))
    speed = (
        measured(candidate, tok_s, policy)
        if accuracy.refusal is None and tok_s is not None
        else None
    )
    recipe = CalibrationConfig(scheme=Scheme.W8A8, smoothing_strength=round(gib / 10, 2))
    return Trial(recipe=recipe, build=candidate, gate=accuracy, perf=speed)


def search(trials: list[Trial], policy: PerfConfig) -> CandidatesReport:
    # 1 KiB of KV cache per token, half that in FP8.
    return compare("m", trials, BASELINE, policy, 512, {False: 1024.0, True: 512.0})


def by_version(report: CandidatesReport) -> dict:
    return {r.version: r for r in report.rows}


POLICY = PerfConfig(concurrency=4)


def test_the_fastest_candidate_that_keeps_the_accuracy_wins_and_the_rest_say_why():
    report = search(
        [
            trial("slow", 1.0, 80.0, POLICY),
            trial("fast", 1.0, 130.0, POLICY),
            trial("wrong", 0.5, 500.0, POLICY, a=0.50, b=0.90),
        ],
        POLICY,
    )
    rows = by_version(report)
    assert report.winner == rows["fast" + "0" * 8].version
    assert report.winner_recipe == "W8A8, SmoothQuant 0.1"
    slow, fast, wrong = (rows[n.ljust(12, "0")] for n in ("slow", "fast", "wrong"))
    assert fast.verdict == "winner" and fast.output_tokens_per_s == 130.0
    assert slow.verdict == "passed" and "slower: 80.0 output tokens/s" in slow.why
    assert "0.62x" in slow.why
    # The wrong one would have been fastest: it was never measured, and says why not.
    assert wrong.verdict == "failed accuracy" and not wrong.passed
    assert wrong.output_tokens_per_s is None and "speed not measured" in wrong.why
    assert "llmship_d_a 0.500 <" in wrong.why
    # The baseline's row closes the table, measured and priced like the candidates.
    base = report.rows[-1]
    assert base.verdict == "baseline" and base.output_tokens_per_s == 100.0
    assert base.accuracy == {"llmship_d_a": 0.95, "llmship_d_b": 0.90}


def test_a_tie_on_speed_goes_to_the_smaller_footprint_and_then_to_the_deployment_s_order():
    tie = PerfConfig(concurrency=4, throughput_tie=0.05)
    report = search(
        [trial("big", 2.0, 100.0, tie), trial("small", 1.0, 97.0, tie)],
        tie,
    )
    rows = by_version(report)
    assert report.winner == "small".ljust(12, "0")
    assert "tied on speed (within 5%), larger footprint" in rows["big".ljust(12, "0")].why
    # Outside the tie the faster one wins, whatever its size.
    strict = PerfConfig(concurrency=4, throughput_tie=0.0)
    report = search([trial("big", 2.0, 100.0, strict), trial("small", 1.0, 97.0, strict)], strict)
    assert report.winner == "big".ljust(12, "0")
    # Equal in speed and size: the deployment's order.
    report = search([trial("one", 1.0, 100.0, tie), trial("two", 1.0, 100.0, tie)], tie)
    assert report.winner == "one".ljust(12, "0")


def test_the_footprint_counts_the_kv_cache_of_the_deployment_s_concurrency():
    row = search([trial("x", 1.0, 100.0, POLICY)], POLICY).rows[0]
    # 4 streams of 512 tokens at 1 KiB a token.
    assert row.kv_cache_bytes == 4 * 512 * 1024
    assert row.footprint_bytes == GIB + 4 * 512 * 1024


def test_a_candidate_over_its_performance_limit_loses_and_none_passing_means_no_winner():
    limited = PerfConfig(concurrency=4, min_throughput_ratio=1.2)
    report = search(
        [trial("slow", 1.0, 90.0, limited), trial("wrong", 1.0, 200.0, limited, a=0.1, b=0.1)],
        limited,
    )
    assert report.winner is None and report.winner_recipe is None
    slow, wrong = report.rows[:2]
    assert slow.verdict == "failed performance" and "production output tokens/s 0.90x" in slow.why
    assert wrong.verdict == "failed accuracy"
    markdown = render_markdown(report)
    assert "no candidate passed both gates: nothing was published" in markdown


def test_with_the_performance_gate_off_the_first_passing_recipe_wins():
    off = PerfConfig(enabled=False)
    report = search([trial("wrong", 1.0, None, off, a=0.1, b=0.1), trial("b", 1.0, None, off)], off)
    assert report.winner == "b".ljust(12, "0")
    assert report.rows[-1].output_tokens_per_s is None  # nothing measured, not even the baseline


def test_the_table_prices_every_build_and_the_charts_mark_the_winner():
    report = search([trial("slow", 1.0, 80.0, POLICY), trial("fast", 1.0, 160.0, POLICY)], POLICY)
    rows = table_rows(report)
    assert [r["verdict"] for r in rows] == ["passed", "winner", "baseline"]
    # $0.20 an hour over the tokens of that hour, per million: each build from its own tokens/s.
    for row, tok_s in zip(rows, (80.0, 160.0, 100.0), strict=True):
        assert float(row["$ per 1M output tokens"]) == pytest.approx(
            0.2 / (tok_s * 3600) * 1e6, abs=0.01
        )
    assert rows[1]["accuracy llmship_d_a"] == 0.95 and rows[1]["TTFT p50/p99 ms"] == "100.0 / 200.0"
    chart = text_chart(report)
    assert "* W8A8, SmoothQuant 0.1: 160.0 tokens/s" in chart and "B baseline (BF16)" in chart
    svg = svg_chart(report)
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and "(winner)" in svg
    markdown = render_markdown(report)
    assert "published: **W8A8, SmoothQuant 0.1**" in markdown and "```" in markdown


def test_recipes_are_named_as_the_table_shows_them():
    assert CalibrationConfig(scheme=Scheme.W8A8).describe() == "W8A8, SmoothQuant 0.8"
    assert CalibrationConfig(scheme=Scheme.W8A8, smoothing_strength=0).describe() == (
        "W8A8, no SmoothQuant"
    )
    assert CalibrationConfig(scheme=Scheme.FP8, kv_cache_fp8=True).describe() == (
        "FP8, FP8 KV cache"
    )
    assert CalibrationConfig(scheme=Scheme.UNQUANTIZED).describe() == "UNQUANTIZED"


def test_a_server_slower_to_start_than_the_policy_allows_fails_the_performance_gate():
    """Cold start (issue 32): the candidate's server, its replica's start to healthy, against
    the deployment's ceiling in seconds; measured and shown without one; a slow starter loses
    the search like a slow candidate, and the alert names the figure."""
    from llmship.alerts import PERF_BODY
    from tasks.perf_rule import COLD_START_METRIC

    fast = build("fast", 1.0)
    starts = {"baseline": 40.0, "candidate": 90.0}
    unjudged = measured(fast, 150.0, POLICY, cold_start_s=starts)
    [row] = [v for v in unjudged.report.verdicts if v.metric == COLD_START_METRIC]
    assert (row.load, row.baseline, row.candidate, row.ratio) == ("start", 40.0, 90.0, 2.25)
    assert row.passed is None and row.limit == "-" and unjudged.refusal is None
    assert unjudged.report.cold_start_s == starts

    ceiling = POLICY.model_copy(update={"max_cold_start_s": 60.0})
    slow = measured(fast, 150.0, ceiling, cold_start_s=starts)
    assert not slow.report.passed and [v.metric for v in slow.report.failing] == [COLD_START_METRIC]
    assert "start cold start (s): 90.00 against the baseline's 40.00 (2.25x, limit <= 60 s)" in (
        slow.refusal.message
    )
    from jinja2 import Template

    body = Template(PERF_BODY).render(event={"payload": slow.refusal.payload | {"model": "m"}})
    assert "start cold start (s): candidate 90.00, baseline 40.00 (2.25x, limit <= 60 s)" in body
    assert measured(fast, 150.0, ceiling, cold_start_s={**starts, "candidate": 59.0}).report.passed

    accurate = gated(fast, **BASELINE_SCORES)
    quick = build("quick", 1.0)
    report = search(
        [
            Trial(recipe=CalibrationConfig(), build=fast, gate=accurate, perf=slow),
            Trial(
                recipe=CalibrationConfig(smoothing_strength=0.5),
                build=quick,
                gate=gated(quick, **BASELINE_SCORES),
                perf=measured(quick, 120.0, ceiling, cold_start_s={**starts, "candidate": 30.0}),
            ),
        ],
        ceiling,
    )
    assert report.winner == quick.version
    assert by_version(report)[fast.version].verdict == "failed performance"
    assert "cold start (s) 2.25x (limit <= 60 s)" in by_version(report)[fast.version].why
    assert [r["cold start s"] for r in table_rows(report)] == ["90.0", "30.0", "40.0"]
    # Without a record of either server's start (an engine build's older report): no row.
    assert not any(
        v.metric == COLD_START_METRIC for v in measured(fast, 150.0, ceiling).report.verdicts
    )


SEARCH = {
    t.build.key: t
    for t in (
        trial("first", 1.0, 100.0, POLICY),
        trial("faster", 1.0, 150.0, POLICY),
        trial("wrong", 1.0, 900.0, POLICY, a=0.1, b=0.1),
        trial("slower", 1.0, 120.0, POLICY),
    )
}


@pytest.mark.parametrize(
    ("at_once", "stopped"),
    [(1, [["first"], ["wrong"], ["slower"]]), (2, [["first"], ["wrong", "slower"]])],
)
def test_a_search_keeps_one_candidate_server_the_fastest_so_far(at_once, stopped):
    """A server per recipe would not fit a GPU host: after each wave of trials, only the
    fastest candidate that passed so far keeps its server (for the rollout)."""
    from tasks.choose import keep_fastest

    trials, kept, stops = list(SEARCH.values()), None, []
    for start in range(0, len(trials), at_once):
        kept, losers = keep_fastest(kept, trials[start : start + at_once])
        stops.append([t.build.key for t in losers])
    assert kept.build.key == "faster"
    assert [s for s in stops if s] == stopped
    assert keep_fastest(None, [SEARCH["wrong"]]) == (None, [SEARCH["wrong"]])


def test_candidates_are_tried_as_many_at_once_as_the_plan_says(monkeypatch):
    """Through Prefect (a temporary server): the plan's count of trials run side by side as
    mapped task runs, wave after wave, the results in the deployment's order. The trials
    themselves are stand-ins that take a second: on this CPU machine the plan says one at a
    time, so no stack run tries two real candidates at once."""
    import threading
    import time

    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from llmship.pipeline_config import PipelineConfig
    from tasks import choose

    spans: dict[str, tuple[float, float]] = {}
    stopped: list[str] = []
    lock = threading.Lock()

    def timed_trial(recipe, build, baseline, config):
        started = time.monotonic()
        time.sleep(1.0)
        with lock:
            spans[build.key] = (started, time.monotonic())
        return SEARCH[build.key]

    monkeypatch.setattr(choose, "trial", timed_trial)
    monkeypatch.setattr(
        choose, "release_server", lambda settings, model, build, side: stopped.append(build.key)
    )
    config = PipelineConfig(name="m", source="/m")
    trials = list(SEARCH.values())

    @flow
    def search(at_once: int) -> list[str]:
        found = choose.try_recipes(
            [t.recipe for t in trials], [t.build for t in trials], BASELINE, config, at_once
        )
        return [t.build.key for t in found]

    with prefect_test_harness():
        assert search(2) == ["first", "faster", "wrong", "slower"]

    def overlap(a: str, b: str) -> bool:
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert overlap("first", "faster") and overlap("wrong", "slower")
    assert not overlap("faster", "wrong")  # the second wave after the first
    assert stopped == ["first", "wrong", "slower"]
