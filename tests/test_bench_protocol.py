"""The method benchmark's protocol, on hand-computed inputs: what each method runs, how accuracies are pooled,
and the significance test. A wrong number here would make every results page wrong while looking plausible."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from bench.common import read_json
from bench.methods import select_cells
from bench.methods_plan import QUICK, SWEEP_BUDGETS, fair_baseline, full_sweep, method_config
from bench.methods_report import render_index, summarise, verdict_lines
from bench.methods_stats import FINAL, OVERALL, headline, paired, sign_flip_p, view_table


def test_sign_flip_p_is_the_exact_permutation_share() -> None:
    # 3 seeds, diffs (1, 2, 3): of the 8 sign patterns, |sum| >= 6 only for all-plus and all-minus -> 2/8
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    # (1, 2, -3): observed |0| = 0, every pattern reaches it -> 1
    assert sign_flip_p([1.0, 2.0, -3.0]) == 1.0
    # (3, 1, 1): |sum| >= 5 for +++ (5) and --- only; +,+,- gives 3 -> 2/8
    assert sign_flip_p([3.0, 1.0, 1.0]) == 0.25
    # five positive seeds: the smallest p the test can give, 2 / 32
    assert sign_flip_p([0.5, 1.0, 1.5, 2.0, 2.5]) == 0.0625
    assert math.isnan(sign_flip_p([]))


def test_paired_differences_use_only_common_seeds() -> None:
    result = paired({0: 50.0, 1: 60.0, 2: 55.0}, {0: 48.0, 1: 61.0, 3: 10.0})
    assert result["seeds"] == [0, 1]
    assert result["diffs"] == [2.0, -1.0]
    assert result["mean"] == 0.5
    assert result["sd"] == pytest.approx(math.sqrt(4.5))  # ((1.5)^2 + (1.5)^2) / 1
    assert result["p"] == 1.0  # 2 seeds: +2-1 = 1, -2+1 = -1, +2+1 = 3, -2-1 = -3 -> |.| >= 1 in all 4


def _row(round_id: int, agent: str, home: str, personal: tuple[int, int], global_: tuple[int, int]) -> dict[str, Any]:
    return {"round": round_id, "agent_id": agent, "home_backbone": home, "personal_correct": personal[0],
            "personal_total": personal[1], "global_correct": global_[0], "global_total": global_[1]}


def test_view_table_pools_samples_not_agents() -> None:
    # two agents of group "s" with different test sizes, one of group "l"; two rounds and a final evaluation
    result = {
        "rounds": [_row(1, "s-0", "s", (1, 4), (3, 10)), _row(1, "s-1", "s", (6, 6), (5, 10)),
                   _row(1, "l-0", "l", (2, 5), (4, 10)),
                   _row(2, "s-0", "s", (2, 4), (6, 10)), _row(2, "s-1", "s", (3, 6), (7, 10)),
                   _row(2, "l-0", "l", (5, 5), (9, 10))],
        "final_global": {"s-0": {"correct": 8, "total": 10, "home_backbone": "s"},
                         "s-1": {"correct": 6, "total": 10, "home_backbone": "s"},
                         "l-0": {"correct": 10, "total": 10, "home_backbone": "l"}},
    }
    table = view_table(result, ["s", "l"])
    assert table["personal"]["s"][1] == pytest.approx(70.0)  # (1 + 6) / (4 + 6), not mean(25 %, 100 %)
    assert table["personal"][OVERALL][2] == pytest.approx(100 * 10 / 15)
    assert table["global"]["l"][1] == pytest.approx(40.0)
    assert table["global"]["s"][FINAL] == pytest.approx(70.0)
    assert table["global"][OVERALL][FINAL] == pytest.approx(80.0)
    head = headline(table, last_round=2)
    assert head["personal"]["s"] == pytest.approx(50.0) and head["global"]["l"] == pytest.approx(100.0)


def test_smallest_common_puts_every_device_on_the_smallest_backbone() -> None:
    config, agents = method_config(QUICK, "smallest-common", seed=1)
    assert set(agents.values()) == {"minilm-l3"} and len(agents) == 2 * QUICK.agents_per_backbone == 4
    assert config.method == "group-fedavg" and config.backbones == ("minilm-l3",)
    own, own_agents = method_config(QUICK, "heterotune", seed=1)
    assert own_agents == QUICK.agents() and own.method == "heterotune" and own.seed == 1
    with pytest.raises(ValueError, match="unknown benchmark method"):
        method_config(QUICK, "fedsomething", seed=0)


def test_allglobal_candidates_send_every_adapter_family_across_backbones() -> None:
    from coordinator.methods import scopes_for

    def scopes(method: str) -> dict[str, str]:
        config, _ = method_config(dataclasses.replace(QUICK, methods=(method,)), method, seed=0)
        return scopes_for(config.method, config.scopes)

    assert scopes("heterotune") == {"ln": "group", "w_in": "group", "w_g": "global", "experts": "global",
                                    "private": "local", "w_out": "group", "head": "local"}
    assert scopes("heterotune-allglobal") == {"ln": "global", "w_in": "global", "w_g": "global", "experts": "global",
                                              "private": "local", "w_out": "global", "head": "local"}
    # private experts (when a bundle has any) stay on the device even when everything else travels
    everything_but_private = [f for f in scopes("heterotune") if f != "private"]
    assert scopes("heterotune-allglobal-globalhead") == dict.fromkeys(everything_but_private, "global") | {
        "private": "local"}
    # its fair baseline shares the same families, but only within a backbone group
    assert scopes("group-fedavg-grouphead") == dict.fromkeys(everything_but_private, "group") | {"private": "local"}


def test_distillation_candidates_and_their_fair_baselines() -> None:
    settings = dataclasses.replace(QUICK, public_samples=50, methods=("heterotune-lightdistill", "heterotune"))
    light, _ = method_config(settings, "heterotune-lightdistill", seed=0)
    assert (light.method, light.distill_steps, light.public_samples) == ("heterotune", 2, 50)  # 8 local steps / 4
    plain, _ = method_config(settings, "heterotune", seed=0)
    assert (plain.distill_steps, plain.public_samples) == (0, 0)
    with pytest.raises(ValueError, match="needs a public set"):  # a distilling method without the public file
        method_config(dataclasses.replace(settings, public_samples=0), "heterotune-lightdistill", seed=0)
    prior, _ = method_config(dataclasses.replace(settings, methods=("group-fedavg-priordistill",)),
                             "group-fedavg-priordistill", seed=0)
    assert (prior.method, prior.distill_steps, prior.distill_local_prior) == ("group-fedavg", 8, True)
    assert not light.distill_local_prior
    confident, _ = method_config(dataclasses.replace(settings, methods=("heterotune-confdistill",)),
                                 "heterotune-confdistill", seed=0)
    assert (confident.distill_steps, confident.distill_confident_fraction) == (8, 0.25)
    assert fair_baseline("heterotune-distill") == "group-fedavg-distill"
    assert fair_baseline("heterotune-grouphead") == "group-fedavg-grouphead"
    assert fair_baseline("heterotune-globalhead") is None and fair_baseline("heterotune") is None
    assert fair_baseline("group-fedavg-distill") is None


def test_pages_pair_each_candidate_with_its_fair_baseline() -> None:
    def job(method: str, seed: int, personal: int) -> dict[str, Any]:
        return {"method": method, "seed": seed, "rounds": [_row(1, "s-0", "s", (personal, 10), (5, 10))],
                "final_global": {"s-0": {"correct": 5, "total": 10, "home_backbone": "s"}}}

    raw = {"settings": {"backbones": ["s"], "rounds": 1}, "baselines": ["group-fedavg"],
           "jobs": [job("heterotune-distill", 0, 9), job("heterotune-distill", 1, 8),
                    job("group-fedavg-distill", 0, 6), job("group-fedavg-distill", 1, 6),
                    job("group-fedavg", 0, 5), job("group-fedavg", 1, 5)]}
    paired_keys = summarise(raw)["paired"]
    cross = paired_keys["heterotune-distill|group-fedavg-distill"]["personal"][OVERALL]
    assert cross["diffs"] == pytest.approx([30.0, 20.0])  # (9 - 6) and (8 - 6) of 10, in points
    assert "group-fedavg-distill|heterotune-distill" not in paired_keys


def test_full_sweep_cells_and_their_selection() -> None:
    cells = full_sweep()
    assert len(cells) == 9 and all(c.seeds == (0, 1, 2, 3, 4) for c in cells)
    assert {c.dataset for c in cells} == {"tweet-sentiment", "bbc-news", "fashion-mnist"}
    # the 2-hour budget trains what --quick and the design search train; --long is the first sweep's budget
    assert {(c.agents_per_backbone, c.rounds, c.local_steps) for c in cells} == {(2, 3, 8)}
    long = full_sweep(budget="long")
    assert {(c.agents_per_backbone, c.rounds, c.local_steps) for c in long} == {(3, 5, 10)}
    # ... and nothing else differs, so the long sweep's kept federations stay reusable (same settings key)
    assert [dataclasses.replace(c, agents_per_backbone=3, rounds=5, local_steps=10) for c in cells] == long
    chosen = select_cells(cells, "bbc-news,fashion-mnist-low")
    assert [c.mode for c in chosen] == ["full-bbc-news-dirichlet-0.3", "full-bbc-news-dirichlet-1.0",
                                        "full-bbc-news-low-data", "full-fashion-mnist-low-data"]
    assert select_cells(cells, None) == cells
    with pytest.raises(ValueError, match="matches no cell"):
        select_cells(cells, "cifar")


def test_dema_overrides_reach_every_method_and_bad_ones_are_refused() -> None:
    from bench.methods import parse_dema

    overrides = parse_dema("private_experts=1,rank=32")
    assert overrides == {"private_experts": 1, "rank": 32}
    settings = dataclasses.replace(QUICK, dema=overrides)
    for method in ("heterotune", "group-fedavg", "smallest-common", "fedproto"):
        config, _ = method_config(settings, method, seed=0)
        assert (config.dema.private_experts, config.dema.rank, config.dema.experts) == (1, 32, 4), method
    for bad, said in (("private_experts=-1", "greater than or equal to 0"), ("experts=0", "greater than or equal"),
                      ("width=3", "Extra inputs"), ("rank", "KEY=INTEGER"), ("rank=1.5", "KEY=INTEGER")):
        with pytest.raises(ValueError, match=said):
            parse_dema(bad)


def test_every_full_sweep_cell_can_split_its_data_for_every_seed(tmp_path: Path) -> None:
    """A cell whose Dirichlet split cannot give every agent its samples fails only hours into a sweep (BBC News at
    alpha 0.3 did, with 200 training articles per agent); the split itself takes seconds, so check it here."""
    from bench.methods import prepare_fleets

    for cell in (*full_sweep(), *full_sweep(budget="long")):
        fleets = prepare_fleets(cell, tmp_path / f"{cell.mode}-{cell.agents_per_backbone}")
        assert sorted(fleets) == [0, 1, 2, 3, 4], cell.mode
        for fleet in fleets.values():
            assert len(fleet["client_files"]) == len(cell.agents())


def test_fleet_data_section_names_the_datasets_own_labels() -> None:
    from bench.methods_report import _data

    fleet = {"labels": ["business", "sports"], "global_test": {"label_counts": [20, 20]},
             "clients": {"a-0": {"label_counts": [7, 3]}}}
    lines = _data({"fleets": {"0": fleet}})
    assert "label counts business/sports of each agent's file" in lines[0]
    assert lines[2] == "- seed 0: a-0 7/3; held-out set 20/20"


def test_the_page_says_plainly_whether_heterotune_beats_group_fedavg() -> None:
    seeds = range(5)

    def summary(personal: list[float], global_: list[float]) -> dict[str, Any]:
        zero = dict.fromkeys(seeds, 0.0)
        return {"paired": {"heterotune|group-fedavg": {
            "personal": {OVERALL: paired(dict(zip(seeds, personal, strict=True)), zero)},
            "global": {OVERALL: paired(dict(zip(seeds, global_, strict=True)), zero)}}}}

    # every seed higher on the global view (p 0.0625, the floor for 5 seeds); personal mixed
    assert "`heterotune` beats `group-fedavg` on the global view" in verdict_lines(
        summary([1, -1, 1, -1, 0.5], [0.2, 0.4, 1, 2, 0.1]), 5)[0]
    assert "`group-fedavg` beats `heterotune` on the personal view" in verdict_lines(
        summary([-1, -2, -1, -1, -0.5], [1, -1, 1, -1, 0]), 5)[0]
    # 4 of 5 seeds higher is not enough (p 0.19), and 2 seeds can never show it
    plain = verdict_lines(summary([1, 1, 1, 1, -1], [1, 1, 1, 1, -0.5]), 5)[0]
    assert "does not measurably beat" in plain and "cannot go below" not in plain
    two = {"paired": {"heterotune|group-fedavg": {v: {OVERALL: paired({0: 3.0, 1: 4.0}, {0: 0.0, 1: 0.0})}
                                                  for v in ("personal", "global")}}}
    (line,) = verdict_lines(two, 2)
    assert "does not measurably beat" in line and "cannot go below p = 0.50" in line
    assert verdict_lines({"paired": {}}, 5) == []  # a page without both methods says nothing


def test_the_sweep_index_gives_its_own_wall_time_only_for_a_whole_run() -> None:
    def job(method: str, seed: int, personal: int) -> dict[str, Any]:
        return {"method": method, "seed": seed, "commit": "abc", "wall_seconds": 90.0,
                "rounds": [_row(1, "s-0", "s", (personal, 10), (5, 10))],
                "final_global": {"s-0": {"correct": 5, "total": 10, "home_backbone": "s"}}}

    raw = {"settings": {"backbones": ["s"], "rounds": 1, "mode": "full-x-low-data", "seeds": [0, 1]},
           "baselines": ["group-fedavg"],
           "machine": {"cpu": "EPYC", "cores": 2},
           "jobs": [job(m, s, 5 + (m == "heterotune")) for m in ("heterotune", "group-fedavg") for s in (0, 1)]}
    budget = SWEEP_BUDGETS["standard"]
    piecemeal = render_index([raw], 9, pages="results-full", flags="--full", sweep=None, budget=budget)
    assert "no single invocation has run every cell" in piecemeal
    assert "Done cells: 6 min in all, about 3 min of wall time" in piecemeal  # 4 federations x 90 s
    assert "[full-x-low-data](results-full/full-x-low-data.md)" in piecemeal
    assert "+10.0 (p 0.50)" in piecemeal  # heterotune 6/10 against 5/10 in both seeds
    sweep = {"command": "python -m bench.methods --full", "commit": "0123456789abcdef", "workers": 2,
             "started_utc": "2026-12-05 01:00", "wall_seconds": 6000.0, "bundle_seconds": 70.0,
             "federations_run": 270, "federations_reused": 0, "load_before": [0.1], "load_after": [2.0],
             "machine": {"cores": 2}}
    whole = render_index([raw], 9, pages="results-full", flags="--full", sweep=sweep, budget=budget)
    assert "whole sweep, one invocation: 100 min wall" in whole and "ran 270 federations and reused 0" in whole
    assert "2 agents per backbone, 3 rounds x 8 local steps, 2 seeds" in whole
    long = render_index([raw], 9, pages="results-long", flags="--full --long", sweep=None,
                        budget=SWEEP_BUDGETS["long"])
    assert "was `--full` until 2026-12-05" in long and "(results-long/full-x-low-data.md)" in long


def test_a_sweep_runs_its_cells_in_one_pool_records_its_wall_time_and_resumes(tmp_path: Path) -> None:
    """Two sweep cells on tiny random backbones (plumbing, not learning): pages, index and the sweep's own
    record are written; a second invocation reruns nothing and reports the same numbers."""
    from bench.methods import run_full
    from bench.methods_plan import SMOKE

    cells = [dataclasses.replace(cell, backbones=SMOKE.backbones, max_length=32, batch_size=8, rounds=1,
                                 local_steps=2, methods=("heterotune", "group-fedavg"), seeds=(0, 1),
                                 regime=dataclasses.replace(cell.regime, train_per_agent=30, global_per_class=5,
                                                            dataset_samples=1500))
             for cell in full_sweep()[:2]]
    pages = tmp_path / "results-full"

    def sweep() -> tuple[dict[str, Any], dict[str, Any]]:
        run_full(cells, budget="standard", workers=2, command="test", every_cell=True, pages=pages,
                 out=tmp_path / "raw")
        return read_json(pages / "sweep.json"), read_json(pages / f"{cells[1].mode}.json")

    first, cell = sweep()
    assert (first["federations_run"], first["federations_reused"]) == (8, 0)
    # a cell's wall time is its own federations' span, not the time since the sweep planned it
    jobs = cell["jobs"]
    span = max(j["started_at"] + j["wall_seconds"] for j in jobs) - min(j["started_at"] for j in jobs)
    assert cell["wall_scope"] == "federations" and cell["wall_seconds"] == pytest.approx(span)
    assert all((pages / "jobs" / c.mode).is_dir() and (pages / f"{c.mode}.md").exists() for c in cells)
    index = (tmp_path / "results-full.md").read_text()
    assert "2 of 9 cells done" in index and "whole sweep, one invocation" in index
    again, cell_again = sweep()
    assert (again["federations_run"], again["federations_reused"]) == (0, 8)
    assert [job["rounds"] for job in cell_again["jobs"]] == [job["rounds"] for job in cell["jobs"]]
