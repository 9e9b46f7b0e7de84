"""Part 2: device cost of one training step, ONNX Runtime Training versus PyTorch, per catalogued backbone.

For every backbone in `export.catalog.CATALOG`, at the run's batch and sequence length (the demo's task:
16 x 64 tokens), each framework trains in a process of its own (`bench.device_worker`), the two alternated
(ORT first in even repetitions, PyTorch first in odd ones) so a load spike on this shared machine hits both.
Reported: the median over repetitions of each run's median step time, and the median peak RSS (VmHWM).

Where ORT loses, a few ORT session variants (threads, memory arena, memory patterns, graph optimisation
level) run on the largest backbone, and one profiled run gives the share of time per operator type.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import REPO, log, median, python_env


def bundles_for(backbones: list[str]) -> dict[str, Path]:
    """The demo task's bundle directory per backbone (built once, then reused by recipe key)."""
    from coordinator.demo import demo_config
    from coordinator.runner import build_bundles

    config = demo_config().model_copy(update={"backbones": tuple(backbones)})
    return {name: bundle.directory for name, bundle in build_bundles(config).items()}


def _worker(framework: str, bundle_dir: Path, *, threads: int, steps: int, warmup: int, variant: str = "default",
            timeout_s: float = 300.0) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.device_worker", "--framework", framework, "--bundle-dir",
               str(bundle_dir), "--threads", str(threads), "--steps", str(steps), "--warmup", str(warmup)]
    if framework == "ort":
        command += ["--variant", variant]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=REPO, env=python_env(threads), capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed on {bundle_dir.name}: {proc.stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.monotonic() - started
    result["median_step_s"] = median(result["step_s"])
    return result


def compare(backbones: list[str], *, repetitions: int = 3, steps: int = 10, warmup: int = 3, threads: int = 1,
            time_limit_s: float = 900.0) -> dict[str, Any]:
    bundles = bundles_for(backbones)
    deadline = time.monotonic() + time_limit_s
    per_backbone: dict[str, Any] = {}
    for name in backbones:
        runs: dict[str, list[dict[str, Any]]] = {"ort": [], "torch": []}
        for rep in range(repetitions):
            if time.monotonic() > deadline:
                log(f"device cost: time limit reached; {name} has {rep} repetitions")
                break
            order = ("ort", "torch") if rep % 2 == 0 else ("torch", "ort")
            for framework in order:
                runs[framework].append(_worker(framework, bundles[name], threads=threads, steps=steps,
                                               warmup=warmup))
        per_backbone[name] = _summarise_pair(runs)
        log(f"device cost {name}: ORT {per_backbone[name]['ort']['step_s']:.3f} s / "
            f"{per_backbone[name]['ort']['peak_rss_mb']:.0f} MB, PyTorch {per_backbone[name]['torch']['step_s']:.3f} s"
            f" / {per_backbone[name]['torch']['peak_rss_mb']:.0f} MB")
    return {"threads": threads, "steps": steps, "warmup": warmup, "repetitions": repetitions,
            "bundles": {n: str(p) for n, p in bundles.items()}, "backbones": per_backbone}


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "step_s": median(r["median_step_s"] for r in runs),
        "step_s_runs": [r["median_step_s"] for r in runs],
        "peak_rss_mb": median(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_runs": [r["peak_rss_mb"] for r in runs],
        "base_rss_mb": median(r["base_rss_mb"] for r in runs),
        "setup_s": median(r["setup_s"] for r in runs),
        "runs": len(runs),
    }
    for key in ("reload_s", "write_only_s"):
        if runs and key in runs[0]:
            out[key] = median(r[key] for r in runs)
    if runs and "torch_imported" in runs[0]:
        out["torch_imported"] = any(r["torch_imported"] for r in runs)
    return out


def _summarise_pair(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    ort, torch = _summarise(runs["ort"]), _summarise(runs["torch"])
    return {"ort": ort, "torch": torch, "step_ratio": ort["step_s"] / torch["step_s"],
            "rss_ratio": ort["peak_rss_mb"] / torch["peak_rss_mb"],
            "growth_ratio": (ort["peak_rss_mb"] - ort["base_rss_mb"]) / (torch["peak_rss_mb"] - torch["base_rss_mb"])}


def investigate(backbone: str, *, repetitions: int = 2, steps: int = 6, warmup: int = 2,
                time_limit_s: float = 600.0) -> dict[str, Any]:
    """ORT session variants and thread counts against PyTorch on one backbone, alternated, plus a profile.

    The default ORT configuration is measured twice under two names: their difference is this run's noise
    floor. Each configuration is summarised by its fastest run (other load on a shared machine only ever
    slows a run down).
    """
    from bench.device_worker import ORT_VARIANTS

    bundle = bundles_for([backbone])[backbone]
    configs: list[tuple[str, str, str, int]] = [("torch/default/1", "torch", "default", 1),
                                                ("ort/default/1", "ort", "default", 1),
                                                ("ort/default-again/1", "ort", "default", 1)]
    configs += [(f"ort/{v}/1", "ort", v, 1) for v in ORT_VARIANTS if v != "default"]
    configs += [("torch/default/2", "torch", "default", 2), ("ort/default/2", "ort", "default", 2)]
    deadline = time.monotonic() + time_limit_s
    results: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repetitions):
        ordered = configs if rep % 2 == 0 else list(reversed(configs))
        for key, framework, variant, threads in ordered:
            if time.monotonic() > deadline:
                break
            results.setdefault(key, []).append(_worker(framework, bundle, threads=threads, steps=steps,
                                                       warmup=warmup, variant=variant))
    summary = {key: {**_summarise(runs), "fastest_step_s": min(r["median_step_s"] for r in runs)}
               for key, runs in results.items()}
    profile = profile_ort(bundle) if time.monotonic() < deadline else {}
    return {"backbone": backbone, "steps": steps, "repetitions": repetitions, "configs": summary,
            "profile": profile, "graph": graph_check(bundle), "load_average": list(os.getloadavg())}


def graph_check(bundle: Path) -> dict[str, Any]:
    """Does the training graph do more work than needed? Count its gradient operators against what a
    frozen backbone needs: activation gradients from the first adapter slot up, weight gradients only for
    the adapters and the head."""
    import onnx

    from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest

    manifest = BundleManifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
    graph = onnx.load(str(bundle / "training_model.onnx"), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    backward_blocks = manifest.layers - (min(manifest.slot_blocks) + 1)
    slots, experts = len(manifest.slot_blocks), manifest.dema["experts"] + manifest.dema.get("private_experts", 0)
    adapter_linears = slots * (3 + 2 * experts)  # w_in, w_g, w_out + two per expert (shared or private)
    return {
        "backward_blocks": backward_blocks,
        "layernorm_grads": ops["LayerNormalizationGrad"],
        "expected_layernorm_grads": 2 * backward_blocks + slots,
        "gradient_matmuls": ops["FusedMatMul"] + ops["Gemm"] - 1,  # the forward has one Gemm (the head)
        "expected_gradient_matmuls": 10 * backward_blocks + 2 * adapter_linears + 2,
        "forward_matmuls": ops["MatMul"] + 1,
    }


_PROFILE_SCRIPT = """
import json, sys, time
from pathlib import Path
import numpy as np
from edge_agent.ort_api import load_training_api
import onnxruntime
api = load_training_api()
bundle, prefix = Path(sys.argv[1]), sys.argv[2]
manifest = json.loads((bundle / "manifest.json").read_text())
task = manifest["task"]
options = onnxruntime.SessionOptions()
options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
options.enable_profiling, options.profile_file_prefix = True, prefix
state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
# no eval session, and the optimizer's session a second later: ORT names profile files by prefix + start
# second, so sessions started in the same second write over one another's file
module = api.Module(str(bundle / "training_model.onnx"), state, None, session_options=options)
time.sleep(1.1)
optimizer = api.Optimizer(str(bundle / "optimizer_model.onnx"), module)
rng = np.random.default_rng(0)
ids = rng.integers(1000, 29000, size=(task["batch_size"], task["max_length"])).astype(np.int64)
labels = rng.integers(0, len(task["labels"]), size=task["batch_size"]).astype(np.int64)
module.train()
for _ in range(4):
    module(ids, np.ones_like(ids), labels)
    optimizer.step()
    module.lazy_reset_grad()
"""


def _json_events(text: str) -> list[dict[str, Any]]:
    """The events of an ORT profile file; sessions created in the same second share one file name, so a
    file can hold several JSON arrays back to back (or a truncated tail, which is dropped)."""
    decoder, events, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        while pos < len(text) and text[pos] in " \r\n\t,":
            pos += 1
        if pos >= len(text):
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        events += value if isinstance(value, list) else [value]
    return [e for e in events if isinstance(e, dict)]


def profile_ort(bundle: Path, workdir: Path | None = None) -> dict[str, Any]:
    """One-thread ORT profile of 4 training steps: share of kernel time per operator type."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ort-profile-", dir=workdir) as tmp:
        prefix = str(Path(tmp) / "profile")
        proc = subprocess.run([sys.executable, "-c", _PROFILE_SCRIPT, str(bundle), prefix], cwd=REPO,
                              env=python_env(1), capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip()[-500:]}
        by_op: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for path in Path(tmp).glob("profile*.json"):
            for event in _json_events(path.read_text()):
                if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                    op = event.get("args", {}).get("op_name", "?")
                    by_op[op] += int(event.get("dur", 0))
                    calls[op] += 1
    total = sum(by_op.values()) or 1
    return {"total_kernel_ms": total / 1000,
            "ops": [{"op": op, "ms": us / 1000, "share": us / total, "calls": calls[op]}
                    for op, us in by_op.most_common(8)]}


if __name__ == "__main__":
    from bench.common import DEFAULT_OUT, write_json

    names = sys.argv[1:] or ["tiny-3"]
    outcome = compare(names, repetitions=2, steps=5, warmup=2)
    write_json(DEFAULT_OUT / "device_cost_dev.json", outcome)
    print(json.dumps({n: {k: v for k, v in b.items() if k.endswith("ratio")} for n, b in
                      outcome["backbones"].items()}, indent=2))
