"""Flower ClientApp: one device of the demo fleet, training with the product's LocalLearner (PyTorch backend).

In deployment every message runs in a fresh `flwr-clientapp` process, so the learner (frozen backbone, data,
tokenizer) is rebuilt per message and the device's private tensors (its kept adapters and head) travel through
``context.state``, which the SuperNode keeps between messages of a run. In simulation a Ray actor serves many
nodes one after another, so built learners are cached per agent id in the actor (as Flower's docs suggest);
the private tensors still come from ``context.state`` every time.
"""

from __future__ import annotations

import time

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_agent.data import load_examples
from edge_agent.limits import peak_rss_mb
from edge_agent.local_round import LocalLearner, RoundOutcome, RoundPlan
from edge_agent.trainers.torch_backend import TorchTrainer
from hetero_flwr.task import Spec, agent_of, from_record, load_spec, to_record
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

app = ClientApp()
_LEARNERS: dict[str, LocalLearner] = {}  # simulation: an actor keeps what it built; deployment: always empty
KEPT = "kept"


def _learner(context: Context, spec: Spec) -> tuple[LocalLearner, bool]:
    """The node's learner with its private tensors restored, and whether it was built for this message."""
    agent = agent_of(context, spec)
    built = agent.agent_id not in _LEARNERS
    if built:
        bundle_dir = spec.bundles[agent.backbone]
        manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
        labels = manifest.task.labels
        trainer = TorchTrainer(bundle_dir, threads=spec.threads)
        _LEARNERS[agent.agent_id] = LocalLearner(agent.agent_id, bundle_dir, manifest, trainer,
                                                 load_examples(agent.data_file, labels),
                                                 load_examples(spec.global_test, labels))
    learner = _LEARNERS[agent.agent_id]
    if KEPT in context.state.array_records:
        learner.restore(from_record(context.state.array_records[KEPT]))
    else:  # the node's first message of this run: the bundle's initial tensors, as a fresh agent starts
        learner.restore(_initial(spec, agent.backbone))
    return learner, built


def _initial(spec: Spec, backbone: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    bundle_dir = spec.bundles[backbone]
    manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
    return load_file(str(bundle_dir / manifest.initial_tensors))


def _metrics(outcome: RoundOutcome, handler_start: float, setup_seconds: float, built: bool) -> MetricRecord:
    g = outcome.global_
    process = psutil.Process()
    return MetricRecord({
        "n-train": outcome.n_train,
        "personal-correct": outcome.personal.correct, "personal-total": outcome.personal.total,
        "global-correct": g.correct if g else 0, "global-total": g.total if g else 0,
        "train-loss": float(outcome.train_loss),
        "train-seconds": float(outcome.train_seconds), "eval-seconds": float(outcome.eval_seconds),
        "setup-seconds": float(setup_seconds),  # building the learner (0 when an actor had it)
        "spawn-seconds": float(handler_start - process.create_time()) if built else 0.0,
        "peak-rss-mb": float(peak_rss_mb()), "pid": process.pid, "built": int(built),
    })


@app.query()
def describe(msg: Message, context: Context) -> Message:
    """Handshake: which device this node is, so the server sends it its backbone's tensors."""
    agent = agent_of(context, load_spec(context))
    info = ConfigRecord({"agent-id": agent.agent_id, "backbone": agent.backbone})
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    handler_start = time.time()
    spec = load_spec(context)
    learner, built = _learner(context, spec)
    setup_seconds = time.time() - handler_start
    cfg = msg.content.config_records["plan"]
    plan = RoundPlan(int(cfg["round"]), int(cfg["local-steps"]), int(cfg["batch-size"]),
                     float(cfg["learning-rate"]), int(cfg["seed"]), tuple(str(n) for n in cfg["upload-names"]))
    outcome = learner.run_round(plan, from_record(msg.content.array_records["tensors"]))
    context.state.array_records[KEPT] = to_record(learner.kept)
    content = RecordDict({"tensors": to_record(outcome.upload),
                          "metrics": _metrics(outcome, handler_start, setup_seconds, built)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The final model (the last aggregate over this device's kept tensors): both views, no training."""
    handler_start = time.time()
    spec = load_spec(context)
    learner, built = _learner(context, spec)
    setup_seconds = time.time() - handler_start
    outcome = learner.evaluate(from_record(msg.content.array_records["tensors"]))
    return Message(RecordDict({"metrics": _metrics(outcome, handler_start, setup_seconds, built)}), reply_to=msg)
