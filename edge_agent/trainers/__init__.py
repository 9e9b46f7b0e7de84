"""Trainer backends: ONNX Runtime Training where it installs, PyTorch as the fallback (issue 6)."""

from edge_agent.trainers.base import Batch, EvalResult, TrainerBackend

__all__ = ["Batch", "EvalResult", "TrainerBackend"]
