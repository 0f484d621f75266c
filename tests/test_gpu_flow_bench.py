"""bench/gpu_flow.py, the whole flow on a GPU host, checked where CI runs (no GPU): how it
reads Prefect's task runs and sets the stages beside the plan's estimates, and the commands
it lays out for a host whose environments are sites on PYTHONPATH."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_flow  # noqa: E402


def task_run(name: str, state: str, seconds: float | None, start_min: int):
    start = datetime(2026, 12, 6, 12, start_min, tzinfo=UTC)
    return SimpleNamespace(
        name=name,
        state=SimpleNamespace(name=state),
        total_run_time=timedelta(seconds=seconds) if seconds is not None else None,
        start_time=start,
        expected_start_time=start,
    )


def test_task_runs_are_read_in_start_order_and_summed_per_stage():
    rows = gpu_flow.task_run_rows(
        [
            task_run("gate-1f2", "Completed", 12.0, 9),
            task_run("preflight-a1b", "Completed", 2.5, 1),
            task_run("evaluate-77c", "Completed", 30.0, 5),
            task_run("evaluate-88d", "Cached", None, 6),
            task_run("build-9ab", "Completed", 4.0, 3),
            task_run("build-9ac", "Completed", 6.0, 4),
        ]
    )
    assert [r["name"] for r in rows][:2] == ["preflight-a1b", "build-9ab"]
    assert rows[4]["state"] == "Cached" and rows[4]["seconds"] == 0.0
    stages = gpu_flow.stage_seconds(rows)
    assert stages == {"preflight": 2.5, "build": 10.0, "evaluate": 30.0, "gate": 12.0}
    # Beside the plan: the evaluations run inside the gate's task, not added twice.
    compared = gpu_flow.against_plan(stages, {"build": 8.0, "gate": 240.0})
    assert compared["build"] == {"flow_run_s": 10.0, "plan_s": 8.0}
    assert compared["gate"] == {"flow_run_s": 12.0, "plan_s": 240.0}
    assert compared["rollout"] == {"flow_run_s": 0.0, "plan_s": None}


def test_the_gpu_host_layout_stands_in_for_the_orchestrator_environment(tmp_path):
    """On the GPU host the orchestrator is a site on PYTHONPATH, not a virtual environment:
    the bin folder the stack takes its commands from runs prefect and ray from that site."""
    site = REPO / ".venv" / "orchestrator" / "lib"
    site = next(site.glob("python3*/site-packages"))
    weed_site = tmp_path / "site"
    (weed_site / "bin").mkdir(parents=True)
    (weed_site / "bin" / "weed").symlink_to(REPO / ".venv" / "orchestrator" / "bin" / "weed")
    bin_dir = gpu_flow.orchestrator_bin(tmp_path, f"{weed_site}:{site}")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    ray = subprocess.run(
        [str(bin_dir / "ray"), "--version"], env=env, capture_output=True, text=True
    )
    assert ray.returncode == 0 and "2.60.0" in ray.stdout, ray.stderr
    prefect = subprocess.run(
        [str(bin_dir / "prefect"), "--version"], env=env, capture_output=True, text=True
    )
    assert prefect.returncode == 0 and prefect.stdout.strip().startswith("3."), prefect.stderr
    assert (bin_dir / "weed").resolve() == (REPO / ".venv/orchestrator/bin/weed").resolve()


def test_the_stack_s_python_keeps_the_packages_of_the_interpreter_it_links_to(tmp_path):
    """Seen on the GPU host: the stack's `python`, a link to the host's interpreter made in
    another folder, lost that interpreter's virtual environment, and Ray Serve's workers could
    not import numpy. Here the suite's own interpreter is a virtual environment's: linked the
    same way it loses the environment's packages (prefect, which the base Python lacks), and
    the stack's PYTHONPATH (host_sites) gives them back."""
    assert sys.prefix != sys.base_prefix, "the suite runs in .venv/orchestrator"
    weed_site = tmp_path / "site"
    (weed_site / "bin").mkdir(parents=True)
    (weed_site / "bin" / "weed").touch()
    bin_dir = gpu_flow.orchestrator_bin(tmp_path, str(weed_site))
    probe = [str(bin_dir / "python"), "-c", "import prefect"]
    lost = subprocess.run(probe, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert lost.returncode != 0 and "No module named 'prefect'" in lost.stderr
    kept = subprocess.run(
        probe,
        env={"PYTHONPATH": ":".join([str(REPO), *gpu_flow.host_sites()])},
        capture_output=True,
        text=True,
    )
    assert kept.returncode == 0, kept.stderr
