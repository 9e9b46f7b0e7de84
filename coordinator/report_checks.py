"""Checks on what an agent reports, beyond the per-tensor ones in protocols/tensors.py: nothing an agent says is
trusted, every number is bounded, and a single update can neither dominate the weighted mean (``n_train``) nor
the geometry (its norm).

Pure functions and one small per-round collector; the engine (coordinator/engine.py) calls them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MIN_REFERENCE_UPDATES = 3  # a group needs this many updates before its median is a reference for the others
MIN_CHUNK_BYTES = 1024  # no honest sender splits a blob finer than this (publish_blob uses 256 KiB)
UPDATE_SLACK_BYTES = 1 << 20  # safetensors header and alignment on top of the raw tensor bytes


def n_train_refusal(reported: int, declared: int) -> str | None:
    """Why a report's sample count is not acceptable: it must be > 0 and at most what the device declared when
    it joined (its data cannot grow mid-run; the count weights the device's update in every mean)."""
    if reported <= 0:
        return f"n_train {reported} must be > 0: an update trained on no samples carries no weight"
    if reported > declared:
        return f"n_train {reported} exceeds the {declared} training samples the device declared when it joined"
    return None


def join_refusal(n_train: int, memory_budget_mb: float) -> str | None:
    """Why a join's declared numbers make no sense for a training device (checked before assignment, whose
    arithmetic assumes a positive memory budget)."""
    if n_train <= 0:
        return "the device declared no training samples; give it a --data file with at least 4 labelled rows"
    if not (memory_budget_mb > 0 and math.isfinite(memory_budget_mb)):
        return f"the device declared a memory budget of {memory_budget_mb} MB; it must be > 0"
    return None


def max_update_bytes(shapes: Iterable[tuple[int, ...]]) -> int:
    """The largest encoded update (float32 tensors of these shapes) an honest agent can send."""
    return sum(4 * math.prod(shape) for shape in shapes) + UPDATE_SLACK_BYTES


def blob_ref_refusal(size: int, chunks: int, max_bytes: int) -> str | None:
    """Why an announced update blob is impossible: larger than the assignment's tensors can encode to, or split
    into more chunks than its size allows (either would make the coordinator reserve work for garbage)."""
    if size > max_bytes:
        return f"update of {size} bytes is larger than the {max_bytes} bytes its assigned tensors encode to"
    if chunks > max(1, math.ceil(size / MIN_CHUNK_BYTES)):
        return f"{chunks} chunks for {size} bytes: chunks must be at least {MIN_CHUNK_BYTES} bytes"
    return None


@dataclass(frozen=True)
class Candidate:
    """An update that passed every per-update check, kept on disk until the round's norms are known."""

    agent_id: str
    group: str
    num_samples: int
    norm: float
    path: Path


def relative_norm_refusals(candidates: Iterable[Candidate], factor: float) -> dict[str, str]:
    """agent id -> reason, for every update whose L2 norm exceeds ``factor`` x the median norm of its group's
    updates this round. Groups with fewer than MIN_REFERENCE_UPDATES updates have no reference (the median of two
    is pulled halfway to an outlier) and rely on the absolute bound alone."""
    by_group: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_group.setdefault(candidate.group, []).append(candidate)
    refused = {}
    for group, members in by_group.items():
        if len(members) < MIN_REFERENCE_UPDATES:
            continue
        median = statistics.median(c.norm for c in members)
        bound = factor * median
        for c in members:
            if c.norm > bound:
                refused[c.agent_id] = (f"update L2 norm {c.norm:.6g} exceeds {factor:g} x the round's median norm "
                                       f"{median:.6g} in group {group}; rejected as an outlier")
    return refused
