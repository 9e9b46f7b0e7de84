"""One inference measurement in its own process (so its peak RSS is its own): load one model, run batch-1 latency
and batch-16 throughput on fixed inputs, print one JSON line.

Standalone on purpose: the plain-onnxruntime variants run it with a separate venv's python that has only
onnxruntime and numpy (no torch, no training package, not this repository's dependencies). The PyTorch variant
imports the repository's exporter (run from the repository root with the builder venv).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ort_runner(model: Path, threads: int, optimize: str) -> tuple[Callable[[dict[str, np.ndarray]], Any], str]:
    if "onnxruntime.training" not in sys.modules:  # the training build's probe would import its training modules
        import importlib.util
        import os
        import types

        spec = importlib.util.find_spec("onnxruntime")
        if spec is not None and spec.origin is not None:
            shim = types.ModuleType("onnxruntime.training")
            shim.__path__ = [os.path.join(os.path.dirname(spec.origin), "training")]
            sys.modules["onnxruntime.training"] = shim
            sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize == "all"
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> Any:
        return session.run(["logits"], {n: feeds[n] for n in names})[0]

    return run, f"onnxruntime {ort.__version__}"


def torch_runner(backbone: str, tensors: Path, classes: int, threads: int
                 ) -> tuple[Callable[[dict[str, np.ndarray]], Any], str]:
    import torch
    from safetensors.torch import load_file

    from export.catalog import get_backbone
    from export.dema import AdapterClassifier, DemaConfig

    torch.set_num_threads(threads)
    model = AdapterClassifier(get_backbone(backbone), DemaConfig(), classes)
    trained = load_file(str(tensors))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in trained:
                param.copy_(trained[name])
    model.eval()

    def run(feeds: dict[str, np.ndarray]) -> Any:
        with torch.inference_mode():
            if "pixel_values" in feeds:
                return model(torch.from_numpy(feeds["pixel_values"])).numpy()
            return model(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()

    return run, f"torch {torch.__version__} eager"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runner", choices=["ort", "torch"], required=True)
    parser.add_argument("--model", type=Path, help="ONNX graph (ort)")
    parser.add_argument("--optimize", default="all", choices=["all", "basic"])
    parser.add_argument("--backbone", default="")
    parser.add_argument("--tensors", type=Path, help="trained tensors (torch)")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--inputs", type=Path, required=True, help=".npz with batch1_* and batch16_* arrays")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    baseline = vm_hwm_mb()
    load_start = time.perf_counter()
    if args.runner == "ort":
        run, runtime = ort_runner(args.model, args.threads, args.optimize)
    else:
        run, runtime = torch_runner(args.backbone, args.tensors, args.classes, args.threads)
    load_seconds = time.perf_counter() - load_start
    with np.load(args.inputs) as data:
        one = {k[len("batch1_"):]: data[k] for k in data.files if k.startswith("batch1_")}
        many = {k[len("batch16_"):]: data[k] for k in data.files if k.startswith("batch16_")}
    for _ in range(10):
        run(one)
    latencies = []
    for _ in range(args.iterations):
        start = time.perf_counter()
        run(one)
        latencies.append(time.perf_counter() - start)
    run(many)
    start = time.perf_counter()
    for _ in range(args.batches):
        logits = run(many)
    elapsed = time.perf_counter() - start
    rows = int(next(iter(many.values())).shape[0])
    print(json.dumps({
        "runtime": runtime, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)), "throughput_per_s": rows * args.batches / elapsed,
        "peak_rss_mb": vm_hwm_mb(), "start_rss_mb": baseline, "load_seconds": load_seconds,
        "logits_batch16": np.asarray(logits, np.float32).tolist()}))


if __name__ == "__main__":
    main()
