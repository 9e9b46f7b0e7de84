"""Where the coordinator's aggregation memory goes, and what streaming into running sums would hold instead.

Each measurement runs in a fresh process (`--worker`) so RSS deltas are its own. For N updates of a fleet
split evenly over two backbone groups (two groups so CMGA really projects across groups):

1. what the engine holds today, step by step: each upload's chunk payloads (the BlobAssembler keeps them
   until the round ends) and each decoded update (`ClientUpdate.tensors`, kept in the `accepted` list until
   `strategy.aggregate` runs); then the extra peak of `HeteroTune.aggregate` itself (VmHWM reset through
   /proc/self/clear_refs just before it);
2. a streaming prototype (here only, not wired into the engine): every update is decoded, validated, added
   into per-group float64 running sums (sum n_k * theta_k, sum n_k) and dropped at once. CMGA then runs on
   the group means, exactly as `HeteroTune.aggregate` does. The result is compared with the engine's.

    python -m bench.aggregation_memory --worker --updates 1000 --pair tiny-3,tiny-6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, peak_rss_mb, python_env, rss_mb


def _reset_peak() -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class StreamingSums:
    """Per backbone group: sum_k n_k * theta_k (float64) for every tensor the group uploads, and sum_k n_k.

    Memory is O(groups x shared tensors), independent of how many agents report.
    """

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.counts: dict[str, int] = {}

    def add(self, group: str, n: int, tensors: Mapping[str, np.ndarray]) -> None:
        sums = self.sums.setdefault(group, {})
        for name, value in tensors.items():
            acc = sums.get(name)
            if acc is None:
                sums[name] = n * np.asarray(value, dtype=np.float64)
            else:
                acc += n * np.asarray(value, dtype=np.float64)
        self.counts[group] = self.counts.get(group, 0) + n

    def means(self, group: str) -> dict[str, np.ndarray]:
        return {name: acc / self.counts[group] for name, acc in self.sums[group].items()}


def streaming_heterotune(state: Any, sums: StreamingSums, round_id: int, seed: int = 0) -> Any:
    """HeteroTune's rule on running sums: group means -> CMGA on global tensors; group tensors = group means."""
    from coordinator.aggregation import FederatedState
    from coordinator.aggregation.cmga import cmga_step, group_weights, seeded_orders
    from coordinator.aggregation.mean import as_float32

    groups = sorted(sums.counts)
    means = {g: sums.means(g) for g in groups}
    weights = group_weights({g: sums.counts[g] for g in groups}, 1.0)
    orders = seeded_orders(groups, seed, round_id)
    new_global = {}
    for name, theta in state.global_tensors.items():
        base = np.asarray(theta, dtype=np.float64)
        grads = {g: means[g][name] - base for g in groups}
        new_global[name] = base + cmga_step(grads, orders, weights).step
    new_groups = {g: as_float32({n: means[g][n] for n in tensors}) if g in means else as_float32(tensors)
                  for g, tensors in state.group_tensors.items()}
    return FederatedState(global_tensors=as_float32(new_global), group_tensors=new_groups)


def _state_and_blobs(pair: list[str], updates: int, seed: int) -> tuple[Any, Iterator[tuple[str, bytes]]]:
    """Initial state from the bundles' initial tensors, and a generator of encoded updates (group, blob)."""
    from coordinator.aggregation import FederatedState
    from coordinator.demo import demo_config
    from coordinator.methods import scopes_for
    from coordinator.runner import build_bundles
    from protocols.tensors import encode_tensors

    bundles = build_bundles(demo_config().model_copy(update={"backbones": tuple(pair)}))
    scopes = scopes_for("heterotune")
    global_tensors: dict[str, np.ndarray] = {}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, bundle in bundles.items():
        initial = bundle.initial_tensors()
        groups[name] = {t.name: initial[t.name].copy() for t in bundle.manifest.tensors if scopes[t.family] == "group"}
        for t in bundle.manifest.tensors:
            if scopes[t.family] == "global":
                global_tensors.setdefault(t.name, initial[t.name].copy())
    state = FederatedState(global_tensors=global_tensors, group_tensors=groups)

    def blobs() -> Iterator[tuple[str, bytes]]:
        rng = np.random.default_rng(seed)
        for k in range(updates):
            group = pair[k % len(pair)]
            base = {**state.global_tensors, **state.group_tensors[group]}
            update = {n: (v + rng.normal(0, 1e-3, v.shape)).astype(np.float32) for n, v in base.items()}
            yield group, encode_tensors(update)

    return state, blobs()


def worker(pair: list[str], updates: int, seed: int = 0) -> dict[str, Any]:
    from coordinator.aggregation import ClientUpdate, HeteroTune
    from protocols.chunks import split_blob
    from protocols.tensors import decode_tensors

    state, blobs = _state_and_blobs(pair, updates, seed)
    encoded = list(blobs)  # what the agents send (not coordinator memory: subtracted below)
    update_bytes = sum(len(b) for _, b in encoded) / len(encoded)
    rss0 = rss_mb()

    # --- today: chunk payloads and decoded updates both held until the round closes ---------------------
    # decode_chunk slices each payload into a new bytes object; copy so no part aliases the sent blob
    held_parts = [[bytes(memoryview(c.data)) for c in split_blob(blob)] for _, blob in encoded]
    rss_parts = rss_mb()
    accepted = [ClientUpdate(f"a{k}", group, 100 + k % 7, dict(decode_tensors(b"".join(parts))))
                for k, ((group, _), parts) in enumerate(zip(encoded, held_parts, strict=True))]
    rss_decoded = rss_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    reference = HeteroTune().aggregate(state, accepted, 1).state
    aggregate_s = time.perf_counter() - t0
    aggregate_peak_extra = peak_rss_mb() - rss_decoded if reset else None
    del accepted, held_parts

    # --- streaming: decode, add, drop -------------------------------------------------------------------
    rss_stream_start = rss_mb()
    _reset_peak()
    sums = StreamingSums()
    t0 = time.perf_counter()
    for k, (group, blob) in enumerate(encoded):
        sums.add(group, 100 + k % 7, decode_tensors(blob))
    accumulate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    streamed = streaming_heterotune(state, sums, 1)
    finish_s = time.perf_counter() - t0
    stream_peak_extra = peak_rss_mb() - rss_stream_start if reset else None
    sums_mb = sum(a.nbytes for g in sums.sums.values() for a in g.values()) / 2**20
    diff = max(float(np.max(np.abs(streamed.global_tensors[n] - reference.global_tensors[n])))
               for n in reference.global_tensors)
    diff = max([diff] + [float(np.max(np.abs(streamed.group_tensors[g][n] - t)))
                         for g, ts in reference.group_tensors.items() for n, t in ts.items()])
    return {
        "pair": pair, "updates": updates, "update_bytes": update_bytes,
        "held_parts_mb": rss_parts - rss0, "held_decoded_mb": rss_decoded - rss_parts,
        "held_total_mb": rss_decoded - rss0, "held_per_update_kb": 1024 * (rss_decoded - rss0) / updates,
        "aggregate_s": aggregate_s, "aggregate_peak_extra_mb": aggregate_peak_extra,
        "streaming_sums_mb": sums_mb, "streaming_peak_extra_mb": stream_peak_extra,
        "streaming_accumulate_s": accumulate_s, "streaming_accumulate_per_update_ms": 1000 * accumulate_s / updates,
        "streaming_finish_s": finish_s, "max_abs_diff_vs_engine": diff,
    }


def measure(configs: list[tuple[list[str], int]], *, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    results = []
    for pair, updates in configs:
        proc = subprocess.run([sys.executable, "-m", "bench.aggregation_memory", "--worker", "--updates",
                               str(updates), "--pair", ",".join(pair)], cwd=REPO, env=python_env(1),
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            results.append({"pair": pair, "updates": updates, "error": proc.stderr.strip()[-800:]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--pair", default="tiny-3,tiny-6")
    args = parser.parse_args()
    if args.worker:
        json.dump(worker(args.pair.split(","), args.updates), sys.stdout)
    else:
        print(json.dumps(measure([(args.pair.split(","), args.updates)]), indent=2))


if __name__ == "__main__":
    main()
