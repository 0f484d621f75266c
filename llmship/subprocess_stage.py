"""Run a stage's job (jobs/) in its own Python environment, as a subprocess.

The orchestrator side (`run_stage`) writes the typed request to a JSON file, starts
`<env python> -m jobs.<job> --request R --result S`, streams the stage's output into the
Prefect log line by line (progress on long work), and reads back the typed result. The stage
side (`stage_main`) does the reverse. A stage that fails with one of llmship's own errors
reports its type and message, and the same exception is raised here: a malformed calibration
line fails the flow with the file and line, not with "exit status 1".
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import traceback
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from llmship import errors
from llmship.settings import Settings, stage_env

Req = TypeVar("Req", bound=BaseModel)
Res = TypeVar("Res", bound=BaseModel)


def run_stage(
    settings: Settings,
    python: Path,
    module: str,
    request: BaseModel,
    result_type: type[Res],
    logger: logging.Logger | logging.LoggerAdapter,
) -> Res:
    if not python.exists():
        raise errors.StackError(f"stage environment {python} is missing: run `make setup`")
    with tempfile.TemporaryDirectory(prefix="llmship-stage-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(request.model_dump_json())
        argv = [str(python), "-m", module, "--request", str(req_path), "--result", str(res_path)]
        logger.info("running %s", " ".join(argv[1:3]))
        tail: deque[str] = deque(maxlen=40)
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=stage_env(settings),
            errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                if line.strip():
                    logger.info("%s", line.rstrip())
            code = proc.wait()
        payload = json.loads(res_path.read_text()) if res_path.exists() else {}
    if "error" in payload:
        err = payload["error"]
        exc_type = getattr(errors, err["type"], None)
        if isinstance(exc_type, type) and issubclass(exc_type, errors.LlmshipError):
            raise exc_type(err["message"])
        raise errors.StageFailed(f"{module}: {err['type']}: {err['message']}")
    if code != 0 or "result" not in payload:
        raise errors.StageFailed(
            f"{module} exited with status {code}; its last lines:\n" + "\n".join(tail)
        )
    return result_type.model_validate(payload["result"])


def stage_main(fn: Callable[[Req], Res], request_type: type[Req]) -> None:
    """The `python -m jobs.<job>` entry point, run in the stage's environment."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--request", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    request = request_type.model_validate_json(args.request.read_text())
    try:
        result = fn(request)
    except errors.LlmshipError as exc:
        args.result.write_text(
            json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}})
        )
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - reported to the orchestrator, then re-raised there
        traceback.print_exc(file=sys.stdout)
        args.result.write_text(
            json.dumps({"error": {"type": type(exc).__name__, "message": str(exc)}})
        )
        sys.exit(1)
    args.result.write_text(json.dumps({"result": result.model_dump(mode="json")}))


@lru_cache
def tool_versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """Versions of packages in a stage environment: part of every stage's content address."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: out[p] = 'absent'\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True)
    if proc.returncode != 0:
        raise errors.StackError(f"cannot read package versions from {python}: {proc.stderr}")
    return json.loads(proc.stdout)
