"""The real edge agent with a stopwatch: every phase of every round is appended to a JSONL timeline.

Runs exactly the join loop of `edge_agent.agent.EdgeAgent` (same messages, same trainer, same data); the
subclass only wraps the steps of a round with wall-clock timestamps (`time.time()`, comparable with the
coordinator's on the same machine). Used by `bench.overhead`; run as

    python -m bench.timed_agent --broker HOST:PORT --id ID --data FILE --timeline OUT.jsonl [...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.agent import AgentConfig, EdgeAgent, make_trainer
from edge_agent.data import load_examples
from edge_agent.local_round import LocalLearner, RoundOutcome, RoundPlan
from protocols.bundle_manifest import BundleManifest
from protocols.messages import Assignment, BlobRefModel


class Timeline:
    """Append-only JSONL of events, flushed at once so a killed agent still leaves its record."""

    def __init__(self, path: Path, agent_id: str) -> None:
        self._handle = path.open("a", encoding="utf-8")
        self._agent = agent_id

    def add(self, event: str, **fields: Any) -> None:
        record = {"agent": self._agent, "event": event, "t": time.time(), **fields}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()


class TimedLearner(LocalLearner):
    """LocalLearner whose round and trainer set-up are timed."""

    timeline: Timeline

    def run_round(self, plan: RoundPlan, received: Mapping[str, np.ndarray]) -> RoundOutcome:
        start = time.time()
        outcome = super().run_round(plan, received)
        self.timeline.add("run_round", round=plan.round_id, start=start, train_s=outcome.train_seconds,
                          eval_s=outcome.eval_seconds, peak_rss_mb=outcome.peak_rss_mb)
        return outcome


class TimedAgent(EdgeAgent):
    def __init__(self, config: AgentConfig, timeline: Timeline) -> None:
        super().__init__(config)
        self.timeline = timeline
        self._round: int | None = None

    def _on_assignment(self, a: Assignment) -> None:
        self._round = a.round
        self.timeline.add("assignment", round=a.round)
        super()._on_assignment(a)
        self.timeline.add("uploaded", round=a.round)  # chunks and report handed to paho
        self._round = None

    def _fetch(self, ref: BlobRefModel, *args: Any, **kwargs: Any) -> bytes:
        start = time.time()
        data = super()._fetch(ref, *args, **kwargs)
        self.timeline.add("fetch", round=self._round, start=start, bytes=len(data))
        return data

    def _make_learner(self, bundle_dir: Path, manifest: BundleManifest) -> LocalLearner:
        started = time.time()
        labels = manifest.task.labels
        examples = load_examples(self.config.data, labels)
        global_test = load_examples(self.config.global_test, labels) if self.config.global_test else []
        trainer = make_trainer(self.config.backend, bundle_dir, self.config.threads)
        original_start = trainer.start_round

        def timed_start_round(tensors: Mapping[str, np.ndarray], learning_rate: float) -> None:
            t0 = time.time()
            original_start(tensors, learning_rate)
            self.timeline.add("start_round", round=self._round, start=t0)

        trainer.start_round = timed_start_round  # type: ignore[method-assign]
        learner = TimedLearner(self.config.agent_id, bundle_dir, manifest, trainer, examples, global_test)
        learner.timeline = self.timeline
        self.timeline.add("learner_ready", start=started, backbone=manifest.backbone)
        return learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--id", required=True, dest="agent_id")
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--global-test", type=Path)
    parser.add_argument("--max-memory", type=float)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", required=True, type=Path)
    parser.add_argument("--max-idle", type=float, default=300.0)
    parser.add_argument("--timeline", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.agent_id} %(levelname)s %(message)s")
    host, _, port = args.broker.rpartition(":")
    config = AgentConfig(agent_id=args.agent_id, host=host, port=int(port), data=args.data,
                         global_test=args.global_test, max_memory_mb=args.max_memory, threads=args.threads,
                         cache_dir=args.cache_dir, max_idle_seconds=args.max_idle)
    timeline = Timeline(args.timeline, args.agent_id)
    timeline.add("process_start")
    raise SystemExit(TimedAgent(config, timeline).run())


if __name__ == "__main__":
    main()
