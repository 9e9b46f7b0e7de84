"""Builder-side data: the real offline corpora, the seeded non-IID splits and the fleet files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.datasets import (
    TWEET_LABELS,
    LabeledText,
    TextDataset,
    balanced_holdout,
    dirichlet_label_split,
    load_bbc_news,
    load_tweet_sentiment,
    read_fleet_data,
    train_test_split_indices,
    write_fleet_data,
)
from edge_agent.data import Example, Sample, load_examples

# --------------------------------------------------------------------------------------- real corpora


def text_of(example: Sample) -> str:
    """The text of a text example (these tests load only text datasets)."""
    assert isinstance(example, Example), example
    return example.text


@pytest.fixture(scope="module")
def tweets() -> TextDataset:
    return load_tweet_sentiment()


def test_tweet_sentiment_matches_published_counts(tweets: TextDataset) -> None:
    assert tweets.labels == ("negative", "neutral", "positive") == TWEET_LABELS
    assert len(tweets.samples) == 38_158
    assert np.bincount(tweets.label_array(), minlength=3).tolist() == [16_186, 15_018, 6_954]
    assert all(s.text.strip() for s in tweets.samples)
    assert tweets.samples[0].text.startswith("I just don't trust my life in google's hands")
    assert tweets.samples[0].label == 0


def test_tweet_subsample_is_seeded_subset(tweets: TextDataset) -> None:
    a = load_tweet_sentiment(max_samples=500, seed=1)
    b = load_tweet_sentiment(max_samples=500, seed=1)
    c = load_tweet_sentiment(max_samples=500, seed=2)
    assert len(a.samples) == 500
    assert a == b
    assert a.samples != c.samples
    full = set(tweets.samples)
    assert set(a.samples) <= full
    assert len(set(a.label_array().tolist())) == 3


def test_tweet_deduplicate_removes_repeats_and_conflicts(tweets: TextDataset) -> None:
    deduped = load_tweet_sentiment(deduplicate=True)
    texts = [s.text for s in deduped.samples]
    assert len(texts) == len(set(texts))
    labels_of: dict[str, set[int]] = {}
    for s in tweets.samples:
        labels_of.setdefault(s.text, set()).add(s.label)
    consistent = {t for t, ls in labels_of.items() if len(ls) == 1}
    assert set(texts) == consistent
    assert len(deduped.samples) < len(tweets.samples)


def test_missing_max_samples_value_rejected() -> None:
    with pytest.raises(ValueError, match="max_samples"):
        load_tweet_sentiment(max_samples=0)


def test_bbc_news_counts() -> None:
    ds = load_bbc_news()
    assert ds.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert len(ds.samples) == 2_225
    assert np.bincount(ds.label_array(), minlength=5).tolist() == [510, 386, 417, 511, 401]
    assert ds.samples[0].text.startswith("Ad sales boost Time Warner profit")


# ------------------------------------------------------------------------------------------- splits


def _labels(n_per_class: tuple[int, ...], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    return np.random.default_rng(seed).permutation(labels)


def _max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    shares = [np.bincount(labels[p]).max() / len(p) for p in parts]
    return float(np.mean(shares))


def test_dirichlet_split_is_a_seeded_partition_with_min_size() -> None:
    labels = _labels((600, 500, 250))
    parts = dirichlet_label_split(labels, num_clients=8, alpha=0.3, seed=7, min_size=20)
    again = dirichlet_label_split(labels, num_clients=8, alpha=0.3, seed=7, min_size=20)
    other = dirichlet_label_split(labels, num_clients=8, alpha=0.3, seed=8, min_size=20)
    assert len(parts) == 8
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))  # disjoint and covering
    assert all(len(p) >= 20 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted


def test_dirichlet_small_alpha_skews_labels() -> None:
    labels = _labels((1000, 1000, 1000))
    skewed = [_max_class_share(labels, dirichlet_label_split(labels, 10, 0.1, s)) for s in range(5)]
    iid = [_max_class_share(labels, dirichlet_label_split(labels, 10, 100.0, s)) for s in range(5)]
    assert np.mean(skewed) > 0.7
    assert np.mean(iid) < 0.45
    assert np.mean(skewed) > np.mean(iid) + 0.25


def test_dirichlet_impossible_requests_are_explained() -> None:
    labels = _labels((30, 30))
    with pytest.raises(ValueError, match="at least 10 samples each from 60"):
        dirichlet_label_split(labels, num_clients=7, alpha=0.3, seed=0)
    with pytest.raises(ValueError, match="in 3 tries"):
        dirichlet_label_split(labels, num_clients=5, alpha=0.01, seed=0, min_size=12, max_tries=3)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_split(labels, num_clients=2, alpha=0.0, seed=0)


def test_balanced_holdout_exact_and_disjoint() -> None:
    labels = _labels((300, 120, 50))
    holdout, rest = balanced_holdout(labels, per_class=40, seed=3)
    assert np.bincount(labels[holdout]).tolist() == [40, 40, 40]
    assert len(np.intersect1d(holdout, rest)) == 0
    assert np.array_equal(np.sort(np.concatenate([holdout, rest])), np.arange(len(labels)))
    again, _ = balanced_holdout(labels, per_class=40, seed=3)
    assert np.array_equal(holdout, again)
    with pytest.raises(ValueError, match="class 2 has only 50 samples"):
        balanced_holdout(labels, per_class=51, seed=3)


def test_train_test_split_indices() -> None:
    train, test = train_test_split_indices(100, 0.25, seed=0)
    assert (len(train), len(test)) == (75, 25)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(100))
    again_train, again_test = train_test_split_indices(100, 0.25, seed=0)
    assert np.array_equal(test, again_test) and np.array_equal(train, again_train)
    assert not np.array_equal(test, train_test_split_indices(100, 0.25, seed=1)[1])
    assert [len(x) for x in train_test_split_indices(2, 0.01, seed=0)] == [1, 1]
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split_indices(10, 1.0, seed=0)


# -------------------------------------------------------------------------------------------- fleet


def _synthetic(n_per_class: tuple[int, ...], duplicate_every: int = 0) -> TextDataset:
    """Unique texts, except that every ``duplicate_every``-th sample repeats its predecessor's text."""
    labels = _labels(n_per_class, seed=11)
    samples: list[LabeledText] = []
    for i, y in enumerate(labels.tolist()):
        if duplicate_every and i % duplicate_every == 0 and samples and samples[-1].label == y:
            samples.append(LabeledText(samples[-1].text, y))
        else:
            samples.append(LabeledText(f"sample {i}, class {y}", y))
    return TextDataset("synthetic", ("a", "b", "c"), tuple(samples))


def test_write_fleet_data_files_round_trip(tmp_path: Path) -> None:
    ds = _synthetic((400, 300, 200))
    agents = ["agent-0", "agent-1", "agent-2", "agent-3"]
    fleet = write_fleet_data(ds, agents, tmp_path, alpha=0.5, seed=1, global_per_class=30)
    assert fleet.dataset == "synthetic" and fleet.labels == ds.labels
    assert set(fleet.client_files) == set(agents)

    test_examples = load_examples(fleet.global_test_file, ds.labels)
    assert np.bincount([e.label for e in test_examples], minlength=3).tolist() == [30, 30, 30]
    test_texts = {text_of(e) for e in test_examples}

    seen: set[str] = set()
    for agent in agents:
        examples = load_examples(fleet.client_files[agent], ds.labels)
        texts = {text_of(e) for e in examples}
        assert len(texts) == len(examples)
        assert not texts & test_texts, "global test leaked into an agent's data"
        assert not texts & seen, "two agents share a sample"
        seen |= texts
        assert np.bincount([e.label for e in examples], minlength=3).tolist() == fleet.label_counts[agent]
    assert len(seen) + len(test_texts) == len(ds.samples)  # without a cap, nothing is lost

    summary = json.loads((tmp_path / "fleet.json").read_text())
    assert summary["labels"] == ["a", "b", "c"]
    assert summary["global_test"]["label_counts"] == [30, 30, 30]
    assert {a: c["label_counts"] for a, c in summary["clients"].items()} == fleet.label_counts
    assert read_fleet_data(tmp_path) == fleet


def test_write_fleet_data_is_seeded(tmp_path: Path) -> None:
    ds = _synthetic((200, 200, 200))
    a = write_fleet_data(ds, ["x", "y"], tmp_path / "a", seed=5, global_per_class=20)
    b = write_fleet_data(ds, ["x", "y"], tmp_path / "b", seed=5, global_per_class=20)
    c = write_fleet_data(ds, ["x", "y"], tmp_path / "c", seed=6, global_per_class=20)
    assert a.client_files["x"].read_text() == b.client_files["x"].read_text()
    assert a.global_test_file.read_text() == b.global_test_file.read_text()
    assert a.global_test_file.read_text() != c.global_test_file.read_text()


def test_write_fleet_data_drops_duplicates_of_global_test(tmp_path: Path) -> None:
    ds = _synthetic((300, 300, 300), duplicate_every=3)
    fleet = write_fleet_data(ds, ["p", "q", "r"], tmp_path, seed=0, global_per_class=60)
    test_texts = {text_of(e) for e in load_examples(fleet.global_test_file, ds.labels)}
    for path in fleet.client_files.values():
        assert not {text_of(e) for e in load_examples(path, ds.labels)} & test_texts
    summary = json.loads((tmp_path / "fleet.json").read_text())
    assert summary["split"]["dropped_duplicates_of_global_test"] > 0


def test_write_fleet_data_caps_clients_on_real_tweets(tmp_path: Path, tweets: TextDataset) -> None:
    agents = [f"a{i}" for i in range(5)]
    fleet = write_fleet_data(
        tweets, agents, tmp_path, alpha=0.3, seed=0, global_per_class=100, max_per_client=200
    )
    for agent in agents:
        examples = load_examples(fleet.client_files[agent], tweets.labels)
        assert 10 <= len(examples) <= 200
        assert sum(fleet.label_counts[agent]) == len(examples)
    test_examples = load_examples(fleet.global_test_file, tweets.labels)
    assert np.bincount([e.label for e in test_examples]).tolist() == [100, 100, 100]


def test_write_fleet_data_rejects_bad_agent_ids(tmp_path: Path) -> None:
    ds = _synthetic((100, 100, 100))
    with pytest.raises(ValueError, match="unique"):
        write_fleet_data(ds, ["a", "a"], tmp_path, global_per_class=10)
    with pytest.raises(ValueError, match="safe file names"):
        write_fleet_data(ds, ["../evil"], tmp_path, global_per_class=10)
    with pytest.raises(ValueError, match="empty"):
        write_fleet_data(ds, [], tmp_path, global_per_class=10)


def test_read_fleet_data_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="write_fleet_data"):
        read_fleet_data(tmp_path)
