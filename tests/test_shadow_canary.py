"""A canary judged on its answers, on the real stack: shadow copies of live requests scored
against the live version's answers (serving/shadow.py, tasks/canary_rule.py).

Two versions are made from the live one's files, as a team's other builds would reach the
store: a twin (the same weights: it answers as the live version does) and a broken build (the
attention output projections of three of its four layers zeroed: it answers 200 OK, as fast,
in the same formats, and wrong a third of the time). The twin passes a shadow-only step and
a canary step and goes live; the broken build is rolled back by the quality criterion alone,
its error rate and latency within bounds.
The tests run in file order, after those that leave a version live.
"""

import json
import logging
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from llmship.errors import CanaryFailed
from llmship.pipeline_config import QualityPolicy, RolloutConfig
from llmship.store import version_prefix
from llmship.versions import read_version, sign_version
from serving.shadow import Shadow, is_sampled, sha256
from tests.helpers.prefect_api import events_named
from tests.helpers.waiting import wait_for

pytestmark = [pytest.mark.stack, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
log = logging.getLogger("test_shadow_canary")


def eval_prompts() -> list[str]:
    lines = (REPO / "calibration_data" / "contracts" / "eval.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:60]]


def publish_copy(store, source: str, version: str, change=None):
    """source's files published again as version (changed by change(dir) first)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        manifest = store.download_dir(version_prefix(MODEL, source), files)
        if change:
            change(files)
        store.upload_dir(
            files, version_prefix(MODEL, version), manifest.model_copy(update={"key": version})
        )
    sign_version(store, MODEL, version)  # as a publish signs
    return read_version(store, MODEL, version)


def zero_tensor(folder: Path, name: str) -> None:
    """Zero one tensor of a safetensors file in place (the format: a little-endian u64 header
    length, a JSON header of offsets, the raw data)."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8 : 8 + length])[name]["data_offsets"]
    raw[8 + length + start : 8 + length + end] = bytes(end - start)
    path.write_bytes(bytes(raw))


@dataclass
class Sent:
    request_id: str
    body_sha256: str
    status: int
    version: str | None
    seconds: float


class Clients:
    """Clients sending the domain's questions at temperature 0, each request with its own
    x-request-id (and a body of its own: the id rides in OpenAI's `user` field)."""

    def __init__(self, gateway: str, tag: str, workers: int = 2):
        self.gateway, self.tag = gateway, tag
        self.sent: list[Sent] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, worker: int) -> None:
        prompts = eval_prompts()
        i = worker
        with httpx.Client(timeout=60.0) as client:
            while not self._stop.is_set():
                rid = f"{self.tag}-{i}"
                body = json.dumps(
                    {
                        "model": MODEL,
                        "prompt": prompts[i % len(prompts)],
                        "max_tokens": 12,
                        "temperature": 0,
                        "stop": ["\n"],
                        "user": rid,
                    }
                ).encode()
                started = time.perf_counter()
                try:
                    resp = client.post(
                        f"{self.gateway}/v1/completions",
                        content=body,
                        headers={"content-type": "application/json", "x-request-id": rid},
                    )
                    status, version = resp.status_code, resp.headers.get("x-llmship-version")
                except httpx.HTTPError:
                    status, version = 0, None
                self.sent.append(
                    Sent(rid, sha256(body), status, version, time.perf_counter() - started)
                )
                i += 2
                time.sleep(0.05)

    def failures(self) -> list[Sent]:
        return [s for s in self.sent if s.status != 200]


def quality_rollout(**quality) -> RolloutConfig:
    policy = {
        "enabled": True,
        "sample_fraction": 0.5,
        "min_pairs": 15,
        "agreement_floor": 0.8,
        "shadow_bake_seconds": 12,
        "max_shadow_rps": 20,
    }
    return RolloutConfig(
        canary_steps=[50],
        bake_seconds=10,
        max_p99_seconds=20,
        quality=QualityPolicy(**(policy | quality)),
    )


@pytest.fixture(scope="module")
def live(first_run, stack, store) -> dict:
    return {"before": store.read_alias(MODEL, "live")}


def test_a_twin_of_the_live_version_agrees_and_goes_live(live, stack, store):
    from tasks.rollout import rollout

    twin = publish_copy(store, live["before"], "shadowtwin001")
    with Clients(stack.gateway_url, "twin") as clients:
        time.sleep(2)
        result = rollout(twin, quality_rollout(), log=log)
    live["twin"] = twin.version
    assert result.changed and result.version == twin.version
    shadow_only, canary = result.steps
    assert (shadow_only.percent, canary.percent) == (0, 50)
    for step in result.steps:
        print(f"twin, step {step.percent:g}%: {step.quality.model_dump(exclude={'examples'})}")
        assert step.breach is None and step.quality.pairs >= 15, step
        assert step.quality.agreement >= 0.95, step.quality
    assert shadow_only.requests == 0 and canary.requests > 0  # copies only, then traffic
    assert clients.failures() == []
    # Every client got its answer from the live version, or from the canary in its step:
    # never from a shadow copy.
    assert {s.version for s in clients.sent} == {live["before"], twin.version}

    # What was sampled is what the request ids say, on the gateway as in any other place.
    shadow = Shadow(version=twin.version, fraction=0.5, max_rps=20)
    chosen = {s.body_sha256 for s in clients.sent if is_sampled(s.request_id, shadow)}
    passed_over = {s.body_sha256 for s in clients.sent} - chosen
    record = store.get_json(shadow_only.quality.stored.split("/", 3)[3])[0]
    scored = {p["request_sha256"] for p in record["pairs"]}
    assert len(scored) >= 15 and scored <= chosen and not scored & passed_over
    # Counts and hashes only: the policy keeps no examples by default.
    assert record["examples"] == [] and "Clause" not in json.dumps(record)


def test_a_canary_that_answers_fluently_but_wrongly_is_rolled_back_by_its_answers(
    live, stack, store
):
    from tasks.rollout import rollout

    broken = publish_copy(
        store,
        live["twin"],
        "shadowbroken1",
        change=lambda d: [
            zero_tensor(d, f"model.layers.{layer}.self_attn.o_proj.weight") for layer in (1, 2, 3)
        ],
    )
    # Every live request copied: the sampling was shown above.
    policy = quality_rollout(keep_examples=5, sample_fraction=1.0)
    with Clients(stack.gateway_url, "broken") as clients:
        time.sleep(2)
        with pytest.raises(CanaryFailed) as failed:
            rollout(broken, policy, log=log)
        time.sleep(2)
    message = str(failed.value)
    print(f"broken: {message}")
    assert message.startswith(f"shadow-only step of {MODEL} {broken.version} breached")
    assert "answers agreed with the live version's in" in message and "below the agree" in message
    assert f"traffic is back on {live['twin']}" in message
    [step] = failed.value.steps  # the shadow-only step: no client request reached it
    assert step.requests == 0 and step.errors == 0 and step.quality.copies.get("failed", 0) == 0
    assert step.quality.agreement < 0.8 and step.quality.pairs >= 15
    # Clients never saw it: all answered, all by the live version.
    assert clients.failures() == [] and {s.version for s in clients.sent} == {live["twin"]}
    assert store.read_alias(MODEL, "live") == live["twin"]

    # The disagreeing examples the policy keeps, in the bucket under the version.
    record = store.get_json(step.quality.stored.split("/", 3)[3])[0]
    assert record["version"] == broken.version and 1 <= len(record["examples"]) <= 5
    example = record["examples"][0]
    assert example["prompt"].startswith("Clause: ") and example["live"] != example["candidate"]

    def rolled_back_event():
        events = events_named(stack, "llmship.rollout.rolled-back", limit=10)
        return [e["payload"] for e in events if e["payload"]["version"] == broken.version]

    [payload] = wait_for("a rolled-back event", rolled_back_event, timeout=30)
    quality = payload["steps"][0]["quality"]
    assert quality["pairs"] == step.quality.pairs and quality["floor"] == 0.8
    assert "examples" not in quality  # no prompts or answers in an event
