"""Measure what training a bundle costs on this machine: step time, eval time per sample, peak RSS.

Run as its own process (`python -m edge_agent.probe BUNDLE_DIR`) so its peak RSS is the training's and not
the builder's; the builder records the result in the bundle's cost card.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edge_agent.trainers.base import Batch


def synthetic_batch(rng: np.random.Generator, batch_size: int, seq_len: int, num_classes: int) -> Batch:
    """Full-length random tokens: the worst case for the configured batch and sequence length."""
    ids = rng.integers(1000, 29000, size=(batch_size, seq_len), dtype=np.int64)
    ids[:, 0] = 101  # [CLS]
    return Batch(ids, np.ones_like(ids), rng.integers(0, num_classes, size=batch_size, dtype=np.int64))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    On Linux this reads VmHWM, which starts afresh at exec; ru_maxrss does not, so a probe spawned by a
    builder holding torch and a model would report the builder's peak instead of its own.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def measure(bundle_dir: Path, *, batch_size: int, seq_len: int, num_classes: int, steps: int = 6,
            warmup: int = 2, threads: int = 0) -> dict[str, float]:
    from edge_agent.trainers.ort import OrtTrainer

    rng = np.random.default_rng(0)
    trainer = OrtTrainer(bundle_dir, threads=threads)
    trainer.start_round({}, learning_rate=1e-4)
    times = []
    for i in range(warmup + steps):
        batch = synthetic_batch(rng, batch_size, seq_len, num_classes)
        start = time.perf_counter()
        trainer.train_step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    eval_batch = synthetic_batch(rng, batch_size, seq_len, num_classes)
    start = time.perf_counter()
    trainer.evaluate([eval_batch] * 2)
    eval_per_sample = (time.perf_counter() - start) / (2 * batch_size)
    from edge_agent.profile import measure_gflops

    return {"step_seconds": statistics.median(times), "eval_seconds_per_sample": eval_per_sample,
            "peak_train_rss_mb": peak_rss_mb(), "gflops": measure_gflops()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bundle_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--num-classes", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    result = measure(args.bundle_dir, batch_size=args.batch_size, seq_len=args.seq_len,
                     num_classes=args.num_classes, steps=args.steps, threads=args.threads)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
