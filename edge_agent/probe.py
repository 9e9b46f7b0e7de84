"""Measure what training a bundle costs on this machine: step time, eval time per sample, peak RSS.

Run as its own process (`python -m edge_agent.probe BUNDLE_DIR`) so its peak RSS is the training's and not
the builder's; the builder records the result in the bundle's cost card, and the coordinator compares that
number with 0.8 x a device's budget. So the probe must reach the peak a real agent reaches, not just the
trainer's: version 1 measured a bare ORT trainer on random ids and read 20 % low (261 vs 317-321 MB for
MiniLM-L3) because an agent process also holds

* its software stack: pydantic message models, paho-mqtt, typer/rich, the tokenizers library (~25 MB);
* tokenised text and evaluation at the training batch size, and
* a second round: every round reloads the base checkpoint and builds new sessions (`OrtTrainer.start_round`),
  and the allocator does not give all of the first round's memory back.

So the probe imports the agent's modules, builds a `LocalLearner` (the join loop's own round code) on
full-length text tokenised with the bundle's tokenizer.json (or, for an image bundle, 28x28 noise images the
agent resizes like Fashion-MNIST), and runs ``rounds`` (default 2) real rounds:
reload, evaluation, local steps, evaluation. ``bench/memory_prediction.py`` checks the result against real
agent processes (docs/cost-model.md).

``--backend`` picks the trainer the learner runs with, through the agent's own ``make_trainer``: a device that
trains with PyTorch (Linux aarch64 has no ORT training wheel) holds torch and the eager model, which peaks
~210-230 MB above ORT for the same bundle (tiny-3 and MiniLM-L3 on the builder), so the builder measures a card
per backend (version 3).

RSS also counts the library pages the kernel maps around each page fault, and how many depends on the shape in
which a library sits in the page cache: the torch probe on tiny-3 read 316 MB with libtorch_cpu.so cached in base
pages (as pip writes it, or cold) and 420 MB after one sequential read had cached it in large folios. ``main``
therefore evicts every native library and reads it back in base pages before measuring
(`edge_agent.page_cache`), the shape every other path leaves (version 7; versions 5 and 6 read them back
sequentially, so the probe itself made the large-folio state, and a card exported while other processes held
the libraries mapped in one shape disagreed with agents run later in the other: 380 vs 298 MB). CPU load does
not move the card: with two busy loops on both cores it read the same to the MB (docs/cost-cards.md). This
module imports only the standard library at the top, so nothing native is mapped before that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import page_cache
from edge_agent.allocator import fix_mmap_threshold
from edge_agent.limits import peak_rss_mb

if TYPE_CHECKING:
    from protocols.bundle_manifest import BundleManifest

__all__ = ["PROBE_BACKENDS", "PROBE_VERSION", "measure", "peak_rss_mb", "synthetic_texts"]

# Part of what a cost card means; bump it when the measurement changes so bundles can be re-measured.
# 3: the trainer backend is a parameter (a card per backend). 4: native libraries are cached before measuring.
# 5: they are evicted and read back first, so their page-cache folios have one shape (edge_agent/page_cache.py).
# 6: glibc's mmap threshold is fixed first, as the agent fixes it (edge_agent/allocator.py).
# 7: the libraries are read back in base pages, not sequentially (large folios), so the card no longer depends on
#    which shape earlier probes or concurrent processes left them in (docs/cost-cards.md "Cards under load").
PROBE_VERSION = 7
# Backends a card can be measured for: a concrete one, never "auto" (a card must say what it measured).
PROBE_BACKENDS = ("ort", "torch")


class _Stopwatch:
    """A RoundGuard that only records how long each unit of work took, per round."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, list[float]]] = []

    def begin(self) -> None:
        self.rounds.append({"load": [], "train": [], "eval": []})

    def after(self, kind: str, seconds: float) -> None:
        self.rounds[-1].setdefault(kind, []).append(seconds)


def synthetic_texts(tokenizer_json: Path, count: int, seq_len: int, seed: int = 0) -> list[str]:
    """Texts of whole vocabulary words, each long enough to be truncated at ``seq_len`` tokens.

    Full length is the worst case for memory and time at a given batch size (a real batch is padded to its
    longest text, and a long tweet fills it).
    """
    import numpy as np
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_json)).get_vocab()
    words = sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 2)
    if not words:
        raise ValueError(f"{tokenizer_json}: no plain words in the vocabulary to build probe texts from")
    rng = np.random.default_rng(seed)
    return [" ".join(words[int(i)] for i in rng.integers(0, len(words), size=seq_len)) for _ in range(count)]


def _manifest(bundle_dir: Path, *, batch_size: int, seq_len: int, num_classes: int) -> BundleManifest:
    """The bundle's manifest if it has one yet; at export it does not, so describe the task from the args."""
    from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest, TaskEntry

    path = bundle_dir / MANIFEST_NAME
    if path.exists():
        manifest = BundleManifest.model_validate_json(path.read_text())
        task = manifest.task.model_copy(update={"max_length": seq_len, "batch_size": batch_size})
        return manifest.model_copy(update={"task": task})
    labels = tuple(f"class-{i}" for i in range(num_classes))
    return BundleManifest(backbone=bundle_dir.name, hidden=1, layers=1, slot_blocks=(), dema={},
                          task=TaskEntry(name="probe", labels=labels, max_length=seq_len, batch_size=batch_size),
                          tensors=(), backbone_params=0, files={})


def measure(bundle_dir: Path, *, batch_size: int, seq_len: int, num_classes: int, steps: int = 6,
            rounds: int = 2, threads: int = 0, backend: str = "ort") -> dict[str, float | str]:
    """Run ``rounds`` agent rounds of ``steps`` local steps with ``backend``'s trainer; times come from the last
    round (warm).

    The torch backend needs the bundle's torch part in ``bundle_dir`` (at export it is written there first).
    """
    if steps < 1 or rounds < 1:
        raise ValueError(f"steps and rounds must be at least 1, got steps={steps}, rounds={rounds}")
    if backend not in PROBE_BACKENDS:
        raise ValueError(f"cannot measure a cost card for backend {backend!r}; choose one of {PROBE_BACKENDS}")
    # The agent's stack, as `edge-agent join` has it loaded while it trains (imported for its memory). The trainer
    # comes from the agent's own factory, which imports only the chosen backend's libraries (torch or ORT).
    import numpy as np

    import edge_agent.cli  # noqa: F401
    from edge_agent.agent import make_trainer
    from edge_agent.data import Example, ImageExample, Sample
    from edge_agent.local_round import LocalLearner, RoundPlan
    from edge_agent.profile import available_backends, measure_gflops

    # First, as the agent profiles itself before it joins. Backend detection loads ORT's native library where it
    # is installed (~17 MB), also in an agent that then trains with torch; a device without ORT (a Pi) holds less
    # than its torch card by that much, an emulated torch agent on the builder exactly that.
    gflops = measure_gflops()
    available_backends()
    manifest = _manifest(bundle_dir, batch_size=batch_size, seq_len=seq_len, num_classes=num_classes)
    # 4 training batches + 2 personal-test batches (the learner keeps 25 % for test) and 2 global-test batches.
    n_local = 8 * batch_size
    examples: list[Sample]
    if manifest.modality == "image":  # 28x28 grayscale noise: the agent resizes it to the bundle's input size
        pixels = np.random.default_rng(0).integers(0, 256, size=(n_local + 2 * batch_size, 28, 28), dtype=np.uint8)
        examples = [ImageExample(image, i % num_classes) for i, image in enumerate(pixels)]
    else:
        texts = synthetic_texts(bundle_dir / manifest.tokenizer, n_local + 2 * batch_size, seq_len)
        examples = [Example(text, i % num_classes) for i, text in enumerate(texts)]
    stopwatch = _Stopwatch()
    learner = LocalLearner("probe", bundle_dir, manifest, make_trainer(backend, bundle_dir, threads),
                           examples[:n_local], examples[n_local:])
    learner.guard = stopwatch
    for round_id in range(1, rounds + 1):
        plan = RoundPlan(round_id, steps, batch_size, 1e-4, 0, ())
        learner.run_round(plan, {})
    last = stopwatch.rounds[-1]
    eval_samples = len(learner.test) + len(learner.global_test)
    return {"step_seconds": statistics.median(last["train"]),
            "eval_seconds_per_sample": sum(last["eval"]) / eval_samples,
            "peak_train_rss_mb": peak_rss_mb(), "gflops": gflops, "probe_version": PROBE_VERSION,
            "backend": learner.trainer.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6, help="local steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (each reloads the checkpoint)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--backend", choices=PROBE_BACKENDS, default="ort", help="trainer backend to measure")
    args = parser.parse_args()
    fix_mmap_threshold()  # as `edge-agent join` does, so the card measures the agent's allocator
    page_cache.warm()
    result = measure(args.bundle_dir, batch_size=args.batch_size, seq_len=args.seq_len,
                     num_classes=args.num_classes, steps=args.steps, rounds=args.rounds, threads=args.threads,
                     backend=args.backend)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
