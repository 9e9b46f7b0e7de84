"""Numerical yardsticks the agreement tests share: one definition of "relative difference" and of the AdamW step
ORT's training graph implements, so every backend comparison measures the same thing."""

from __future__ import annotations

import numpy as np


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (in float64): the tensor-level relative difference the issues ask for."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max()) / max(float(np.abs(b64).max()), 1e-12)


def hf_adamw_first_step(param: np.ndarray, grad: np.ndarray, lr: float, eps: float = 1e-6,
                        betas: tuple[float, float] = (0.9, 0.999)) -> np.ndarray:
    """One HF-style AdamW step from zero moments (eps added to sqrt(v) before bias correction), written out by hand."""
    g = grad.astype(np.float64)
    m = (1 - betas[0]) * g
    v = (1 - betas[1]) * g * g
    step_size = lr * np.sqrt(1 - betas[1]) / (1 - betas[0])
    return (param - step_size * m / (np.sqrt(v) + eps)).astype(np.float32)
