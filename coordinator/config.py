"""Run configuration: one TOML file says what to train, on which backbones, how, and for how long.

Validated with pydantic so a typo or an impossible value fails at start with the field named, instead of
hours into a run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coordinator.aggregation import STRATEGY_NAMES
from coordinator.assignment import DEFAULT_MEMORY_FRACTION
from coordinator.privacy import PrivacyPlan, plan
from protocols.tensor_codec import Encoding


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    name: str = "tweet-sentiment"
    labels: tuple[str, ...] = ("negative", "neutral", "positive")
    max_length: int = Field(64, ge=8, le=512)
    batch_size: int = Field(16, ge=1, le=1024)


class DemaSettings(_Strict):
    rank: int = Field(64, ge=4)
    slots: int = Field(3, ge=1)
    experts: int = Field(4, ge=1)
    private_experts: int = Field(0, ge=0)  # never sent (scope "local"); see export/dema/config.py
    seed: int = 0


class PrivacySettings(_Strict):
    """``[privacy]``: client-level DP (coordinator/privacy.py, docs/privacy.md). Absent = no DP."""

    clip_norm: float = Field(gt=0)  # C: each device's delta over the travelling tensors is clipped to this L2 norm
    target_epsilon: float = Field(gt=0)  # the run's budget: it refuses to start (or resume) if it would spend more
    delta: float = Field(1e-5, gt=0, lt=1)
    # z: noise std on each group's sum of clipped deltas is z * C. Unset = the smallest z that fits the budget.
    noise_multiplier: float | None = Field(None, gt=0)
    population: int = Field(ge=1)  # devices the rounds select from (agents_per_round of them; all when unset)
    # The Gaussian noise's seed. Unset (the default, and the only private choice) = drawn fresh by the coordinator
    # at start; set it only to reproduce a benchmark: anyone who knows it can subtract the noise.
    noise_seed: int | None = Field(None, ge=0)


class ExchangeSettings(_Strict):
    """``[exchange]``: how tensors travel (protocols/tensor_codec.py, docs/wire-encodings.md). Both directions (the
    updates up, the aggregates down) use it; the coordinator decodes to fp32 before validation and aggregation."""

    encoding: Encoding = "fp32"


# Methods whose every travelling tensor is model weights the DP decorator can clip and average.
PRIVATE_METHODS = ("heterotune", "heterotune-noalign", "group-fedavg")


class RunConfig(_Strict):
    run_name: str = "run"
    method: str = "heterotune"
    method_options: dict[str, Any] = Field(default_factory=dict)
    # fedproto's lambda: the weight of the pull towards the global class prototypes (FedProto's default is 1).
    prototype_weight: float = Field(1.0, ge=0)
    # Any other method can exchange prototypes and train with that pull too (the shared adapters keep their rule).
    share_prototypes: bool = False
    # Consensus distillation (coordinator/aggregation/with_distillation.py): every device holds the same
    # `public_samples` unlabelled samples and takes `distill_steps` steps a round on the consensus's labels.
    distill_steps: int = Field(0, ge=0)
    public_samples: int = Field(0, ge=0)
    # Re-weight the consensus to each device's own label mix before taking its labels (keeps the head's prior).
    distill_local_prior: bool = False
    # Distil only on this fraction of the public set: the samples the consensus is most confident about.
    distill_confident_fraction: float = Field(1.0, gt=0, le=1)
    # Public-set anchoring (coordinator/aggregation/with_anchors.py): `anchor_steps` steps a round pulling each
    # public sample's representation towards the fleet's mean representation of it, at weight `anchor_weight`.
    anchor_steps: int = Field(0, ge=0)
    anchor_weight: float = Field(1.0, gt=0)
    backbones: tuple[str, ...] = ("minilm-l3", "minilm-l6")
    task: TaskConfig = TaskConfig()
    dema: DemaSettings = DemaSettings()
    scopes: dict[str, str] = Field(default_factory=dict)  # family -> global | group | local
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(20, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    min_agents: int = Field(1, ge=1)  # rounds start once this many agents have joined
    join_timeout_s: float = Field(300.0, gt=0)
    round_timeout_s: float = Field(600.0, gt=0)
    # Selection (docs/design.md "Round engine"): aim for `agents_per_round` reports (None = every live agent), invite
    # `over_selection` times as many, close the round at the target; stragglers past the deadline are ignored.
    agents_per_round: int | None = Field(None, ge=1)
    over_selection: float = Field(1.3, ge=1.0, le=5.0)
    min_fraction: float = Field(1.0, gt=0, le=1)  # of the target that must be accepted for a round to count
    max_round_attempts: int = Field(3, ge=1)  # an abandoned round is retried with the same id this often
    memory_fraction: float = Field(DEFAULT_MEMORY_FRACTION, gt=0, le=1)
    max_update_norm: float = Field(1e4, gt=0)
    # Relative norm bound (coordinator/report_checks.py): an update whose L2 norm exceeds this many times the
    # median norm of its group's updates in the same round is rejected (groups of 3 or more updates).
    relative_norm_factor: float = Field(3.0, ge=1.0)
    # Robust aggregation (coordinator/aggregation/robust.py): "mean" (the rule's sample-weighted mean), or the
    # coordinate-wise "median" / "trimmed_mean" (trimming `trim_fraction` at each end) of each group's updates.
    robust_rule: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    # Admission on a plain broker (coordinator/admission.py): only these agent ids may join (None: any id).
    allowed_agents: tuple[str, ...] | None = None
    seed: int = 0
    # Operator pinning: agent id -> backbone. The device must still fit it, or it is refused with the reason.
    pinned: dict[str, str] = Field(default_factory=dict)
    privacy: PrivacySettings | None = None
    exchange: ExchangeSettings = ExchangeSettings()

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in STRATEGY_NAMES:
            raise ValueError(f"unknown method '{value}'; choose one of {', '.join(STRATEGY_NAMES)}")
        return value

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from export.catalog import CATALOG

        unknown = [b for b in value if b not in CATALOG]
        if unknown or not value:
            raise ValueError(f"unknown backbone(s) {unknown}; catalogued: {', '.join(CATALOG)}")
        modalities = {CATALOG[b].modality: b for b in value}
        if len(modalities) > 1:
            raise ValueError(f"backbones mix modalities ({', '.join(f'{m}: {b}' for m, b in modalities.items())}); "
                             "one run trains one task, so list only text or only image backbones")
        return value

    @model_validator(mode="after")
    def _pins_are_catalogued(self) -> RunConfig:
        stray = {a: b for a, b in self.pinned.items() if b not in self.backbones}
        if stray:
            raise ValueError(f"pinned backbones must be among the run's backbones {list(self.backbones)}: {stray}")
        return self

    @model_validator(mode="after")
    def _public_exchange_has_public_data(self) -> RunConfig:
        for option, steps in (("distill_steps", self.distill_steps), ("anchor_steps", self.anchor_steps)):
            if steps > 0 and self.public_samples == 0:
                raise ValueError(f"{option} needs a public set: set public_samples to the size of the public "
                                 f"file every device holds (or {option} = 0)")
        if self.distill_steps > 0 and self.anchor_steps > 0:
            raise ValueError("a run exchanges one table over its public set: set distill_steps (consensus "
                             "distillation) or anchor_steps (public-set anchoring), not both")
        return self

    @model_validator(mode="after")
    def _robust_rule_fits_the_method(self) -> RunConfig:
        if self.robust_rule != "mean" and (self.public_samples > 0 or self.share_prototypes
                                           or self.method == "fedproto"):
            raise ValueError(f"robust_rule {self.robust_rule!r} estimates adapter tensors only; runs that exchange "
                             "prototypes or a public-set table use robust_rule = \"mean\"")
        return self

    @model_validator(mode="after")
    def _privacy_budget_fits(self) -> RunConfig:
        """Refuse a private run whose planned rounds exhaust its budget before anything starts."""
        if self.privacy is None:
            return self
        if self.method not in PRIVATE_METHODS or self.share_prototypes or self.distill_steps or self.anchor_steps:
            raise ValueError(f"privacy clips and noises model updates only: use method = one of {PRIVATE_METHODS} "
                             "without share_prototypes, distill_steps or anchor_steps (their tables would travel "
                             "without noise)")
        if self.robust_rule != "mean":
            raise ValueError(f"privacy's noise is calibrated to the mean of clipped updates; robust_rule "
                             f"{self.robust_rule!r} changes that sensitivity: use robust_rule = \"mean\" with "
                             "[privacy]")
        privacy_plan(self)
        return self

    @field_validator("scopes")
    @classmethod
    def _valid_scopes(cls, value: dict[str, str]) -> dict[str, str]:
        from export.dema.config import resolve_scopes

        resolve_scopes(value)
        return value


def privacy_plan(config: RunConfig) -> PrivacyPlan | None:
    """The run's DP plan (noise multiplier, planned epsilon), or None without ``[privacy]``; raises
    PrivacyBudgetError naming the fields when the planned rounds exhaust the budget."""
    p = config.privacy
    if p is None:
        return None
    return plan(clip_norm=p.clip_norm, target_epsilon=p.target_epsilon, delta=p.delta, population=p.population,
                per_round=config.agents_per_round or p.population, rounds=config.rounds,
                noise_multiplier=p.noise_multiplier)


def load_config(path: Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML run configuration, apply command-line overrides, and validate everything."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config({**raw, **(overrides or {})}, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {summarise_validation(exc)}") from None


def summarise_validation(exc: ValidationError, message: Callable[[Any], str] = lambda err: str(err["msg"])) -> str:
    """Every problem of a pydantic validation on one line, each with its field path, for file-level errors."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {message(err)}"
                     for err in exc.errors())
