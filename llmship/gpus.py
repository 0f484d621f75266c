"""The GPUs of this machine, and which model server holds which.

Servers of a rollout run side by side (the live version and the new one, the gate's
evaluation servers beside the live one), so each takes its own GPUs: CUDA_VISIBLE_DEVICES
from the GPUs no running server holds.
"""

from __future__ import annotations

import shutil
import subprocess

from pydantic import BaseModel

from llmship import processes
from llmship.errors import ServingError
from llmship.settings import Settings


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
        gpus.append(Gpu(index=i, name=name, memory_gib=round(float(memory_mib) / 1024, 1),
                        compute_capability=(int(major), int(minor))))
    return gpus


def detect_gpus() -> list[Gpu]:
    if shutil.which("nvidia-smi") is None:
        return []
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return parse_nvidia_smi(proc.stdout) if proc.returncode == 0 else []


def held_gpus(settings: Settings) -> dict[int, str]:
    """GPU index -> the running server's record that holds it."""
    held = {}
    for rec in processes.records(settings):
        if processes.is_alive(rec.pid):
            for index in rec.info.get("gpus", []):
                held[index] = rec.name
    return held


def choose_gpus(total: int, held: dict[int, str], count: int, for_name: str) -> list[int]:
    """The first count GPUs nobody holds; ServingError naming the holders otherwise."""
    free = [i for i in range(total) if i not in held]
    if len(free) < count:
        holders = ", ".join(sorted(set(held.values()))) or "nobody"
        raise ServingError(f"{for_name} needs {count} GPU(s); {len(free)} of {total} are free "
                           f"(held by {holders}). Stop a server kept warm, or give the pool "
                           "hosts with more GPUs (`llmship plan` counts them)")
    return free[:count]
