"""Inference benchmark (issue 17): the exported DeMA model (fp32, int8, with and without onnxruntime's transformer
fusions) against PyTorch eager on the same model and inputs, side by side in one run, on the training package
(onnxruntime-training, the builder venv) and, when given, the plain onnxruntime package (a separate venv).

    .venv/bin/python -m bench.inference [--plain-python /path/to/venv-ort/bin/python] [--backbone minilm-l6]

The plain venv: `python3.11 -m venv venv-ort && venv-ort/bin/pip install onnxruntime numpy tokenizers pillow onnx
sympy` (onnx and sympy only for onnxruntime.transformers' fusion pass; never in the project's .venv).

The model is trained for one round by the agent's own LocalLearner on tweet sentiment (ORT backend), exported by
`edge_agent.model_export.export_tensors` (the code `edge-agent export` runs; int8 is measured there on the device's
test split), then every variant runs in its own process (bench/inference_worker.py): batch-1 p50/p95 latency and
batch-16 throughput at 64 tokens, one thread, peak RSS (VmHWM). Writes docs/inference-benchmark.md and
runs/bench-inference/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, fmt, git_commit, load_average, machine_facts, python_env, table

TOKENS = 64
HEADS = 12  # attention heads of the MiniLM backbones (L3 and L6), for the fusion pass
FUSED, FUSED_INT8 = "model.fused.onnx", "model.fused.int8.onnx"


def train_and_export(backbone: str, work: Path, steps: int) -> dict[str, Any]:
    from safetensors.numpy import save_file

    from coordinator.datasets import load_tweet_sentiment, write_fleet_data
    from edge_agent.data import Example, load_examples
    from edge_agent.inference_package import ModelCard
    from edge_agent.local_round import LocalLearner, RoundPlan
    from edge_agent.model_export import export_tensors
    from edge_agent.trainers.ort import OrtTrainer
    from export.assets import heterotune_home
    from export.bundle import BundleRecipe, TaskSpec, build_bundle

    labels = ("negative", "neutral", "positive")
    bundle = build_bundle(BundleRecipe(backbone, TaskSpec("tweet-sentiment", labels, TOKENS, 16)),
                          root=heterotune_home() / "bundles-uncosted", measure_cost=False, log=False)
    data = write_fleet_data(load_tweet_sentiment(max_samples=2000, seed=5), ["bench"], work / "data", alpha=100.0,
                            seed=5, global_per_class=60, max_per_client=1000)
    examples = load_examples(data.client_files["bench"], labels)
    learner = LocalLearner("bench", bundle.directory, bundle.manifest, OrtTrainer(bundle.directory, threads=1),
                           examples)
    started = time.perf_counter()
    outcome = learner.run_round(RoundPlan(round_id=1, local_steps=steps, batch_size=16, learning_rate=5e-3, seed=5,
                                          upload_names=()), {})
    train_seconds = time.perf_counter() - started
    test = [e for e in learner.test if isinstance(e, Example)]
    card = ModelCard(backbone=backbone, modality="text", labels=labels, max_length=TOKENS, image_size=0,
                     source="device", run_id="bench", rounds=1, method="local", bundle_sha=bundle.sha256,
                     agent_id="bench", backend="ort", training_samples=outcome.n_train,
                     metrics={"personal_accuracy": outcome.personal.accuracy})
    package = work / "package"
    card = export_tensors(bundle.directory, bundle.manifest, learner.kept, card, package, int8=True,
                          test=([e.text for e in test], [e.label for e in test]),
                          test_name="the device's own test split", threads=1)
    save_file(dict(learner.kept), str(work / "trained.safetensors"))
    return {"package": package, "card": card, "bundle": bundle, "train_seconds": train_seconds,
            "personal_accuracy": outcome.personal.accuracy, "test_texts": [e.text for e in test],
            "test_labels": [e.label for e in test], "hidden": bundle.manifest.hidden}


FUSE_SCRIPT = """
import collections, json, sys
from onnxruntime.transformers.optimizer import optimize_model
model = optimize_model(sys.argv[1], model_type="bert", num_heads=int(sys.argv[3]), hidden_size=int(sys.argv[4]),
                       opt_level=0)
model.save_model_to_file(sys.argv[2])
stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
print(json.dumps(stats))
"""


def fuse(package: Path, hidden: int, heads: int, python: str) -> dict[str, Any]:
    """onnxruntime.transformers' BERT fusions (attention, skip-LayerNorm, bias-GELU) on the merged graph, then int8
    of that. Python-only fusions (opt_level 0: higher levels import torch). Run with ``python``, which needs onnx
    beside onnxruntime (the training venv lacks coloredlogs, which the tool imports). Reported, not assumed: the
    max |delta logit| column shows whether the fused graph still computes the model."""
    from edge_agent.inference_graph import externalize_weights
    from edge_agent.model_export import quantize_int8

    proc = subprocess.run([python, "-c", FUSE_SCRIPT, str(package / "model.onnx"), str(package / FUSED), str(heads),
                           str(hidden)], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    inline = (package / FUSED).read_bytes()
    for name, graph in ((FUSED, inline), (FUSED_INT8, quantize_int8(inline))):
        structure, weights = externalize_weights(graph, name + ".data")  # stored like the package's own graphs
        (package / name).write_bytes(structure)
        (package / (name + ".data")).write_bytes(weights)
    fused: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fused_ops": fused}


def plain_backbone_fusions(backbone: str, work: Path, hidden: int, python: str) -> dict[str, Any]:
    """The same fusion pass on a plain export of the backbone + mean pool + linear head (torch.onnx, opset 17, no
    adapters, constant folding on): what the fuser finds when neither the DeMA adapters nor the training export's
    shape of the embeddings and mask are in the way, for comparison with the shipped graph's fusions."""
    import torch

    from export.catalog import get_backbone

    spec = get_backbone(backbone)

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = spec.load(), torch.nn.Linear(spec.hidden, 3)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            hidden_states = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden_states.dtype)
            return self.head((hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0))

    path = work / "plain-backbone.onnx"
    dummy = torch.ones(2, 16, dtype=torch.long)
    torch.onnx.export(Plain().eval(), (dummy, dummy), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                    "attention_mask": {0: "batch", 1: "sequence"}})
    proc = subprocess.run([python, "-c", FUSE_SCRIPT, str(path), str(work / "plain-backbone.fused.onnx"), str(HEADS),
                           str(hidden)], capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    fused: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fused_ops": fused}


def file_mb(graph: Path) -> float:
    """The graph file plus its external weights (model.onnx.data), as shipped."""
    data = graph.with_name(graph.name + ".data")
    return (graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)) / 1e6


def matmul_gflop(graph: Path, tokens: int, hidden: int) -> float:
    """GFLOP of the graph's matrix products for one sequence of ``tokens``: 2*T*k*n for every MatMul by a weight
    [k, n], 2*T*T*hidden for every MatMul of two activations (attention's Q.K^T and P.V, all heads together).
    Counted on the unfused graph as exported; everything else (LayerNorm, GELU, softmax, ...) is not counted."""
    from edge_agent.inference_graph import load_onnx

    model = load_onnx().load(str(graph), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    flops = 0
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = dims.get(node.input[1])
        flops += 2 * tokens * weight[-2] * weight[-1] if weight else 2 * tokens * tokens * hidden
    return flops / 1e9


def gemm_graph(path: Path, k: int, n: int) -> None:
    """One MatMul by a [k, n] weight (the FFN's shape), for the worker's GEMM-rate probe."""
    from edge_agent.inference_graph import load_onnx

    onnx = load_onnx()
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("C", onnx.TensorProto.FLOAT, ["m", n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "Attention", "aten::addmm", "aten::mm", "aten::bmm", "aten::matmul",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::baddbmm")


def profile_rows(profile: dict[str, Any], top: int = 6) -> tuple[list[tuple[str, float]], float, float]:
    """(the ``top`` operators by time, the matrix-product operators' total, the total), ms per run."""
    ops = sorted(profile.get("kernel_ms", {}).items(), key=lambda kv: -kv[1])
    gemm = sum(ms for op, ms in ops if op in GEMM_OPS)
    return ops[:top], gemm, sum(ms for _, ms in ops)


def make_inputs(package: Path, texts: list[str], path: Path) -> None:
    """batch 1 x 64 and batch 16 x 64 tokens of real tweets (repeated so every row fills the 64 tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(package / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=TOKENS)
    tokenizer.enable_padding(length=TOKENS, pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch([" ".join([t] * 8) for t in texts[:16]])
    ids = np.array([e.ids for e in encodings], np.int64)
    mask = np.array([e.attention_mask for e in encodings], np.int64)
    assert ids.shape == (16, TOKENS) and mask.all(), "every row should hold 64 real tokens"
    np.savez(path, batch1_input_ids=ids[:1], batch1_attention_mask=mask[:1], batch16_input_ids=ids,
             batch16_attention_mask=mask)


def measure(python: str, args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([python, str(REPO / "bench" / "inference_worker.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env=python_env(1), timeout=1800, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-600:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def plain_fusions(fusion: dict[str, Any]) -> str:
    plain = fusion.get("plain_backbone") or {}
    return str(plain.get("fused_ops", plain.get("error", "not measured")))


def fusion_reading(fusion: dict[str, Any]) -> str:
    """What the two fusion counts say, only when they say it (the same Attention and SkipLayerNormalization counts,
    EmbedLayerNormalization in the plain graph only)."""
    dema, plain = fusion.get("fused_ops") or {}, (fusion.get("plain_backbone") or {}).get("fused_ops") or {}
    same = all(dema.get(op) == plain.get(op) and plain.get(op) for op in ("Attention", "SkipLayerNormalization"))
    if not same or not plain.get("EmbedLayerNormalization") or dema.get("EmbedLayerNormalization"):
        return ""
    return (" Every attention block and every residual LayerNorm fuses in both graphs, so neither the adapters nor "
            "the mask handling break those patterns; the adapters add their own LayerNormalization, BiasGelu (W_in) "
            "and Gelu (bias-free experts) nodes; only the embeddings' EmbedLayerNormalization is not found in the "
            "DeMA graph (its embeddings subgraph, from the training export, does not match the fuser's pattern), "
            "which leaves its Gathers, Adds and one LayerNormalization unfused: a small share of the run (below).")


def busy_warning(results: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """A paragraph when the machine was busier than its cores: then the wall-clock ratios mostly measure waiting."""
    cores = facts.get("cores") or 1
    load = max(results["load_start"][0], results["load_end"][0])
    if load <= 2 * cores:
        return []
    return [f"**The machine was busy** (load average up to {load:.0f} on {cores} cores): every process waited for "
            "a core most of the time, so the wall-clock p50s and their ratios are mostly queueing (see the rounds' "
            "spread). The CPU-time ratio is the load-independent reading; the verdicts are given on both.", ""]


def render(results: dict[str, Any], facts: dict[str, Any], command: str) -> str:
    rows, torch_row = [], results["variants"].get("pytorch eager", {})
    reference = np.array(torch_row.get("logits_batch16", []), np.float32)
    for name, r in results["variants"].items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"].splitlines()[-1][:80], "", "", "", "", "", "", "", ""])
            continue
        diff = (float(np.abs(np.array(r["logits_batch16"], np.float32) - reference).max())
                if reference.size else float("nan"))
        each = ", ".join(f"{x:.0f}" for x in r.get("p50_ms_each", []))
        rows.append([name, r["runtime"], fmt(r["p50_ms"], 1), each, fmt(r.get("cpu_p50_ms"), 1), fmt(r["p95_ms"], 1),
                     fmt(r["throughput_per_s"], 0), fmt(r["peak_rss_mb"], 0), fmt(r.get("file_mb"), 1), f"{diff:.1e}"])
    eager = results["variants"].get("pytorch eager", {})

    def ratio(name: str, key: str) -> str:
        r = results["variants"].get(name, {})
        if "error" in r or key not in r or key not in eager:
            return "n/a"
        return f"{r[key] / eager[key]:.2f}x"

    int8 = results["int8"]
    goal_rows = []
    for name in results["variants"]:
        if name == "pytorch eager" or ": " not in name:
            continue
        kind = name.split(": ")[1]
        lat_goal, rss_goal = (0.3, 0.25) if kind.startswith("int8") else (0.5, 0.4)
        lat, rss, cpu = ratio(name, "p50_ms"), ratio(name, "peak_rss_mb"), ratio(name, "cpu_p50_ms")
        verdicts = [("n/a" if value == "n/a" else ("met" if float(value[:-1]) <= goal else "missed"))
                    for value, goal in ((lat, lat_goal), (cpu, lat_goal), (rss, rss_goal))]
        goal_rows.append([name, f"≤ {lat_goal}x / ≤ {rss_goal}x", f"{lat} / {rss}", cpu,
                          f"latency **{verdicts[0]}** (wall) / **{verdicts[1]}** (CPU time), RSS **{verdicts[2]}**"])
    change = int8.get("accuracy_change_points")
    lines = [
        "# Inference benchmark: the exported model against PyTorch eager",
        "",
        "<!-- Generated by bench/inference.py. Do not edit by hand: regenerate. -->",
        "",
        f"- **Command**: `{command}` (took {results['wall_seconds'] / 60:.0f} min)",
        f"- **Commit**: `{facts.get('commit', '?')}`; generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- **Machine**: {facts.get('cpu', '?')}, {facts.get('cores', '?')} cores; load average "
        f"{results['load_start']} at start, {results['load_end']} at the end (a shared machine: absolute times are "
        "noisy, every comparison is side by side in one run)",
        f"- **Model**: `{results['backbone']}` + DeMA adapters (3 slots) + linear head, trained one round "
        f"({results['steps']} steps, ORT backend) on tweet sentiment, exported with `edge_agent.model_export` (what "
        "`edge-agent export --int8` runs)",
        f"- **Inputs**: real tweets, every row 64 real tokens; batch 1 for latency ({results['iterations']} runs "
        "after 10 warm-up), batch 16 for throughput (20 runs); one thread (`intra_op_num_threads=1`, "
        "`torch.set_num_threads(1)`), `ORT_ENABLE_ALL`, sequential execution",
        "- **Peak RSS**: VmHWM of the measuring process (each variant in its own process: load + all runs); the "
        "exported graphs keep their weights in a page-aligned external data file (`model.onnx.data`), which "
        "onnxruntime memory-maps instead of copying; *file MB* counts both files",
        f"- **Rounds**: {results['rounds']} interleaved rounds (every variant once per round, in its own process); "
        "each number is the median over the rounds",
        "- **max |Δ logit|**: against PyTorch eager on the batch of 16 (fp32 should be ~1e-5; int8 is approximate)",
        "",
        table(["variant", "runtime", "p50 ms (b=1)", "p50 per round", "CPU ms (b=1)", "p95 ms (b=1)",
               "samples/s (b=16)", "peak RSS MB", "file MB", "max |Δ logit|"], rows),
        "",
        "## Goals of issue 17 (ratios to PyTorch eager, p50 latency / peak RSS)",
        "",
        *busy_warning(results, facts),
        table(["variant", "goal", "measured", "CPU-time ratio (b=1)", "verdict"], goal_rows),
        "",
        f"int8 accuracy change on the device's own test split ({int8.get('samples')} samples): "
        f"{fmt(100 * int8['fp32_accuracy'], 1)} % -> {fmt(100 * int8['int8_accuracy'], 1)} % "
        f"({change:+.2f} points; goal: within 1 point -> {'**met**' if abs(change) <= 1 else '**missed**'}). "
        f"Sizes: {int8['fp32_size_mb']} MB fp32, {int8['size_mb']} MB int8.",
        "",
        f"Transformer fusions (`onnxruntime.transformers.optimizer`, model_type bert, python fusions only) on the "
        f"exported DeMA graph: {results['fusion'].get('fused_ops', results['fusion'].get('error'))}; the fused "
        "graphs compute the same logits (the max |Δ logit| column). The same pass on a plain torch.onnx export of "
        f"the backbone + mean pool + head: {plain_fusions(results['fusion'])}.{fusion_reading(results['fusion'])}",
        "",
        "Reading the latency columns: the p50 of each round is listed because the machine is shared; when its load "
        "average is several times its core count the same variant's p50 moves by up to 2x between rounds, and a "
        "latency verdict is only as good as that spread; the CPU-time ratio (thread CPU time per run, which "
        "preemption by other processes does not inflate) is the cross-check. Peak RSS and file sizes do not depend "
        "on the load.",
        "",
        *render_profile(results),
    ]
    return "\n".join(lines)


def where_the_time_goes(plans: dict[str, tuple[str, list[str], Path | None]], out: Path, hidden: int,
                        iterations: int) -> dict[str, Any]:
    """Once, after the timed rounds: operator profiles of PyTorch eager and of the fp32 graphs (plain onnxruntime
    if measured, else the training package), the graph's matrix-product GFLOP and the core's GEMM rate, so the
    page can say how far the fp32 latency can fall."""
    ort_names = [n for n in plans if n.startswith("plain onnxruntime: fp32")] or \
        [n for n in plans if n.startswith("training package: fp32")]
    profiles: dict[str, Any] = {}
    for name in ["pytorch eager", *ort_names]:
        python, worker_args, _ = plans[name]
        profiles[name] = measure(python, [*worker_args, "--profile", "50"])
    shipped = plans[ort_names[0]][2]
    gemm = out / "gemm.onnx"
    gemm_graph(gemm, hidden, 4 * hidden)
    rate = measure(plans[ort_names[0]][0], ["--runner", "gemm", "--model", str(gemm), "--inputs", str(gemm),
                                            "--threads", "1", "--iterations", str(4 * iterations)])
    return {"variants": profiles, "gemm": rate, "tokens": TOKENS,
            "gflop": matmul_gflop(shipped, TOKENS, hidden) if shipped else None}


def render_profile(results: dict[str, Any]) -> list[str]:
    """The "where the fp32 time goes" section, from where_the_time_goes' numbers. Profilers time kernels by the
    wall clock, which a busy machine inflates; their *shares* survive that, so every millisecond here is a share
    of the run's thread CPU time, and every ratio is to eager's CPU time."""
    info = results.get("profiles")
    if not info:
        return []
    eager = results["variants"].get("pytorch eager", {})
    rate, gflop = info.get("gemm", {}), info.get("gflop")
    rows, matrix_cpu = [], {}
    for name, measured in info["variants"].items():
        if "error" in measured or not measured.get("profile"):
            rows.append([name, "failed", "", "", "", ""])
            continue
        top, gemm, total = profile_rows(measured["profile"])
        cpu = measured["cpu_p50_ms"]
        matrix_cpu[name] = cpu * gemm / total
        rows.append([name, fmt(measured["p50_ms"], 1), fmt(cpu, 1), f"{100 * gemm / total:.0f} %",
                     fmt(matrix_cpu[name], 1), ", ".join(f"{op} {100 * ms / total:.0f} %" for op, ms in top)])
    lines = ["## Where the fp32 time goes (batch 1 x 64 tokens, one thread)", "",
             "One extra measurement per variant after the timed rounds, with the runtime's own profiler (onnxruntime "
             "`enable_profiling`, kernel time per operator type after the session's graph optimisations; "
             "`torch.profiler`, self CPU time per aten operator). *CPU ms* is the calling thread's CPU time per run "
             "(with one thread all the work runs in it), which preemption by the machine's other processes does not "
             "inflate; *matrix products* are MatMul, FusedMatMul, Gemm and Attention (aten::addmm, mm, bmm, "
             "attention) and their CPU ms is their share of the profiled time times the CPU ms.", "",
             table(["variant", "p50 ms", "CPU ms", "matrix-product share", "matrix products CPU ms",
                    "top operators (share of profiled time)"], rows), ""]
    if gflop and "gflops" in rate and eager.get("cpu_p50_ms"):
        floor = 1000 * gflop / rate["gflops"]
        eager_cpu = eager["cpu_p50_ms"]
        m, k, n = rate["shape"]
        lines += [
            f"The speed limit: the graph's matrix products are {gflop:.2f} GFLOP per sequence of {info['tokens']} "
            f"tokens (every MatMul by a weight, and attention's two products; counted on the exported graph). "
            f"onnxruntime's fp32 MatMul ({rate['runtime']}, MLAS) sustains {rate['gflops']:.0f} GFLOP/s of CPU time "
            f"on one core of this machine for the FFN's shape ({m}x{k} by {k}x{n}, the weight hot in cache), so "
            f"those products alone need **{floor:.1f} ms**: **{floor / eager_cpu:.2f}x** PyTorch eager's CPU time "
            f"per run ({eager_cpu:.1f} ms in this run), with every LayerNorm, GELU, softmax, embedding and adapter "
            "op taking no time at all."]
        shipped = next(((n, m) for n, m in info["variants"].items() if n != "pytorch eager" and m.get("profile")),
                       None)
        if shipped:
            name, measured = shipped
            _, gemm, total = profile_rows(measured["profile"])
            if gemm > 0:
                estimate = floor * total / gemm
                lines += [
                    f"In the shipped graph ({name}) the matrix products take {100 * gemm / total:.0f} % of the "
                    f"profiled time, {matrix_cpu[name]:.1f} ms of CPU ({gflop / matrix_cpu[name] * 1000:.0f} "
                    f"GFLOP/s); if they ran at the probe's rate and the rest kept its share, the graph would take "
                    f"about {estimate:.1f} ms, **{estimate / eager_cpu:.2f}x** eager. An fp32 graph cannot go much "
                    "below that line without computing less (int8 does: the int8 rows)."]
                rest = measured["cpu_p50_ms"] - matrix_cpu[name]
                budget = 0.5 * eager_cpu - rest
                need = (f"{gflop / budget * 1000:.0f} GFLOP/s" if budget > 0 else
                        "more than the whole budget (the rest alone exceeds it)")
                lines += [
                    f"So 0.5x eager's CPU time ({0.5 * eager_cpu:.1f} ms) with the rest of the graph as it runs now "
                    f"({rest:.1f} ms) leaves {max(budget, 0):.1f} ms for {gflop:.2f} GFLOP: the matrix products "
                    f"would have to run at **{need}** inside the graph, where they measured "
                    f"{gflop / matrix_cpu[name] * 1000:.0f} GFLOP/s, against the isolated probe's "
                    f"{rate['gflops']:.0f} GFLOP/s with its one weight hot in cache."]
            profiled_eager = info["variants"].get("pytorch eager", {})
            if "pytorch eager" in matrix_cpu:
                eager_matrix, eager_total = matrix_cpu["pytorch eager"], profiled_eager["cpu_p50_ms"]
                lines += [
                    f"Against eager in the profiling runs: eager spent {eager_matrix:.1f} ms of CPU in its matrix "
                    f"products and {eager_total - eager_matrix:.1f} ms in everything else; the shipped graph "
                    f"{matrix_cpu[name]:.1f} ms and {measured['cpu_p50_ms'] - matrix_cpu[name]:.1f} ms."]
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median reported)")
    parser.add_argument("--iterations", type=int, default=100, help="batch-1 runs per measurement")
    parser.add_argument("--plain-python", default="", help="python of a venv with plain onnxruntime (no training)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-inference")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "inference-benchmark.md")
    parser.add_argument("--render-only", action="store_true", help="re-render --doc from --out/results.json")
    args = parser.parse_args()
    if args.render_only:
        results = json.loads((args.out / "results.json").read_text())
        facts = {**machine_facts(), "commit": results.get("commit", "?")}
        args.doc.write_text(render(results, facts, results.get("command", "python -m bench.inference")))
        return
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    load_start = load_average()
    model = train_and_export(args.backbone, args.out, args.steps)
    package: Path = model["package"]
    fusion = fuse(package, model["hidden"], HEADS, args.plain_python or sys.executable)
    try:
        fusion["plain_backbone"] = plain_backbone_fusions(args.backbone, args.out, model["hidden"],
                                                          args.plain_python or sys.executable)
    except Exception as exc:  # a comparison only: the run goes on without it
        fusion["plain_backbone"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    inputs = args.out / "inputs.npz"
    make_inputs(package, model["test_texts"], inputs)
    common = ["--inputs", str(inputs), "--threads", "1", "--iterations", str(args.iterations)]
    plans: dict[str, tuple[str, list[str], Path | None]] = {
        "pytorch eager": (sys.executable, ["--runner", "torch", "--backbone", args.backbone, "--tensors",
                                           str(args.out / "trained.safetensors"), "--classes", "3", *common], None)}
    pythons = {"training package": sys.executable}
    if args.plain_python:
        pythons["plain onnxruntime"] = args.plain_python
    graphs = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    if "error" not in fusion:
        graphs.update({"fp32 fused": FUSED, "int8 fused": FUSED_INT8})
    for package_name, python in pythons.items():
        for kind, file in graphs.items():
            plans[f"{package_name}: {kind}"] = (python, ["--runner", "ort", "--model", str(package / file), *common],
                                                package / file)
    # Interleaved rounds: every variant once per round, so a change in the shared machine's load hits all of them
    # alike; each number is the median over rounds.
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in plans}
    for _ in range(args.rounds):
        for name, (python, worker_args, _file) in plans.items():
            measured[name].append(measure(python, worker_args))
    variants: dict[str, dict[str, Any]] = {}
    for name, runs in measured.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            variants[name] = runs[0]
            continue
        merged = {key: float(np.median([r[key] for r in good])) for key in
                  ("p50_ms", "cpu_p50_ms", "p95_ms", "throughput_per_s", "peak_rss_mb", "load_seconds")}
        graph = plans[name][2]
        variants[name] = {**merged, "runtime": good[0]["runtime"], "logits_batch16": good[0]["logits_batch16"],
                          "rounds": len(good), "file_mb": file_mb(graph) if graph else None,
                          "p50_ms_each": [round(r["p50_ms"], 2) for r in good]}
    profiles = where_the_time_goes(plans, args.out, model["hidden"], args.iterations)
    results = {"backbone": args.backbone, "steps": args.steps, "rounds": args.rounds, "iterations": args.iterations,
               "variants": variants, "fusion": fusion, "profiles": profiles,
               "int8": model["card"].int8, "train_seconds": model["train_seconds"], "load_start": load_start,
               "load_end": load_average(), "wall_seconds": time.time() - started}
    facts = {**machine_facts(), "commit": git_commit()[:12]}
    command = "python -m bench.inference" + (" --plain-python VENV/bin/python" if args.plain_python else "")
    results.update(commit=facts["commit"], command=command)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    args.doc.write_text(render(results, facts, command))
    print(args.doc.read_text())


if __name__ == "__main__":
    main()
