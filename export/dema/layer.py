"""One DeMA block, exactly as docs/design.md writes it.

    z  = GELU(W_in · LN(h))                  group
    g  = softmax(W_g · z)                    global (dense gate: all experts active)
    y  = sum_e g_e · B_e · GELU(A_e · z)     global
       + sum_p B_p · GELU(A_p · z)          local (private experts, none by default; ungated)
    h' = h + W_out · y                       group, zero-initialised so the start equals the frozen backbone
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from export.dema.config import DemaConfig


class Expert(nn.Module):
    """A q-wide bottleneck inside the shared r-space (A_e: q x r, B_e: r x q)."""

    def __init__(self, rank: int, expert_rank: int) -> None:
        super().__init__()
        self.a = nn.Linear(rank, expert_rank, bias=False)
        self.b = nn.Linear(expert_rank, rank, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.b(F.gelu(self.a(z)))


class DemaAdapter(nn.Module):
    """Residual adapter whose middle (gate + experts) lives in a backbone-independent r-space."""

    def __init__(self, hidden: int, config: DemaConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.w_in = nn.Linear(hidden, config.rank)
        self.w_g = nn.Linear(config.rank, config.experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.rank, config.expert_rank) for _ in range(config.experts))
        self.private = nn.ModuleList(Expert(config.rank, config.expert_rank) for _ in range(config.private_experts))
        self.w_out = nn.Linear(config.rank, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mix(h, self.project(h))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """z: the token's point in the shared r-space (what FedProto's prototypes are means of)."""
        return F.gelu(self.w_in(self.ln(h)))

    def mix(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = torch.softmax(self.w_g(z), dim=-1)
        y = sum(gate[..., e : e + 1] * expert(z) for e, expert in enumerate(self.experts))
        for expert in self.private:  # none by default: then the graph is exactly the one without the option
            y = y + expert(z)
        return h + self.w_out(y)
