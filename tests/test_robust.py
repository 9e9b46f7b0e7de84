"""The robust rules on hand-computed tensors, and the engine's use of them on updates saved in a real run store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.aggregation import ClientUpdate
from coordinator.aggregation.robust import coordinate_median, robust_group_updates, trimmed_mean
from coordinator.config import ConfigError, RunConfig, parse_config
from coordinator.engine import Coordinator
from coordinator.report_checks import Candidate
from coordinator.store import RunStore
from protocols.signing import generate_key
from tests.test_report_checks import CONFIG, RecordingEndpoint


def test_coordinate_median_and_trimmed_mean_by_hand() -> None:
    a, b, c = np.array([1.0, 10.0, -3.0]), np.array([2.0, 20.0, 0.0]), np.array([100.0, -50.0, 1.0])
    np.testing.assert_array_equal(coordinate_median([a, b, c]), [2.0, 10.0, 0.0])
    np.testing.assert_array_equal(coordinate_median([a, b]), [1.5, 15.0, -1.5])
    five = [np.array([v]) for v in (4.0, 100.0, 1.0, 3.0, 2.0)]
    np.testing.assert_array_equal(trimmed_mean(five, 0.2), [3.0])  # drops 1 and 100, averages 2, 3, 4
    np.testing.assert_array_equal(trimmed_mean(five, 0.0), [22.0])  # no trimming: the plain mean
    np.testing.assert_array_equal(trimmed_mean(five, 0.19), [22.0])  # floor(0.19 x 5) = 0 values trimmed
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(five, 0.5)


def test_robust_group_updates_are_per_group_and_ignore_claimed_sample_counts() -> None:
    def up(agent: str, group: str, n: int, value: float) -> ClientUpdate:
        return ClientUpdate(agent, group, n, {"w": np.full((2,), value, np.float32)})

    updates = [up("a", "g1", 10, 1.0), up("b", "g1", 10, 2.0), up("x", "g1", 10**9, 1e4), up("c", "g2", 5, 7.0)]
    out = {u.group: u for u in robust_group_updates(updates, "median")}
    np.testing.assert_array_equal(out["g1"].tensors["w"], [2.0, 2.0])  # the liar moved nothing
    assert out["g1"].num_samples == 10 + 10 + 10**9 and out["g2"].num_samples == 5
    np.testing.assert_array_equal(out["g2"].tensors["w"], [7.0, 7.0])


def test_the_engine_aggregates_saved_updates_with_the_configured_rule(tmp_path: Path) -> None:
    from coordinator.runner import build_bundles

    config = CONFIG.model_copy(update={"robust_rule": "median"})
    store = RunStore(tmp_path)
    try:
        coordinator = Coordinator(config, build_bundles(config), RecordingEndpoint(), store,  # type: ignore[arg-type]
                                  signing_key=generate_key())
        names = coordinator._expected_tensors("tiny-3")
        candidates = []
        for agent, value in (("a1", 1.0), ("a2", 2.0), ("a3", 500.0)):
            tensors = {n: np.full(shape, value, np.float32) for n, (shape, _) in names.items()}
            path = store.save_update(1, agent, tensors)
            candidates.append(Candidate(agent, "tiny-3", 90, value, path))
        (group,) = coordinator._group_updates(candidates)
        assert all(np.all(v == 2.0) for v in group.tensors.values())
        coordinator.config = CONFIG  # the default: the sample-weighted mean over the same files
        (mean,) = coordinator._group_updates(candidates)
        assert all(np.allclose(v, (1.0 + 2.0 + 500.0) / 3) for v in mean.tensors.values())
    finally:
        store.close()


def test_robust_rule_is_validated() -> None:
    with pytest.raises(ConfigError, match="robust_rule"):
        parse_config({"robust_rule": "mode"})
    with pytest.raises(ConfigError, match="prototypes"):
        parse_config({"robust_rule": "median", "method": "fedproto"})
    assert RunConfig(robust_rule="trimmed_mean", trim_fraction=0.25).trim_fraction == 0.25
