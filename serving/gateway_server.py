"""The gateway's process: uvicorn serving serving.gateway:app, as `uvicorn` on the command line
would (uvloop, httptools with the limits of serving/gateway_http.py, llmship's logging config,
no access log of uvicorn's), less uvicorn's ten wake-ups a second.

uvicorn's server wakes every 100 ms to see whether it should exit, and every tenth time to
renew the Date header. On the VMs measured here a wake-up of a Python process costs about
100 microseconds of CPU, and uvicorn's ticks cost the idle gateway 3.5 ms of CPU a second:
70 microseconds of every relayed token at one stream of 50 tokens a second (docs/BENCHMARKS.md,
bench/gateway_relay.py). Here it wakes once a second, which is all the Date header's
one-second resolution needs; a signal to stop is seen within that second.

    python -m serving.gateway_server --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvicorn

from serving.gateway_http import GatewayHttpProtocol

TICK_S = 1.0
# uvicorn renews its default headers (Date) when its tick counter is a multiple of this.
UVICORN_TICKS_PER_HEADER = 10
LOG_CONFIG = Path(__file__).resolve().parent / "gateway_logging.json"


class GatewayServer(uvicorn.Server):
    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            await asyncio.sleep(TICK_S)
            # Every tick renews the headers (uvicorn does it at counter % 10 == 0).
            counter = (counter + UVICORN_TICKS_PER_HEADER) % 864000
            should_exit = await self.on_tick(counter)


def config(host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        "serving.gateway:app",
        host=host,
        port=port,
        log_config=str(LOG_CONFIG),
        access_log=False,
        loop="uvloop",
        http=GatewayHttpProtocol,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    GatewayServer(config(args.host, args.port)).run()


if __name__ == "__main__":
    main()
