"""Model servers: one OpenAI-compatible server process per served version.

vLLM (target vllm) or trtllm-serve (target trtllm), with the command lines of
serving/engines.py. Each runs from its engine's environment on its own loopback port, logs to
<state>/logs/vllm-<model>-<version>.log, and is found again by its PID record, so the flow run
that started it may exit while it keeps serving. (The record's "vllm-" prefix names every
model server, whichever engine it runs.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel

from llmship import gpus, processes
from llmship.errors import ServerExited, ServingError
from llmship.processes import ProcessRecord, http_ok, wait_until
from llmship.settings import Settings, Target, stage_env
from serving import engines


class ModelServer(BaseModel):
    name: str  # of its process record
    model: str
    version: str
    url: str  # http://host:port
    pid: int


def server_name(model: str, version: str) -> str:
    return f"vllm-{model}-{version}"


def server_env(settings: Settings, target: Target = Target.VLLM) -> dict[str, str]:
    env = stage_env(settings)
    if target is Target.VLLM and settings.device == "cpu":
        # Without it vLLM's CPU backend sizes its KV cache at 0.9 x RAM.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # vLLM pins each CPU server's threads to cores from 0 up: two servers of a rollout
        # (old and new) would share core 0, and a busy old one starves the new one's start
        # for minutes. Unpinned, the OS shares the cores between them.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def free_port(settings: Settings) -> int:
    taken = {r.port for r in processes.records(settings) if r.port}
    port = settings.model_server_base_port
    while port in taken or not processes.port_is_free(settings.host, port):
        port += 1
    return port


def _as_server(rec: ProcessRecord) -> ModelServer:
    return ModelServer(name=rec.name, model=rec.info["model"], version=rec.info["version"],
                       url=f"http://{rec.info['host']}:{rec.port}", pid=rec.pid)


def running(settings: Settings, model: str | None = None) -> list[ModelServer]:
    return [_as_server(r) for r in processes.records(settings)
            if r.name.startswith("vllm-") and processes.is_alive(r.pid)
            and (model is None or r.info.get("model") == model)]


def find(settings: Settings, model: str, version: str) -> ModelServer | None:
    return find_by_name(settings, server_name(model, version))


def find_by_name(settings: Settings, name: str) -> ModelServer | None:
    rec = processes.find(settings, name)
    return _as_server(rec) if rec else None


def trtllm_model_path(settings: Settings, name: str, served_name: str, model_dir: Path,
                      serve_subdir: str | None) -> Path:
    """A link named served_name to what trtllm-serve loads (it names the model after it)."""
    link = settings.state_dir / "serving" / name / served_name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(model_dir / serve_subdir if serve_subdir else model_dir,
                    target_is_directory=True)
    return link


def start(settings: Settings, model: str, version: str, model_dir: Path,
          engine_args: list[str], name: str | None = None, target: Target = Target.VLLM,
          serve_subdir: str | None = None) -> ModelServer:
    """Start (or find running) the server for a version and wait until it is healthy.

    name: the process record's name; the default, vllm-<model>-<version>, marks a server
    that serves traffic. The gate's evaluation servers take another name, so nothing
    mistakes them for one. serve_subdir: what in model_dir the engine loads (a TensorRT
    engine's folder), when not model_dir itself.
    """
    name = name or server_name(model, version)
    existing = find_by_name(settings, name)
    if existing and is_healthy(existing):
        return existing
    if existing:
        stop(settings, existing)
    port = free_port(settings)
    env, info = server_env(settings, target), {}
    if settings.device == "cuda":
        count = engines.tensor_parallel_size(engine_args)
        info["gpus"] = gpus.choose_gpus(len(gpus.detect_gpus()), gpus.held_gpus(settings),
                                        count, name)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, info["gpus"]))
    # trtllm-serve is given a link named after the model (engines.server_command says why).
    load_path = (trtllm_model_path(settings, name, model, model_dir, serve_subdir)
                 if target is Target.TRTLLM else model_dir)
    command = engines.server_command(settings, target, load_path, model, port, engine_args,
                                     tokenizer_dir=model_dir if serve_subdir else None)
    rec = processes.start(
        settings, name, command, env=env, port=port,
        info={"model": model, "version": version, "host": settings.host,
              "model_dir": str(model_dir), "target": target.value, **info},
    )
    try:
        wait_until(http_ok(f"http://{settings.host}:{port}/health"), rec,
                   settings.server_start_timeout_s, "healthy", ServingError, ServerExited)
    except ServingError:
        processes.stop(settings, rec)
        raise
    return _as_server(rec)


def hand_over(settings: Settings, current_name: str, model: str, version: str,
              keep_s: float) -> ModelServer:
    """Make a running server (the gate's, of a candidate) version's serving server: its
    record takes the serving name and version, and it is stopped in keep_s unless traffic
    reaches it by then."""
    rec = processes.find(settings, current_name)
    if rec is None:
        raise ServingError(f"{current_name} is not running: nothing to hand over")
    existing = find(settings, model, version)
    if existing:  # already served under that name: keep the one serving
        processes.stop(settings, rec)
        return existing
    server = _as_server(processes.rename(settings, rec, server_name(model, version),
                                         info={"model": model, "version": version}))
    retire_after(settings, server, keep_s)
    return server


def is_healthy(server: ModelServer) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def smoke_test(server: ModelServer, prompt: str) -> str:
    """One real completion through the server; raises ServingError if it does not answer."""
    try:
        resp = httpx.post(f"{server.url}/v1/completions", timeout=60.0, json={
            "model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0})
    except httpx.HTTPError as exc:
        raise ServingError(f"{server.model} {server.version} did not answer: {exc}") from exc
    if resp.status_code != 200:
        raise ServingError(f"{server.model} {server.version} answered {resp.status_code}: "
                           f"{resp.text[:500]}")
    return resp.json()["choices"][0]["text"]


def describe_death(settings: Settings, server: ModelServer) -> str:
    """Where a server's log is and its last lines: what a person needs when it died."""
    rec = processes.find(settings, server.name)
    if rec is None:
        return f"{server.name} left no process record"
    return f"last log lines ({rec.log}):\n{processes.log_tail(rec)}"


def stop(settings: Settings, server: ModelServer) -> None:
    cancel_retirement(settings, server)
    rec = processes.find(settings, server.name)
    if rec:
        processes.stop(settings, rec)


# A server that traffic has left stays up for a while, so that a rollback to it takes a
# second. A small detached process (serving/retire.py) stops it when the time is up, unless
# traffic has come back to it by then; it outlives the flow run that started it.

def retirement_name(server: ModelServer) -> str:
    return f"retire-{server.name}"


def retire_after(settings: Settings, server: ModelServer, seconds: float) -> float | None:
    """Stop server in seconds (at once for 0); returns the deadline (unix time)."""
    cancel_retirement(settings, server)
    if seconds <= 0:
        stop(settings, server)
        return None
    deadline = time.time() + seconds
    processes.start(settings, retirement_name(server),
                    [sys.executable, "-m", "serving.retire", server.name, f"{deadline:.3f}"],
                    # It reads the live alias, nothing more: the store's read-only identity.
                    env={**stage_env(settings), "LLMSHIP_S3_IDENTITY": "reader"},
                    info={"server": server.name, "model": server.model,
                          "version": server.version, "deadline": deadline})
    return deadline


def retirement_deadline(settings: Settings, server: ModelServer) -> float | None:
    rec = processes.find(settings, retirement_name(server))
    return rec.info.get("deadline") if rec else None


def cancel_retirement(settings: Settings, server: ModelServer) -> None:
    """Traffic is back on server (or it is stopping anyway): keep it up."""
    rec = processes.find(settings, retirement_name(server))
    if rec:
        processes.stop(settings, rec)
