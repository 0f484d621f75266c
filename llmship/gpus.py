"""The GPUs of this machine, as the preflight plans with them. Which model server holds which
is Ray's business (serving/fleet.py): it gives each replica its own.
"""

from __future__ import annotations

import shutil
import subprocess

from pydantic import BaseModel


class Gpu(BaseModel):
    index: int
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits`"""
    gpus = []
    for i, line in enumerate(filter(None, (ln.strip() for ln in text.splitlines()))):
        name, memory_mib, cap = (part.strip() for part in line.rsplit(",", 2))
        major, minor = cap.split(".")
        gpus.append(
            Gpu(
                index=i,
                name=name,
                memory_gib=round(float(memory_mib) / 1024, 1),
                compute_capability=(int(major), int(minor)),
            )
        )
    return gpus


def detect_gpus() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    proc = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=name,memory.total,compute_cap",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
    )
    return parse_nvidia_smi(proc.stdout) if proc.returncode == 0 else []
