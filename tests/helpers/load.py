"""Steady client traffic through the gateway, recording every request's outcome."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import httpx


@dataclass
class Outcome:
    started: float
    ended: float
    stream: bool
    status: int | None
    version: str | None
    ok: bool
    detail: str = ""


class SteadyLoad:
    """`workers` clients, each sending one completion after another (every other one
    streamed) until stopped. A request is ok when it is answered 200 with a whole answer: a
    stream must end with `data: [DONE]`."""

    def __init__(
        self,
        gateway_url: str,
        model: str,
        prompts: list[str],
        workers: int = 3,
        pause_s: float = 0.1,
    ):
        self.url, self.model, self.prompts = gateway_url, model, prompts
        self.workers, self.pause_s = workers, pause_s
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(workers)
        ]

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _client(self, worker: int) -> None:
        with httpx.Client(timeout=60.0) as client:
            i = worker
            while not self._stop.is_set():
                stream = i % 2 == 1
                body = {
                    "model": self.model,
                    "prompt": self.prompts[i % len(self.prompts)],
                    "max_tokens": 8,
                    "temperature": 0,
                    "stream": stream,
                }
                self.outcomes.append(self._send(client, body, stream))
                i += 1
                time.sleep(self.pause_s)

    def _send(self, client: httpx.Client, body: dict, stream: bool) -> Outcome:
        started = time.time()
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body) as resp:
                lines = [line for line in resp.iter_lines() if line]
                version = resp.headers.get("x-llmship-version")
            if resp.status_code != 200:
                return Outcome(
                    started,
                    time.time(),
                    stream,
                    resp.status_code,
                    version,
                    False,
                    "\n".join(lines)[:300],
                )
            if stream:
                complete = lines[-1] == "data: [DONE]" and len(lines) >= 2
                # A stream broken after its 200 ends with an OpenAI error event.
                detail = (
                    lines[-1][len("data: ") :]
                    if '"error"' in lines[-1]
                    else f"cut short: {lines[-2:]}"
                )
            else:
                complete = bool(json.loads("".join(lines))["choices"])
                detail = f"cut short: {lines[-2:]}"
            return Outcome(
                started, time.time(), stream, 200, version, complete, "" if complete else detail
            )
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            return Outcome(
                started, time.time(), stream, None, None, False, f"{type(exc).__name__}: {exc}"
            )

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]
