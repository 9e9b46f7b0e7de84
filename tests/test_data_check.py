"""The agent's checks of its data files: before the join (no labels known yet) and against the run's labels.

The whole-agent version (a malformed file never joins, a wrong label set leaves before the bundle download) is
in tests/test_agent_leave.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data_check import check_before_join, check_labels, labels_for_format_check

RUN_LABELS = ("negative", "neutral", "positive")


def jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_names_and_indices_pass_the_format_check_and_are_counted(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": 2},
                                        {"text": "c", "label": "0"}])
    held = jsonl(tmp_path / "g.jsonl", [{"text": "x", "label": "neutral"}])
    files = check_before_join(data, held)
    assert (files.n_examples, files.n_global_test, files.n_public) == (3, 1, 0)
    assert files.label_names == ("positive",)
    check_labels(files, data, held, RUN_LABELS)  # all in the run's labels


def test_placeholders_cover_every_index_and_keep_the_names() -> None:
    names, labels = labels_for_format_check(["b", "a", 4, " 2 ", "b"])
    assert names == ("b", "a") and len(labels) == 5 and labels[:2] == ("b", "a")


@pytest.mark.parametrize(("lines", "message"), [
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\nnot json\n', "line 3: not valid JSON"),
    ('{"text": "a", "label": "x"}\n{"text": "", "label": "x"}\n', "line 2: empty text"),
    ('{"text": "a", "label": "x"}\n{"label": "x"}\n', 'line 2: missing field "text"'),
    ('{"text": "only one", "label": "x"}\n', "needs at least 2"),
    ('{"text": "a", "label": -1}\n{"text": "b", "label": 0}\n', "out of range"),
])
def test_a_bad_file_is_refused_before_the_join(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(lines)
    with pytest.raises(ValueError, match=message):
        check_before_join(path)


def test_a_missing_or_unknown_file_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_before_join(tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        check_before_join(tmp_path / "data.txt")


def test_labels_outside_the_run_are_named(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "banana"}])
    files = check_before_join(data)
    with pytest.raises(ValueError, match=r"\['banana'\] are not labels of this run"):
        check_labels(files, data, None, RUN_LABELS)
    indices = jsonl(tmp_path / "i.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 7}])
    with pytest.raises(ValueError, match="line 2: label index 7 is out of range"):
        check_labels(check_before_join(indices), indices, None, RUN_LABELS)


def test_image_files_are_checked_too(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((4, 8, 8), np.uint8), labels=np.array(["cat", "dog", "cat", "dog"]))
    files = check_before_join(good)
    assert files.n_examples == 4 and set(files.label_names) == {"cat", "dog"}
    with pytest.raises(ValueError, match="not labels of this run"):
        check_labels(files, good, None, RUN_LABELS)
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((4, 8, 8), np.float32), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="expected uint8"):
        check_before_join(floats)
