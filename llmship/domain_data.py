"""The team's domain data in calibration_data/<dataset>/: read, checked, digested.

    calibration.jsonl   {"text": "..."} per line: what calibration runs through the model
    eval.jsonl          {"id", "task", "prompt", "answer"} per line: held-out gate items

Every problem is reported with the file and the line, so it can be fixed where it is.
See calibration_data/README.md for the format.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from llmship.errors import CalibrationDataError
from llmship.settings import get_settings

MAX_LINE_BYTES = 1_000_000


class EvalItem(BaseModel, extra="forbid"):
    id: str
    task: str
    prompt: str
    answer: str


def dataset_dir(name: str) -> Path:
    root = get_settings().stages.calibration_data_dir.resolve()
    path = (root / name).resolve()
    if root not in path.parents or not path.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise CalibrationDataError(f"no dataset {name!r} under {root}: choose one of {known}")
    return path


def _json_lines(path: Path):
    """(line number, object) for each non-blank line; any problem names file and line."""
    if not path.is_file():
        raise CalibrationDataError(f"{path} does not exist: see calibration_data/README.md")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise CalibrationDataError(
                    f"{path}:{number}: line is {len(raw)} bytes, over {MAX_LINE_BYTES}: split it"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CalibrationDataError(
                    f"{path}:{number}: not UTF-8 (byte {exc.start}): re-encode the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationDataError(
                    f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise CalibrationDataError(f"{path}:{number}: expected a JSON object per line")
            yield number, obj


def calibration_texts(path: Path):
    """Each sample's text, line by line, every line checked; any problem names file and line."""
    for number, obj in _json_lines(path):
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            raise CalibrationDataError(
                f'{path}:{number}: expected {{"text": "<non-empty string>"}}, '
                f"got keys {sorted(obj)}"
            )
        yield text


def load_calibration_texts(path: Path, limit: int | None = None) -> list[str]:
    """Every line is checked; at most limit texts are kept (a large file costs time to read,
    not memory)."""
    texts, count = [], 0
    for text in calibration_texts(path):
        count += 1
        if limit is None or len(texts) < limit:
            texts.append(text)
    if not count:
        raise CalibrationDataError(f"{path} has no calibration samples")
    return texts


def count_calibration_texts(path: Path) -> int:
    """How many samples the file holds, every line checked, none kept in memory."""
    count = sum(1 for _ in calibration_texts(path))
    if not count:
        raise CalibrationDataError(f"{path} has no calibration samples")
    return count


def load_eval_items(path: Path) -> list[EvalItem]:
    items, seen = [], set()
    for number, obj in _json_lines(path):
        try:
            item = EvalItem.model_validate(obj)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise CalibrationDataError(f"{path}:{number}: {problems}") from None
        if item.id in seen:
            raise CalibrationDataError(f"{path}:{number}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise CalibrationDataError(f"{path} has no evaluation items")
    return items


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_disjoint(calibration_file: Path, eval_file: Path) -> None:
    """Refuse evaluation items that calibration has seen: a gate on seen items measures nothing."""
    texts = load_calibration_texts(calibration_file)
    for item in load_eval_items(eval_file):
        prompt = item.prompt.strip()
        seen = next((n for n, text in enumerate(texts, start=1) if prompt in text), None)
        if seen is not None:
            raise CalibrationDataError(
                f"evaluation item {item.id!r} of {eval_file} also appears in {calibration_file} "
                f"(sample {seen}): keep the evaluation set apart from the calibration set"
            )
