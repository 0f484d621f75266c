"""The gate's policy on its own: per task, candidate >= max(baseline * (1 - rtol) - atol, floor),
per-task overrides, the Wilson strict mode, and policies that name what the gate cannot run."""

import json

import pytest

from jobs.evaluate import Evaluation, TaskScore, TaskSet
from llmship.errors import GateConfigError
from llmship.pipeline_config import GateConfig, TaskPolicy
from tasks.gate_rule import (
    DOMAIN_METRIC,
    GateReport,
    judge,
    render_markdown,
    resolve_tasks,
    rule_of,
    wilson_lower,
)

TASKS = TaskSet(
    dataset="d", eval_file="-", eval_data_sha256="0" * 64, domain=["a", "b"], standard=[]
)


def scores(n=100, **by_kind: float) -> Evaluation:
    return Evaluation(
        backend="vllm",
        seconds=0.0,
        scores={
            TASKS.domain_task(kind): TaskScore(metrics={DOMAIN_METRIC: value}, n=n)
            for kind, value in by_kind.items()
        },
    )


def verdicts(base, cand, **policy):
    return {
        v.task.removeprefix("llmship_d_"): v for v in judge(base, cand, GateConfig(**policy), TASKS)
    }


def test_a_drop_past_rtol_fails_only_that_task():
    by_task = verdicts(scores(a=1.0, b=0.8), scores(a=0.94, b=0.79), rtol=0.05)
    assert not by_task["a"].passed and abs(by_task["a"].threshold - 0.95) < 1e-9
    assert by_task["b"].passed and abs(by_task["b"].delta + 0.01) < 1e-9


def test_equal_scores_pass_and_gains_pass():
    assert all(
        v.passed for v in verdicts(scores(a=0.69, b=0.5), scores(a=0.69, b=0.7), rtol=0.0).values()
    )


def test_atol_absorbs_one_item_on_a_near_zero_baseline():
    base, cand = scores(a=0.9, b=0.01), scores(a=0.9, b=0.0)
    assert not verdicts(base, cand, rtol=0.05)["b"].passed
    b = verdicts(base, cand, rtol=0.05, atol=0.02)["b"]
    assert b.passed and b.threshold == 0.0
    # atol does not hide a real loss on a task the baseline does well.
    assert not verdicts(scores(a=0.9, b=0.5), scores(a=0.8, b=0.5), rtol=0.05, atol=0.02)[
        "a"
    ].passed


def test_per_task_tolerance_and_floor_override_the_defaults():
    base, cand = scores(a=0.9, b=0.6), scores(a=0.84, b=0.6)
    assert not verdicts(base, cand, rtol=0.05)["a"].passed
    loose = verdicts(base, cand, rtol=0.05, per_task={"a": TaskPolicy(rtol=0.1)})["a"]
    assert loose.passed and loose.rtol == 0.1 and abs(loose.threshold - 0.81) < 1e-9
    # A floor holds even where the baseline itself is below it.
    floored = verdicts(base, cand, rtol=0.05, per_task={"llmship_d_b": TaskPolicy(floor=0.7)})
    assert not floored["b"].passed and floored["b"].threshold == 0.7
    assert floored["a"].floor is None  # the other task keeps the defaults


def test_wilson_lower_bound_matches_the_formula():
    # Worked values: p=0.5, n=100, z=1.645 -> 0.4183; p=1, n=100 -> 0.9737; n=0 -> 0.
    assert abs(wilson_lower(0.5, 100, 0.95) - 0.4183) < 1e-3
    assert abs(wilson_lower(1.0, 100, 0.95) - 0.9737) < 1e-3
    assert wilson_lower(0.3, 0, 0.95) == 0.0
    assert wilson_lower(0.8, 1000, 0.95) > wilson_lower(0.8, 100, 0.95)


def test_strict_mode_needs_enough_items_to_be_sure():
    base = scores(a=0.9, b=0.5)
    few, many = scores(n=50, a=0.9, b=0.5), scores(n=5000, a=0.9, b=0.5)
    strict = dict(rtol=0.05, strict=True, confidence=0.95)
    assert all(v.passed for v in verdicts(base, few, rtol=0.05).values())
    on_few = verdicts(base, few, **strict)
    assert not on_few["a"].passed and on_few["a"].measured < on_few["a"].candidate
    assert all(v.passed for v in verdicts(base, many, **strict).values())
    assert rule_of(GateConfig(**strict)).startswith("wilson_lower(candidate, n, 95%)")


def test_report_names_the_rule_and_every_number(tmp_path):
    config = GateConfig(rtol=0.05, atol=0.01, per_task={"a": TaskPolicy(floor=0.5)})
    tasks = judge(scores(a=1.0, b=0.8), scores(a=0.7, b=0.8), config, TASKS)
    report = GateReport(
        passed=False,
        rule=rule_of(config),
        backend="vllm",
        rtol=0.05,
        atol=0.01,
        dataset="d",
        eval_data_sha256="0" * 64,
        candidate="stages/build/c",
        candidate_version="abc",
        baseline="stages/build/b",
        tasks=tasks,
        harness={},
        seconds={},
    )
    md = render_markdown("m", report)
    assert "Accuracy gate FAILED: m" in md and rule_of(config) in md
    assert (
        "| llmship_d_a | exact_match,strip | 100 | 1.000 | 0.700 | -0.300 | 0.05 | 0.01 "
        "| 0.500 | 0.940 | 0.700 | **FAIL** |" in md
    )
    assert "version `abc`" in md


def write_eval(root, name, kinds):
    (root / name).mkdir()
    (root / name / "eval.jsonl").write_text(
        "".join(
            json.dumps({"id": f"{k}-{i}", "task": k, "prompt": f"{k} {i}?", "answer": "x"}) + "\n"
            for k in kinds
            for i in range(3)
        )
    )


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    from llmship.settings import get_settings

    monkeypatch.setenv("LLMSHIP_CALIBRATION_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    write_eval(tmp_path, "ds", ["amount", "date"])
    yield tmp_path
    get_settings.cache_clear()


def test_task_set_is_every_kind_by_default_or_the_ones_named(data_root):
    assert resolve_tasks(GateConfig(dataset="ds")).names == ["llmship_ds_amount", "llmship_ds_date"]
    picked = resolve_tasks(
        GateConfig(dataset="ds", domain_tasks=["date"], standard_tasks=["gsm8k"])
    )
    assert picked.names == ["llmship_ds_date", "gsm8k"]


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"domain_tasks": ["amount", "clause"]}, "gate.domain_tasks names ['clause']"),
        ({"domain_tasks": []}, "the gate has no tasks"),
        (
            {"per_task": {"amount": {"rtol": 0.1}, "mmlu": {"floor": 0.5}}},
            "gate.per_task names ['mmlu'], which the gate does not run",
        ),
    ],
)
def test_a_policy_naming_what_the_gate_cannot_run_is_refused(data_root, policy, message):
    with pytest.raises(GateConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_tasks(GateConfig(dataset="ds", **policy))


@pytest.mark.parametrize(
    "bad",
    [
        {"rtol": -0.1},
        {"rtol": 1.5},
        {"confidence": 1.0},
        {"per_task": {"a": {"floor": 2}}},
        {"backend": "tensorrt"},
        {"tolerance": 0.1},
    ],
)
def test_out_of_range_or_unknown_gate_settings_are_refused(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        GateConfig(**bad)


def test_missing_eval_file_names_the_path(data_root):
    (data_root / "noeval").mkdir()
    with pytest.raises(Exception, match=r"noeval/eval.jsonl does not exist"):
        resolve_tasks(GateConfig(dataset="noeval"))
