"""The device's private data: reading it, splitting it 75/25, tokenising it and batching it.

Two modalities: labelled texts (JSONL/CSV, tokenised by ``TextEncoder``) and labelled images (``.npz``,
preprocessed by ``edge_agent.image.ImageEncoder``). Runs on the device, so it uses only numpy and the Rust
``tokenizers`` package (no torch, no transformers, no PIL). Input errors name the file, the line (or the
array) and the fix, because the person reading them is whoever put the data file on the device.
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
from tokenizers import Tokenizer

JSONL_SUFFIXES = (".jsonl", ".json-lines", ".ndjson")
CSV_SUFFIXES = (".csv",)
NPZ_SUFFIXES = (".npz",)


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's label list."""

    text: str
    label: int


@dataclass(frozen=True, eq=False)
class ImageExample:
    """One labelled image: uint8 ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB); ``label`` indexes the labels.

    ``eq=False`` because comparing arrays element-wise has no single truth value; examples compare (and
    hash) by identity, which is what the split and batching code needs. Images read by ``load_examples``
    are read-only views, so a frozen example really cannot change.
    """

    image: np.ndarray
    label: int


Sample = Example | ImageExample
"""Anything an agent trains on; the local round dispatches on the concrete type."""

S = TypeVar("S", bound=Sample)
T = TypeVar("T")  # anything batched: samples, or indices into the public set


@dataclass(frozen=True)
class LocalSplit(Generic[S]):
    """The agent's own train and (personalised) test examples, of whichever kind it was given."""

    train: list[S]
    test: list[S]


# ------------------------------------------------------------------------------------------- reading


def _label_index(raw: object, labels: Sequence[str], index: Mapping[str, int], where: str) -> int:
    """A label given by name, by int index, or (as CSV gives everything as text) by a digit string."""
    expected = f"expected one of {', '.join(repr(x) for x in labels)} or an index 0..{len(labels) - 1}"
    if isinstance(raw, str):
        if raw in index:
            return index[raw]
        stripped = raw.strip()
        if stripped in index:
            return index[stripped]
        if stripped.lstrip("-").isdigit():
            raw = int(stripped)
        else:
            raise ValueError(
                f"{where}: unknown label {raw!r} ({expected}); fix the label or the task's labels"
            )
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"{where}: label must be a label name or an integer index, got {raw!r} ({expected})")
    if not 0 <= raw < len(labels):
        raise ValueError(f"{where}: label index {raw} is out of range ({expected})")
    return raw


def _example(
    record: Mapping[str, object], labels: Sequence[str], index: Mapping[str, int], where: str
) -> Example:
    """Validate one record into an Example."""
    for field in ("text", "label"):
        value = record.get(field)
        if value is None or (field == "label" and isinstance(value, str) and not value.strip()):
            raise ValueError(f'{where}: missing field "{field}"; every record needs "text" and "label"')
    text = record["text"]
    if not isinstance(text, str):
        raise ValueError(f'{where}: "text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise ValueError(f"{where}: empty text; remove the line or give it text")
    return Example(text, _label_index(record["label"], labels, index, where))


def _read_jsonl(path: Path, labels: Sequence[str], index: Mapping[str, int]) -> list[Example]:
    """One JSON object per line; blank lines are skipped."""
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg}); each line must be one object like "
                    '{"text": "...", "label": "..."}'
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f'{where}: expected a JSON object with "text" and "label", got {type(record).__name__}'
                )
            examples.append(_example(record, labels, index, where))
    return examples


def _read_csv(path: Path, labels: Sequence[str], index: Mapping[str, int]) -> list[Example]:
    """A header row naming (at least) the columns text and label."""
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if header is None:
            return examples
        missing = [c for c in ("text", "label") if c not in header]
        if missing:
            raise ValueError(
                f"{path}, line 1: the header {header} lacks the column(s) {missing}; "
                "the first row must name the columns text and label"
            )
        for row in reader:
            examples.append(_example(row, labels, index, f"{path}, line {reader.line_num}"))
    return examples


def _npz_labels(raw: np.ndarray, labels: Sequence[str], index: Mapping[str, int], path: Path) -> np.ndarray:
    """The ``labels`` array as int64 indices; it may hold integer indices or label names (str or bytes).

    Names go through the same rules (and messages) as a text file's labels; integer indices are checked
    at once, since an image file can hold tens of thousands of them.
    """
    if raw.dtype.kind in "US":
        names = raw.astype(str) if raw.dtype.kind == "U" else np.char.decode(raw, "utf-8")
        return np.array(
            [_label_index(name, labels, index, f"{path}, labels[{i}]") for i, name in enumerate(names.tolist())],
            dtype=np.int64,
        )
    if raw.dtype.kind not in "iu":
        raise ValueError(
            f"{path}: the labels array has dtype {raw.dtype}; store integer indices "
            "(e.g. labels.astype(np.int64)) or label names (strings)"
        )
    bad = np.flatnonzero((raw < 0) | (raw >= len(labels)))
    if bad.size:
        first = int(bad[0])
        expected = f"expected one of {', '.join(repr(x) for x in labels)} or an index 0..{len(labels) - 1}"
        raise ValueError(
            f"{path}, labels[{first}]: label index {int(raw[first])} is out of range ({expected}); "
            f"{bad.size} label(s) out of range in all"
        )
    return raw.astype(np.int64)


def _read_npz(path: Path, labels: Sequence[str], index: Mapping[str, int]) -> list[ImageExample]:
    """Arrays ``images`` (uint8 ``[N, H, W]`` or ``[N, H, W, 3]``) and ``labels`` (``[N]``, indices or names).

    ``allow_pickle=False``: a data file must never be able to run code on the device.
    """
    fix = "save it with np.savez(path, images=<uint8 [N,H,W] or [N,H,W,3]>, labels=<[N] indices or names>)"
    unreadable = (ValueError, zipfile.BadZipFile, EOFError, OSError)  # what numpy raises for a broken file
    try:
        archive = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise ValueError(f"{path}: not a valid .npz file ({e}); {fix}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single array (.npy format), not an .npz archive; {fix}")
    with archive:
        missing = [name for name in ("images", "labels") if name not in archive.files]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing} (found {sorted(archive.files)}); {fix}")
        try:
            images = archive["images"]
            raw_labels = archive["labels"]
        except unreadable as e:
            raise ValueError(f"{path}: not a valid .npz file ({e}); {fix}") from None
    if images.dtype != np.uint8:
        raise ValueError(
            f"{path}: images have dtype {images.dtype}, expected uint8 pixels 0..255; "
            "convert with (x * 255).round().astype(np.uint8) if they are floats in [0, 1]"
        )
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(
            f"{path}: images have shape {images.shape}, expected [N, H, W] (grayscale) or [N, H, W, 3] (RGB)"
        )
    if raw_labels.ndim != 1:
        raise ValueError(f"{path}: labels have shape {raw_labels.shape}, expected one label per image: [N]")
    if len(raw_labels) != len(images):
        raise ValueError(
            f"{path}: {len(images)} images but {len(raw_labels)} labels; give exactly one label per image"
        )
    if len(images) and min(images.shape[1:3]) < 1:
        raise ValueError(f"{path}: images have shape {images.shape}; each image needs at least 1x1 pixels")
    label_ids = _npz_labels(raw_labels, labels, index, path)
    images.setflags(write=False)  # the examples are views into this array: keep them immutable
    return [ImageExample(images[i], int(label_ids[i])) for i in range(len(images))]


def load_examples(path: Path, labels: Sequence[str]) -> list[Sample]:
    """Read a data file: JSONL (``.jsonl``/``.json-lines``/``.ndjson``) or CSV (``.csv``) of {text, label}
    gives ``Example``s; ``.npz`` with arrays ``images`` and ``labels`` gives ``ImageExample``s.

    A label may be a name from ``labels`` or an integer index into it. One file holds one modality, so the
    list is all ``Example`` or all ``ImageExample``.
    """
    path = Path(path)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be a non-empty list of distinct names, got {list(labels)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist; check the --data path")
    index = {name: i for i, name in enumerate(labels)}
    suffix = path.suffix.lower()
    examples: list[Sample]  # list() below: a list[Example] is not a list[Sample] to mypy (lists are invariant)
    try:
        if suffix in JSONL_SUFFIXES:
            examples = list(_read_jsonl(path, labels, index))
        elif suffix in CSV_SUFFIXES:
            examples = list(_read_csv(path, labels, index))
        elif suffix in NPZ_SUFFIXES:
            examples = list(_read_npz(path, labels, index))
        else:
            supported = ", ".join(JSONL_SUFFIXES + CSV_SUFFIXES + NPZ_SUFFIXES)
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {supported}")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8"
        ) from None
    if not examples:
        raise ValueError(f"{path}: contains no examples; the agent needs labelled data to train")
    return examples


# ---------------------------------------------------------------------------------------------- split


def split_local(examples: Sequence[S], test_fraction: float = 0.25, seed: int = 0) -> LocalSplit[S]:
    """Seeded random train/test split of the agent's own data (75/25 by default).

    Both sides keep the file order (only membership is random), and each side gets at least one
    example when there are two or more, so personalised accuracy is always defined.
    """
    n = len(examples)
    if n < 2:
        raise ValueError(f"need at least 2 examples to make a train and a test split, got {n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test_idx = set(perm[:n_test].tolist())
    return LocalSplit(
        train=[e for i, e in enumerate(examples) if i not in test_idx],
        test=[e for i, e in enumerate(examples) if i in test_idx],
    )


# ----------------------------------------------------------------------------------------- tokenising


class TextEncoder:
    """Tokenises with a Hugging Face `tokenizers` tokenizer.json (no transformers on the device).

    Truncates to ``max_length`` and pads to the longest text in each batch, which is what the exported
    graphs take (dynamic sequence axis) and what ``AutoTokenizer(padding="longest", truncation=True)``
    gives on the builder, so the device sees the same ids the bundle was checked with.
    """

    def __init__(self, tokenizer_json: Path, max_length: int) -> None:
        path = Path(tokenizer_json)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} does not exist; the bundle should contain tokenizer.json"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}")
        tokenizer = Tokenizer.from_file(str(path))
        self.pad_id, self.pad_token = self._pad(tokenizer)
        self.max_length = max_length
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token)  # no length: longest in batch
        self._tokenizer = tokenizer

    @staticmethod
    def _pad(tokenizer: Tokenizer) -> tuple[int, str]:
        """The tokenizer's own pad token if configured, else BERT's "[PAD]", else id 0."""
        padding = tokenizer.padding
        if padding is not None:
            return int(padding["pad_id"]), str(padding["pad_token"])
        pad_id = tokenizer.token_to_id("[PAD]")
        if pad_id is not None:
            return pad_id, "[PAD]"
        return 0, tokenizer.id_to_token(0) or "[PAD]"

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 of shape [batch, longest sequence in the batch]."""
        ids, mask, _truncated = self.encode_counting(texts)
        return ids, mask

    def encode_counting(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """`encode`, plus how many texts were cut at ``max_length`` (prediction says so once)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string; wrap it in a list")
        if not texts:
            raise ValueError("encode got no texts; pass at least one")
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask, sum(1 for e in encodings if e.overflowing)


# -------------------------------------------------------------------------------------------- batching


def batches(examples: Sequence[T], batch_size: int, rng: np.random.Generator) -> Iterator[list[T]]:
    """Endless shuffled batches for k local steps: a fresh permutation each epoch.

    Every example is seen once per epoch and never twice in one batch; the last batch of an epoch may be
    short (also when there are fewer examples than ``batch_size``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not examples:
        raise ValueError("no training examples to batch; the agent's train split is empty")
    n = len(examples)
    while True:
        perm = rng.permutation(n)
        for start in range(0, n, batch_size):
            yield [examples[int(i)] for i in perm[start : start + batch_size]]


def eval_batches(examples: Sequence[S], batch_size: int) -> Iterator[list[S]]:
    """Batches in order (evaluation must not depend on an rng); the last one may be short."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        yield list(examples[start : start + batch_size])
