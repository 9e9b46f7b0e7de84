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


def ort_session(model: Path, threads: int, optimize: str, profile: str = "") -> Any:
    """An InferenceSession with the package's settings (one thread, sequential); profiling to ``profile`` if given."""
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
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]), ort.__version__


def ort_runner(model: Path, threads: int, optimize: str) -> tuple[Callable[[dict[str, np.ndarray]], Any], str]:
    session, version = ort_session(model, threads, optimize)
    names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> Any:
        return session.run(["logits"], {n: feeds[n] for n in names})[0]

    return run, f"onnxruntime {version}"


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


def ort_profile(model: Path, one: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, Any]:
    """onnxruntime's own profiler on batch-1 runs: kernel milliseconds per run by operator type (after the
    session's graph optimisations, so fused operators show as such) and the run's total."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="heterotune-profile-") as tmp:
        session, version = ort_session(model, threads, "all", profile=os.path.join(tmp, "ort"))
        names = [i.name for i in session.get_inputs()]
        for _ in range(runs):
            session.run(["logits"], {n: one[n] for n in names})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    nodes: dict[str, int] = {}
    total = 0.0
    for event in events:
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
            op = str(event.get("args", {}).get("op_name", "?"))
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1000 / runs
            nodes[op] = nodes.get(op, 0) + 1
        elif event.get("cat") == "Session" and event.get("name") == "model_run":
            total += event["dur"] / 1000 / runs
    return {"runtime": f"onnxruntime {version}", "run_ms": total, "kernel_ms": by_op,
            "nodes": {op: n // runs for op, n in nodes.items()}}


def torch_profile(run: Callable[[dict[str, np.ndarray]], Any], one: dict[str, np.ndarray], runs: int
                  ) -> dict[str, Any]:
    """torch.profiler on batch-1 eager runs: self CPU milliseconds per run by aten operator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            run(one)
    by_op = {e.key: e.self_cpu_time_total / 1000 / runs for e in prof.key_averages()}
    return {"kernel_ms": by_op}


def gemm_rate(model: Path, rows: int, threads: int, iterations: int) -> dict[str, Any]:
    """Sustained fp32 GEMM rate of onnxruntime's MatMul (MLAS) on this core for one weight shape: the speed limit
    of the model's matrix products. CPU time of the calling thread (one thread: the kernel runs in it), so the
    machine's other load does not count."""
    session, version = ort_session(model, threads, "all")
    weight_rows = int(session.get_inputs()[0].shape[1])
    x = np.random.default_rng(0).standard_normal((rows, weight_rows)).astype(np.float32)
    (y,) = session.run(None, {"A": x})
    for _ in range(20):
        session.run(None, {"A": x})
    cpu = []
    for _ in range(iterations):
        start = time.thread_time()
        session.run(None, {"A": x})
        cpu.append(time.thread_time() - start)
    flops = 2 * rows * weight_rows * int(y.shape[1])
    return {"runtime": f"onnxruntime {version}", "gflops": flops / float(np.median(cpu)) / 1e9,
            "shape": [rows, weight_rows, int(y.shape[1])]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runner", choices=["ort", "torch", "gemm"], required=True)
    parser.add_argument("--profile", type=int, default=0, help="also profile this many batch-1 runs by operator")
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
    if args.runner == "gemm":
        print(json.dumps(gemm_rate(args.model, 64, args.threads, args.iterations)))
        return
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
    latencies, cpu = [], []
    for _ in range(args.iterations):
        start, start_cpu = time.perf_counter(), time.thread_time()
        run(one)
        latencies.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)  # one thread: the work runs in this thread
    run(many)
    start = time.perf_counter()
    for _ in range(args.batches):
        logits = run(many)
    elapsed = time.perf_counter() - start
    rows = int(next(iter(many.values())).shape[0])
    peak_rss = vm_hwm_mb()  # before any profiling session adds its own copy of the model
    profiled: dict[str, Any] = {}
    if args.profile:
        profiled = (ort_profile(args.model, one, args.threads, args.profile) if args.runner == "ort"
                    else torch_profile(run, one, args.profile))
    print(json.dumps({
        "profile": profiled, "cpu_p50_ms": 1000 * float(np.percentile(cpu, 50)), "runtime": runtime,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p95_ms": 1000 * float(np.percentile(latencies, 95)), "throughput_per_s": rows * args.batches / elapsed,
        "peak_rss_mb": peak_rss, "start_rss_mb": baseline, "load_seconds": load_seconds,
        "logits_batch16": np.asarray(logits, np.float32).tolist()}))


if __name__ == "__main__":
    main()
