"""ONNX Runtime Training backend: trains a bundle's exported graphs, no torch on the device.

Each round reloads the shipped base checkpoint rather than reusing the last state: a new Optimizer on an old
state keeps the Adam moments (reference/ort-training.md §5), and a clean reload is the one reliable reset.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.ort_api import load_training_api
from edge_agent.trainers.base import (
    Batch,
    EvalResult,
    accumulate,
    anchor_inputs,
    checked_prototypes,
    prototype_shape,
    zero_prototypes,
)


class OrtTrainer:
    name = "ort"

    def __init__(self, bundle_dir: Path, *, threads: int = 0) -> None:
        self._api = load_training_api()
        self._dir = bundle_dir
        self._threads = threads
        self._state: Any = None
        self._module: Any = None
        self._optimizer: Any = None
        self._prepared = False
        self._prototypes: tuple[np.ndarray, np.ndarray] | None = None
        self._prototype_shape: tuple[int, int] | None = None

    def _session_options(self) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if self._threads > 0:
            options.intra_op_num_threads = self._threads
            options.inter_op_num_threads = 1
        return options

    def prepare(self) -> None:
        """Load a fresh session now, so the next start_round only writes values.

        Rebuilding the session (checkpoint reload, Module) took 97 % of the demo's round overhead when done after
        the assignment arrived (docs/performance.md); the agent calls this right after uploading, while it waits.
        """
        api = self._api
        # Drop the previous round's sessions before loading new ones, or two copies coexist at the peak.
        self._optimizer = self._module = self._state = None
        _release_memory()
        self._state = api.CheckpointState.load_checkpoint(str(self._dir / "checkpoint"))
        # The Module must exist before any parameter is written: writing into a bare state segfaults.
        self._module = api.Module(str(self._dir / "training_model.onnx"), self._state,
                                  str(self._dir / "eval_model.onnx"), session_options=self._session_options())
        self._prepared = True

    def start_round(self, tensors: Mapping[str, np.ndarray], learning_rate: float) -> None:
        api = self._api
        if not self._prepared:
            self.prepare()
        self._prepared = False  # this session now carries this round's values and moments
        params = self._state.parameters
        for name, value in tensors.items():
            target = params[name]
            if tuple(target.data.shape) != tuple(value.shape):
                raise ValueError(f"tensor '{name}' has shape {value.shape}, the bundle expects "
                                 f"{tuple(target.data.shape)}; the update does not belong to this bundle")
            target.data = np.ascontiguousarray(value, dtype=np.float32)
        self._optimizer = api.Optimizer(str(self._dir / "optimizer_model.onnx"), self._module)
        self._optimizer.set_learning_rate(float(learning_rate))
        self._prototypes = zero_prototypes(self._prototype_input_shape())

    def set_prototypes(self, prototypes: np.ndarray, weights: np.ndarray) -> None:
        self._require_module()
        self._prototypes = checked_prototypes(prototypes, weights, self._prototype_input_shape())

    def train_step(self, batch: Batch) -> float:
        loss = self.forward_backward(batch)
        self.optimizer_step()
        return loss

    def evaluate(self, batches: Iterable[Batch]) -> EvalResult:
        module = self._require_module()
        module.eval()

        def outputs() -> Iterator[tuple[float, np.ndarray, np.ndarray]]:
            for b in batches:
                loss, logits, _representation = module(*self._feeds(b, pull=False))
                yield float(loss), np.asarray(logits), b.labels

        return accumulate(outputs())

    def predict(self, batches: Iterable[Batch]) -> np.ndarray:
        return self._eval_output(batches, 1)

    def represent(self, batches: Iterable[Batch]) -> np.ndarray:
        return self._eval_output(batches, 2)

    def _eval_output(self, batches: Iterable[Batch], index: int) -> np.ndarray:
        """One eval-graph output (1 = logits, 2 = representation) for every example, concatenated."""
        module = self._require_module()
        module.eval()
        parts = [np.array(module(*self._feeds(b, pull=False))[index], dtype=np.float32) for b in batches]
        if parts:
            return np.concatenate(parts)
        classes, rank = self._prototype_input_shape()
        return np.zeros((0, classes if index == 1 else rank), np.float32)

    def read_tensors(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        self._require_module()
        params = self._state.parameters
        return {n: np.array(params[n].data, dtype=np.float32, copy=True) for n in names}

    def read_gradients(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Accumulated gradients (before the next reset); used to check agreement with PyTorch."""
        params = self._state.parameters
        return {n: np.array(params[n].grad, dtype=np.float32, copy=True) for n in names}

    def forward_backward(self, batch: Batch) -> float:
        """Loss with gradients accumulated but no optimizer step (train_step, and the agreement test)."""
        module = self._require_module()
        module.train()
        loss, _logits, _representation = module(*self._feeds(batch))
        return float(loss)

    def optimizer_step(self) -> None:
        self._optimizer.step()
        self._require_module().lazy_reset_grad()

    def _feeds(self, batch: Batch, *, pull: bool = True) -> tuple[np.ndarray, ...]:
        """The graphs' inputs in order: the model's, labels, prototypes [classes, r], prototype weights, anchors
        [B, r], anchor weights [B]. Without ``pull`` the weights are zero: an evaluation's loss is cross-entropy
        alone, the pulls are training terms."""
        assert self._prototypes is not None  # set by start_round, which _require_module has checked
        prototypes, weights = self._prototypes
        anchors = anchor_inputs(batch, self._prototype_input_shape()[1], pull=pull)
        return (*batch.inputs, batch.labels, prototypes, weights if pull else np.zeros_like(weights), *anchors)

    def _prototype_input_shape(self) -> tuple[int, int]:
        """(classes, r) of the graphs' prototype inputs, from the checkpoint's head and W_in (read once)."""
        if self._prototype_shape is None:
            params = self._state.parameters
            names = ["head.weight", *(name for name, _ in params if name.endswith(".w_in.weight"))]
            self._prototype_shape = prototype_shape({name: tuple(params[name].data.shape) for name in names})
        return self._prototype_shape

    def _require_module(self) -> Any:
        if self._module is None:
            raise RuntimeError("start_round() must be called before training or evaluating")
        return self._module


def _release_memory() -> None:
    """Return freed session memory to the OS.

    Without this, glibc keeps the previous round's freed buffers fragmented and a MiniLM-L6 agent's peak RSS
    grew 351 -> 464 MB over five rounds (measured); with it the peak stays at 351-362 MB.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
