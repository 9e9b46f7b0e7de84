"""What the public-set tests share (consensus distillation, anchoring): a three-agent tiny fleet over two
backbones, tweet data with a public set carved out, and a device holding it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.methods_federation import FederationRun
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import FleetData, load_tweet_sentiment, write_fleet_data
from edge_agent.data import Sample
from edge_agent.local_round import LocalLearner
from edge_agent.trainers.ort import OrtTrainer
from export.bundle import Bundle

LABELS = ("negative", "neutral", "positive")
PINS = {"a1": "tiny-3", "a2": "tiny-6", "a3": "tiny-6"}
PUBLIC = 24


def public_config(name: str, method: str, **exchange: Any) -> RunConfig:
    """A 2-round run of the tiny fleet with a public set of PUBLIC samples; ``exchange`` says what it does with
    it (distill_steps=... or anchor_steps=...)."""
    return RunConfig(run_name=name, method=method, backbones=("tiny-3", "tiny-6"), rounds=2, local_steps=3,
                     min_agents=len(PINS), pinned=PINS, task=TaskConfig(max_length=32, batch_size=8),
                     learning_rate=5e-3, seed=3, public_samples=PUBLIC, **exchange)


def fleet_with_public(directory: Path, agents: list[str] | None = None, *, max_samples: int = 600) -> FleetData:
    """Tweet data for ``agents`` (the tiny fleet's by default) and a public file of PUBLIC samples beside it."""
    return write_fleet_data(load_tweet_sentiment(max_samples=max_samples, seed=1), agents or list(PINS), directory,
                            alpha=1.0, seed=1, global_per_class=20, max_per_client=120, public_size=PUBLIC)


def public_file(data: FleetData) -> Path:
    return data.global_test_file.parent / "public.jsonl"


def device_learner(bundle: Bundle, examples: list[Sample], public: list[Sample]) -> LocalLearner:
    return LocalLearner("a1", bundle.directory, bundle.manifest, OrtTrainer(bundle.directory, threads=1), examples,
                        public=public)


def assert_rounds_commit_weighted_tables(run: FederationRun, table: str, method: str) -> None:
    """Every round's committed ``table`` is the n_k-weighted mean of its uploads: fleet-wide for heterotune, per
    backbone group for group-fedavg (a group's table never takes another group's rows)."""
    for round_id in (1, 2):
        uploads, state = run.updates[round_id], run.states[round_id]
        n = {r.agent_id: r.n_train for r in run.rounds if r.round == round_id}
        for group, members in {"all": list(PINS), "tiny-3": ["a1"], "tiny-6": ["a2", "a3"]}.items():
            if (group == "all") != (method == "heterotune"):
                continue
            expected = sum(n[a] * uploads[a][table].astype(np.float64) for a in members) / sum(n[a] for a in members)
            got = state.global_tensors[table] if group == "all" else state.group_tensors[group][table]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=f"{group} round {round_id}")


def assert_round_one_is_plain_and_round_two_is_not(run: FederationRun, plain: FederationRun, table: str) -> None:
    """Round 1 has no table yet ("none yet" zeros), so it trains exactly as the run without the exchange; round 2
    uses the table, so it differs."""
    for agent in PINS:
        model = list(plain.updates[1][agent])
        assert table not in model
        for name in model:
            np.testing.assert_array_equal(run.updates[1][agent][name], plain.updates[1][agent][name], err_msg=name)
        assert any(not np.array_equal(run.updates[2][agent][n], plain.updates[2][agent][n]) for n in model), agent
