"""Host side of the arm64 proof: a coordinator on the host's loopback, one agent inside the arm64 chroot.

Run by scripts/arm64/run-round.sh (which builds the rootfs and does the mounts); not part of CI. The agent runs
under qemu user-mode emulation with `--backend torch` on the smallest real text backbone (paraphrase-MiniLM-L3),
joins, fetches its bundle and the bundle's torch part, trains one round and uploads it. The script records
wall times, the agent's peak RSS (its own VmHWM report and GNU time's maximum RSS) and writes summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from coordinator.broker import MosquittoBroker  # noqa: E402
from coordinator.config import RunConfig, TaskConfig  # noqa: E402
from coordinator.datasets import (  # noqa: E402
    FleetData,
    load_tweet_sentiment,
    write_fleet_data,
)
from coordinator.runner import build_bundles, run_federation  # noqa: E402
from coordinator.store import RunStore, load_state  # noqa: E402

AGENT_ID = "pi-arm64"


def agent_command(root: Path, repo_in_root: str, data: str, global_test: str, cache: str, host: str, port: int,
                  threads: int, cpu: str) -> list[str]:
    """The agent, started inside the arm64 chroot with a clean environment; its python is an arm64 binary,
    so every instruction runs under qemu-aarch64, emulating the given CPU model (QEMU_CPU is read by every
    qemu-user process, so it must survive `env -i`)."""
    env = ["HOME=/root", "PATH=/opt/agent-venv/bin:/usr/bin:/bin", "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1",
           f"PYTHONPATH={repo_in_root}", "HF_HUB_OFFLINE=1", f"QEMU_CPU={cpu}"]
    return ["chroot", str(root), "/usr/bin/env", "-i", *env, "/usr/bin/time", "-v",
            "/opt/agent-venv/bin/python", "-m", "edge_agent.cli", "join", "--broker", f"{host}:{port}",
            "--id", AGENT_ID, "--backend", "torch", "--threads", str(threads),
            "--data", data, "--global-test", global_test, "--cache-dir", cache, "--max-idle", "7200", "--verbose",
            "--insecure-no-verify"]  # loopback bench: the run key is outside the chroot


def replay_on_host(config: RunConfig, fleet: FleetData, run_dir: Path) -> float:
    """Train the agent's round again on this x86_64 host with ONNX Runtime (same data, seeds and start
    tensors) and return the worst relative difference to the update the emulated arm64 torch agent uploaded.

    A round that merely completes could still carry wrong numbers (an emulator or kernel bug); this checks the
    arm64 result against the reference backend."""
    import numpy as np
    from safetensors.numpy import load_file

    from edge_agent.data import load_examples
    from edge_agent.local_round import LocalLearner, RoundPlan
    from edge_agent.trainers.ort import OrtTrainer

    bundle = build_bundles(config)["minilm-l3"]
    labels = bundle.manifest.task.labels
    state = load_state(RunStore(run_dir / "run").tensors_path(0))
    received = {**state.global_tensors, **state.group_tensors["minilm-l3"]}
    learner = LocalLearner(AGENT_ID, bundle.directory, bundle.manifest, OrtTrainer(bundle.directory, threads=1),
                           load_examples(fleet.client_files[AGENT_ID], labels),
                           load_examples(fleet.global_test_file, labels))
    plan = RoundPlan(1, config.local_steps, config.task.batch_size, config.learning_rate, config.seed,
                     tuple(sorted(received)))
    host = learner.run_round(plan, received).upload
    arm = load_file(str(run_dir / "run" / "updates" / "round-0001" / f"{AGENT_ID}.safetensors"))
    assert set(arm) == set(host), sorted(set(arm) ^ set(host))
    return max(float(np.abs(arm[n] - host[n]).max()) / max(float(np.abs(host[n]).max()), 1e-12) for n in host)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True, help="the arm64 rootfs")
    parser.add_argument("--run-dir", type=Path, required=True, help="host path, bind-mounted at --run-in-root")
    parser.add_argument("--run-in-root", default="/opt/arm64-run")
    parser.add_argument("--repo-in-root", default="/opt/heterotune")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64, help="examples on the device (25%% are its test split)")
    parser.add_argument("--cpu", default="cortex-a76",
                        help="qemu CPU model: cortex-a76 is the Raspberry Pi 5's core, cortex-a72 the Pi 4's, "
                             "cortex-a57 the Jetson Nano's ('max' also enables SVE/SME, under which qemu 7.2 "
                             "raised spurious floating-point warnings in numpy's matmul)")
    args = parser.parse_args()
    # `timeout` (run-round.sh) stops us with SIGTERM: exit through the finally blocks, so the agent and the
    # private mosquitto are stopped too instead of being left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    run_dir: Path = args.run_dir
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    fleet = write_fleet_data(load_tweet_sentiment(max_samples=600, seed=0), [AGENT_ID], run_dir / "data",
                             alpha=100.0, seed=0, global_per_class=4, max_per_client=args.samples)
    print(f"[host] data: {fleet.client_files[AGENT_ID]} ({fleet.label_counts})", flush=True)
    config = RunConfig(run_name="arm64", backbones=("minilm-l3",), rounds=1, local_steps=args.local_steps,
                       min_agents=1, task=TaskConfig(), learning_rate=2e-3,
                       join_timeout_s=7200, round_timeout_s=10800)
    agent_log = run_dir / "agent.log"
    started = time.time()
    timings: dict[str, float] = {}
    agent: subprocess.Popen[bytes] | None = None

    with MosquittoBroker(run_dir / "broker") as broker:
        def start_agent(host: str, port: int) -> None:
            nonlocal agent
            inside = args.run_in_root  # the run directory as the chroot sees it

            def seen(path: Path) -> str:
                return f"{inside}/{path.relative_to(run_dir)}"

            command = agent_command(args.root, args.repo_in_root, seen(fleet.client_files[AGENT_ID]),
                                    seen(fleet.global_test_file), f"{inside}/cache", host, port, args.threads,
                                    args.cpu)
            print(f"[host] starting the arm64 agent: {' '.join(command)}", flush=True)
            timings["agent_started"] = time.time() - started
            agent = subprocess.Popen(command, stdout=agent_log.open("wb"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "QEMU_CPU": args.cpu})

        try:
            summary = run_federation(config, run_dir / "run", broker=broker.address, start_agents=start_agent)
            assert agent is not None
            code = agent.wait(600)
        finally:
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait(30)
    wall = time.time() - started
    log_text = agent_log.read_text(errors="replace")
    rows = RunStore(run_dir / "run").metrics()
    max_rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log_text)
    ok = code == 0 and summary["rounds"] == 1 and bool(rows) and all(r.accepted and r.backend == "torch" for r in rows)
    agreement = replay_on_host(config, fleet, run_dir) if ok else None
    result = {
        "agent_exit_code": code,
        "max_rel_diff_arm64_torch_vs_host_ort_update": agreement,
        "qemu_cpu": args.cpu,
        "rounds_completed": summary["rounds"],
        "wall_seconds_total": round(wall, 1),
        "agent_started_at_s": round(timings.get("agent_started", 0.0), 1),
        "backend": [r.backend for r in rows],
        "accepted": [r.accepted for r in rows],
        "train_seconds": [r.train_seconds for r in rows],
        "eval_seconds": [r.eval_seconds for r in rows],
        "agent_peak_rss_mb_vmhwm": [r.peak_rss_mb for r in rows],
        "agent_max_rss_mb_gnu_time": int(max_rss_kb.group(1)) / 1024 if max_rss_kb else None,
        "bytes_down_round1": [r.bytes_down for r in rows],
        "personal_accuracy": [r.personal_accuracy for r in rows],
        "global_accuracy": [r.global_accuracy for r in rows],
        "agent_log_tail": log_text.splitlines()[-40:],
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "agent_log_tail"}, indent=2), flush=True)
    ok = ok and agreement is not None and agreement <= 1e-4
    print("[host] ARM64 ROUND " + ("COMPLETED" if ok else "FAILED"), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
