"""Shadow traffic's parts, apart from the stack: which requests are copied, how a pair of
answers is scored, what the gateway keeps, and how a step is judged on the counts the gateway
exports. tests/test_shadow_canary.py runs the whole on the real stack."""

import asyncio
import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from llmship.pipeline_config import QualityPolicy, RolloutConfig
from serving.gateway import CompletionRequest, Route
from serving.shadow import (
    Shadow,
    Shadower,
    agreement_of,
    copy_body,
    is_sampled,
    streamed_text,
    why_not_comparable,
)
from tasks.canary_rule import (
    StepResult,
    Traffic,
    judge,
    parse_traffic,
    render_steps,
    shadow_score,
)

SHADOW = Shadow(version="v2", fraction=0.25, max_rps=1000)


def test_the_same_request_ids_give_the_same_sample_of_about_the_fraction():
    ids = [f"req-{i}" for i in range(4000)]
    first = [i for i in ids if is_sampled(i, SHADOW)]
    assert first == [i for i in ids if is_sampled(i, SHADOW.model_copy())]
    assert 0.22 < len(first) / len(ids) < 0.28
    # Another candidate, another sample: a rollout does not always watch the same requests.
    other = [i for i in ids if is_sampled(i, SHADOW.model_copy(update={"version": "v3"}))]
    assert other != first and 0.22 < len(other) / len(ids) < 0.28
    assert all(is_sampled(i, SHADOW.model_copy(update={"fraction": 1.0})) for i in ids)


@pytest.mark.parametrize(
    "temperature,seed,n,comparable",
    [
        (0, None, None, True),
        (0.0, None, 1, True),
        (0.7, 42, None, True),
        (None, None, None, False),
        (0.7, None, None, False),
        (0, None, 2, False),
    ],
)
def test_only_answers_that_can_be_reproduced_are_compared(temperature, seed, n, comparable):
    assert (why_not_comparable(temperature, seed, n) is None) is comparable


def test_a_streamed_answer_is_the_text_of_its_chunks_and_only_when_whole():
    completion = (
        b'data: {"choices":[{"index":0,"text":"March"}]}\n\n'
        b'data: {"choices":[{"index":0,"text":" 16, 2022"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    assert streamed_text(completion) == "March 16, 2022"
    chat = (
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
        b'data: {"choices":[{"index":0,"delta":{"content":"payment"}}]}\n\ndata: [DONE]\n\n'
    )
    assert streamed_text(chat) == "payment"
    assert streamed_text(completion.replace(b"data: [DONE]\n\n", b"")) is None
    error = b'data: {"error": {"message": "the model server failed mid-answer"}}\n\n'
    assert streamed_text(completion[:50] + b"\n\n" + error) is None


def test_answers_agree_exactly_by_the_gates_extraction_or_not_at_all():
    assert agreement_of(" March 16,  2022\n", "March 16, 2022") == "exact"
    # The gate reads the first line: what follows it is not the answer.
    assert agreement_of(" $12,000\nClause: ...", "$12,000\nQuestion") == "answer"
    assert agreement_of("termination", "payment") == "none"


def test_a_streamed_request_is_copied_whole():
    body = json.dumps(
        {"model": "m", "prompt": "p", "stream": True, "stream_options": {"include_usage": True}}
    ).encode()
    assert json.loads(copy_body(body, streamed=True)) == {
        "model": "m",
        "prompt": "p",
        "stream": False,
    }
    assert copy_body(body, streamed=False) is body


def test_a_route_shadows_only_its_canary_and_never_its_live_version():
    Route(version="v1", shadow=SHADOW)  # a shadow-only step
    with pytest.raises(ValidationError, match="the canary's version"):
        Route(version="v1", canary={"version": "v3", "percent": 10}, shadow=SHADOW)
    with pytest.raises(ValidationError, match="another version than the live one"):
        Route(version="v2", shadow=SHADOW)


class Candidate:
    """The candidate's side of Shadower.send: answers by prompt, as an engine would."""

    def __init__(self, answers: dict[str, str], status: int = 200):
        self.answers, self.status, self.sent = answers, status, []

    async def __call__(self, model, version, endpoint, body):
        prompt = json.loads(body)["prompt"]
        self.sent.append(prompt)
        return self.status, json.dumps({"choices": [{"text": self.answers[prompt]}]}).encode()


def run_shadower(requests, candidate, shadow=SHADOW, queue_size=64):
    """Offer each (prompt, live answer, request id) as the gateway does once the live answer
    is out, let the workers score, and return the shadower."""
    registry = CollectorRegistry()

    async def main():
        shadower = Shadower(
            registry,
            queue_size=queue_size,
            concurrency=2,
            timeout_s=5,
            max_bytes=4096,
            kept_pairs=100,
            send=candidate,
            shadow_of=lambda model: shadow,
        )
        for prompt, live, rid in requests:
            body = json.dumps({"model": "m", "prompt": prompt, "temperature": 0}).encode()
            parsed = CompletionRequest.model_validate_json(body)
            copy = shadower.choose("m", shadow, "/v1/completions", body, parsed, rid)
            if copy:
                shadower.offer(copy, live)
        workers = asyncio.create_task(shadower.run())
        await asyncio.wait_for(shadower.queue.join(), 30)  # every copy scored
        workers.cancel()
        return shadower

    return asyncio.run(main()), registry


def test_the_gateway_keeps_counts_and_hashes_and_examples_only_when_asked():
    everything = SHADOW.model_copy(update={"fraction": 1.0})
    requests = [(f"q{i}", "yes", f"id{i}") for i in range(6)]
    candidate = Candidate({f"q{i}": "yes" if i < 4 else "no" for i in range(6)})
    shadower, registry = run_shadower(requests, candidate, everything)
    kept = shadower.kept("m", since=0)["v2"]
    assert [p["agreement"] for p in kept["pairs"]].count("none") == 2 and len(kept["pairs"]) == 6
    assert kept["examples"] == []
    assert "yes" not in json.dumps(kept) and "q1" not in json.dumps(kept)  # hashes only

    keeping = everything.model_copy(update={"keep_examples": 1})
    shadower, _ = run_shadower(requests, candidate, keeping)
    [example] = shadower.kept("m", since=0)["v2"]["examples"]  # the last disagreement only
    assert (example["prompt"], example["live"], example["candidate"]) == ("q5", "yes", "no")

    window = parse_traffic(generate_latest(registry).decode(), "m", "v2")
    assert window.pairs == {"exact": 4.0, "none": 2.0}
    assert window.shadow == {"answered": 6.0}


def test_copies_past_the_rate_cap_or_the_queue_are_dropped_never_waited_for():
    everything = SHADOW.model_copy(update={"fraction": 1.0, "max_rps": 1})
    requests = [(f"q{i}", "a", f"id{i}") for i in range(10)]
    shadower, registry = run_shadower(
        requests, Candidate({f"q{i}": "a" for i in range(10)}), everything
    )
    # A burst of 10 within a moment: the bucket holds 1 (and refills at 1 a second).
    window = parse_traffic(generate_latest(registry).decode(), "m", "v2")
    assert window.shadow == {"answered": 1.0, "capped": 9.0}

    _, registry = run_shadower(
        requests,
        Candidate({f"q{i}": "a" for i in range(10)}),
        everything.model_copy(update={"max_rps": 100}),
        queue_size=3,
    )
    window = parse_traffic(generate_latest(registry).decode(), "m", "v2")
    assert window.shadow == {"answered": 3.0, "dropped": 7.0}


def test_copies_the_candidate_fails_are_its_errors():
    everything = SHADOW.model_copy(update={"fraction": 1.0})
    requests = [(f"q{i}", "a", f"id{i}") for i in range(4)]
    _, registry = run_shadower(requests, Candidate({}, status=500), everything)
    window = parse_traffic(generate_latest(registry).decode(), "m", "v2")
    assert window.shadow == {"failed": 4.0} and not window.pairs
    # Judged with the new version's own requests: 4 failed copies of 4 sent.
    breach = judge(window, RolloutConfig(), finished=False, shadow_only=True)
    assert breach == "error rate 100.0% (4 of 4 requests, 4 of them shadow copies) > 1.0%"


POLICY = QualityPolicy(enabled=True, min_pairs=30, agreement_floor=0.9, shadow_bake_seconds=60)


def scored(exact=0, answer=0, none=0):
    """A step's window of shadowed pairs, by agreement."""
    pairs = {"exact": exact, "answer": answer, "none": none}
    return Traffic(
        shadow={"answered": float(exact + answer + none)},
        pairs={k: float(v) for k, v in pairs.items() if v},
    )


def test_a_candidate_that_answers_as_the_live_one_passes():
    cfg = RolloutConfig(quality=POLICY)
    assert judge(scored(exact=60), cfg, finished=True) is None
    # Formatting aside (the answer, not the text): the same answer counts as agreement...
    assert judge(scored(exact=30, answer=30), cfg, finished=True) is None
    # ...unless the policy compares whole texts.
    exact = RolloutConfig(quality=POLICY.model_copy(update={"compare": "exact"}))
    assert "agreed with the live version's in 30 of 60" in judge(
        scored(exact=30, answer=30), exact, finished=True
    )


def test_a_fluent_wrong_candidate_breaches_as_soon_as_it_is_surely_below_the_floor():
    cfg = RolloutConfig(quality=POLICY)
    assert judge(scored(exact=10, none=10), cfg, finished=False) is None  # < min_pairs yet
    breach = judge(scored(exact=18, none=12), cfg, finished=False)
    assert breach.startswith("the new version's answers agreed with the live version's in 18 of")
    assert "60.0%): even the 95% upper bound 0.7" in breach and "floor 0.900" in breach


def test_agreement_below_the_floor_by_its_lower_bound_breaches_when_the_step_ends():
    cfg = RolloutConfig(quality=POLICY)
    # 29 of 30 agree (96.7%), but 30 pairs cannot show 90% with 95% confidence.
    assert judge(scored(exact=29, none=1), cfg, finished=False) is None
    breach = judge(scored(exact=29, none=1), cfg, finished=True)
    assert "96.7%): its 95% lower bound 0.864" in breach and "below the agreement floor" in breach
    # 150 pairs at the same rate can.
    assert judge(scored(exact=145, none=5), cfg, finished=True) is None


def test_too_few_pairs_is_a_breach_when_the_step_ends_even_at_0_percent():
    cfg = RolloutConfig(quality=POLICY, min_requests=10)
    breach = judge(scored(exact=5), cfg, finished=True, shadow_only=True)
    assert "fewer than min_pairs 30, too little evidence" in breach
    # A shadow-only step has no client requests: min_requests does not apply to it.
    assert judge(scored(exact=40), cfg, finished=True, shadow_only=True) is None
    assert "fewer than min_requests 10" in judge(scored(exact=40), cfg, finished=True)


def test_the_steps_report_shows_pairs_agreement_bound_floor_and_examples():
    window = scored(exact=18, none=12)
    quality = shadow_score(window, POLICY)
    quality.examples = [
        {
            "request_sha256": "ab" * 32,
            "prompt": "Clause: X\nAnswer:",
            "live": "payment",
            "candidate": "termination",
        }
    ] * 12
    quality.stored = "s3://artifacts/shadow/m/v2/step2.json"
    steps = [
        StepResult(
            percent=0,
            seconds=10,
            requests=0,
            errors=0,
            p99_seconds=None,
            quality=shadow_score(scored(exact=40), POLICY),
        ),
        StepResult(
            percent=50,
            seconds=4,
            requests=9,
            errors=0,
            p99_seconds=0.2,
            breach="agreement below the floor",
            quality=quality,
        ),
    ]
    report = render_steps("m", "v2", steps, "rolled back")
    assert "| 1 | 0% | 0 | 0 | - | 40 | 40 | 100.0% | 0.937 | 0.900 | - |" in report
    assert (
        "| 2 | 50% | 9 | 0 | 0.200 | 30 | 18 | 60.0% | 0.451 | 0.900 | agreement below the floor |"
        in report
    )
    assert report.count("  - new: 'termination'") == 10  # ten examples at most
    assert "`s3://artifacts/shadow/m/v2/step2.json`" in report


def test_a_quality_policy_without_a_step_to_judge_is_refused():
    with pytest.raises(ValidationError, match="set canary_steps or quality.shadow_bake_seconds"):
        RolloutConfig(quality=QualityPolicy(enabled=True))
    RolloutConfig(quality=QualityPolicy(enabled=True, shadow_bake_seconds=60))
