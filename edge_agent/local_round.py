"""One round of local work on a device, independent of how the tensors arrived.

The MQTT join loop and the in-process benchmark runner both call `LocalLearner.run_round`, so the two paths
train with the very same code.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from edge_agent.anchors import anchor_table, anchor_targets
from edge_agent.data import Sample, batches, eval_batches, split_local
from edge_agent.distillation import confident_rows, pseudo_labels, softmax, step_order, to_local_prior
from edge_agent.inputs import BatchEncoder
from edge_agent.limits import peak_rss_mb
from edge_agent.prototypes import class_means, prototype_targets, prototype_upload
from edge_agent.trainers.base import Batch, EvalResult, TrainerBackend
from protocols.anchors import ANCHOR_REPR, NO_LABEL, is_anchor_name
from protocols.bundle_manifest import BundleManifest
from protocols.distillation import DISTILL_PROBS, is_distillation_name
from protocols.prototypes import is_prototype_name


@dataclass(frozen=True)
class RoundPlan:
    """What the coordinator asked for this round."""

    round_id: int
    local_steps: int
    batch_size: int
    learning_rate: float
    seed: int
    upload_names: tuple[str, ...]
    prototype_weight: float = 0.0  # fedproto's lambda; prototypes are asked for by name in upload_names
    # Consensus distillation: steps on the public set's consensus labels, interleaved with the local steps.
    distill_steps: int = 0
    distill_local_prior: bool = False  # re-weight the consensus to this device's label mix first
    distill_confident_fraction: float = 1.0  # distil only on the public samples the consensus is surest of
    # Public-set anchoring: steps pulling the public samples' representations towards the received anchors,
    # interleaved with the local steps like distillation's (a run uses one or the other), at this weight.
    anchor_steps: int = 0
    anchor_weight: float = 0.0


def is_exchange_only(name: str) -> bool:
    """Tensors that shape training but are not part of the model: prototypes, the distillation consensus and
    the public-set anchors."""
    return is_prototype_name(name) or is_distillation_name(name) or is_anchor_name(name)


class RoundGuard(Protocol):
    """Watches a round from inside (``edge_agent.limits.DeviceLimits``): told when the round begins and after
    every unit of work ("load", each "train" step, each "eval" batch) with the seconds it took. It may raise
    to abort the round (memory cap) or sleep (emulated slower device)."""

    def begin(self) -> None: ...

    def after(self, kind: str, seconds: float) -> None: ...


class _Unguarded:
    def begin(self) -> None:
        pass

    def after(self, kind: str, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class RoundOutcome:
    upload: dict[str, np.ndarray]
    personal: EvalResult
    global_: EvalResult | None
    train_loss: float
    train_seconds: float
    eval_seconds: float
    peak_rss_mb: float
    n_train: int


class LocalLearner:
    """A device's private data, its bundle, its trainer and the tensors it never shares."""

    # Set by the join loop before a round (an attribute, not a run_round argument, so subclasses that wrap
    # run_round keep working); None = no checks, no slowdown.
    guard: RoundGuard | None = None
    _UNGUARDED: ClassVar[RoundGuard] = _Unguarded()

    def __init__(self, agent_id: str, bundle_dir: Path, manifest: BundleManifest, trainer: TrainerBackend,
                 examples: Sequence[Sample], global_test: Sequence[Sample] = (), *, split_seed: int = 0,
                 initial: Mapping[str, np.ndarray] | None = None, public: Sequence[Sample] = ()) -> None:
        self.agent_id = agent_id
        self.manifest = manifest
        self.trainer = trainer
        self.encoder = BatchEncoder(bundle_dir, manifest)
        self.encoder.check(examples, f"agent {agent_id}'s data")
        self.encoder.check(global_test, f"agent {agent_id}'s global test data")
        split = split_local(examples, test_fraction=0.25, seed=split_seed)
        self.train, self.test = split.train, split.test
        self.global_test = list(global_test)
        # The run's public set (consensus distillation): its labels, if the file has any, are never read.
        self.encoder.check(public, f"agent {agent_id}'s public data")
        self.public = list(public)
        if initial is None:
            from safetensors.numpy import load_file

            initial = load_file(str(bundle_dir / manifest.initial_tensors))
        # Tensors kept across rounds: whatever the coordinator does not send back (e.g. the local head).
        self.kept: dict[str, np.ndarray] = {k: np.array(v, copy=True) for k, v in initial.items()}
        # The kept tensors as they were before the latest round, so a round the coordinator runs again (it was
        # abandoned, or the coordinator crashed and resumed) starts from the same state and gives the same result.
        self._before: tuple[int, dict[str, np.ndarray]] | None = None

    def restore(self, tensors: Mapping[str, np.ndarray], round_id: int | None = None,
                before: Mapping[str, np.ndarray] | None = None) -> None:
        """Continue from saved tensors (a restarted device, edge_agent/round_state.py): every kept tensor, each
        with its shape, or a ValueError and the learner unchanged. ``before`` (the kept tensors as they were
        before round ``round_id``, any subset) lets that round, if the coordinator runs it again, restart from
        where its first attempt did, as it would have without the restart."""
        before = before or {}
        wrong = sorted(name for name in self.kept
                       if name not in tensors or np.shape(tensors[name]) != self.kept[name].shape)
        wrong += sorted(set(tensors) - set(self.kept))
        wrong += sorted(name for name in before
                        if name not in self.kept or np.shape(before[name]) != self.kept[name].shape)
        if wrong:
            raise ValueError(f"saved tensors do not fit this bundle: {wrong[:3]}")
        self.kept = {name: np.array(tensors[name], dtype=self.kept[name].dtype, copy=True) for name in self.kept}
        self._before = None
        if round_id is not None and before:
            self._before = (round_id, {name: np.array(before[name], dtype=value.dtype, copy=True)
                                       if name in before else value for name, value in self.kept.items()})

    @property
    def round_start(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The latest round and the kept tensors it started from (None before the first round)."""
        return self._before

    def run_round(self, plan: RoundPlan, received: Mapping[str, np.ndarray]) -> RoundOutcome:
        """Received tensors in -> global eval -> k local steps -> personal eval -> shared tensors out.

        fedproto: the received global prototypes become this round's training targets, and the upload carries
        this device's class prototypes, computed after the local steps (edge_agent/prototypes.py).
        Consensus distillation: ``plan.distill_steps`` steps on the public set labelled by the received
        consensus are interleaved with the local steps, and the upload carries this device's class
        probabilities on the public set, computed after them (edge_agent/distillation.py).
        Public-set anchoring: the same, with ``plan.anchor_steps`` steps pulling the public samples'
        representations towards the received anchors, and the upload carrying this device's representation of
        every public sample (edge_agent/anchors.py).
        """
        global_prototypes = {k: v for k, v in received.items() if is_prototype_name(k)}
        consensus = received.get(DISTILL_PROBS)
        anchors = received.get(ANCHOR_REPR)
        received = {k: v for k, v in received.items() if not is_exchange_only(k)}
        unknown = sorted(set(received) - set(self.kept))
        if unknown:
            raise ValueError(f"received tensors this bundle does not have: {unknown[:3]}")
        if self._before is not None and self._before[0] == plan.round_id:
            self.kept = self._before[1]  # a repeated round: undo what its earlier attempt did locally
        self._before = (plan.round_id, self.kept)
        guard = self.guard or self._UNGUARDED
        guard.begin()
        start_tensors = {**self.kept, **received}
        load_start = time.perf_counter()
        self.trainer.start_round(start_tensors, plan.learning_rate)
        if plan.prototype_weight > 0 and global_prototypes:
            self.trainer.set_prototypes(*prototype_targets(global_prototypes, len(self.manifest.task.labels),
                                                           int(self.manifest.dema["rank"]), plan.prototype_weight))
        guard.after("load", time.perf_counter() - load_start)

        eval_start = time.perf_counter()
        global_result = (self.trainer.evaluate(self._batches(self.global_test, guard)) if self.global_test
                         else None)
        eval_seconds = time.perf_counter() - eval_start

        rng = np.random.default_rng([plan.seed, plan.round_id, zlib.crc32(self.agent_id.encode())])
        stream = batches(self.train, plan.batch_size, rng)
        public_stream, public_steps = self._consensus_batches(plan, consensus, rng), plan.distill_steps
        if public_stream is None:
            # Its own rng: anchoring must not change which own batches a round draws (paired comparisons).
            anchor_rng = np.random.default_rng([plan.seed, plan.round_id, zlib.crc32(self.agent_id.encode()), 1])
            public_stream, public_steps = self._anchor_batches(plan, anchors, anchor_rng), plan.anchor_steps
        train_start = time.perf_counter()
        losses = []  # own-data steps only, so a round's loss means the same with and without the public set
        for public in step_order(plan.local_steps, public_steps if public_stream is not None else 0):
            batch = next(public_stream) if public and public_stream is not None else self._encode(next(stream))
            step_start = time.perf_counter()
            loss = self.trainer.train_step(batch)
            if not public:
                losses.append(loss)
            guard.after("train", time.perf_counter() - step_start)
        train_seconds = time.perf_counter() - train_start

        eval_start = time.perf_counter()
        personal = self.trainer.evaluate(self._batches(self.test, guard))
        wants_prototypes = any(is_prototype_name(name) for name in plan.upload_names)
        exchanged = self._class_prototypes(guard) if wants_prototypes else {}
        if DISTILL_PROBS in plan.upload_names:
            exchanged[DISTILL_PROBS] = softmax(self.trainer.predict(self._public_batches(guard)))
        if ANCHOR_REPR in plan.upload_names:
            exchanged[ANCHOR_REPR] = self.trainer.represent(self._public_batches(guard))
        eval_seconds += time.perf_counter() - eval_start

        after = self.trainer.read_tensors(self.kept)
        self.kept = after
        upload = {name: exchanged[name] if is_exchange_only(name) else after[name] for name in plan.upload_names}
        return RoundOutcome(upload=upload, personal=personal, global_=global_result,
                            train_loss=float(np.mean(losses[-max(1, len(losses) // 4):])),
                            train_seconds=train_seconds, eval_seconds=eval_seconds,
                            peak_rss_mb=peak_rss_mb(), n_train=len(self.train))

    def evaluate(self, received: Mapping[str, np.ndarray]) -> RoundOutcome:
        """The final model, measured without training: the received aggregate over this device's kept tensors
        (e.g. its private experts and head), on the global test set (global view) and on its own test split
        (personal view). Nothing changes on the device and nothing is uploaded."""
        received = {k: v for k, v in received.items() if not is_exchange_only(k)}
        unknown = sorted(set(received) - set(self.kept))
        if unknown:
            raise ValueError(f"received tensors this bundle does not have: {unknown[:3]}")
        guard = self.guard or self._UNGUARDED
        guard.begin()
        start = time.perf_counter()
        self.trainer.start_round({**self.kept, **received}, learning_rate=1e-3)  # no step is taken
        guard.after("load", time.perf_counter() - start)
        start = time.perf_counter()
        global_result = (self.trainer.evaluate(self._batches(self.global_test, guard)) if self.global_test
                         else None)
        personal = self.trainer.evaluate(self._batches(self.test, guard))
        return RoundOutcome(upload={}, personal=personal, global_=global_result, train_loss=0.0, train_seconds=0.0,
                            eval_seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
                            n_train=len(self.train))

    def _class_prototypes(self, guard: RoundGuard) -> dict[str, np.ndarray]:
        representations = self.trainer.represent(self._batches(self.train, guard))
        labels = np.array([example.label for example in self.train], dtype=np.int64)
        return prototype_upload(*class_means(representations, labels, len(self.manifest.task.labels)))

    def _consensus_batches(self, plan: RoundPlan, consensus: np.ndarray | None, rng: np.random.Generator
                           ) -> Iterator[Batch] | None:
        """Endless batches of the public set under the consensus's labels, or None when this round has no
        distillation (no steps asked for, no consensus received, or an all-zero round-0 consensus)."""
        if plan.distill_steps <= 0 or consensus is None:
            return None
        classes = len(self.manifest.task.labels)
        labels = pseudo_labels(np.asarray(consensus), len(self.public), classes)
        if labels is None:
            return None
        if plan.distill_local_prior:
            counts = np.bincount([example.label for example in self.train], minlength=classes)
            labels = np.argmax(to_local_prior(np.asarray(consensus), counts), axis=-1)
        kept = confident_rows(np.asarray(consensus), plan.distill_confident_fraction)
        relabelled = [dataclasses.replace(self.public[index], label=int(labels[index])) for index in kept]
        return (self._encode(chunk) for chunk in batches(relabelled, plan.batch_size, rng))

    def _anchor_batches(self, plan: RoundPlan, anchors: np.ndarray | None, rng: np.random.Generator
                        ) -> Iterator[Batch] | None:
        """Endless batches of public samples (no labels) carrying their anchors, or None when this round has no
        anchoring (no steps asked for, no anchors received, or an all-zero round-0 table)."""
        if plan.anchor_steps <= 0 or anchors is None:
            return None
        table = anchor_table(anchors, len(self.public), int(self.manifest.dema["rank"]))
        if table is None:
            return None
        return self._anchored(table, plan, rng)

    def _anchored(self, table: np.ndarray, plan: RoundPlan, rng: np.random.Generator) -> Iterator[Batch]:
        unlabelled = [dataclasses.replace(sample, label=NO_LABEL) for sample in self.public]
        for indices in batches(list(range(len(unlabelled))), plan.batch_size, rng):
            anchors, weights = anchor_targets(table, np.asarray(indices, np.int64), plan.anchor_weight)
            batch = self._encode([unlabelled[i] for i in indices])
            yield dataclasses.replace(batch, anchors=anchors, anchor_weights=weights)

    def _public_batches(self, guard: RoundGuard) -> Iterator[Batch]:
        if not self.public:
            raise ValueError("the coordinator asks for this device's outputs on the public set (consensus "
                             "distillation or anchoring), but this device holds no public data; give it the "
                             "run's public file")
        return self._batches(self.public, guard)

    def _encode(self, examples: Sequence[Sample]) -> Batch:
        return self.encoder.encode(examples)

    def _batches(self, examples: Sequence[Sample], guard: RoundGuard) -> Iterator[Batch]:
        # Evaluate at the training batch size: the cost card (and the memory check) are measured there.
        size = self.manifest.task.batch_size
        for chunk in eval_batches(examples, size):
            batch = self._encode(chunk)
            start = time.perf_counter()
            yield batch  # the trainer evaluates it before asking for the next one
            guard.after("eval", time.perf_counter() - start)
