"""Calibration and evaluation files: bad input is named by file and line, and the committed
domain sets keep their promise that no evaluation clause is ever calibrated on."""

import json
import sys
from pathlib import Path

import pytest

from llmship.domain_data import (
    check_disjoint,
    dataset_dir,
    load_calibration_texts,
    load_eval_items,
)
from llmship.errors import CalibrationDataError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(
        tmp_path,
        "calibration.jsonl",
        b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n',
    )
    with pytest.raises(CalibrationDataError, match=rf"{path}:3: not valid JSON"):
        load_calibration_texts(path)


def test_non_utf8_names_the_line(tmp_path):
    path = write(tmp_path, "calibration.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CalibrationDataError, match=rf"{path}:2: not UTF-8"):
        load_calibration_texts(path)


def test_missing_text_field_says_what_is_expected(tmp_path):
    path = write(tmp_path, "calibration.jsonl", b'{"text": "ok"}\n{"prompt": "x"}\n')
    with pytest.raises(CalibrationDataError, match=r':2: expected \{"text"'):
        load_calibration_texts(path)


def test_empty_file_is_refused(tmp_path):
    path = write(tmp_path, "calibration.jsonl", b"\n\n")
    with pytest.raises(CalibrationDataError, match="no calibration samples"):
        load_calibration_texts(path)


def test_blank_lines_are_skipped_and_texts_kept(tmp_path):
    path = write(tmp_path, "calibration.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n')
    assert load_calibration_texts(path) == ["a", "b"]


def test_eval_item_missing_answer_and_duplicate_id(tmp_path):
    missing = write(
        tmp_path,
        "eval.jsonl",
        b'{"id": "1", "task": "t", "prompt": "p", "answer": "a"}\n'
        b'{"id": "2", "task": "t", "prompt": "p"}\n',
    )
    with pytest.raises(CalibrationDataError, match=r"eval.jsonl:2: answer: Field required"):
        load_eval_items(missing)
    dup = write(
        tmp_path,
        "eval2.jsonl",
        b'{"id": "1", "task": "t", "prompt": "p", "answer": "a"}\n'
        b'{"id": "1", "task": "t", "prompt": "q", "answer": "b"}\n',
    )
    with pytest.raises(CalibrationDataError, match=r"eval2.jsonl:2: duplicate id '1'"):
        load_eval_items(dup)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(CalibrationDataError, match=r"no dataset 'nope'.*contracts"):
        dataset_dir("nope")
    with pytest.raises(CalibrationDataError):
        dataset_dir("../../etc")


def test_committed_sets_are_disjoint_and_reproducible(tmp_path):
    sys.path.insert(0, str(REPO / "demo"))
    import contracts

    data = REPO / "calibration_data" / "contracts"
    items = load_eval_items(data / "eval.jsonl")
    texts = load_calibration_texts(data / "calibration.jsonl")
    eval_clauses = {contracts.clause_of(i.prompt) for i in items}
    calib_clauses = {contracts.clause_of(t) for t in texts}
    assert len(items) == 300 and len(texts) == 512
    assert not eval_clauses & calib_clauses
    assert {i.task for i in items} == {"clause_type", "extract_date", "extract_amount"}
    # The generator reproduces the committed files byte for byte.
    contracts.write_domain_sets(tmp_path)
    for name in ("eval.jsonl", "calibration.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes()
    assert json.loads((data / "eval.jsonl").read_text().splitlines()[0])["id"] == "s1001-0"


def test_evaluation_items_seen_in_calibration_are_refused(tmp_path):
    data = REPO / "calibration_data" / "contracts"
    check_disjoint(data / "calibration.jsonl", data / "eval.jsonl")  # the committed sets pass
    item = json.loads((data / "eval.jsonl").read_text().splitlines()[4])
    leaky = tmp_path / "calibration.jsonl"
    leaky.write_text(
        (data / "calibration.jsonl").read_text()
        + json.dumps({"text": f"{item['prompt']} {item['answer']}"})
        + "\n"
    )
    with pytest.raises(
        CalibrationDataError,
        match=rf"item '{item['id']}' .* also appears in .*calibration.jsonl "
        r"\(sample 513\)",
    ):
        check_disjoint(leaky, data / "eval.jsonl")


def test_a_line_past_the_size_limit_names_file_and_line(tmp_path):
    path = tmp_path / "calibration.jsonl"
    path.write_text('{"text": "fine"}\n' + json.dumps({"text": "x" * 1_200_000}) + "\n")
    with pytest.raises(CalibrationDataError, match=r"calibration.jsonl:2: line is 1200\d+ bytes"):
        load_calibration_texts(path)


def test_a_large_file_is_checked_whole_but_only_the_samples_used_are_kept(tmp_path):
    """200k lines: every one is checked (a bad last line is found), and a limit keeps the
    texts in memory to what calibration takes."""
    from llmship.domain_data import count_calibration_texts

    path = tmp_path / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": f"clause {i}"}) + "\n" for i in range(200_000)))
    assert count_calibration_texts(path) == 200_000
    assert load_calibration_texts(path, limit=512) == [f"clause {i}" for i in range(512)]
    with path.open("a") as f:
        f.write('{"txt": "a typo"}\n')
    with pytest.raises(CalibrationDataError, match=r"calibration.jsonl:200001: expected"):
        load_calibration_texts(path, limit=512)
