"""The method benchmark's protocol, on hand-computed inputs: what each method runs, how accuracies are pooled,
and the significance test. A wrong number here would make every results page wrong while looking plausible."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from bench.methods import select_cells
from bench.methods_plan import QUICK, fair_baseline, full_sweep, method_config
from bench.methods_report import summarise, verdict_lines
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

    for cell in full_sweep():
        fleets = prepare_fleets(cell, tmp_path / cell.mode)
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
