"""How public-set anchoring's representations travel: one tensor name shared by agent, engine and rule.

Every device of a run holds the same small *public, unlabelled* set (P samples). After its local steps a device
sends its representation of every public sample, ``anchor.repr`` (float32 ``(P, r)``: the last DeMA adapter's
pooled z, in the r-space the shared experts work in); the coordinator averages them into the anchors it sends
back under the same name, and next round the device pulls its own representation of each public sample towards
that sample's anchor. Where the consensus distillation of protocols/distillation.py agrees on *predictions*,
anchoring agrees on *coordinates*: the same input should land on the same point of the r-space on every
backbone, which is what sharing the experts across backbones assumes.
"""

from __future__ import annotations

ANCHOR_REPR = "anchor.repr"
# A sample without a label (a public sample in a training batch): cross-entropy's ignore index, so it adds no
# cross-entropy and no prototype pull and trains only through its anchor (export/dema/model.py `training_loss`).
NO_LABEL = -100


def is_anchor_name(name: str) -> bool:
    return name == ANCHOR_REPR


def anchor_shapes(public_samples: int, rank: int) -> dict[str, tuple[int, ...]]:
    """The anchoring tensors of a run with ``public_samples`` public samples and r-space ``rank`` (none when it
    has no public set)."""
    return {ANCHOR_REPR: (public_samples, rank)} if public_samples > 0 else {}
