"""Backbone assignment pinned on hand-computed budgets.

Cards (builder at 100 GFLOP/s), with local_steps = 15 and eval_samples = 50:
  minilm-l3  (3 x 384):  200 MB; round on builder 15 x 0.1 + 50 x 0.01 = 1.5 + 0.5 = 2 s
  minilm-l6  (6 x 384):  300 MB; round on builder 15 x 0.2 + 50 x 0.02 = 3 + 1     = 4 s
  mpnet-base (12 x 768): 900 MB; round on builder 15 x 1.0 + 50 x 0.1  = 15 + 5    = 20 s
A device at G GFLOP/s takes those times x 100 / G.
"""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.assignment import CostCard, Decision, DeviceBudget, assign_backbone


def card(name: str, layers: int, hidden: int, mb: float, step: float, eval_s: float) -> CostCard:
    return CostCard(
        backbone=name,
        peak_train_rss_mb=mb,
        step_seconds=step,
        eval_seconds_per_sample=eval_s,
        flops_per_step=1e9,
        payload_bytes=100_000,
        bundle_bytes=50_000_000,
        builder_gflops=100.0,
        layers=layers,
        hidden=hidden,
    )


CARDS = (
    card("minilm-l3", 3, 384, 200.0, 0.1, 0.01),
    card("mpnet-base", 12, 768, 900.0, 1.0, 0.1),  # deliberately not in size order
    card("minilm-l6", 6, 384, 300.0, 0.2, 0.02),
)


def device(mb: float, gflops: float = 100.0, max_round: float | None = None) -> DeviceBudget:
    return DeviceBudget(agent_id="dev-1", memory_budget_mb=mb, gflops=gflops, max_round_seconds=max_round)


def assign(dev: DeviceBudget, **kwargs: float | None) -> Decision:
    # The arithmetic below is written for a fraction of 0.8 (the run default is DEFAULT_MEMORY_FRACTION).
    kwargs.setdefault("memory_fraction", 0.8)
    return assign_backbone(dev, CARDS, local_steps=15, eval_samples=50, **kwargs)  # type: ignore[arg-type]


def test_picks_largest_that_fits() -> None:
    # 0.8 x 2000 = 1600 MB >= 900: everything fits -> the largest, mpnet-base
    assert assign(device(2000)).backbone == "mpnet-base"
    # 0.8 x 500 = 400 MB: mpnet (900) no, minilm-l6 (300) yes
    decision = assign(device(500))
    assert decision.backbone == "minilm-l6"
    assert "larger backbones do not fit: mpnet-base" in decision.reason
    # 0.8 x 300 = 240 MB: only minilm-l3 (200)
    assert assign(device(300)).backbone == "minilm-l3"


def test_memory_boundary_exactly_at_fraction() -> None:
    # 0.8 x 375 = 300 MB == minilm-l6's 300 MB -> fits
    assert assign(device(375)).backbone == "minilm-l6"
    # 0.8 x 374 = 299.2 MB < 300 -> minilm-l3
    assert assign(device(374)).backbone == "minilm-l3"
    # other fraction: 0.5 x 600 = 300 -> fits; 0.5 x 599 = 299.5 -> not
    assert assign(device(600), memory_fraction=0.5).backbone == "minilm-l6"
    assert assign(device(599), memory_fraction=0.5).backbone == "minilm-l3"


def test_memory_boundary_survives_float_rounding() -> None:
    # In floats 0.8 * 4.6 == 3.6799999999999997 < 3.68; exactly at the limit must still fit.
    tiny = card("tiny", 1, 8, 3.68, 0.0, 0.0)
    decision = assign_backbone(device(4.6), [tiny], local_steps=1, eval_samples=1)
    assert decision.backbone == "tiny"


def test_deadline_excludes_slow_device_from_large_model() -> None:
    # 50 GFLOP/s: x2 -> mpnet 40 s, minilm-l6 8 s, minilm-l3 4 s; deadline 30 s -> minilm-l6
    slow = device(2000, gflops=50)
    assert assign(slow, deadline_seconds=30).backbone == "minilm-l6"
    # 200 GFLOP/s: x0.5 -> mpnet 10 s <= 30 -> mpnet
    assert assign(device(2000, gflops=200), deadline_seconds=30).backbone == "mpnet-base"
    # at exactly the deadline: mpnet at 50 GFLOP/s = 40 s, deadline 40 -> fits
    assert assign(slow, deadline_seconds=40).backbone == "mpnet-base"
    # no deadline at all: time does not constrain
    assert assign(slow).backbone == "mpnet-base"


def test_tighter_of_deadline_and_device_cap() -> None:
    # device cap 30 s is tighter than the run deadline 60 s -> mpnet (40 s) excluded
    assert assign(device(2000, gflops=50, max_round=30), deadline_seconds=60).backbone == "minilm-l6"
    # run deadline 30 s is tighter than the cap 60 s
    assert assign(device(2000, gflops=50, max_round=60), deadline_seconds=30).backbone == "minilm-l6"
    # only the device cap set (45 s): mpnet 40 s fits
    assert assign(device(2000, gflops=50, max_round=45)).backbone == "mpnet-base"


def test_refusal_for_memory_states_the_numbers() -> None:
    # 0.8 x 200 = 160 MB < 200 MB (smallest); needed budget 200 / 0.8 = 250 MB
    decision = assign(device(200))
    assert decision.backbone is None
    assert decision.reason.startswith("refused: no backbone fits; the smallest, minilm-l3,")
    assert "needs 200 MB (0.8 x budget = 160 MB)" in decision.reason
    assert "a memory budget of at least 250 MB" in decision.reason
    # at 100 GFLOP/s with no limit: 2 s per round
    assert "a predicted 2.0 s per round (no time limit)" in decision.reason


def test_refusal_for_time_states_the_numbers() -> None:
    # 10 GFLOP/s: x10 -> minilm-l3 takes 20 s > deadline 10 s; needed 10 x 20 / 10 = 20 GFLOP/s
    decision = assign(device(2000, gflops=10), deadline_seconds=10)
    assert decision.backbone is None
    assert "a predicted 20.0 s per round (limit 10.0 s)" in decision.reason
    assert "at least 20 GFLOP/s (device has 10)" in decision.reason
    assert "memory budget" not in decision.reason  # memory was fine


def test_explain_lines_for_every_candidate() -> None:
    decision = assign(device(500))
    assert len(decision.lines) == 3
    # largest first
    assert [line.split(" ")[0] for line in decision.lines] == ["mpnet-base", "minilm-l6", "minilm-l3"]
    # hand-written arithmetic: 0.8 x 500 = 400; (15 x 0.2 + 50 x 0.02) x 100 / 100 = 4.0 s
    assert decision.lines[1] == (
        "minilm-l6 (6 x 384, ort card): memory 300 MB vs 0.8 x 500 MB = 400 MB -> ok; "
        "round (15 x 0.2 s + 50 x 0.02 s) x 100 / 100 GFLOP/s = 4.0 s vs no limit -> ok <- chosen"
    )
    assert decision.lines[0].startswith(
        "mpnet-base (12 x 768, ort card): memory 900 MB vs 0.8 x 500 MB = 400 MB -> too big"
    )
    assert not decision.lines[2].endswith("<- chosen")
    # a time failure is spelled out too: 50 GFLOP/s, deadline 30 -> mpnet 40 s
    slow = assign(device(2000, gflops=50), deadline_seconds=30)
    assert "= 40.0 s vs limit 30.0 s -> too slow" in slow.lines[0]
    # a refusal still explains every candidate
    assert len(assign(device(100)).lines) == 3


def test_equal_size_tie_broken_by_faster_round() -> None:
    # same 12 x 384 size proxy; b's round is 15 x 0.1 = 1.5 s vs a's 15 x 0.3 = 4.5 s -> b
    a = card("vit-a", 12, 384, 100.0, 0.3, 0.0)
    b = card("vit-b", 12, 384, 100.0, 0.1, 0.0)
    for cards in ([a, b], [b, a]):
        decision = assign_backbone(device(1000), cards, local_steps=15, eval_samples=0)
        assert decision.backbone == "vit-b"


def test_size_proxy_not_memory_orders_candidates() -> None:
    # "wide" (2 x 1024: 2,097,152) outranks "deep" (8 x 384: 1,179,648) despite less memory
    deep = card("deep", 8, 384, 500.0, 0.1, 0.0)
    wide = card("wide", 2, 1024, 400.0, 0.1, 0.0)
    decision = assign_backbone(device(1000), [deep, wide], local_steps=1, eval_samples=0)
    assert decision.backbone == "wide"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cards": []}, "no cost cards"),
        ({"cards": [CARDS[0], CARDS[0]]}, "duplicate backbones"),
        ({"device": device(0)}, "memory_budget_mb must be > 0"),
        ({"device": device(100, gflops=0)}, "gflops must be > 0"),
        ({"device": device(100, max_round=0)}, "max_round_seconds must be > 0"),
        ({"deadline_seconds": -1.0}, "deadline_seconds must be > 0"),
        ({"memory_fraction": 1.5}, r"memory_fraction must be in \(0, 1\]"),
        ({"local_steps": -1}, "local_steps and eval_samples must be >= 0"),
        ({"cards": [dataclasses.replace(CARDS[0], builder_gflops=0.0)]}, "builder_gflops"),
    ],
)
def test_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "device": device(1000),
        "cards": CARDS,
        "local_steps": 15,
        "eval_samples": 50,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        assign_backbone(**args)  # type: ignore[arg-type]


# What each bundle carries trainers for, as cost_card_of records it: the MiniLMs have a torch part (and a torch
# card), mpnet-base has neither (the PyTorch backend implements BERT and DINOv2 only).
TORCH_CAPABLE = ("ort", "torch")
MIXED = (
    dataclasses.replace(CARDS[0], trainable_by=TORCH_CAPABLE),
    dataclasses.replace(CARDS[0], peak_train_rss_mb=420.0, backend="torch", trainable_by=TORCH_CAPABLE),
    dataclasses.replace(CARDS[1], trainable_by=("ort",)),
    dataclasses.replace(CARDS[2], trainable_by=TORCH_CAPABLE),  # a torch part but no torch card: ORT card stands in
)


def test_a_backbone_without_card_or_part_for_the_backend_is_no_candidate() -> None:
    def decide(backend: str | None, cards: tuple[CostCard, ...] = MIXED) -> Decision:
        dev = DeviceBudget("dev-1", memory_budget_mb=2000, gflops=100.0, max_round_seconds=None, backend=backend)
        return assign_backbone(dev, cards, local_steps=15, eval_samples=50)

    # an ORT device (or one from before the backend field) gets the largest, mpnet-base, as before
    assert decide("ort").backbone == "mpnet-base" and decide(None).backbone == "mpnet-base"
    assert not any("not a candidate" in line for line in decide("ort").lines)
    # a torch device with room for everything still does not get it: it falls to minilm-l6 (its ORT card, since
    # that bundle has a torch part but was not measured with torch), and the explanation says why
    torch = decide("torch")
    assert torch.backbone == "minilm-l6"
    assert [line.split(" ")[0] for line in torch.lines] == ["minilm-l6", "minilm-l3", "mpnet-base"]
    assert torch.lines[0].startswith("minilm-l6 (6 x 384, ort card)") and torch.lines[0].endswith("<- chosen")
    assert torch.lines[1].startswith("minilm-l3 (3 x 384, torch card): memory 420 MB")
    assert torch.lines[2] == ("mpnet-base (12 x 768): not a candidate for a torch device: its bundle has no torch "
                              "part and no torch cost card; only ort devices can train it")
    assert torch.reason.endswith("; not trainable with torch: mpnet-base")
    # a run (or a pin) offering only mpnet-base refuses a torch device outright, saying who could take it
    only = decide("torch", (MIXED[2],))
    assert only.backbone is None
    assert only.reason == ("refused: no backbone of this run can be trained with the torch backend (mpnet-base: "
                           "no torch part in the bundle); a device training with ort could take it")
    assert only.lines == (torch.lines[2],)
    assert decide("ort", (MIXED[2],)).backbone == "mpnet-base"
    # hand-built cards that record nothing (trainable_by None) keep the plain ORT fallback
    assert decide("torch", CARDS).backbone == "mpnet-base"
