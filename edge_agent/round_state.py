"""The join loop's two touch points with the device state: resume a learner when it is created, save after a round.

Why a module of its own: `edge_agent/agent.py` stays a message loop (two calls into here), and neither call may
ever stop the agent. A state that cannot be read is a warning and a fresh start from the bundle's initial tensors
(the coordinator's global tensors arrive with the next assignment); a save that fails (disk full, read-only
directory) is an error in the log while the federation goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge_agent.device_state import (
    FINAL_EVALUATION_OF,
    DeviceModel,
    DeviceStateError,
    NoDeviceState,
    load_model,
    save_model,
)
from edge_agent.local_round import LocalLearner, RoundOutcome, is_exchange_only

log = logging.getLogger("edge_agent.device_state")


def resume_learner(learner: LocalLearner, state_dir: Path, run_id: str | None, bundle_sha: str) -> int | None:
    """Load this run's saved tensors for this bundle into ``learner``; the round they were saved after, or None
    when the learner keeps its initial tensors (nothing saved, another run or bundle, or nothing usable)."""
    if run_id is None:
        return None
    expected = {name: tuple(np.shape(value)) for name, value in learner.kept.items()}
    try:
        model = load_model(state_dir, run_id, bundle_sha=bundle_sha, expected=expected)
    except NoDeviceState as exc:
        log.info("starting from the bundle's initial tensors: %s", exc)
        return None
    except DeviceStateError as exc:
        log.warning("starting from the bundle's initial tensors and the received global ones: %s", exc)
        return None
    try:
        learner.restore(model.tensors, model.round_id, model.before)
    except ValueError as exc:  # verified against these very shapes above; kept as the last line of defence
        log.warning("starting from the bundle's initial tensors: the device state in %s does not fit (%s)",
                    state_dir, exc)
        return None
    log.info("resumed run %s from the device state of round %d in %s", run_id, model.round_id, state_dir)
    return model.round_id


def save_round(state_dir: Path, *, learner: LocalLearner, run_id: str, round_id: int, bundle_sha: str,
               bundle_dir: Path, received: Mapping[str, np.ndarray], outcome: RoundOutcome,
               final: bool = False) -> Path | None:
    """Save the learner's whole trainable state after ``round_id``; the state's directory, or None on failure.

    ``final``: ``round_id`` was the run's final evaluation (no training): the device's model from then on is the
    final aggregate over its own kept tensors (e.g. its local head), the model whose accuracy it just measured.

    No optimizer state: both trainer backends start every round with fresh AdamW moments
    (`TrainerBackend.start_round`), so there is none that carries from one round to the next.
    """
    personal, global_ = outcome.personal, outcome.global_
    shared = {name for name in received if not is_exchange_only(name)}
    start = learner.round_start
    before = ({name: value for name, value in start[1].items() if name not in shared}
              if start is not None and start[0] == round_id and not final else {})
    tensors = {**learner.kept, **{name: received[name] for name in shared}} if final else dict(learner.kept)
    model = DeviceModel(
        agent_id=learner.agent_id, run_id=run_id, round_id=round_id, bundle_sha=bundle_sha, bundle_dir=bundle_dir,
        backbone=learner.manifest.backbone, labels=tuple(learner.manifest.task.labels), tensors=tensors,
        received={name: received[name] for name in shared}, optimizer={}, before=before,
        metrics={"personal_accuracy": personal.accuracy, "personal_loss": personal.loss, "n_test": personal.total,
                 "global_accuracy": global_.accuracy if global_ else None,
                 "n_global_test": global_.total if global_ else 0, "n_train": outcome.n_train,
                 "train_loss": outcome.train_loss, "backend": learner.trainer.name,
                 **({FINAL_EVALUATION_OF: round_id - 1} if final else {})},
        saved_unix=time.time())
    started = time.perf_counter()
    try:
        slot = save_model(state_dir, model)
    except (OSError, DeviceStateError) as exc:
        log.error("round %d: device state not saved (%s); the previous state stays in %s", round_id, exc, state_dir)
        return None
    log.info("round %d: device state saved to %s in %.3f s", round_id, slot, time.perf_counter() - started)
    return slot
