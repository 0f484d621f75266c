"""What the gateway tells those who watch it, beside its request metrics: where the engines'
own metrics are (a Prometheus file_sd file), how many tokens each answer carried, and one
access-log line per request. Pure functions and small value types; serving/gateway/ calls
them.

- Scrape targets: every engine listens on a port its replica picked when it started, so a
  fixed Prometheus target cannot find it. The gateway already follows the fleet's directory
  (where each replica's engine listens); it writes what it learns as file_sd target groups,
  one per replica, labelled with the model, version and replica that vLLM's own metrics lack.
- Tokens: from an answer's `usage` object. A stream carries one only when the client asked
  for it (`stream_options.include_usage`); otherwise the gateway counts the stream's events
  that carry a choice, which is the completion's tokens give or take one per choice (vLLM
  sends a token per event; a chat stream opens with a role-only event), and the prompt's
  tokens are not known. The gateway does not ask for usage on the client's behalf: the extra
  event would then have to be cut out of every relayed stream.
- The access log never holds a request's body, its prompt, an answer, or any header but the
  client's x-request-id.
"""

from __future__ import annotations

import json
import re
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

EVAL_PREFIX = "eval--"  # serving/fleet.py's evaluation servers (the gateway does not import it)


# ------------------------------------------------------------------ engines' scrape targets


class EngineEndpoint(BaseModel):
    """One replica's engine as the fleet's directory lists it (serving/directory.py: Endpoint)."""

    model_config = ConfigDict(extra="ignore")
    url: str
    replica: str


class ScrapeTargetGroup(BaseModel):
    """A Prometheus file_sd / http_sd target group."""

    targets: list[str]
    labels: dict[str, str]


def engine_scrape_targets(endpoints: dict[str, list[EngineEndpoint]]) -> list[ScrapeTargetGroup]:
    """One target group per replica of every served version, from the fleet's applications
    (`<model>--<version>`). Evaluation servers (the gate's baselines) are left out: they come
    and go within a run and serve no traffic."""
    groups = []
    for app, replicas in sorted(endpoints.items()):
        model, sep, version = app.rpartition("--")
        if not sep or not model or app.startswith(EVAL_PREFIX):
            continue
        for endpoint in sorted(replicas, key=lambda e: e.replica):
            groups.append(
                ScrapeTargetGroup(
                    targets=[urlsplit(endpoint.url).netloc],
                    labels={"model": model, "version": version, "replica": endpoint.replica},
                )
            )
    return groups


# ------------------------------------------------------------------ tokens


class TokenUsage(BaseModel):
    """An answer's tokens; None where not known. counted: the completion's tokens were
    counted from a stream's events, not reported by the engine."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    counted: bool = False


def usage_of_answer(answer: Any) -> TokenUsage:
    """The `usage` object of a whole (non-streamed) answer, or of a stream's usage event. Of
    the Responses API: its `input_tokens` and `output_tokens`, and of a stream, its
    `response.completed` event's response."""
    if isinstance(answer, dict) and answer.get("type") == "response.completed":
        answer = answer.get("response")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return TokenUsage()

    def count(*names: str) -> int | None:
        for name in names:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
        return None

    return TokenUsage(
        prompt_tokens=count("prompt_tokens", "input_tokens"),
        completion_tokens=count("completion_tokens", "output_tokens"),
    )


class StreamTally:
    """What a relayed stream says of its tokens, read as it passes: the events that carry a
    token are counted (one C-level scan per chunk), and the last few chunks are kept, as
    the usage event, when there is one, comes last (before `data: [DONE]`).

    event: what marks an event that carries a token. Of completions, every `data: {` event;
    of the Responses API, whose events are named, `event: response.output_text.delta`."""

    __slots__ = ("events", "marker", "tail")
    EVENT = b"data: {"
    TAIL_CHUNKS = 4

    def __init__(self, event: bytes = EVENT) -> None:
        self.events = 0
        self.marker = event
        self.tail: deque[bytes] = deque(maxlen=self.TAIL_CHUNKS)

    def feed(self, chunk: bytes) -> None:
        self.events += chunk.count(self.marker)
        self.tail.append(chunk)

    def usage(self) -> TokenUsage:
        for event in reversed(b"".join(self.tail).split(b"\n\n")):
            event = event.strip().rpartition(b"\n")[2]  # the data line of a named event
            if not event.startswith(self.EVENT):
                continue
            try:
                reported = usage_of_answer(json.loads(event[len(b"data: ") :]))
            except ValueError:
                break  # the first event of the tail, cut in two: no usage event after it
            if reported.completion_tokens is not None:
                return reported
            break  # the last event carries no usage: the client did not ask for it
        return TokenUsage(completion_tokens=self.events, counted=True)


# ------------------------------------------------------------------ the access log


class AccessEntry(BaseModel):
    """One request answered on a relayed endpoint. Nothing of its body, nor its headers but
    the request id."""

    method: str
    path: str
    model: str | None = None
    version: str | None = None  # the version that answered; None when none did
    status: str  # the HTTP status, or "broken" for a stream cut off mid-answer
    duration_ms: float
    usage: TokenUsage = TokenUsage()
    request_id: str


_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+\-]")


def _field(value: object) -> str:
    """A value as one logfmt token: what a client chose (its model name, its request id) can
    neither break the line nor forge another field."""
    if value is None:
        return "-"
    return _UNSAFE.sub("_", str(value))[:128] or "-"


def access_line(entry: AccessEntry) -> str:
    usage = entry.usage
    fields = {
        "model": entry.model,
        "version": entry.version,
        "status": entry.status,
        "ms": f"{entry.duration_ms:.1f}",
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "tokens": None
        if usage.completion_tokens is None
        else ("counted" if usage.counted else "reported"),
        "request_id": entry.request_id,
    }
    return f"{_field(entry.method)} {_field(entry.path)} " + " ".join(
        f"{key}={_field(value)}" for key, value in fields.items()
    )
