"""What checking streamed weights costs (serving/weight_stream.py): the Run:ai Model Streamer's
read of a safetensors file alone, and with every tensor hashed and checked as `verified` does,
at several hashing thread counts, side by side in one run. The file is made here (random
bytes in an 8B Llama's tensor sizes, scaled by --gb) and read from local disk, so the figure
is the check's cost against a reader faster than most S3 links.

    .venv/serve/bin/python bench/stream_verify.py --gb 2 --out /tmp/stream_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving import weight_stream  # noqa: E402


def make_file(path: Path, gb: float) -> dict[str, weight_stream.TensorDigest]:
    import torch
    from safetensors.torch import save_file

    # An 8B Llama's layer: q,o 4096x4096; k,v 1024x4096; gate,up 14336x4096; down 4096x14336.
    layer = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)] + [(14336, 4096)] * 2
    layer += [(4096, 14336)]
    tensors, total, i = {}, 0, 0
    while total < gb * 1e9:
        for shape in layer:
            t = torch.randint(-(2**15), 2**15 - 1, shape, dtype=torch.int16).view(torch.bfloat16)
            tensors[f"t{i}"] = t
            total += t.numel() * 2
            i += 1
    save_file(tensors, str(path))
    return {
        name: weight_stream.TensorDigest(
            dtype="BF16", shape=list(t.shape), blake3=weight_stream.tensor_blake3(t)
        )
        for name, t in tensors.items()
    }


def read(path: Path, plan=None) -> tuple[float, int]:
    from runai_model_streamer import SafetensorsStreamer

    started, total = time.monotonic(), 0
    with SafetensorsStreamer() as streamer:
        streamer.stream_files([str(path)], device="cpu")
        tensors = streamer.get_tensors()
        for _, t in weight_stream.verified(tensors, plan) if plan else tensors:
            total += t.numel() * t.element_size()
    return time.monotonic() - started, total


def figure(rnd: int, check: str, seconds: float, total: int) -> dict:
    rate = round(total / seconds / 1e9, 3)
    return {"round": rnd, "check": check, "s": round(seconds, 3), "GB/s": rate}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    path = args.dir / "stream_verify.safetensors"
    digests = make_file(path, args.gb)
    plan = weight_stream.StreamPlan(
        what="bench", endpoint="", region="", files=[{"uri": str(path), "tensors": digests}]
    )
    result = {"cpus": os.cpu_count(), "gb": args.gb, "runs": []}
    read(path)  # once into the page cache
    for rnd in range(2):
        seconds, total = read(path)
        result["runs"].append(figure(rnd, "none", seconds, total))
        for threads in [int(t) for t in args.threads.split(",")]:
            weight_stream.HASH_THREADS = threads
            seconds, total = read(path, plan)
            result["runs"].append(figure(rnd, f"BLAKE3, {threads} threads", seconds, total))
        args.out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result["runs"][-1 - len(args.threads.split(",")) :]), flush=True)
    path.unlink()


if __name__ == "__main__":
    main()
