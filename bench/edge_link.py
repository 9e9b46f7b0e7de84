"""Round time and bytes of one real agent behind an emulated edge link, against loopback.

For each backbone a real coordinator (`run_federation`) and one real `edge_agent.cli join` process run a
small federation twice: once with the agent behind an unshaped link (counts the bytes: the bundle download
and the rounds) and once behind the edge link (1 Mbit/s each way, 200 ms round trip, 1 % of segments
retransmitted one RTO late; bench/link_emulator.py). The edge run reuses the agent's bundle cache from the
loopback run, because a 70 MB bundle takes ~10 minutes at 1 Mbit/s; its download time on that link is
computed from the measured bytes and the rate. Bytes per torch-backend device are read from the bundle
(the tar and its parts), before and after splitting the ORT training artefacts out of the tar.

    python -m bench.edge_link --backbones minilm-l3 minilm-l6 --rounds 2 --local-steps 2
    python -m bench.edge_link --backbones minilm-l3 --backend torch --links loopback   # a torch device's bytes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, git_commit
from bench.link_emulator import EdgeLink, LinkSpec
from coordinator.config import RunConfig, TaskConfig
from coordinator.datasets import load_tweet_sentiment, write_fleet_data
from coordinator.observers import RoundEnded, RoundStarted, UpdateHandled
from coordinator.runner import build_bundles, run_federation

EDGE = LinkSpec(rate_bps=1_000_000.0, rtt=0.2, loss=0.01, seed=1)
LOOPBACK = LinkSpec(rate_bps=None, rtt=0.0)
ORT_ONLY = ("checkpoint", "training_model.onnx", "optimizer_model.onnx")  # what the torch backend never reads


class RoundClock:
    """Observer keeping each committed round's wall time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def round_started(self, event: RoundStarted) -> None:
        pass

    def update_handled(self, event: UpdateHandled) -> None:
        pass

    def round_ended(self, event: RoundEnded) -> None:
        if event.committed:
            self.seconds.append(event.seconds)


def one_run(work: Path, backbone: str, spec: LinkSpec, cache: Path, args: argparse.Namespace) -> dict[str, Any]:
    agent_id = "edge-1"
    data = write_fleet_data(load_tweet_sentiment(max_samples=300, seed=3), [agent_id], work / "data", alpha=1.0,
                            seed=3, global_per_class=10, max_per_client=60)
    config = RunConfig(run_name="edge-link", backbones=(backbone,), rounds=args.rounds, local_steps=args.local_steps,
                       min_agents=1, pinned={agent_id: backbone}, task=TaskConfig(max_length=32, batch_size=8),
                       round_timeout_s=900, join_timeout_s=1800, seed=5)
    clock = RoundClock()
    procs: list[subprocess.Popen[bytes]] = []
    links: list[EdgeLink] = []

    def start_agents(host: str, port: int) -> None:
        link = EdgeLink((host, port), spec)
        links.append(link)
        log = open(work / f"{agent_id}.log", "wb")  # noqa: SIM115 - the child holds it
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "join", "--broker", f"127.0.0.1:{link.port}", "--id", agent_id,
             "--data", str(data.client_files[agent_id]), "--global-test", str(data.global_test_file),
             "--threads", "1", "--cache-dir", str(cache), "--max-idle", "300", "--backend", args.backend,
             "--coordinator-key", str(work / "run" / "keys" / "run-key.pub")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}))
        log.close()

    started = time.monotonic()
    try:
        summary = run_federation(config, work / "run", start_agents=start_agents, observers=[clock])
        code = procs[0].wait(120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for link in links:
            link.close()
    link = links[0]
    return {"backbone": backbone, "link": "edge" if spec.rate_bps else "loopback", "backend": args.backend,
            "exit_code": code,
            "rounds": summary["rounds"], "round_seconds": clock.seconds, "wall_seconds": time.monotonic() - started,
            "bytes_down": link.bytes_down, "bytes_up": link.bytes_up, "bundle_bytes": summary["bundle_bytes"][backbone]}


def torch_device_bytes(backbone: str) -> dict[str, Any]:
    """What a torch-backend device downloads now (tar + torch part) and without the ORT-only files in the tar."""
    config = RunConfig(run_name="edge-link", backbones=(backbone,), task=TaskConfig(max_length=32, batch_size=8))
    bundle = build_bundles(config)[backbone]
    tar_bytes = bundle.size
    with tarfile.open(bundle.archive) as tar:
        sizes = {m.name: m.size for m in tar.getmembers()}
    parts = {name: part.size for name, part in bundle.manifest.parts_for("torch").items()}
    ort_only = sum(sizes.get(name, 0) for name in ORT_ONLY)
    return {"backbone": backbone, "tar_bytes": tar_bytes, "tar_files": sizes, "torch_parts": parts,
            "torch_device_now": tar_bytes + sum(parts.values()),
            "torch_device_without_ort_files": tar_bytes - ort_only + sum(parts.values()),
            "ort_device": tar_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l3", "minilm-l6"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--backend", choices=["ort", "torch"], default="ort", help="the agent's trainer backend")
    parser.add_argument("--links", nargs="+", choices=["loopback", "edge"], default=["loopback", "edge"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "edge-link")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"commit": git_commit(Path(__file__).resolve().parent.parent),
                               "link": {"rate_bps": EDGE.rate_bps, "rtt": EDGE.rtt, "loss": EDGE.loss},
                               "load_before": os.getloadavg(), "runs": [], "torch_bytes": []}
    for backbone in args.backbones:
        cache = args.out / backbone / "agent-cache"
        for name, spec in (("loopback", LOOPBACK), ("edge", EDGE)):
            if name not in args.links:
                continue
            work = args.out / backbone / name
            if (work / "run").exists():
                raise SystemExit(f"{work} exists from an earlier run; remove {args.out} first")
            work.mkdir(parents=True)
            run = one_run(work, backbone, spec, cache, args)
            run["load_after"] = os.getloadavg()
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
        results["torch_bytes"].append(torch_device_bytes(backbone))
    results["load_after"] = os.getloadavg()
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results["torch_bytes"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
