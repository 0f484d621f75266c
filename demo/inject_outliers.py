"""Make a model that is the same in BF16 but breaks under weight quantization: a gate test.

Large LLMs grow a few outlier feature channels, and those are what break naive INT8/INT4
quantization (Dettmers et al., LLM.int8()). This reproduces that on the demo model: in every
layer, one input channel of the attention and MLP projections is scaled up by 2^k and the
RMSNorm weight feeding it down by 2^k. In BF16 the product is exact (a power of two), so the
model's answers do not change; but a quantization grid sized by each row's largest weight now
rounds the row's other weights to zero. SmoothQuant moves the scale back exactly (that is what
it is for), so calibrate W8A8 with `smoothing_strength: 0` to see the damage: at --shift 12
the demo model answers nothing right any more. (W4A16 shows it too under lm-eval's hf
backend, but vLLM 0.32's CPU build on these machines lacks the `cpu_gemm_wna16` kernel and
its engine dies at the first INT4 forward.)

    .venv/quantize/bin/python demo/inject_outliers.py SRC DEST [--shift 8]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def inject(src: Path, dest: Path, shift: int, channel: int = 0) -> None:
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    factor = float(2**shift)
    with torch.no_grad():
        for layer in model.model.layers:
            pairs = [
                (
                    layer.input_layernorm,
                    [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                ),
                (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
            ]
            for norm, projections in pairs:
                norm.weight[channel] /= factor
                for proj in projections:
                    proj.weight[:, channel] *= factor
    shutil.copytree(src, dest, dirs_exist_ok=True)
    model.save_pretrained(dest)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--shift", type=int, default=8, help="scale by 2^shift (default 8)")
    args = parser.parse_args()
    inject(args.src, args.dest, args.shift)
    print(f"wrote {args.dest}")
