"""FP8 against BF16 GEMM throughput on the lent GPU, at Llama 3 70B's layer shapes.

What the FP8 build buys at serving time is decided here: every linear layer of a W8A8
(static, per-tensor) checkpoint runs as an FP8 GEMM (`torch._scaled_mm`, the cuBLASLt path
vLLM also calls for per-tensor scales) instead of a BF16 one. Shapes are the 70B model's four
linear layers with tensor parallelism 4 (what prefect.yaml deploys), at decode batch sizes
(memory-bound: FP8 halves the weight bytes read) and prefill token counts (compute-bound:
FP8 doubles the tensor-core rate on Hopper).

    python3 bench/gpu_gemm.py --out docs/gpu/h200-gemm.json

Prints one line per shape and writes the JSON; docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, TP = 8192, 28672, 64, 8, 128, 4
# (name, N, K) of each per-GPU weight shard, y[M, N] = x[M, K] @ W[N, K]^T
LAYERS = [
    ("qkv_proj", (HEADS + 2 * KV_HEADS) * HEAD_DIM // TP, HIDDEN),
    ("o_proj", HIDDEN, HEADS * HEAD_DIM // TP),
    ("gate_up_proj", 2 * INTERMEDIATE // TP, HIDDEN),
    ("down_proj", HIDDEN, INTERMEDIATE // TP),
]
TOKENS = [16, 64, 256, 2048, 8192]  # decode batches, then prefill chunks


def timed_ms(fn, iters: int, per_graph: int = 20) -> float:
    """GPU time of one call: per_graph calls captured in a CUDA graph (as vLLM runs decode
    steps), replayed iters times; the median replay over per_graph. Launched one by one from
    Python, small GEMMs would measure the CPU's launch time instead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / per_graph)
    return statistics.median(times)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Three elementwise kernels here; vLLM fuses them into one (scaled_fp8_quant, or into
    the RMSNorm before the layer): an upper bound on the activation quantization's cost."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    return (x / scale).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn)


def measure(m: int, n: int, k: int, iters: int) -> dict:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    fp8 = torch.float8_e4m3fn
    finfo = torch.finfo(fp8)
    # Static per-tensor scales, as calibration computes them (absmax / fp8 max).
    scale_x = (x.abs().max().float() / finfo.max).reshape(())
    scale_w = (w.abs().max().float() / finfo.max).reshape(())
    x8 = (x / scale_x).clamp(finfo.min, finfo.max).to(fp8)
    w8 = (w / scale_w).clamp(finfo.min, finfo.max).to(fp8)
    w8_t = w8.t()  # column-major view, as _scaled_mm wants its second operand

    def bf16():
        return x @ w.t()

    def fp8_gemm():
        return torch._scaled_mm(
            x8, w8_t, scale_a=scale_x, scale_b=scale_w, out_dtype=torch.bfloat16
        )

    def fp8_with_quant():  # the activation is quantized on the fly, as a layer does
        return torch._scaled_mm(
            quantize(x, scale_x), w8_t, scale_a=scale_x, scale_b=scale_w, out_dtype=torch.bfloat16
        )

    ref, out = bf16().float(), fp8_gemm().float()
    rel_err = ((out - ref).norm() / ref.norm()).item()
    flops = 2 * m * n * k
    row = {"m": m, "n": n, "k": k}
    for name, fn in (("bf16", bf16), ("fp8", fp8_gemm), ("fp8_with_act_quant", fp8_with_quant)):
        ms = timed_ms(fn, iters)
        row[f"{name}_ms"] = round(ms, 5)
        row[f"{name}_tflops"] = round(flops / ms / 1e9, 1)
    row["fp8_speedup"] = round(row["bf16_ms"] / row["fp8_ms"], 3)
    row["fp8_with_act_quant_speedup"] = round(row["bf16_ms"] / row["fp8_with_act_quant_ms"], 3)
    row["fp8_relative_error"] = round(rel_err, 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "tp": TP,
        "rows": [],
    }
    print(f"{props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    for layer, n, k in LAYERS:
        for m in TOKENS:
            row = {"layer": layer, **measure(m, n, k, args.iters)}
            result["rows"].append(row)
            print(
                f"{layer:13s} M={m:5d} N={n:6d} K={k:6d}  bf16 {row['bf16_tflops']:7.1f} "
                f"TFLOPS  fp8 {row['fp8_tflops']:7.1f}  x{row['fp8_speedup']:.2f} "
                f"(with act quant x{row['fp8_with_act_quant_speedup']:.2f})  "
                f"rel err {row['fp8_relative_error']}",
                flush=True,
            )
    # A decode step of the whole model: every layer at the decode batch, summed (80 layers
    # have the same four GEMMs; attention and the rest are not counted).
    for m in TOKENS[:3]:
        rows = [r for r in result["rows"] if r["m"] == m]
        bf16 = sum(r["bf16_ms"] for r in rows)
        fp8 = sum(r["fp8_with_act_quant_ms"] for r in rows)
        result.setdefault("decode_step_linear_layers", []).append(
            {
                "batch": m,
                "bf16_ms_per_layer": round(bf16, 4),
                "fp8_ms_per_layer": round(fp8, 4),
                "speedup": round(bf16 / fp8, 3),
            }
        )
        print(
            f"decode batch {m}: linear layers {bf16:.4f} ms (bf16) vs {fp8:.4f} ms (fp8, with "
            f"activation quantization) per transformer layer: x{bf16 / fp8:.2f}"
        )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
