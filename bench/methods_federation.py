"""One federation in one process: the MQTT path's trainer, bundles and aggregation, without the broker.

Why: a method benchmark needs dozens of federations (methods x seeds x regimes); starting a broker and one
agent process per device for each would spend the budget on plumbing. This runner keeps everything that
decides the tensors identical to the MQTT path and drops only the transport:

- each agent is an ``edge_agent.local_round.LocalLearner`` with an ``OrtTrainer`` on the bundle built by
  ``export.bundle.build_bundle`` (the join loop creates exactly these), fed from the same JSONL files through
  ``edge_agent.data.load_examples``;
- the coordinator side is ``coordinator.federation_state`` (initial state, upload names, per-backbone weights)
  plus ``make_strategy`` and ``scopes_for`` from the run's ``RunConfig``, as the engine uses them;
- every agent runs every round (the engine invites all live agents when ``agents_per_round`` is unset) with
  the plan the engine would send: ``RoundPlan(round, local_steps, batch_size, learning_rate, seed, names)``.

Weights go through ``protocols.tensor_codec`` encode/decode (the run's wire encoding) as on the wire, so the
bytes counted are the blobs MQTT would carry and any rounding effect is the same.
tests/test_inprocess_equivalence.py checks that one round gives the same tensors as the MQTT path.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import ClientUpdate, FederatedState
from coordinator.aggregation.dp import admit
from coordinator.config import RunConfig
from coordinator.federation_state import initial_state, upload_names, weights_for
from coordinator.methods import (
    anchor_weight_for,
    prototype_weight_for,
    public_kind_for,
    public_samples_for,
    public_scope_for,
    scopes_for,
    strategy_for,
    uses_prototypes,
)
from edge_agent.data import Sample, eval_batches, load_examples
from edge_agent.local_round import LocalLearner, RoundPlan, is_exchange_only
from edge_agent.trainers.base import EvalResult
from edge_agent.trainers.ort import OrtTrainer
from export.bundle import Bundle
from protocols.tensor_codec import decode_blob, encode_blob


@dataclass(frozen=True)
class AgentSpec:
    """One emulated device: its id (it seeds its batch order, as on a real agent), backbone and data file."""

    agent_id: str
    backbone: str
    data_file: Path


@dataclass(frozen=True)
class AgentRound:
    """One agent's round, in the units the MQTT path reports (engine MetricRow) plus what a benchmark needs."""

    round: int
    agent_id: str
    backbone: str
    n_train: int
    personal_correct: int
    personal_total: int
    global_correct: int | None
    global_total: int
    train_loss: float
    bytes_up: int
    bytes_down: int
    train_seconds: float
    eval_seconds: float


@dataclass
class FederationRun:
    """Everything one in-process federation produced."""

    rounds: list[AgentRound] = field(default_factory=list)
    # Global view of the state after the last aggregation (the MQTT path would measure it in round R+1).
    final_global: dict[str, EvalResult] = field(default_factory=dict)
    states: dict[int, FederatedState] = field(default_factory=dict)  # round -> state after it (0 = initial)
    updates: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)  # round -> agent -> upload
    diagnostics: dict[int, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def make_learners(config: RunConfig, bundles: Mapping[str, Bundle], agents: Sequence[AgentSpec],
                  global_test_file: Path | None, *, threads: int = 1,
                  public_file: Path | None = None) -> dict[str, LocalLearner]:
    """One LocalLearner per agent, built the way ``EdgeAgent._make_learner`` builds it (ORT backend); with
    ``public_file`` every agent holds the run's public set (consensus distillation)."""
    learners: dict[str, LocalLearner] = {}
    for spec in agents:
        bundle = bundles[spec.backbone]
        labels = bundle.manifest.task.labels
        if tuple(labels) != tuple(config.task.labels):
            raise ValueError(f"bundle for {spec.backbone} has labels {labels}, the run {config.task.labels}")
        examples = load_examples(spec.data_file, labels)
        global_test = load_examples(global_test_file, labels) if global_test_file else []
        public = load_examples(public_file, labels) if public_file else []
        trainer = OrtTrainer(bundle.directory, threads=threads)
        learners[spec.agent_id] = LocalLearner(spec.agent_id, bundle.directory, bundle.manifest, trainer,
                                               examples, global_test, public=public)
    return learners


def evaluate_received(learner: LocalLearner, tensors: Mapping[str, np.ndarray],
                      examples: Sequence[Sample], learning_rate: float) -> EvalResult:
    """Evaluate what an agent would start the next round with (its kept tensors + ``tensors``), no training.

    Uses the learner's own trainer and encoder, batched as ``LocalLearner`` batches its evaluation. Prototypes
    (fedproto) and the distillation consensus shape training only, so they are not part of the evaluated model.
    """
    model = {name: value for name, value in tensors.items() if not is_exchange_only(name)}
    learner.trainer.start_round({**learner.kept, **model}, learning_rate)
    encoded = (learner.encoder.encode(chunk) for chunk in eval_batches(examples, learner.manifest.task.batch_size))
    return learner.trainer.evaluate(encoded)


@contextlib.contextmanager
def frozen_live_objects() -> Iterator[None]:
    """Keep what is alive now out of the garbage collector's walks until the block ends.

    Every agent round's session reload runs gc.collect (edge_agent/trainers/ort.py); in a benchmark process the
    imported libraries and the whole fleet's data are live objects for it to walk, 0.07-0.14 s a collection (7 %
    of a federation, profiled). Frozen, they are skipped; nothing here needs them collected before the end.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def encode_with_feedback(tensors: Mapping[str, np.ndarray], encoding: str,
                         residual: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
    """Error feedback: encode ``tensors + residual`` and return the blob with the new residual (what the encoding
    lost this time), to be added to the next upload so rounding errors do not pile up over rounds.

    A benchmark option only: bench/wire.py measured no gain beyond noise over plain int8 (docs/wire-encodings.md),
    so devices do not carry a residual."""
    corrected = {n: (np.asarray(v, np.float32) + residual[n]).astype(np.float32)
                 if n in residual and np.shape(residual[n]) == np.shape(v) else np.asarray(v, np.float32)
                 for n, v in tensors.items()}
    blob = encode_blob(corrected, encoding)
    decoded = decode_blob(blob, encoding)
    return blob, {n: corrected[n] - decoded[n] for n in corrected}


def run_inprocess(config: RunConfig, bundles: Mapping[str, Bundle], agents: Sequence[AgentSpec],
                  global_test_file: Path | None, *, threads: int = 1, final_eval: bool = True,
                  keep_tensors: bool = False, public_file: Path | None = None,
                  on_round: Callable[[int, list[AgentRound]], None] | None = None,
                  error_feedback: bool = False) -> FederationRun:
    """Run ``config.rounds`` rounds of ``config.method`` over ``agents``; every agent trains every round.

    ``keep_tensors`` keeps every round's state and every upload (for the equivalence test; a benchmark keeps
    only the metrics). ``final_eval`` adds the global view of the last aggregate, which the MQTT path never
    measures because no round follows it. Blobs travel in the plan's ``[exchange] encoding`` both ways, as on the
    MQTT path; ``error_feedback`` (benchmark only, bench/wire.py) carries each device's int8/fp16 rounding
    residual into its next upload.
    """
    started = time.perf_counter()
    scopes = scopes_for(config.method, config.scopes)
    prototypes = uses_prototypes(config)
    prototype_weight = prototype_weight_for(config)  # as the engine's Assignment carries it
    strategy = strategy_for(config)
    public_samples = public_samples_for(config)
    if public_samples and public_file is None:
        raise ValueError(f"{config.method} with a public exchange (distill_steps or anchor_steps) needs the run's "
                         "public file (public_file)")
    public_kind = public_kind_for(config)
    used = {a.backbone for a in agents}
    state = initial_state({b: bundles[b] for b in sorted(used)}, scopes, prototypes=prototypes,
                          public_samples=public_samples, public_scope=public_scope_for(config),
                          public_kind=public_kind)
    names = {b: tuple(upload_names(bundles[b].manifest, scopes, prototypes=prototypes, public_samples=public_samples,
                                   public_kind=public_kind))
             for b in used}
    learners = make_learners(config, bundles, agents, global_test_file, threads=threads,
                             public_file=public_file if public_samples else None)
    run = FederationRun()
    encoding = config.exchange.encoding
    residuals: dict[str, dict[str, np.ndarray]] = {}
    if keep_tensors:
        run.states[0] = state
    with frozen_live_objects():
        for round_id in range(1, config.rounds + 1):
            blobs = {b: encode_blob(weights_for(state, b), encoding) for b in sorted(used)}
            updates: list[ClientUpdate] = []
            rows: list[AgentRound] = []
            for spec in sorted(agents, key=lambda a: a.agent_id):
                received = decode_blob(blobs[spec.backbone], encoding)
                plan = RoundPlan(round_id, config.local_steps, config.task.batch_size, config.learning_rate,
                                 config.seed, names[spec.backbone], prototype_weight, config.distill_steps,
                                 config.distill_local_prior, config.distill_confident_fraction, config.anchor_steps,
                                 anchor_weight_for(config))
                outcome = learners[spec.agent_id].run_round(plan, received)
                if error_feedback:
                    up_blob, residuals[spec.agent_id] = encode_with_feedback(outcome.upload, encoding,
                                                                             residuals.get(spec.agent_id, {}))
                else:
                    up_blob = encode_blob(outcome.upload, encoding)
                updates.append(admit(strategy, state, ClientUpdate(spec.agent_id, spec.backbone, outcome.n_train,
                                                                   dict(decode_blob(up_blob, encoding)))))
                g = outcome.global_
                rows.append(AgentRound(
                    round=round_id, agent_id=spec.agent_id, backbone=spec.backbone, n_train=outcome.n_train,
                    personal_correct=outcome.personal.correct, personal_total=outcome.personal.total,
                    global_correct=g.correct if g else None, global_total=g.total if g else 0,
                    train_loss=outcome.train_loss, bytes_up=len(up_blob), bytes_down=len(blobs[spec.backbone]),
                    train_seconds=outcome.train_seconds, eval_seconds=outcome.eval_seconds))
            result = strategy.aggregate(state, updates, round_id)
            state = result.state
            run.rounds.extend(rows)
            run.diagnostics[round_id] = result.diagnostics
            if keep_tensors:
                run.states[round_id] = state
                run.updates[round_id] = {u.agent_id: u.tensors for u in updates}
            if on_round is not None:
                on_round(round_id, rows)
        if final_eval and global_test_file is not None:
            for spec in sorted(agents, key=lambda a: a.agent_id):
                learner = learners[spec.agent_id]
                received = decode_blob(encode_blob(weights_for(state, spec.backbone), encoding), encoding)
                run.final_global[spec.agent_id] = evaluate_received(learner, received, learner.global_test,
                                                                    config.learning_rate)
    run.seconds = time.perf_counter() - started
    return run
