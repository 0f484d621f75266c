"""The gate's rule on its own: per task, candidate >= baseline * (1 - rtol) - atol."""

from tasks.gate import Evaluation, TaskScore, judge


def scores(**by_task: float) -> Evaluation:
    return Evaluation(seconds=0.0, scores={
        name: TaskScore(score=value, stderr=None, n=100) for name, value in by_task.items()})


def test_a_drop_past_rtol_fails_only_that_task():
    verdicts = judge(scores(a=1.0, b=0.8), scores(a=0.94, b=0.79), rtol=0.05)
    by_task = {v.task: v for v in verdicts}
    assert not by_task["a"].passed and abs(by_task["a"].threshold - 0.95) < 1e-9
    assert by_task["b"].passed and abs(by_task["b"].delta + 0.01) < 1e-9


def test_equal_scores_pass_and_gains_pass():
    assert all(v.passed for v in judge(scores(a=0.69), scores(a=0.69), rtol=0.0))
    assert all(v.passed for v in judge(scores(a=0.5), scores(a=0.7), rtol=0.0))


def test_atol_absorbs_one_item_on_a_near_zero_baseline():
    base, cand = scores(date=0.01), scores(date=0.0)
    assert not judge(base, cand, rtol=0.05)[0].passed
    verdict = judge(base, cand, rtol=0.05, atol=0.02)[0]
    assert verdict.passed and verdict.threshold == 0.0
    # atol does not hide a real loss on a task the baseline does well.
    assert not judge(scores(a=0.9), scores(a=0.8), rtol=0.05, atol=0.02)[0].passed
