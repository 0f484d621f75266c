"""The floors of docs/ARCHITECTURE.md, read from the code: no import runs from a lower floor
to a higher one, the jobs load neither prefect nor boto3 nor Ray in their environments, and no
stage reads another's manifest by string key."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOORS = ["llmship", "serving", "jobs", "tasks", "flows"]
# jobs/ sit above serving/ only for the engines' pure command lines and health check.
ONLY_FROM = {"jobs": {"serving": {"serving.engines"}}}


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from serving import engines` imports serving.engines.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def package_modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", FLOORS)
def test_no_import_runs_up_a_floor(package):
    floor = FLOORS.index(package)
    above = set(FLOORS[floor + 1 :])
    wrong = []
    for path in package_modules(package):
        for line, module in imports_of(path):
            top = module.split(".")[0]
            if top in above:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            for lower, allowed in ONLY_FROM.get(package, {}).items():
                if top == lower and not any(
                    module == a or module.startswith(a + ".") for a in allowed
                ):
                    wrong.append(
                        f"{path.relative_to(REPO)}:{line} imports {module} "
                        f"(only {sorted(allowed)} of {lower})"
                    )
    assert wrong == []


@pytest.mark.parametrize(
    "env, jobs",
    [
        ("quantize", ["jobs.calibrate", "jobs.build", "jobs.evaluate"]),
        ("serve", ["jobs.benchmark"]),
    ],
)
def test_jobs_load_no_orchestration_in_their_environment(env, jobs):
    code = (
        f"import sys; import {', '.join(jobs)}; "
        "print(sorted(m for m in ('prefect', 'boto3', 'ray') if m in sys.modules))"
    )
    out = subprocess.run(
        [str(REPO / ".venv" / env / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_the_quantize_environment_installs_no_orchestration():
    out = subprocess.run(
        [
            str(REPO / ".venv" / "quantize" / "bin" / "python"),
            "-c",
            "import importlib.util as u; print([m for m in ('prefect', 'boto3', "
            "'ray') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_no_stage_reads_a_manifest_by_string_key():
    """Stages hand each other typed models (llmship/contracts.py, llmship/versions.py)."""
    keyed = re.compile(r"\.(details|inputs)(\[|\.get\()")
    wrong = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for package in ("tasks", "flows", "serving", "jobs", "llmship")
        for path in package_modules(package)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if keyed.search(line)
    ]
    assert wrong == []


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each project module -> the project modules it imports, wherever the import is (inside a
    function too: it hides a circle from Python at import time, it does not remove it)."""
    paths = {module_of(p): p for package in FLOORS for p in package_modules(package)}

    def resolve(name: str) -> str | None:
        """The project module a dotted name is, or is in (`serving.fleet.acquire`)."""
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # `from . import x`, `from .y import x`
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                found |= {resolve(f"{base}.{alias.name}") for alias in node.names}
        graph[module] = found - {None, module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (each sorted)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        return seen

    reached = {module: reach(module) for module in graph}
    groups = {
        tuple(sorted(m for m in reached[module] if module in reached[m]))
        for module in graph
        if module in reached[module]
    }
    return sorted(list(group) for group in groups)


def test_no_import_circle():
    """Control flows one way: no module imports, directly or through others, one that imports
    it back (the fleet, the replica, the gateway and its admin client did, issue 29)."""
    found = circles(import_graph())
    assert found == [], "modules that import each other: " + "; ".join(map(" <-> ".join, found))


# The serving control path's messages (llmship/serving_messages.py): routes, canaries,
# shadows, shadow pairs, the directory's records and the alias documents.
CONTROL_KEYS = (
    "version|canary|percent|shadow|fraction|max_rps|keep_examples|since|pairs|examples"
    "|endpoints|warm_until|routed|spec|serving|previous|ungated_override|alias"
)


def test_nothing_on_the_serving_control_path_is_read_by_string_key():
    """The gateway, its admin client, the fleet, its directory, the aliases and, in tasks/,
    the rollout, its canary and the gates' servers read their messages through the models,
    never as dicts (issue 29). tasks/canary_rule.py is not among them: it reads Prometheus
    samples, whose labels (a `version` one) are no control-path message."""
    keyed = re.compile(rf"""(\[|\.get\(|\.pop\(|\.setdefault\()\s*["']({CONTROL_KEYS})["']""")
    paths = [
        *package_modules("serving"),
        REPO / "llmship" / "serving_messages.py",
        REPO / "llmship" / "store.py",
        REPO / "llmship" / "versions.py",
        REPO / "tasks" / "rollout.py",
        REPO / "tasks" / "canary.py",
        REPO / "tasks" / "servers.py",
    ]
    wrong = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for path in paths
        if path.exists()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if keyed.search(line)
    ]
    assert wrong == []


# Files a newcomer reads in one sitting.
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 80


def test_every_module_says_what_it_is_for():
    """Each production file opens with a docstring (what it is for, in a sentence or so)."""
    silent = [
        str(path.relative_to(REPO))
        for package in FLOORS
        for path in package_modules(package)
        if path.read_text().strip() and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert silent == []


def test_no_production_file_or_function_too_long_to_read_in_one_sitting():
    long = []
    for package in FLOORS:
        for path in package_modules(package):
            name, text = str(path.relative_to(REPO)), path.read_text()
            if len(text.splitlines()) > MAX_FILE_LINES:
                long.append(f"{name}: {len(text.splitlines())} lines")
            long += [
                f"{name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
                for node in ast.walk(ast.parse(text))
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            ]
    assert long == []
