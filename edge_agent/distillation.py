"""Consensus distillation on the device: probabilities to send, pseudo-labels to learn, and the step order.

Pure numpy; the trainer supplies logits, the learner does the I/O. The consensus is the fleet's (or the
backbone group's) sample-weighted mean of class probabilities on the public set; its arg-max is a hard label
the bundle's cross-entropy graph can train on directly (no soft-label loss had to be exported). A round-0
consensus is all zeros, which means "none yet": the device then trains on its own data only.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise class probabilities, float32, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted.astype(np.float64))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def pseudo_labels(consensus: np.ndarray, public_samples: int, num_classes: int) -> np.ndarray | None:
    """The consensus's label for every public sample, or None when there is no consensus yet (all zeros).

    Raises ValueError when the consensus cannot come from this run's public set (shape) or is not a
    probability table (negative, non-finite or rows far from summing to 1), rather than training on noise.
    """
    if consensus.shape != (public_samples, num_classes):
        raise ValueError(f"the consensus has shape {consensus.shape}; this device's public set needs "
                         f"({public_samples}, {num_classes})")
    if not np.any(consensus):
        return None
    rows = consensus.sum(axis=-1)
    if not np.isfinite(consensus).all() or (consensus < 0).any() or not np.allclose(rows, 1.0, atol=1e-3):
        raise ValueError("the consensus is not a table of class probabilities (finite, >= 0, rows summing to 1)")
    return np.argmax(consensus, axis=-1).astype(np.int64)


def to_local_prior(consensus: np.ndarray, local_counts: np.ndarray) -> np.ndarray:
    """The consensus re-weighted to this device's label mix: p(y|x) * pi_local(y) / pi_fleet(y), renormalised.

    Why: the fleet's consensus carries the fleet's label mix, and training a device's head on it moves that
    head's prior away from the device's own data, which is what its personalised accuracy is measured on. Bayes'
    rule swaps the prior and keeps what the fleet knows about each input. pi_fleet is the consensus's mean row;
    pi_local the device's training label counts, add-one smoothed so a class it never saw stays possible.
    """
    local = (local_counts.astype(np.float64) + 1.0) / (float(local_counts.sum()) + len(local_counts))
    fleet = np.maximum(consensus.astype(np.float64).mean(axis=0), 1e-6)
    adjusted = consensus.astype(np.float64) * (local / fleet)
    return (adjusted / adjusted.sum(axis=-1, keepdims=True)).astype(np.float32)


def confident_rows(consensus: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``fraction`` of public samples the consensus is surest of (highest top probability), sorted.

    Why: the fleet's consensus is a weak teacher early on (its devices score ~40-50 % on a balanced set), so most
    of its arg-max labels are wrong; keeping only its most confident rows trades quantity for label quality, as
    confidence thresholds do in FedDF-style and semi-supervised training. At least one row is kept.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the confident fraction must be in (0, 1], got {fraction}")
    keep = max(1, round(fraction * consensus.shape[0]))
    order = np.argsort(-consensus.max(axis=-1), kind="stable")
    return np.sort(order[:keep])


def step_order(own_steps: int, distill_steps: int) -> list[bool]:
    """Which of a round's steps are distillation steps (True), spread evenly among the own-data steps.

    Interleaving, rather than distilling first or last, keeps the head from ending the round fitted to only
    one of the two: a round that ended on public batches would lose the device's own label prior, and one that
    ended on own batches would forget the fleet's. The last step is always an own-data step.
    """
    if own_steps < 1 or distill_steps < 0:
        raise ValueError(f"need at least one own step and no negative distillation steps, got {own_steps}, "
                         f"{distill_steps}")
    total = own_steps + distill_steps
    # Own step k sits at floor((k + 1) * total / own_steps) - 1: evenly spaced, distinct, the last at the end.
    own = {(k + 1) * total // own_steps - 1 for k in range(own_steps)}
    return [index not in own for index in range(total)]
