"""Shadow traffic: copies of a share of the live version's requests, sent to a candidate,
and each pair of answers scored. A canary is then judged on what it answers, not only on
whether it answers (tasks/rollout.py reads the counts from every gateway's /metrics).

- Which requests: those the live version answered whole, with `temperature: 0` or a `seed`
  of their own (a sampled answer cannot be compared with another), `n` of 1, chosen by a hash
  of their request id (the client's `x-request-id`, else the body) and the candidate's
  version: the same ids give the same sample, on every gateway.
- Never in the client's way: a copy is offered after the client's answer is complete, to a
  bounded queue, and sent by a few workers of its own; a full queue, a copy over the rate cap
  (max_rps, per gateway) or a request past the size limit is dropped and counted.
- Scored twice: `exact` (the whole text, whitespace normalised) and `answer` (the first line,
  stripped: how the accuracy gate's tasks extract an answer, lm-eval's `until: ["\\n"]` with
  its whitespace filter).
- Privacy: the gateway keeps counts and sha256 hashes of each pair; the prompt and both
  answers only of disagreeing pairs, and only as many as the route's shadow says
  (keep_examples: 0 by default).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel

from llmship.serving_messages import Agreement, Example, KeptPairs, ScoredPair, Shadow

log = logging.getLogger("llmship.gateway.shadow")

# ------------------------------------------------------------------ pure parts


def is_sampled(request_id: str, shadow: Shadow) -> bool:
    digest = hashlib.sha256(f"{shadow.version}:{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < shadow.fraction


def why_not_comparable(temperature: float | None, seed: Any, n: int | None) -> str | None:
    """Why this request's answers cannot be compared, or None when they can."""
    if (n or 1) != 1:
        return "n > 1"
    if temperature == 0 or seed is not None:
        return None
    return "sampled: temperature not 0 and no seed"


def answer_text(payload: Any) -> str | None:
    """The first choice's text of a completion or chat completion."""
    try:
        choice = payload["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def streamed_text(raw: bytes) -> str | None:
    """The first choice's text of a server-sent event stream; None unless it ended with
    `data: [DONE]` (a broken stream is not an answer)."""
    parts = []
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return "".join(parts)
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        for choice in chunk.get("choices") or [] if isinstance(chunk, dict) else []:
            if choice.get("index", 0) != 0:
                continue
            piece = (
                choice.get("text")
                if "text" in choice
                else (choice.get("delta") or {}).get("content")
            )
            if isinstance(piece, str):
                parts.append(piece)
    return None


def gate_answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def agreement_of(live: str, candidate: str) -> Agreement:
    if " ".join(live.split()) == " ".join(candidate.split()):
        return "exact"
    if gate_answer(live) == gate_answer(candidate):
        return "answer"
    return "none"


def copy_body(body: bytes, streamed: bool) -> bytes:
    """The request as the candidate gets it: whole, not streamed (its answer is scored, not
    relayed)."""
    if not streamed:
        return body
    payload = json.loads(body)
    payload["stream"] = False
    payload.pop("stream_options", None)
    return json.dumps(payload).encode()


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# ------------------------------------------------------------------ the gateway's part


class Copy(BaseModel):
    """A live request chosen for copying, waiting for the live answer."""

    model: str
    shadow: Shadow
    endpoint: str
    body: bytes
    streamed: bool
    request_sha256: str


class Shadower:
    """Copies live requests to the candidates of routes that have a shadow, and scores them.

    `send(model, version, endpoint, body)` relays a copy to one of version's replicas and
    returns (status, body); `shadow_of(model)` is the route's shadow now (a copy whose route
    changed meanwhile is dropped).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        queue_size: int,
        concurrency: int,
        timeout_s: float,
        max_bytes: int,
        kept_pairs: int,
        send: Callable[[str, str, str, bytes], Awaitable[tuple[int, bytes]]],
        shadow_of: Callable[[str], Shadow | None],
    ) -> None:
        self.queue: asyncio.Queue[tuple[Copy, str]] = asyncio.Queue(queue_size)
        self.concurrency, self.timeout_s, self.max_bytes = concurrency, timeout_s, max_bytes
        self.kept_pairs = kept_pairs
        self.send, self.shadow_of = send, shadow_of
        self.tokens: dict[str, tuple[float, float]] = {}  # model -> (tokens, at)
        self.pairs: dict[tuple[str, str], deque[ScoredPair]] = {}
        self.examples: dict[tuple[str, str], deque[Example]] = {}
        self.copies = Counter(
            "llmship_gateway_shadow_requests",
            "Live requests considered for shadowing, by outcome: answered or failed (sent to "
            "the candidate); capped, dropped (queue full), too_large, unscorable (no whole "
            "live answer) or incomparable (sampled at temperature > 0, or n > 1): not sent",
            ["model", "version", "outcome"],
            registry=registry,
        )
        self.scored = Counter(
            "llmship_gateway_shadow_pairs",
            "Live and candidate answers compared: exact (the same text), answer (the same "
            "answer, as the accuracy gate extracts it) or none",
            ["model", "version", "agreement"],
            registry=registry,
        )

    # -- at the live request

    def choose(
        self,
        model: str,
        shadow: Shadow,
        endpoint: str,
        body: bytes,
        parsed: Any,
        request_id_header: str | None,
    ) -> Copy | None:
        """Whether to copy this live request: a Copy to complete with its answer, or None."""
        extras = parsed.model_extra or {}
        # The body's digest is the request's id when the client gave none: hashed once.
        rid = request_id_header or sha256(body)
        if not is_sampled(rid, shadow):
            return None
        if why_not_comparable(parsed.temperature, extras.get("seed"), parsed.n):
            self.copies.labels(model, shadow.version, "incomparable").inc()
            return None
        if len(body) > self.max_bytes:
            self.copies.labels(model, shadow.version, "too_large").inc()
            return None
        return Copy(
            model=model,
            shadow=shadow,
            endpoint=endpoint,
            body=body,
            streamed=parsed.stream,
            request_sha256=sha256(body) if request_id_header else rid,
        )

    def offer(self, copy: Copy, live_text: str | None) -> None:
        """The live answer is out: queue the copy, or drop it (never waits)."""
        version = copy.shadow.version
        if live_text is None:
            self.copies.labels(copy.model, version, "unscorable").inc()
            return
        if not self._take_token(copy.model, copy.shadow.max_rps):
            self.copies.labels(copy.model, version, "capped").inc()
            return
        try:
            self.queue.put_nowait((copy, live_text))
        except asyncio.QueueFull:
            self.copies.labels(copy.model, version, "dropped").inc()

    def _take_token(self, model: str, rate: float) -> bool:
        now = time.monotonic()
        tokens, at = self.tokens.get(model, (max(1.0, rate), now))
        tokens = min(max(1.0, rate), tokens + (now - at) * rate)
        if tokens < 1.0:
            self.tokens[model] = (tokens, now)
            return False
        self.tokens[model] = (tokens - 1.0, now)
        return True

    # -- the workers

    async def run(self) -> None:
        await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))

    async def _worker(self) -> None:
        while True:
            copy, live_text = await self.queue.get()
            try:
                await self._score(copy, live_text)
            except Exception:  # noqa: BLE001 - a copy must never stop the workers
                log.exception("scoring a shadow copy of %s failed", copy.model)
            finally:
                self.queue.task_done()

    async def _score(self, copy: Copy, live_text: str) -> None:
        version = copy.shadow.version
        now = self.shadow_of(copy.model)
        if now is None or now.version != version:
            self.copies.labels(copy.model, version, "dropped").inc()
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                status, raw = await self.send(
                    copy.model, version, copy.endpoint, copy_body(copy.body, copy.streamed)
                )
            text = answer_text(json.loads(raw)) if status == 200 else None
        except Exception as exc:  # noqa: BLE001 - the candidate's failure is counted
            log.info("shadow copy to %s %s failed: %s", copy.model, version, exc)
            text = None
        if text is None:
            self.copies.labels(copy.model, version, "failed").inc()
            return
        self.copies.labels(copy.model, version, "answered").inc()
        agreement = agreement_of(live_text, text)
        self.scored.labels(copy.model, version, agreement).inc()
        key = (copy.model, version)
        self.pairs.setdefault(key, deque(maxlen=self.kept_pairs)).append(
            ScoredPair(
                at=time.time(),
                request_sha256=copy.request_sha256,
                live_sha256=sha256(live_text),
                candidate_sha256=sha256(text),
                agreement=agreement,
            )
        )
        if agreement != "none" or not copy.shadow.keep_examples:
            return
        payload = json.loads(copy.body)
        self.examples.setdefault(key, deque(maxlen=copy.shadow.keep_examples)).append(
            Example(
                at=time.time(),
                request_sha256=copy.request_sha256,
                prompt=payload.get("prompt", payload.get("messages")),
                live=live_text,
                candidate=text,
            )
        )

    # -- what the rollout reads

    def kept(self, model: str, since: float) -> dict[str, dict[str, Any]]:
        """kept_since as JSON, as GET /admin/shadow/{model} answers it."""
        return {
            version: kept.model_dump() for version, kept in self.kept_since(model, since).items()
        }

    def kept_since(self, model: str, since: float) -> dict[str, KeptPairs]:
        """What was scored since a time, for every version of model."""
        return {
            version: KeptPairs(
                pairs=[p for p in pairs if p.at >= since],
                examples=[e for e in self.examples.get((m, version), ()) if e.at >= since],
            )
            for (m, version), pairs in self.pairs.items()
            if m == model
        }

    def forget_all_but(self, model: str, version: str | None) -> None:
        """A route changed: what was kept of model's other versions goes."""
        for kept in (self.pairs, self.examples):
            for key in [k for k in kept if k[0] == model and k[1] != version]:
                del kept[key]
