"""The calibrate, build and gate stages' own functions on CUDA, on an 8B-shaped Llama with
random weights: time, peak GPU memory and output format of each (issue 5, item 4).

    python bench/gpu_stages.py --work /tmp/gpu --out results.json            # 8B shape
    python bench/gpu_stages.py --shape tiny --device cpu --work /tmp/t ...   # a dry run here

Steps (each a function llmship's stages run, called in this process, one after another):
    make-model      LlamaForCausalLM with Llama 3 8B's shape, random BF16 weights, saved
    calibrate-llmc  tasks.calibrate: llmcompressor FP8 (static scales) + FP8 KV cache
    calibrate-mo    tasks.calibrate: ModelOpt FP8 + FP8 KV cache -> unified HF checkpoint
    calibrate-mo-trt tasks.calibrate: ModelOpt FP8 -> TensorRT-LLM checkpoint (engine path)
    build-vllm      tasks.build for target vllm: transformers loads the compressed-tensors
                    checkpoint and generates
    build-trtllm    tasks.build for target trtllm: the ModelOpt checkpoint, tensor by tensor
    dequant-check   ModelOpt's FP8 weights times their scales against the BF16 weights
    gate-hf         jobs.evaluate.evaluate, lm-eval's hf backend, on the BF16 baseline and the
                    llmcompressor FP8 build (the contracts domain tasks)
Random weights score nothing on the tasks: the gate steps measure time and memory, not
accuracy. The GPU machine lent here has no Prefect: when it is missing, a stand-in module
makes the @task decorators no-ops (the functions measured never call Prefect).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # Meta-Llama-3-8B's config.json
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=500000.0,
    ),
}


def stand_in_for_prefect() -> None:
    """Make llmship's own `from prefect... import ...` lines work where Prefect is missing:
    exactly the names they import, as no-ops."""
    try:
        import prefect  # noqa: F401

        return
    except ImportError:
        pass

    def task(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    def nothing(*args, **kwargs):
        return None

    names = {
        "prefect": {"task": task, "flow": task, "get_run_logger": nothing, "Task": object},
        "prefect.artifacts": {
            "create_markdown_artifact": nothing,
            "create_table_artifact": nothing,
        },
        "prefect.events": {"emit_event": nothing},
        "prefect.states": {"State": object},
        "prefect.tasks": {"exponential_backoff": lambda **kwargs: [1]},
        "prefect.client": {},
        "prefect.client.schemas": {},
        "prefect.client.schemas.objects": {"TaskRun": object},
    }
    for module_name, attrs in names.items():
        module = types.ModuleType(module_name)
        module.__dict__.update(attrs)
        sys.modules[module_name] = module


def gpu_peak_gib(device: str) -> dict:
    if device != "cuda":
        return {}
    import torch

    n = torch.cuda.device_count()
    return {
        "peak_allocated_gib": round(
            sum(torch.cuda.max_memory_allocated(i) for i in range(n)) / 2**30, 2
        ),
        "peak_reserved_gib": round(
            sum(torch.cuda.max_memory_reserved(i) for i in range(n)) / 2**30, 2
        ),
    }


def dir_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 3)


def make_model(shape: str, device: str, out: Path, tokenizer_from: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **SHAPES[shape],
        torch_dtype="bfloat16",
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    for f in tokenizer_from.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return {"parameters": params, "size_gib": dir_gib(out)}


def dequant_check(bf16_dir: Path, fp8_dir: Path) -> dict:
    """Dequantize ModelOpt's FP8 weights (weight * weight_scale) and compare with the BF16
    weights they came from: the relative error of FP8 E4M3 rounding is a few percent."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for shard in d.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                out.update({k: shard for k in f.keys()})
        return out

    ref, q = tensors(bf16_dir), tensors(fp8_dir)
    name = next(k for k in sorted(q) if k.endswith("mlp.down_proj.weight"))
    with safe_open(q[name], "pt") as f:
        w, scale = f.get_tensor(name), f.get_tensor(name.replace("weight", "weight_scale"))
    with safe_open(ref[name], "pt") as f:
        original = f.get_tensor(name).float()
    approx = w.float() * scale.float()
    rel = ((approx - original).norm() / original.norm()).item()
    return {
        "tensor": name,
        "dtype": str(w.dtype),
        "weight_scale": scale.float().tolist(),
        "relative_error": round(rel, 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--limit", type=int, default=50, help="gate items per task")
    ap.add_argument("--steps", default="all", help="comma-separated step names")
    args = ap.parse_args()
    stand_in_for_prefect()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from jobs.build import BuildRequest, build
    from jobs.calibrate import CalibrateRequest, calibrate
    from jobs.evaluate import EvaluateRequest, evaluate
    from llmship.pipeline_config import EvalBackend, GateConfig, Scheme, ServingConfig, Target
    from tasks.gate_rule import resolve_tasks

    work, data = args.work, REPO / "calibration_data" / "contracts" / "calibration.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    dirs = {
        n: work / n
        for n in ("bf16", "fp8-llmc", "fp8-mo", "fp8-mo-trt", "build-vllm", "build-trtllm")
    }
    serving = ServingConfig(max_model_len=args.seq)
    results: dict = {
        "shape": args.shape,
        "device": args.device,
        "samples": args.samples,
        "seq": args.seq,
        "torch": torch.__version__,
        "steps": {},
    }
    if args.device == "cuda":
        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    wanted = None if args.steps == "all" else set(args.steps.split(","))

    def step(name: str, fn) -> None:
        if wanted is not None and name not in wanted:
            return
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        print(f"== {name}", flush=True)
        started = time.monotonic()
        try:
            detail = fn()
            ok = True
        except Exception as exc:  # a step that fails is a finding: record it, go on
            import traceback

            traceback.print_exc()
            detail, ok = {"error": f"{type(exc).__name__}: {exc}"[:2000]}, False
        record = {
            "ok": ok,
            "seconds": round(time.monotonic() - started, 1),
            **gpu_peak_gib(args.device),
            **detail,
        }
        results["steps"][name] = record
        print(json.dumps(record, default=str)[:1500], flush=True)
        args.out.write_text(json.dumps(results, indent=2, default=str))

    def calib(out: Path, target: Target, **extra):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        res = calibrate(
            CalibrateRequest(
                model_dir=str(dirs["bf16"]),
                data_file=str(data),
                out_dir=str(out),
                scheme=Scheme.FP8,
                num_samples=args.samples,
                max_seq_length=args.seq,
                kv_cache_fp8=True,
                target=target,
                device=args.device,
                **extra,
            )
        )
        files = sorted(p.name for p in out.iterdir())
        return {
            "quantizer": res.quantizer,
            "size_gib": dir_gib(out),
            "files": files,
            "quantization_config": res.quantization_config,
        }

    def build_for(checkpoint: Path, out: Path, target: Target):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        res = build(
            BuildRequest(
                checkpoint_dir=str(checkpoint),
                out_dir=str(out),
                target=target,
                serving=serving,
                kv_cache_fp8=True,
                device=args.device,
            )
        )
        shutil.rmtree(out)  # a copy of the checkpoint: the disk is needed for the next steps
        return res.model_dump(mode="json", exclude={"seconds"})

    tasks = resolve_tasks(GateConfig(dataset="contracts"))

    def gate(model_dir: Path, label: str):
        ev = evaluate(
            EvaluateRequest(
                model_dir=str(model_dir),
                tasks=tasks,
                backend=EvalBackend.HF,
                served_name=label,
                server_name=label,
                limit=args.limit,
                device=args.device,
            )
        )
        return {
            "scores": {k: v.metrics for k, v in ev.scores.items()},
            "items": {k: v.n for k, v in ev.scores.items()},
        }

    step(
        "make-model",
        lambda: make_model(args.shape, args.device, dirs["bf16"], REPO / "demo" / "tiny-llama"),
    )
    step("calibrate-llmc", lambda: calib(dirs["fp8-llmc"], Target.VLLM))
    step("calibrate-mo", lambda: calib(dirs["fp8-mo"], Target.TRTLLM))
    step(
        "calibrate-mo-trt",
        lambda: calib(dirs["fp8-mo-trt"], Target.TRTLLM, export_trtllm_checkpoint=True),
    )
    step("build-vllm", lambda: build_for(dirs["fp8-llmc"], dirs["build-vllm"], Target.VLLM))
    step("build-trtllm", lambda: build_for(dirs["fp8-mo"], dirs["build-trtllm"], Target.TRTLLM))
    step("dequant-check", lambda: dequant_check(dirs["bf16"], dirs["fp8-mo"]))
    step("gate-hf-baseline", lambda: gate(dirs["bf16"], "baseline"))
    step("gate-hf-fp8", lambda: gate(dirs["fp8-llmc"], "fp8"))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
