"""A method's own rule plus public-set anchoring: the fleet (or each backbone group) averages its devices'
representations of a shared public set, and every device then pulls its own towards that mean.

Why: the design search found the DeMA experts carry nothing between backbones, and the pilot measured the two
groups' expert updates nearly orthogonal: each backbone's W_in maps inputs to its own corner of the r-space, so
"the same expert" sees different things on different backbones. Anchoring asks the r-space itself to agree,
sample by sample: the same public input should land on the same point on every backbone. Unlike fedproto's class
prototypes it needs no labels, and unlike distillation it acts on the space the shared experts work in. The
anchors travel as far as the run's scope says (with_public_table.py): fleet-wide is the cross-model design,
per group its fair baseline.
"""

from __future__ import annotations

import numpy as np

from coordinator.aggregation.base import ClientUpdate, Strategy
from coordinator.aggregation.with_public_table import WithPublicTable, table_of
from protocols.anchors import ANCHOR_REPR


def checked_representations(update: ClientUpdate, shape: tuple[int, ...]) -> np.ndarray:
    """The update's representation table as float64 (finite, one row per public sample), or a ValueError."""
    return table_of(update, ANCHOR_REPR, shape, "public-set anchoring")


def with_anchors(inner: Strategy) -> WithPublicTable:
    """``inner`` on the model tensors; the anchors where the state keeps them (global, or per group)."""
    return WithPublicTable(inner, ANCHOR_REPR, "anchoring", checked_representations)
