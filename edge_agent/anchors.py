"""Public-set anchoring on the device: the anchors to train towards and the batches that carry them.

Pure numpy; the trainer supplies representations, the learner does the I/O. The anchors are the fleet's (or the
backbone group's) sample-weighted mean representation of every public sample (protocols/anchors.py). An anchor
step is a batch of public samples, labelled ``NO_LABEL`` so they add no cross-entropy, whose loss is the anchor
weight times the mean squared distance between each sample's representation and its anchor. A round-0 table is
all zeros, which means "none yet": the device then trains on its own data only.
"""

from __future__ import annotations

import numpy as np


def anchor_table(received: np.ndarray, public_samples: int, rank: int) -> np.ndarray | None:
    """The received anchors as float32 [P, r], or None when there are none yet (all zeros).

    Raises ValueError when the table cannot come from this run's public set and r-space (shape) or holds a
    non-finite value, rather than pulling the representation towards noise.
    """
    table = np.asarray(received, dtype=np.float32)
    if table.shape != (public_samples, rank):
        raise ValueError(f"the anchors have shape {table.shape}; this device's public set and r-space need "
                         f"({public_samples}, {rank})")
    if not np.isfinite(table).all():
        raise ValueError("the anchors hold a non-finite value; the coordinator's table is corrupt")
    return table if np.any(table) else None


def anchor_targets(table: np.ndarray, indices: np.ndarray, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """The graph's anchor inputs for a batch of the public samples at ``indices``: their anchors [B, r] and the
    anchor weight for every one of them [B]."""
    if weight < 0 or not np.isfinite(weight):
        raise ValueError(f"the anchor weight must be finite and >= 0, got {weight}")
    return np.ascontiguousarray(table[indices], np.float32), np.full(len(indices), weight, np.float32)
