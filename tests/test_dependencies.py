"""Dependencies are pinned: every package of the three environments is installed at the
version its lock file names, and every direct requirement has a pin there. `make setup`
installs with `-c envs/<env>.lock`; this catches a lock that drifted from what runs."""

import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENVS = ["orchestrator", "quantize", "serve"]
# What `python -m venv` puts in every environment, whatever is installed after.
VENV_BOOTSTRAP = {"pip", "setuptools", "wheel"}
# Metadata that `make setup` writes, no package of its own (envs/vllm_cpu_alias.py).
SETUP_ALIASES = {"vllm"}


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e ") or " @ " in line:
            continue
        name, _, version = line.partition("==")
        assert version, f"{line!r} is not pinned with =="
        found[canonicalize_name(name)] = version
    return found


@pytest.mark.parametrize("env", ENVS)
def test_every_installed_package_is_the_version_its_lock_names(env):
    lock = pins((REPO / "envs" / f"{env}.lock").read_text().splitlines())
    frozen = subprocess.run(
        [
            str(REPO / ".venv" / "uv" / "bin" / "uv"),
            "pip",
            "freeze",
            "--python",
            str(REPO / ".venv" / env / "bin" / "python"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    installed = {n: v for n, v in pins(frozen).items() if n not in VENV_BOOTSTRAP | SETUP_ALIASES}
    assert len(installed) > 20
    assert {n: v for n, v in installed.items() if lock.get(n) != v} == {}


@pytest.mark.parametrize("env", ENVS)
def test_every_direct_requirement_has_a_pin(env):
    lock = pins((REPO / "envs" / f"{env}.lock").read_text().splitlines())
    for line in (REPO / "envs" / f"{env}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            assert name in lock, f"{env}: {requirement.name} has no pin in envs/{env}.lock"
            assert requirement.specifier.contains(lock[name], prereleases=True), (
                f"{env}: the lock's {requirement.name}=={lock[name]} is outside {line!r}"
            )


def test_vllm_s_own_cli_runs_in_the_serve_environment():
    """`vllm bench serve`, the benchmark client README points to, as a user types it."""
    vllm = REPO / ".venv" / "serve" / "bin" / "vllm"
    out = subprocess.run(
        [str(vllm), "bench", "serve", "--help=max-concurrency"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--max-concurrency" in out.stdout
