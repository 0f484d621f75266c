"""What relaying a token stream costs, proxy by proxy, side by side in one run.

In front of the same stand-in model server (gateway_relay.serve_stand_in: `--tokens` SSE
events, one every `--token-ms`), the same waves of streamed completions go straight to it and
through each of:
  gateway          the gateway as the stack starts it (serving/gateway_server.py)
  gateway-uvicorn  the gateway under uvicorn's own command line (`python -m uvicorn`, which
                   wakes ten times a second): how the stack started it before
  byte-relay       a byte relay in Python on uvloop, no HTTP parsing at all: the floor of any
                   proxy written in Python
  nginx            nginx with one worker, proxy_buffering off, where `nginx` is on PATH
                   (`apt-get install nginx-light`): a proxy made for it
Printed first, each proxy's CPU while idle (ms per second, all in the same window); then per
concurrency and proxy: CPU per relayed token (the proxy's processes, from
/proc/<pid>/task/*/schedstat, idle time included: a proxy's wake-ups are its cost too) and the
p50 added to the first token, against the direct wave.

    .venv/orchestrator/bin/python bench/relay_floor.py [--concurrency 1,8,64]

Starts and stops everything it uses; needs no stack.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import wave  # noqa: E402
from gateway_relay import TOKEN, free_port  # noqa: E402

from llmship.processes import write_json  # noqa: E402
from llmship.settings import Settings  # noqa: E402
from llmship.stack import gateway_argv  # noqa: E402
from serving.gateway import gateway_state_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

BYTE_RELAY = textwrap.dedent(
    """
    import asyncio, sys, uvloop
    async def pipe(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()
    async def handle(cr, cw):
        ur, uw = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
        await asyncio.gather(pipe(cr, uw), pipe(ur, cw))
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        await server.serve_forever()
    uvloop.run(main())
    """
)

NGINX_CONF = """daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; client_body_temp_path {d}; proxy_temp_path {d};
  upstream model {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""


def cpu_ns(pid: int) -> int:
    """CPU of pid and its descendants, nanoseconds."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def start_proxy(name: str, port: int, upstream: int, work: Path) -> subprocess.Popen:
    if name == "byte-relay":
        return subprocess.Popen([PYTHON, "-c", BYTE_RELAY, str(port), str(upstream)])
    if name == "nginx":
        (work / "nginx.conf").write_text(NGINX_CONF.format(d=work, port=port, upstream=upstream))
        return subprocess.Popen(["nginx", "-c", str(work / "nginx.conf")])
    # The gateway, routing model "relay" to the stand-in (no Ray: the endpoints file).
    settings = Settings(state_dir=work, gateway={"port": port})
    write_json(
        gateway_state_dir(settings) / "endpoints.json",
        {"relay--v1": [f"http://127.0.0.1:{upstream}"]},
    )
    argv = gateway_argv(Path(PYTHON), settings)
    if name == "gateway-uvicorn":
        argv = [PYTHON, "-m", "uvicorn", "serving.gateway:app", *argv[3:]]
        argv += ["--log-config", str(REPO / "serving" / "gateway_logging.json")]
        argv += ["--no-access-log", "--loop", "uvloop"]
        argv += ["--http", "serving.gateway_http:GatewayHttpProtocol"]
    env = os.environ | {
        "LLMSHIP_STATE_DIR": str(work),
        "LLMSHIP_GATEWAY_ADMIN_TOKEN": TOKEN,
        "LLMSHIP_GATEWAY_PORT": str(port),
    }
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--seconds", type=float, default=20.0, help="of streaming per wave")
    parser.add_argument("--idle-s", type=float, default=20.0, help="idle, measured first")
    args = parser.parse_args()
    names = ["gateway", "gateway-uvicorn", "byte-relay"] + (
        ["nginx"] if shutil.which("nginx") else []
    )
    upstream = free_port()
    stand_in = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import asyncio, sys; sys.path.insert(0, 'bench'); import gateway_relay as g;"
            f" asyncio.run(g.serve_stand_in({upstream}, {args.tokens}, {args.token_ms / 1000}))",
        ],
        cwd=REPO,
    )
    proxies: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name in names:
            port = free_port()
            work = Path(tempfile.mkdtemp(prefix=f"llmship-floor-{name}-"))
            proxies[name] = (start_proxy(name, port, upstream, work), f"http://127.0.0.1:{port}")
        direct = f"http://127.0.0.1:{upstream}"
        for url in [direct] + [u for _, u in proxies.values()]:
            wait_ready(url)
        for name in ("gateway", "gateway-uvicorn"):
            httpx.put(
                f"{proxies[name][1]}/admin/routes/relay",
                json={"version": "v1"},
                headers={"authorization": f"Bearer {TOKEN}"},
            ).raise_for_status()
        time.sleep(2)  # every process settled before the first wave
        # Idle, all in the same window: what each costs with no request at all.
        before = {name: cpu_ns(p.pid) for name, (p, _) in proxies.items()}
        time.sleep(args.idle_s)
        idle = {n: (cpu_ns(p.pid) - before[n]) / 1e6 / args.idle_s for n, (p, _) in proxies.items()}
        print("idle CPU: " + " | ".join(f"{n} {ms:.2f} ms/s" for n, ms in idle.items()), flush=True)
        print(
            f"stand-in: {args.tokens} tokens per answer, one every {args.token_ms:g} ms; "
            f"proxies: {', '.join(names)}",
            flush=True,
        )
        for concurrency in map(int, args.concurrency.split(",")):
            answer_s = args.tokens * args.token_ms / 1000
            requests = max(concurrency, round(args.seconds / answer_s) * concurrency)
            base = asyncio.run(wave(direct, "relay", concurrency, requests, args.tokens))
            row = []
            for name, (process, url) in proxies.items():
                before = cpu_ns(process.pid)
                got = asyncio.run(wave(url, "relay", concurrency, requests, args.tokens))
                per_token = (cpu_ns(process.pid) - before) / 1e3 / (requests * (args.tokens + 1))
                added = (got["ttft_p50"] - base["ttft_p50"]) * 1000
                row.append(f"{name} {per_token:5.0f} us/token, first token {added:+.2f} ms")
            print(f"c={concurrency:2d}  " + " | ".join(row), flush=True)
    finally:
        for process in [stand_in] + [p for p, _ in proxies.values()]:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
