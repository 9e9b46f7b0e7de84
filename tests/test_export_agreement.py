"""ORT Training and PyTorch agree on one step of an exported DeMA model with real pretrained weights.

Every trainable tensor starts from random non-zero values (W_out = 0 would block all upstream gradients and
make most comparisons trivially 0 == 0). The reference optimizer is the Hugging Face AdamW that ORT's
training graph implements (eps added to sqrt(v) before bias correction, eps = 1e-6, no weight decay).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.trainers.base import Batch
from edge_agent.trainers.ort import OrtTrainer
from export.catalog import get_backbone
from export.dema import AdapterClassifier, DemaConfig
from export.onnx_export import MAX_IR_VERSION, export_onnx, generate_training_artifacts
from tests.numerics import hf_adamw_first_step, rel_diff

LR = 1e-3
RTOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterClassifier, Path]:
    torch.manual_seed(0)
    model = AdapterClassifier(get_backbone("minilm-l3"), DemaConfig(), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("artifacts")
    proto = export_onnx(model, out / "model.onnx", batch_size=2, seq_len=16)
    generate_training_artifacts(model, proto, out)
    return model, out


def test_every_graph_is_loadable_by_ort_1_19(exported: tuple[AdapterClassifier, Path]) -> None:
    import onnx

    _, out = exported
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        assert onnx.load(str(out / name)).ir_version <= MAX_IR_VERSION


def test_ort_matches_pytorch_on_one_step(exported: tuple[AdapterClassifier, Path]) -> None:
    model, out = exported
    rng = np.random.default_rng(1)
    ids = rng.integers(1000, 29000, size=(4, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 15:] = 0
    mask[3, 9:] = 0
    labels = np.array([0, 2, 1, 2], dtype=np.int64)

    names = model.trainable_names()
    start = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}

    model.zero_grad()
    logits = model(torch.from_numpy(ids), torch.from_numpy(mask))
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    torch_loss.backward()
    torch_grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()
                   if p.requires_grad and p.grad is not None}

    trainer = OrtTrainer(out)
    trainer.start_round(start, learning_rate=LR)
    ort_loss = trainer.forward_backward(Batch((ids, mask), labels))
    ort_grads = trainer.read_gradients(names)
    trainer.optimizer_step()
    ort_after = trainer.read_tensors(names)

    assert abs(ort_loss - float(torch_loss.detach())) <= RTOL * abs(float(torch_loss.detach()))
    worst_grad = max(names, key=lambda n: rel_diff(ort_grads[n], torch_grads[n]))
    assert rel_diff(ort_grads[worst_grad], torch_grads[worst_grad]) <= RTOL, worst_grad
    for n in names:
        assert np.abs(torch_grads[n]).max() > 0, f"{n} got no gradient; the test would be vacuous"
        expected = hf_adamw_first_step(start[n], torch_grads[n], LR)
        assert rel_diff(ort_after[n] - start[n], expected - start[n]) <= 1e-3, n
        assert rel_diff(ort_after[n], expected) <= RTOL, n
