"""Prefect's names that llmship's stage modules import, as no-ops, written as a package folder:
for a GPU host without Prefect, where bench/gpu_serve.py calls the stages' own functions (which
never call Prefect; only their @task wrappers and artifacts do).

    write(folder)   # then put folder on PYTHONPATH (first), in this process or a child's
"""

from __future__ import annotations

from pathlib import Path

MODULES = {
    "prefect": """
def task(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn
flow = task
def get_run_logger():
    import logging
    return logging.getLogger("llmship")
def pause_flow_run(*args, **kwargs):
    raise RuntimeError("no Prefect here")
class Task: pass
""",
    "prefect.artifacts": "def create_markdown_artifact(*a, **k): pass\n"
    "def create_table_artifact(*a, **k): pass\n",
    "prefect.events": "def emit_event(*a, **k): pass\n",
    "prefect.states": "class State: pass\n",
    "prefect.tasks": "def exponential_backoff(**kwargs): return [1]\n",
    "prefect.input": "class RunInput:\n    pass\n",
    "prefect.transactions": """
import contextlib
class CommitMode:
    EAGER = "EAGER"
@contextlib.contextmanager
def transaction(*a, **k):
    yield
""",
    "prefect.client": "",
    "prefect.client.schemas": "",
    "prefect.client.schemas.objects": "class TaskRun: pass\n",
    # Imported by llmship.alerts (through llmship.stack): any name, a class that does nothing.
    "prefect.automations": "",
    "prefect.blocks": "",
    "prefect.blocks.notifications": "",
    "prefect.client.orchestration": "",
    "prefect.client.schemas.filters": "",
    "prefect.events.actions": "",
    "prefect.events.schemas": "",
    "prefect.events.schemas.automations": "",
}
ANY_NAME = """
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})
"""


def write(folder: Path) -> Path:
    for name, source in MODULES.items():
        package = folder.joinpath(*name.split("."))
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text(source.lstrip() + ANY_NAME)
    return folder
