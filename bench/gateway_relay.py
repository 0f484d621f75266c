"""The gateway's own cost, apart from vLLM: a model server that streams at a GPU's pace.

On this 2-core machine vLLM's CPU engine takes every core, so in `gateway_overhead.py` each
cycle the gateway spends comes out of vLLM's throughput. Here the model server is a stand-in
that costs almost nothing: it answers every streamed completion with `--tokens` SSE events,
one every `--token-ms` (20 ms: 50 tokens/s per stream, a 70B decode on H100s), as vLLM
writes them. The same waves of 1, 8 and 32 concurrent streams go straight to it and through
a gateway started here (the stack's command, on its own port and state directory), side by
side; printed per concurrency: throughput ratio (target >= 0.97), p50 added to the first
token and to the whole answer (target <= 2 ms), and the gateway's CPU time per token relayed.

    .venv/orchestrator/bin/python bench/gateway_relay.py [--tokens 64 --token-ms 20]

With --shadow, what shadow traffic (serving/shadow.py) costs the clients: a second stand-in
serves version v2, and round by round the same waves go through the gateway with the route
plain and with a shadow copying every request (fraction 1, the worst case) to v2; printed per
concurrency: throughput ratio with/without, p50 added to the first token and to the whole
answer, and the copies the gateway sent and scored.

Starts and stops everything it uses; needs no stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import wave  # noqa: E402

from llmship.processes import write_json  # noqa: E402
from llmship.settings import Settings  # noqa: E402
from llmship.stack import gateway_argv  # noqa: E402
from serving.gateway import gateway_state_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_stand_in(port: int, tokens: int, token_s: float) -> None:
    """An OpenAI-compatible streaming endpoint that writes what vLLM writes, at its pace."""

    def event(i: int) -> bytes:
        body = json.dumps(
            {
                "id": "cmpl-bench",
                "object": "text_completion",
                "created": 0,
                "model": "relay",
                "choices": [
                    {"index": 0, "text": f" t{i}", "logprobs": None, "finish_reason": None}
                ],
            }
        )
        data = f"data: {body}\n\n".encode()
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    events = [event(i) for i in range(tokens)]
    done = b"data: [DONE]\n\n"
    tail = f"{len(done):x}\r\n".encode() + done + b"\r\n0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    continue
                if length and not json.loads(body).get("stream"):  # a shadow copy: whole
                    await asyncio.sleep(tokens * token_s)
                    text = "".join(f" t{i}" for i in range(tokens))
                    whole = json.dumps({"choices": [{"index": 0, "text": text}]}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(whole), whole)
                    )
                    await writer.drain()
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                # On a fixed schedule, so that late wake-ups do not add up over an answer.
                started = asyncio.get_running_loop().time()
                for i, chunk in enumerate(events, 1):
                    await asyncio.sleep(
                        max(0.0, started + i * token_s - asyncio.get_running_loop().time())
                    )
                    writer.write(chunk)
                    await writer.drain()
                writer.write(tail)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(
    direct: str,
    through: str,
    model: str,
    gateway_pid: int,
    concurrency: int,
    requests: int,
    tokens: int,
    rounds: int,
) -> dict:
    """The same wave straight to the model server and through the gateway, round by round:
    medians of each side, their ratio, what the gateway added, and its CPU per token."""
    per = {"direct": [], "gateway": []}
    cpu = 0.0
    for _ in range(rounds):
        per["direct"].append(asyncio.run(wave(direct, model, concurrency, requests, tokens)))
        before = cpu_seconds(gateway_pid)
        per["gateway"].append(asyncio.run(wave(through, model, concurrency, requests, tokens)))
        cpu += cpu_seconds(gateway_pid) - before
    d, g = (
        {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for rs in (per["direct"], per["gateway"])
    )
    return {
        "direct_rps": round(d["rps"], 3),
        "gateway_rps": round(g["rps"], 3),
        "ratio": round(g["rps"] / d["rps"], 4),
        "added_ttft_p50_ms": round((g["ttft_p50"] - d["ttft_p50"]) * 1000, 2),
        "added_total_p50_ms": round((g["total_p50"] - d["total_p50"]) * 1000, 2),
        "gateway_cpu_us_per_token": round(cpu / (rounds * requests * (tokens + 1)) * 1e6, 1),
    }


def compare_shadow(
    through: str, route, concurrency: int, requests: int, tokens: int, rounds: int
) -> dict:
    """The same wave through the gateway with the route plain and with a shadow, round by
    round: medians of each side, their ratio and what the shadow added."""
    per = {"plain": [], "shadow": []}
    for _ in range(rounds):
        for side in ("plain", "shadow"):
            route(shadow=side == "shadow")
            per[side].append(asyncio.run(wave(through, "relay", concurrency, requests, tokens)))
    route(shadow=False)
    p, s = (
        {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for rs in (per["plain"], per["shadow"])
    )
    return {
        "plain_rps": round(p["rps"], 3),
        "shadow_rps": round(s["rps"], 3),
        "ratio": round(s["rps"] / p["rps"], 4),
        "added_ttft_p50_ms": round((s["ttft_p50"] - p["ttft_p50"]) * 1000, 2),
        "added_total_p50_ms": round((s["total_p50"] - p["total_p50"]) * 1000, 2),
    }


def shadow_copies(through: str) -> dict[str, float]:
    """The gateway's shadow counters for relay v2, by outcome."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{through}/metrics").text):
        for sample in family.samples:
            if sample.name == "llmship_gateway_shadow_requests_total":
                counts[sample.labels["outcome"]] = sample.value
            elif sample.name == "llmship_gateway_shadow_pairs_total":
                counts[f"pairs {sample.labels['agreement']}"] = sample.value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", default="1,8,32", help="concurrent streams of each wave, comma-separated"
    )
    parser.add_argument(
        "--uvicorn-args",
        default="",
        help="uvicorn options for the gateway instead of the stack's command "
        "line (llmship.stack.gateway_argv: uvloop, httptools with the "
        "head limits), e.g. '--loop uvloop --http httptools'",
    )
    parser.add_argument(
        "--shadow", action="store_true", help="compare the route with and without a shadow"
    )
    args = parser.parse_args()
    upstream_port, shadow_port, gateway_port = free_port(), free_port(), free_port()

    def start_stand_in(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                (
                    "import asyncio, sys; sys.path.insert(0, 'bench'); import gateway_relay as g;"
                    f" asyncio.run(g.serve_stand_in({port}, {args.tokens}, "
                    f"{args.token_ms / 1000}))"
                ),
            ],
            cwd=REPO,
        )

    stand_in = start_stand_in(upstream_port)
    shadow_stand_in = start_stand_in(shadow_port) if args.shadow else None
    state = tempfile.mkdtemp(prefix="llmship-bench-relay-")
    # The replicas the fleet would report for relay v1 (and v2): the stand-ins (no Ray here).
    write_json(
        gateway_state_dir(Settings(state_dir=state, gateway={"port": gateway_port}))
        / "endpoints.json",
        {
            "relay--v1": [f"http://127.0.0.1:{upstream_port}"],
            "relay--v2": [f"http://127.0.0.1:{shadow_port}"],
        },
    )
    env = os.environ | {
        "LLMSHIP_STATE_DIR": state,
        "LLMSHIP_GATEWAY_ADMIN_TOKEN": TOKEN,
        "LLMSHIP_GATEWAY_PORT": str(gateway_port),
    }
    if args.uvicorn_args:
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "serving.gateway:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(gateway_port),
            "--no-access-log",
            *args.uvicorn_args.split(),
        ]
    else:  # exactly as the stack starts it
        argv = gateway_argv(Path(sys.executable), Settings(gateway={"port": gateway_port}))
    gateway = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    direct, through = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{gateway_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (
                    httpx.get(f"{through}/health").status_code == 200
                    and httpx.get(f"{direct}/health").status_code == 200
                ):
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        resp = httpx.put(
            f"{through}/admin/routes/relay",
            json={"version": "v1"},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        resp.raise_for_status()
        print(
            f"stand-in model server: {args.tokens} tokens per answer, one every "
            f"{args.token_ms:g} ms; {args.requests} streamed completions per wave, "
            f"{args.rounds} rounds; gateway uvicorn options: "
            f"{args.uvicorn_args or 'the stack’s (uvloop, GatewayHttpProtocol)'}"
        )
        for url in (direct, through):
            asyncio.run(wave(url, "relay", 4, 8, args.tokens))
        if args.shadow:

            def route(shadow: bool) -> None:
                copies = {"version": "v2", "fraction": 1.0, "max_rps": 10000.0}
                httpx.put(
                    f"{through}/admin/routes/relay",
                    json={"version": "v1", "shadow": copies if shadow else None},
                    headers={"authorization": f"Bearer {TOKEN}"},
                ).raise_for_status()

            for concurrency in map(int, args.concurrency.split(",")):
                row = compare_shadow(
                    through, route, concurrency, args.requests, args.tokens, args.rounds
                )
                print(
                    f"c={concurrency:2d}  plain {row['plain_rps']:6.2f} req/s  with shadow "
                    f"{row['shadow_rps']:6.2f} req/s  ratio {row['ratio']:.3f}  added p50: "
                    f"first token {row['added_ttft_p50_ms']:+.2f} ms, whole answer "
                    f"{row['added_total_p50_ms']:+.2f} ms",
                    flush=True,
                )
            print(f"shadow copies by outcome: {shadow_copies(through)}")
            return
        for concurrency in map(int, args.concurrency.split(",")):
            row = compare(
                direct,
                through,
                "relay",
                gateway.pid,
                concurrency,
                args.requests,
                args.tokens,
                args.rounds,
            )
            print(
                f"c={concurrency:2d}  direct {row['direct_rps']:6.2f} req/s  gateway "
                f"{row['gateway_rps']:6.2f} req/s  ratio {row['ratio']:.3f} (target >= 0.97)  "
                f"added p50: first token {row['added_ttft_p50_ms']:+.2f} ms, whole answer "
                f"{row['added_total_p50_ms']:+.2f} ms (target <= 2 ms)  "
                f"gateway CPU {row['gateway_cpu_us_per_token']:.0f} us per token"
            )
    finally:
        for process in filter(None, (gateway, stand_in, shadow_stand_in)):
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
