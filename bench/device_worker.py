"""One device-cost measurement in a process of its own: ORT training graph or the same model in PyTorch.

    python -m bench.device_worker --framework ort|torch --bundle-dir DIR [--threads 1] [--steps 10] ...

Prints one JSON object: RSS after imports, set-up time, per-step times and peak RSS (VmHWM, which starts
afresh at exec, so the parent's memory never leaks into the number). The ORT path imports no torch (it goes
through the agent's import shim); the PyTorch path builds `export.dema.AdapterClassifier` from the same
catalog entry and DeMA config as the bundle and trains it with `torch.optim.AdamW(eps=1e-6,
weight_decay=0)`, the HF-style hyper-parameters of ORT's AdamW block.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import peak_rss_mb, rss_mb

# ORT session-option variants for finding out where ORT's time or memory goes.
# (The default level already is ORT_ENABLE_ALL.)
ORT_VARIANTS = ("default", "no-arena", "no-mem-pattern", "opt-basic", "opt-disabled")


def _batch(seed: int, batch_size: int, seq_len: int, num_classes: int) -> Any:
    """Full-length random tokens (no padding): the worst case at the bundle's batch and sequence length."""
    from edge_agent.trainers.base import Batch

    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 29000, size=(batch_size, seq_len), dtype=np.int64)
    ids[:, 0] = 101  # [CLS]
    labels = rng.integers(0, num_classes, size=batch_size, dtype=np.int64)
    return Batch((ids, np.ones_like(ids)), labels)


def _session_options(threads: int, variant: str) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if variant == "no-arena":
        options.enable_cpu_mem_arena = False
    elif variant == "no-mem-pattern":
        options.enable_mem_pattern = False
    elif variant == "opt-basic":
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    elif variant == "opt-disabled":
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif variant != "default":
        raise ValueError(f"unknown ORT variant '{variant}'; choose one of {', '.join(ORT_VARIANTS)}")
    return options


def run_ort(bundle_dir: Path, *, threads: int, steps: int, warmup: int, variant: str) -> dict[str, Any]:
    from edge_agent.ort_api import load_training_api
    from edge_agent.trainers.ort import OrtTrainer
    from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

    api = load_training_api()
    manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
    task = manifest.task
    base = rss_mb()
    trainer = OrtTrainer(bundle_dir, threads=threads)
    if variant != "default":  # same calls as OrtTrainer.start_round, with other session options
        trainer._session_options = lambda: _session_options(threads, variant)  # type: ignore[method-assign]
    t0 = time.perf_counter()
    trainer.start_round({}, learning_rate=1e-4)
    setup_s = time.perf_counter() - t0
    after_setup = rss_mb()
    batches = [_batch(i, task.batch_size, task.max_length, len(task.labels)) for i in range(warmup + steps)]
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        trainer.train_step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    # What a later round pays: the full reload (what the agent does today) versus writing only the values.
    shared = [t.name for t in manifest.tensors]
    values = trainer.read_tensors(shared)
    t0 = time.perf_counter()
    trainer.start_round(values, learning_rate=1e-4)
    reload_s = time.perf_counter() - t0
    params = trainer._state.parameters
    t0 = time.perf_counter()
    for name, value in values.items():
        params[name].data = value
    write_only_s = time.perf_counter() - t0
    del api
    return {"base_rss_mb": base, "after_setup_rss_mb": after_setup, "setup_s": setup_s, "step_s": times,
            "peak_rss_mb": peak, "reload_s": reload_s, "write_only_s": write_only_s,
            "torch_imported": "torch" in sys.modules}


def run_torch(bundle_dir: Path, *, threads: int, steps: int, warmup: int) -> dict[str, Any]:
    import torch
    from torch.nn import functional as F

    from export.catalog import get_backbone
    from export.dema import AdapterClassifier, DemaConfig
    from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

    torch.set_num_threads(max(1, threads))
    manifest = BundleManifest.model_validate_json((bundle_dir / MANIFEST_NAME).read_text())
    task = manifest.task
    base = rss_mb()
    t0 = time.perf_counter()
    model = AdapterClassifier(get_backbone(manifest.backbone), DemaConfig(**manifest.dema), len(task.labels))
    model.train()  # dropout is p=0 in the catalog's backbones, as in the exported training graph
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, eps=1e-6, weight_decay=0.0)
    setup_s = time.perf_counter() - t0
    after_setup = rss_mb()
    batches = [_batch(i, task.batch_size, task.max_length, len(task.labels)) for i in range(warmup + steps)]
    times = []
    for i, batch in enumerate(batches):
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        labels = torch.from_numpy(batch.labels)
        start = time.perf_counter()
        loss = F.cross_entropy(model(ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"base_rss_mb": base, "after_setup_rss_mb": after_setup, "setup_s": setup_s, "step_s": times,
            "peak_rss_mb": peak_rss_mb(), "trainable_params": sum(p.numel() for p in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--framework", choices=("ort", "torch"), required=True)
    parser.add_argument("--bundle-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", default="default", choices=ORT_VARIANTS)
    args = parser.parse_args()
    if args.framework == "ort":
        result = run_ort(args.bundle_dir, threads=args.threads, steps=args.steps, warmup=args.warmup,
                         variant=args.variant)
    else:
        result = run_torch(args.bundle_dir, threads=args.threads, steps=args.steps, warmup=args.warmup)
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
