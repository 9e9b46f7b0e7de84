"""FedProto on the device: class prototypes from this round's representations, and the targets the next
round trains towards. Pure numpy; the trainer supplies the representations, the learner does the I/O.

A device's prototype for class i is the mean representation (the last DeMA adapter's pooled z, in the shared
r-space) of its training samples of class i, after its local steps; classes it has no sample of go out as a zero
vector with count 0, which the aggregation reads as "not sent" (coordinator/aggregation/fedproto.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protocols.prototypes import count_name, prototype_name


def class_means(representations: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean representation [classes, r] (zeros where a class has no sample) and counts [classes]."""
    if representations.ndim != 2 or representations.shape[0] != labels.shape[0]:
        raise ValueError(f"{representations.shape[0]} representations for {labels.shape[0]} labels")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, representations.shape[1]), np.float64)
    np.add.at(sums, labels, representations.astype(np.float64))
    means = np.divide(sums, counts[:, None], out=np.zeros_like(sums), where=counts[:, None] > 0)
    return means.astype(np.float32), counts.astype(np.float32)


def prototype_upload(means: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """The update's prototype tensors: ``proto.i`` and ``proto_count.i`` for every class i."""
    upload: dict[str, np.ndarray] = {}
    for index, (mean, count) in enumerate(zip(means, counts, strict=True)):
        upload[prototype_name(index)] = np.asarray(mean, np.float32)
        upload[count_name(index)] = np.asarray(count, np.float32)
    return upload


def prototype_targets(received: Mapping[str, np.ndarray], num_classes: int, rank: int, weight: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The trainer's prototype inputs from the global prototypes: [classes, r] targets and per-class weights,
    ``weight`` (lambda) where the fleet has a prototype (count > 0), 0 where it has none yet."""
    targets = np.zeros((num_classes, rank), np.float32)
    weights = np.zeros(num_classes, np.float32)
    for index in range(num_classes):
        proto, count = received.get(prototype_name(index)), received.get(count_name(index))
        if proto is None or count is None or not float(count) > 0:
            continue
        if np.shape(proto) != (rank,):
            raise ValueError(f"global prototype {prototype_name(index)} has shape {np.shape(proto)}, "
                             f"expected ({rank},)")
        targets[index] = proto
        weights[index] = weight
    return targets, weights
