"""Check a device's data files before it joins a run, and its labels against the run's as soon as they are known.

Why before the join: an agent with a broken file used to join, download a bundle of tens of MB, then exit; the
coordinator kept it as joined and waited out every round's deadline for it. The run's labels reach the agent
only once it is accepted (``JoinAccepted.labels``, or the bundle manifest), so the check has two steps:

1. before the join request, everything that does not depend on the run: the file type, every row readable (text
   and label present, pixels uint8), and at least two examples so the 75/25 split has one example per side;
2. right after acceptance, before the bundle is downloaded, every label against the run's labels.

Both steps go through ``edge_agent.data.load_examples``, so the messages are the ones the training code gives.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.data import CSV_SUFFIXES, JSONL_SUFFIXES, NPZ_SUFFIXES, load_examples

MAX_PLACEHOLDER_LABELS = 100_000  # integer labels above this are out of range for any run


@dataclass(frozen=True)
class DataFiles:
    """What the pre-join check found: example counts (sent in the join request) and the label names used."""

    n_examples: int
    n_global_test: int
    n_public: int
    label_names: tuple[str, ...]  # labels given by name in the private file (integer labels are not listed)


def raw_labels(path: Path) -> list[object]:
    """The label values of a file as written (names or integers), without judging them.

    Parse errors are left to ``load_examples``, which reports them with the line; here they only stop the scan.
    """
    suffix = path.suffix.lower()
    found: list[object] = []
    try:
        if suffix in JSONL_SUFFIXES:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if isinstance(record, dict) and "label" in record:
                        found.append(record["label"])
        elif suffix in CSV_SUFFIXES:
            with path.open(encoding="utf-8-sig", newline="") as handle:
                found.extend(row.get("label") for row in csv.DictReader(handle))
        elif suffix in NPZ_SUFFIXES:
            with np.load(path, allow_pickle=False) as archive:
                raw = archive["labels"]
                if raw.dtype.kind in "US":
                    found.extend(raw.astype(str).tolist() if raw.dtype.kind == "U"
                                 else np.char.decode(raw, "utf-8").tolist())
                elif raw.dtype.kind in "iu" and raw.size:
                    found.append(int(raw.max()))
    except (ValueError, KeyError, OSError, TypeError, AttributeError):
        pass  # load_examples gives the precise error
    return found


def labels_for_format_check(raw: Sequence[object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, labels to check the format with): every label name as written, plus placeholders so that every
    integer index (or digit string) in the file is in range; the run's real labels are checked later."""
    names: dict[str, None] = {}
    top = -1
    for value in raw:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.lstrip("-").isdigit():
                top = max(top, int(stripped))
            elif stripped:
                names.setdefault(stripped, None)
        elif isinstance(value, int) and not isinstance(value, bool):
            top = max(top, value)
    named = tuple(names)
    needed = min(max(top + 1, len(named), 1), MAX_PLACEHOLDER_LABELS)
    placeholders = tuple(f"#{i}" for i in range(needed - len(named)))
    return named, named + placeholders


def _count(path: Path, what: str, minimum: int) -> tuple[int, tuple[str, ...]]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist; check the path")
    names, labels = labels_for_format_check(raw_labels(path))
    examples = load_examples(path, labels)
    if len(examples) < minimum:
        raise ValueError(f"{path}: {len(examples)} example(s); the {what} needs at least {minimum} (the agent "
                         "keeps a quarter of its data to test on, so one for training and one for testing)")
    return len(examples), names


def check_before_join(data: Path, global_test: Path | None = None, public: Path | None = None) -> DataFiles:
    """Everything about the files that can be checked without the run's labels; raises ValueError (or
    FileNotFoundError) with the file, the line and the fix."""
    n, names = _count(data, "data file (--data)", 2)
    n_global = _count(global_test, "global test file (--global-test)", 1)[0] if global_test else 0
    n_public = _count(public, "public file (--public)", 1)[0] if public else 0
    return DataFiles(n, n_global, n_public, names)


def check_labels(files: DataFiles, data: Path, global_test: Path | None, labels: Sequence[str]) -> None:
    """Every example's label against the run's labels (names or indices), before the bundle is downloaded."""
    unknown = [name for name in files.label_names if name not in labels]
    if unknown:
        raise ValueError(f"{data}: label(s) {unknown[:10]} are not labels of this run "
                         f"({', '.join(repr(x) for x in labels)}); relabel the file, or join a run trained on "
                         "these labels")
    load_examples(data, labels)  # integer labels in range, with the line of the first bad one
    if global_test is not None:
        load_examples(global_test, labels)
