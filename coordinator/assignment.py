"""Backbone assignment: give a device the largest backbone whose cost card fits its budget.

Pure function of a device profile and the bundles' cost cards, so ``coordinator assign --explain``
can print exactly the arithmetic the round engine used.

A bundle has a card per trainer backend (on the builder the PyTorch backend peaks ~210-230 MB above ONNX Runtime
on the same bundle; importing torch alone is ~230 MB resident), and a device is judged by the card of the backend
it trains with (``DeviceBudget.backend``; none given = ORT). A backbone without a card for that backend falls back
to its ORT card, as ``BundleManifest.cost_card_for`` does, and every explanation line names the backend whose card
it used. That fallback is only for bundles a backend *can* train: a bundle with neither a card nor a part for the
device's backend (MPNet has no torch part, because the PyTorch backend implements only BERT and DINOv2) is not a
candidate for that device at all, and the explanation says so (``CostCard.trainable_by``).

Rule (docs/design.md, "Profiles and assignment"):

* memory: ``card.peak_train_rss_mb <= memory_fraction x device.memory_budget_mb`` (default 0.9; the
  rest is headroom for the OS, the MQTT client and allocator fragmentation, which the builder's
  RSS measurement does not see);
* time: ``(local_steps x step_seconds + eval_samples x eval_seconds_per_sample)
  x card.builder_gflops / device.gflops <= limit``, with ``limit`` the tighter of the run's
  ``deadline_seconds`` and the device's own ``max_round_seconds`` (no limit if neither is set).
  The cost card was measured on the builder, so times scale by the ratio of matmul throughput,
  which dominates transformer training on CPU.

Among the backbones that fit, the largest by parameter-size proxy ``layers x hidden^2`` wins
(a bigger backbone is the point of heterogeneous support); equal sizes go to the faster predicted
round, then to the name, so the choice is deterministic. If none fits, the device is refused and
the reason states what the smallest backbone would need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from protocols.bundle_manifest import DEFAULT_COST_BACKEND, BundleManifest

# The share of a device's memory budget a backbone's cost card may take: one default for every run, the demo's
# included. 0.9 because the cards measure a complete agent process within 1-3 % of its real peak (predicted /
# measured 0.97-0.99, docs/cost-model.md), an agent's RSS grew 3 % over five demo rounds (allocator growth), and
# every agent started with --max-memory enforces its cap for real; 0.8 refused the README's Raspberry-Pi class
# (384 MB) the MiniLM-L3 it runs (308 MB needed, 307.2 MB allowed).
DEFAULT_MEMORY_FRACTION = 0.9

# Relative slack on the limits so that "exactly at the limit" (e.g. 320 MB vs 0.8 x 400 MB) is not
# lost to float rounding of the product.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class CostCard:
    """Costs of one backbone's bundle, measured at export on the builder machine."""

    backbone: str
    peak_train_rss_mb: float
    step_seconds: float  # one training step at the bundle's batch/seq
    eval_seconds_per_sample: float
    flops_per_step: float
    payload_bytes: int  # bytes one agent uploads per round
    bundle_bytes: int
    builder_gflops: float  # matmul GFLOP/s of the builder machine when measured
    layers: int
    hidden: int
    backend: str = DEFAULT_COST_BACKEND  # the trainer backend the card was measured with
    # The backends whose trainer the bundle carries what it needs for: ORT (the tar), plus each backend with a part
    # or a card of its own. None = not recorded (hand-built cards): any backend may fall back to the ORT card.
    trainable_by: tuple[str, ...] | None = None

    def can_train_with(self, backend: str) -> bool:
        """Whether a device training with ``backend`` can train this card's bundle at all."""
        return self.trainable_by is None or backend in self.trainable_by

    @property
    def size_proxy(self) -> int:
        """``layers x hidden^2``: proportional to a transformer's block parameters."""
        return self.layers * self.hidden * self.hidden


@dataclass(frozen=True)
class DeviceBudget:
    """What a device offers, from ``edge-agent profile`` and the user's caps."""

    agent_id: str
    memory_budget_mb: float  # min(available RAM, user cap)
    gflops: float  # device matmul benchmark
    max_round_seconds: float | None
    backend: str | None = None  # the trainer backend it trains with; None = ORT (agents from before the field)


@dataclass(frozen=True)
class Decision:
    """The assignment and its explanation."""

    agent_id: str
    backbone: str | None  # None = refused
    reason: str  # human explanation (for refusal: what it would need)
    # The arithmetic, one line per candidate backbone (largest first), then one per backbone the device's backend
    # cannot train (why it is no candidate).
    lines: tuple[str, ...]


@dataclass(frozen=True)
class _Evaluation:
    card: CostCard
    memory_limit_mb: float
    round_seconds: float
    time_limit_seconds: float | None

    @property
    def memory_ok(self) -> bool:
        return self.card.peak_train_rss_mb <= self.memory_limit_mb * (1 + _REL_TOL)

    @property
    def time_ok(self) -> bool:
        limit = self.time_limit_seconds
        return limit is None or self.round_seconds <= limit * (1 + _REL_TOL)

    @property
    def fits(self) -> bool:
        return self.memory_ok and self.time_ok


def _num(x: float) -> str:
    """Compact number: one decimal, without a trailing ``.0`` (``320``, ``412.5``)."""
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _secs(x: float) -> str:
    return f"{x:.3g}" if x < 1 else f"{x:.1f}"


def predicted_round_seconds(
    card: CostCard, device: DeviceBudget, *, local_steps: int, eval_samples: int
) -> float:
    """Builder-measured round time scaled by builder/device matmul throughput."""
    builder_seconds = local_steps * card.step_seconds + eval_samples * card.eval_seconds_per_sample
    return builder_seconds * card.builder_gflops / device.gflops


def _time_limit(device: DeviceBudget, deadline_seconds: float | None) -> float | None:
    limits = [t for t in (deadline_seconds, device.max_round_seconds) if t is not None]
    return min(limits) if limits else None


def cards_for_backend(cards: Sequence[CostCard], backend: str | None) -> list[CostCard]:
    """One card per backbone, the one a device training with ``backend`` is judged by: the backbone's card for
    that backend, else its ORT card (the rule of ``BundleManifest.cost_card_for``). Backbones keep their order.

    ``cards`` may hold several backends' cards per backbone, at most one of each. Backbones whose bundle ``backend``
    cannot train (``untrainable_backbones``) are left out: they are no candidates, not candidates judged by ORT.
    """
    return split_for_backend(cards, backend)[0]


def split_for_backend(cards: Sequence[CostCard], backend: str | None) -> tuple[list[CostCard], list[CostCard]]:
    """``cards_for_backend`` and ``untrainable_backbones`` at once: (the candidates' cards, the untrainable ones)."""
    wanted = backend or DEFAULT_COST_BACKEND
    pairs = [(c.backbone, c.backend) for c in cards]
    if len(set(pairs)) != len(pairs):
        names = [f"{name} ({kind})" for name, kind in pairs]
        raise ValueError(f"assign_backbone: duplicate backbones in cost cards: {names}")
    chosen: dict[str, CostCard] = {}
    for c in cards:
        if c.backend == wanted or (c.backend == DEFAULT_COST_BACKEND and c.backbone not in chosen
                                   and c.can_train_with(wanted)):
            chosen[c.backbone] = c
    untrainable = untrainable_backbones(cards, wanted)
    missing = sorted({c.backbone for c in cards} - set(chosen) - {c.backbone for c in untrainable})
    if missing:
        raise ValueError(f"assign_backbone: no {wanted} or {DEFAULT_COST_BACKEND} cost card for {missing}")
    order = list(dict.fromkeys(c.backbone for c in cards))
    return [chosen[name] for name in order if name in chosen], untrainable


def untrainable_backbones(cards: Sequence[CostCard], backend: str | None) -> list[CostCard]:
    """The ORT card of each backbone a device training with ``backend`` cannot train: no card measured with that
    backend, and a bundle that records it has nothing for it (no part: e.g. MPNet for the torch backend)."""
    wanted = backend or DEFAULT_COST_BACKEND
    measured = {c.backbone for c in cards if c.backend == wanted}
    return [c for c in cards if c.backend == DEFAULT_COST_BACKEND and c.backbone not in measured
            and not c.can_train_with(wanted)]


def _untrainable_line(card: CostCard, backend: str) -> str:
    others = ", ".join(card.trainable_by or ())
    return (f"{card.backbone} ({card.layers} x {card.hidden}): not a candidate for a {backend} device: its bundle "
            f"has no {backend} part and no {backend} cost card; only {others} devices can train it")


def _validate(
    device: DeviceBudget,
    cards: Sequence[CostCard],
    local_steps: int,
    eval_samples: int,
    memory_fraction: float,
    deadline_seconds: float | None,
) -> None:
    if not cards:
        raise ValueError("assign_backbone: no cost cards")
    if not (device.memory_budget_mb > 0 and math.isfinite(device.memory_budget_mb)):
        raise ValueError(
            f"device {device.agent_id!r}: memory_budget_mb must be > 0, got {device.memory_budget_mb}"
        )
    if not (device.gflops > 0 and math.isfinite(device.gflops)):
        raise ValueError(f"device {device.agent_id!r}: gflops must be > 0, got {device.gflops}")
    if device.max_round_seconds is not None and not device.max_round_seconds > 0:
        raise ValueError(
            f"device {device.agent_id!r}: max_round_seconds must be > 0, got {device.max_round_seconds}"
        )
    if deadline_seconds is not None and not deadline_seconds > 0:
        raise ValueError(f"deadline_seconds must be > 0, got {deadline_seconds}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    if local_steps < 0 or eval_samples < 0:
        raise ValueError(f"local_steps and eval_samples must be >= 0, got {local_steps}, {eval_samples}")
    for c in cards:
        if not (c.builder_gflops > 0 and c.layers > 0 and c.hidden > 0):
            raise ValueError(f"cost card {c.backbone!r}: builder_gflops, layers and hidden must be > 0")
        if min(c.peak_train_rss_mb, c.step_seconds, c.eval_seconds_per_sample) < 0:
            raise ValueError(f"cost card {c.backbone!r}: memory and times must be >= 0")


def _line(
    ev: _Evaluation, device: DeviceBudget, memory_fraction: float, local_steps: int, eval_samples: int
) -> str:
    card = ev.card
    memory = (
        f"memory {_num(card.peak_train_rss_mb)} MB vs {memory_fraction:g} x "
        f"{_num(device.memory_budget_mb)} MB = {_num(ev.memory_limit_mb)} MB"
        f" -> {'ok' if ev.memory_ok else 'too big'}"
    )
    limit = "no limit" if ev.time_limit_seconds is None else f"limit {_secs(ev.time_limit_seconds)} s"
    timing = (
        f"round ({local_steps} x {card.step_seconds:g} s + "
        f"{eval_samples} x {card.eval_seconds_per_sample:g} s)"
        f" x {card.builder_gflops:g} / {device.gflops:g} GFLOP/s = {_secs(ev.round_seconds)} s vs {limit}"
        f" -> {'ok' if ev.time_ok else 'too slow'}"
    )
    return f"{card.backbone} ({card.layers} x {card.hidden}, {card.backend} card): {memory}; {timing}"


def _needs(ev: _Evaluation, memory_fraction: float) -> str:
    card = ev.card
    parts = [
        f"needs {_num(card.peak_train_rss_mb)} MB "
        f"({memory_fraction:g} x budget = {_num(ev.memory_limit_mb)} MB)"
    ]
    if ev.time_limit_seconds is None:
        parts.append(f"a predicted {_secs(ev.round_seconds)} s per round (no time limit)")
    else:
        parts.append(
            f"a predicted {_secs(ev.round_seconds)} s per round (limit {_secs(ev.time_limit_seconds)} s)"
        )
    return " and ".join(parts) + f", by its {card.backend} cost card"


def assign_backbone(
    device: DeviceBudget,
    cards: Sequence[CostCard],
    *,
    local_steps: int,
    eval_samples: int,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    deadline_seconds: float | None = None,
) -> Decision:
    """Largest backbone that fits ``device``; or a refusal saying what the smallest would need.

    ``cards`` may hold several backends' cards; each backbone is judged by the one for ``device.backend``.
    """
    if not cards:
        raise ValueError("assign_backbone: no cost cards")
    backend = device.backend or DEFAULT_COST_BACKEND
    cards, untrainable = split_for_backend(cards, backend)
    excluded = tuple(_untrainable_line(c, backend) for c in untrainable)
    _validate(device, cards or untrainable, local_steps, eval_samples, memory_fraction, deadline_seconds)
    if not cards:
        names = ", ".join(c.backbone for c in untrainable)
        reason = (f"refused: no backbone of this run can be trained with the {backend} backend ({names}: no "
                  f"{backend} part in the bundle); a device training with "
                  f"{' or '.join(sorted({b for c in untrainable for b in c.trainable_by or ()}))} could take it")
        return Decision(agent_id=device.agent_id, backbone=None, reason=reason, lines=excluded)
    memory_limit = memory_fraction * device.memory_budget_mb
    time_limit = _time_limit(device, deadline_seconds)
    evaluations = [
        _Evaluation(
            card=c,
            memory_limit_mb=memory_limit,
            round_seconds=predicted_round_seconds(
                c, device, local_steps=local_steps, eval_samples=eval_samples
            ),
            time_limit_seconds=time_limit,
        )
        for c in cards
    ]
    # Largest first; equal size -> faster round first; then by name for determinism.
    evaluations.sort(key=lambda e: (-e.card.size_proxy, e.round_seconds, e.card.backbone))
    chosen = next((e for e in evaluations if e.fits), None)
    lines = tuple(
        _line(e, device, memory_fraction, local_steps, eval_samples) + (" <- chosen" if e is chosen else "")
        for e in evaluations
    ) + excluded
    not_for_backend = f"; not trainable with {backend}: {', '.join(c.backbone for c in untrainable)}"

    if chosen is not None:
        skipped = [e.card.backbone for e in evaluations[: evaluations.index(chosen)]]
        reason = f"{chosen.card.backbone}: largest backbone that fits; {_needs(chosen, memory_fraction)}"
        if skipped:
            reason += f"; larger backbones do not fit: {', '.join(skipped)}"
        if untrainable:
            reason += not_for_backend
        return Decision(agent_id=device.agent_id, backbone=chosen.card.backbone, reason=reason, lines=lines)

    smallest = min(evaluations, key=lambda e: (e.card.size_proxy, e.round_seconds, e.card.backbone))
    shortfalls = []
    if not smallest.memory_ok:
        needed_budget = smallest.card.peak_train_rss_mb / memory_fraction
        shortfalls.append(f"a memory budget of at least {_num(needed_budget)} MB")
    if not smallest.time_ok and smallest.time_limit_seconds is not None:
        needed_gflops = device.gflops * smallest.round_seconds / smallest.time_limit_seconds
        shortfalls.append(f"at least {_num(needed_gflops)} GFLOP/s (device has {device.gflops:g})")
    reason = (
        f"refused: no backbone fits; the smallest, {smallest.card.backbone}, "
        f"{_needs(smallest, memory_fraction)}; it would take {' and '.join(shortfalls)}"
    )
    if untrainable:
        reason += not_for_backend
    return Decision(agent_id=device.agent_id, backbone=None, reason=reason, lines=lines)


def cost_card_of(manifest: BundleManifest, backend: str = DEFAULT_COST_BACKEND) -> CostCard:
    """The assignment view of a bundle's cost card for ``backend`` (its ORT card if it has none for it; the
    result's ``backend`` says which). Measured at export, see export/bundle.py."""
    card = manifest.cost_card_for(backend)
    if card is None:
        raise ValueError(f"bundle for {manifest.backbone} has no cost card; rebuild it with costs")
    return CostCard(backbone=manifest.backbone, peak_train_rss_mb=card.peak_train_rss_mb,
                    step_seconds=card.step_seconds, eval_seconds_per_sample=card.eval_seconds_per_sample,
                    flops_per_step=card.flops_per_step, payload_bytes=card.payload_bytes,
                    bundle_bytes=card.bundle_bytes, builder_gflops=card.builder_gflops,
                    layers=manifest.layers, hidden=manifest.hidden, backend=manifest.cost_card_backend(backend),
                    trainable_by=trainable_backends(manifest))


def trainable_backends(manifest: BundleManifest) -> tuple[str, ...]:
    """The trainer backends a bundle carries what they need for: ORT (the tar itself), every backend a part is for,
    and every backend it has a card for (a card was measured by training it, so that backend can)."""
    backends = {b for part in manifest.parts.values() for b in part.backends} | set(manifest.cost_card_by_backend)
    return (DEFAULT_COST_BACKEND, *sorted(backends - {DEFAULT_COST_BACKEND}))


def cost_cards_of(manifest: BundleManifest) -> list[CostCard]:
    """Every card of a bundle: the ORT card, then one per other backend it was measured with (by name).

    The engine and ``assign --explain`` hold all of them and let ``assign_backbone`` pick by device backend.
    """
    others = sorted(b for b in manifest.cost_card_by_backend if b != DEFAULT_COST_BACKEND)
    return [cost_card_of(manifest), *(cost_card_of(manifest, b) for b in others)]
