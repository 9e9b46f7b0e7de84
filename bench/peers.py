"""Flower side by side: the demo's federation run by HeteroTune and by Flower 1.42, measured in one script.

Three runs, one after another, on the same fleet, data split, bundles, rounds, local steps and seed:

1. HeteroTune: `coordinator run`'s path (coordinator.demo.run_agents -> runner.run_federation) on its own
   mosquitto, one real `edge-agent join` process per device (ORT backend, bundles already in each agent's
   cache, as Flower's nodes have them on disk);
2. Flower deployment: a SuperLink and one SuperNode per device as real processes on 127.0.0.1 (insecure mode,
   loopback only), the app in bench/peers/ submitted with `flwr run`;
3. Flower simulation: the same app through `flwr run` on the local simulation SuperLink (Ray, one CPU per
   client: two actors on this machine).

The Flower app runs the product's own LocalLearner (PyTorch trainer backend, same DeMA adapters and frozen
backbone) and aggregation (bench/peers/hetero_flwr), inside a venv of its own (`--flower-venv`, Python >= 3.11
with flwr[simulation]==1.42.*, torch==2.13.0 and this repository installed editable); the product never imports
flwr. Measured: round overhead (round wall minus the slowest device's train + eval seconds), device peak RSS
(each training process's own VmHWM, and the whole device tree sampled), bytes per round, time to first round,
final accuracy in both views. `python -m bench.peers --rounds 2` writes docs/peers.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, REPO, load_average, log, machine_facts, read_json, stop_process, write_json
from bench.peers_processes import (
    FLOWER_VENV_ENV,
    TreeSampler,
    end_leftovers,
    flower_env,
    free_port,
    listener_pid,
    wait_for,
)

APP_DIR = REPO / "bench" / "peers"
DEFAULT_VENV = REPO / ".cache" / "venv-flower"
PAGE = REPO / "docs" / "peers.md"
PAGE_DATA = REPO / "docs" / "peers.json"  # the measurements the page is rendered from (--render-only reads it)
MODES = ("heterotune", "flower-deployment", "flower-simulation")


# --- the shared task ---------------------------------------------------------------------------------------------

def prepare(out: Path, rounds: int, seed: int) -> dict[str, Any]:
    """The demo's fleet, config, bundles and data split (as coordinator.demo.run_fleet writes them), once."""
    from coordinator.datasets import load_tweet_sentiment, write_fleet_data
    from coordinator.demo import demo_agents, demo_config, plan_for
    from coordinator.fleet import DataSplit
    from coordinator.methods import public_samples_for, uses_prototypes
    from coordinator.runner import build_bundles

    agents = demo_agents()
    data = DataSplit()
    config, plans = plan_for(agents, demo_config(rounds, seed), data)
    config = config.model_copy(update={"allowed_agents": tuple(a.agent_id for a in agents)})
    if public_samples_for(config) or uses_prototypes(config):
        raise ValueError("the Flower app exchanges adapters only; the demo config now has a public set or "
                         "prototypes, which bench/peers/hetero_flwr does not carry")
    bundles = build_bundles(config)
    samples = max(8000, 2 * len(agents) * data.samples_per_agent)
    dataset = load_tweet_sentiment(max_samples=samples, seed=seed)
    files = write_fleet_data(dataset, [a.agent_id for a in agents], out / "data", alpha=data.alpha, seed=seed,
                             global_per_class=data.global_test_per_class, max_per_client=data.samples_per_agent)
    assigned = {p.agent.agent_id: p.decision.backbone for p in plans}
    if None in assigned.values():
        raise RuntimeError(f"the demo plan refuses a device: {assigned}")
    return {"agents": agents, "config": config, "bundles": bundles, "files": files, "assigned": assigned}


# --- HeteroTune ------------------------------------------------------------------------------------------------

def run_heterotune(out: Path, task: dict[str, Any]) -> dict[str, Any]:
    """`coordinator run` + real agents on its own mosquitto; rounds from the run directory's records."""
    from coordinator.demo import run_agents
    from edge_agent.bundle_store import BundleStore

    run_dir = out / "heterotune"
    shutil.rmtree(run_dir, ignore_errors=True)
    for agent in task["agents"]:  # "bundles cached": as every Flower node reads its bundle from disk
        store = BundleStore(run_dir / "agents" / agent.agent_id / "bundles")
        bundle = task["bundles"][task["assigned"][agent.agent_id]]
        store.install(bundle.sha256, bundle.archive_bytes())
        for name, part in bundle.manifest.parts_for("ort").items():  # the ORT checkpoint and graphs too
            store.install_part(bundle.sha256, part, bundle.part_bytes(name))

    def roots() -> dict[str, int]:
        found = {}
        for child in _children():
            cmd = child.get("cmdline", [])
            if "edge_agent.cli" in cmd and "--id" in cmd:
                found[cmd[cmd.index("--id") + 1]] = child["pid"]
        return found

    load_before = load_average()
    launched = time.time()
    with TreeSampler(roots, lambda cmd: "agent" if "edge_agent.cli" in cmd else "other") as sampler:
        summary = run_agents(run_dir, task["agents"], task["config"], task["files"])
    planned = task["config"].rounds
    rounds = [r for r in _store_rounds(run_dir) if r["round"] <= planned]
    rows = _metrics_rows(run_dir / "metrics.csv")
    per_round = []
    for r in rounds:
        agents = [row for row in rows if row["round"] == r["round"]]
        per_round.append(_round_entry(r["round"], r["started"], r["finished"], agents))
    return {
        "mode": "heterotune", "launched": launched, "load_before": load_before, "load_after": load_average(),
        "first_round_started": rounds[0]["started"], "first_round_done": rounds[0]["finished"],
        "ended": time.time(), "rounds": per_round,
        # The evaluation-only round after the last (coordinator.report.final_overview, sample-weighted).
        "final": {"personal_accuracy": summary["final"]["personal_accuracy"],
                  "global_accuracy": summary["final"]["global_accuracy"], "agents": len(summary["final"]["agents"])},
        "device_peak_vmhwm": _peak_by_backbone(rows, "peak_rss_mb"),
        "process_peak_sampled": sampler.peaks("agent"), "device_tree_peak": dict(sampler.tree_peak),
        "assigned": task["assigned"],
    }


def _children() -> list[dict[str, Any]]:
    import psutil

    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            out.append({"pid": child.pid, "cmdline": child.cmdline()})
        except psutil.Error:
            continue
    return out


def _store_rounds(run_dir: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(f"file:{run_dir / 'coordinator.sqlite'}?mode=ro", uri=True)
    try:
        found = db.execute("SELECT round_id, started, finished FROM rounds ORDER BY round_id").fetchall()
    finally:
        db.close()
    return [{"round": int(r), "started": float(s), "finished": float(f)} for r, s, f in found]


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = dict(raw)
            for key in ("round", "n_test", "n_global_test", "n_train", "bytes_up", "bytes_down"):
                row[key] = int(float(raw[key] or 0))
            for key in ("personal_accuracy", "global_accuracy", "train_seconds", "eval_seconds", "peak_rss_mb"):
                row[key] = float(raw[key]) if raw.get(key) not in (None, "") else None
            rows.append(row)
    return rows


def _round_entry(round_id: int, started: float, ended: float, agents: list[dict[str, Any]]) -> dict[str, Any]:
    """Round wall, slowest device compute (train + eval) and their difference, bytes over all devices."""
    wall = ended - started
    compute = max((a["train_seconds"] or 0) + (a["eval_seconds"] or 0) for a in agents)
    return {"round": round_id, "wall_s": wall, "slowest_compute_s": compute, "overhead_s": wall - compute,
            "bytes": sum(a["bytes_up"] + a["bytes_down"] for a in agents),
            "bytes_up": sum(a["bytes_up"] for a in agents), "bytes_down": sum(a["bytes_down"] for a in agents),
            "agents": len(agents)}


def _final(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Both views of the final model, sample-weighted as coordinator.report.round_summary weighs them."""
    def weighted(acc: str, n: str) -> float | None:
        pairs = [(r[acc], r[n]) for r in rows if r.get(acc) is not None and r.get(n)]
        total = sum(n for _, n in pairs)
        return sum(a * n for a, n in pairs) / total if total else None

    return {"personal_accuracy": weighted("personal_accuracy", "n_test"),
            "global_accuracy": weighted("global_accuracy", "n_global_test"), "agents": len(rows)}


def _peak_by_backbone(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in rows:
        if row.get(key):
            out[row["backbone"]] = max(out.get(row["backbone"], 0.0), float(row[key]))
    return out


# --- Flower ----------------------------------------------------------------------------------------------------

def write_spec(out: Path, task: dict[str, Any], mode: str) -> tuple[Path, Path]:
    """The run's spec for the Flower app: agents in partition order (node i = agent i)."""
    result = out / mode / "result.json"
    result.unlink(missing_ok=True)
    spec = {
        "config": task["config"].model_dump(mode="json"),
        "bundles": {name: str(b.directory) for name, b in task["bundles"].items()},
        "agents": [{"agent_id": a.agent_id, "backbone": task["assigned"][a.agent_id],
                    "data_file": str(task["files"].client_files[a.agent_id])} for a in task["agents"]],
        "global_test": str(task["files"].global_test_file),
        "result": str(result), "threads": 1,
    }
    path = out / mode / "spec.json"
    write_json(path, spec)
    return path, result


def _flwr_run(venv: Path, env: dict[str, str], args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as handle:
        return subprocess.Popen([str(venv / "bin" / "flwr"), "run", str(APP_DIR), *args], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, cwd=log_path.parent)


def run_flower_deployment(out: Path, task: dict[str, Any], venv: Path) -> dict[str, Any]:
    """SuperLink + one SuperNode per device on 127.0.0.1 (insecure: loopback only), then `flwr run`."""
    folder = out / "flower-deployment"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec, result_path = write_spec(out, task, "flower-deployment")
    env = flower_env(venv, folder / "home")
    link_port = free_port()
    _write_connection(Path(env["FLWR_HOME"]), link_port)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    load_before = load_average()
    launched = time.time()
    logs = folder / "logs"
    logs.mkdir()

    def start(name: str, command: list[str]) -> None:
        with (logs / f"{name}.log").open("wb") as handle:
            procs[name] = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=folder)

    def roots() -> dict[str, int]:
        return {name: p.pid for name, p in procs.items() if p.poll() is None}

    classify = _flower_kind
    sampler = TreeSampler(roots, classify)
    try:
        with sampler:
            start("superlink", [str(venv / "bin" / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                "--port", str(link_port), "--disable-runtime-dependency-installation"])
            wait_for(lambda: listener_pid(link_port) is not None, 120, "the SuperLink listening")
            for index, agent in enumerate(task["agents"]):
                start(agent.agent_id, [str(venv / "bin" / "flower-supernode"), "--insecure", "--superlink",
                                       f"127.0.0.1:{link_port}", "--host", "127.0.0.1", "--port", str(free_port()),
                                       "--node-config", f"partition-id={index} num-partitions={len(task['agents'])}"])
            runner = _flwr_run(venv, env, ["local-deploy", "--stream", "-c", f'spec="{spec}"'], logs / "flwr-run.log")
            _wait_result(runner, result_path, timeout_s=3600)
    finally:
        for name in ["superlink", *[a.agent_id for a in task["agents"]]]:
            if name in procs:
                procs[name].terminate()
        for proc in procs.values():
            stop_process(proc, grace_s=15)
        leftovers = end_leftovers(sampler.seen())
    result = read_json(result_path)
    entry = _flower_entry("flower-deployment", result, launched, load_before, task)
    entry.update({"clientapp_peak_sampled": sampler.peaks("clientapp"),
                  "device_tree_peak": {k: v for k, v in sampler.tree_peak.items() if k != "superlink"},
                  "supernode_peak_sampled": sampler.peaks("supernode"),
                  "superexec_peak_sampled": sampler.peaks("superexec"),
                  "server_tree_peak": sampler.tree_peak.get("superlink"), "leftovers_ended": leftovers})
    return entry


def run_flower_simulation(out: Path, task: dict[str, Any], venv: Path) -> dict[str, Any]:
    """`flwr run` on the local simulation SuperLink (a detached daemon it starts; stopped here by its PID)."""
    folder = out / "flower-simulation"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec, result_path = write_spec(out, task, "flower-simulation")
    env = flower_env(venv, folder / "home")
    port = free_port()
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(port)
    env["RAY_TMPDIR"] = str(Path("/tmp") / f"ray-peers-{os.getpid()}")  # short: Ray's socket paths are limited
    logs = folder / "logs"
    logs.mkdir()
    link: dict[str, int] = {}

    def roots() -> dict[str, int]:
        if "superlink" not in link:
            pid = listener_pid(port)
            if pid is not None:
                link["superlink"] = pid
        return dict(link)

    sampler = TreeSampler(roots, _flower_kind)
    load_before = load_average()
    launched = time.time()
    n = len(task["agents"])
    try:
        with sampler:
            runner = _flwr_run(venv, env, ["--stream", "--federation-config",
                                           f"num-supernodes={n} client-resources-num-cpus=1",
                                           "-c", f'spec="{spec}"'], logs / "flwr-run.log")
            _wait_result(runner, result_path, timeout_s=3600)
    finally:
        pid = link.get("superlink") or listener_pid(port)
        leftovers = end_leftovers([*([pid] if pid else []), *sampler.seen()], grace_s=15)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    result = read_json(result_path)
    entry = _flower_entry("flower-simulation", result, launched, load_before, task)
    entry.update({"actor_peak_sampled": max(sampler.peaks("ray-actor").values(), default=None),
                  "simulation_tree_peak": sampler.tree_peak.get("superlink"), "leftovers_ended": leftovers})
    return entry


def _flower_kind(cmdline: str) -> str:
    for needle, kind in (("flwr-clientapp", "clientapp"), ("flower-supernode", "supernode"),
                         ("flower-superexec", "superexec"), ("flwr-serverapp", "serverapp"),
                         ("flower-superlink", "superlink"), ("ClientAppActor", "ray-actor"),
                         ("ray::", "ray-actor"), ("flwr-simulation", "simulation")):
        if needle in cmdline:
            return kind
    return "other"


def _write_connection(flwr_home: Path, port: int) -> None:
    """A `local-deploy` SuperLink connection in this run's own FLWR_HOME (never ~/.flwr)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deploy"\n\n'
        f'[superlink.local-deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')


def _wait_result(runner: subprocess.Popen[bytes], result_path: Path, timeout_s: float) -> None:
    """Until the ServerApp has written its result (flwr run's exit code says nothing about success)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result_path.exists():
            break
        if runner.poll() is not None and not result_path.exists():
            time.sleep(5)  # the result may land just after the CLI returns
            if not result_path.exists():
                raise RuntimeError(f"`flwr run` ended (rc {runner.returncode}) without a result; see its log "
                                   f"in {result_path.parent / 'logs'}")
        time.sleep(1)
    stop_process(runner, grace_s=60)
    result = read_json(result_path)
    if result.get("error"):
        raise RuntimeError(f"the Flower run failed: {result['error']}")


def _flower_entry(mode: str, result: dict[str, Any], launched: float, load_before: list[float],
                  task: dict[str, Any]) -> dict[str, Any]:
    per_round = []
    rows = []
    for r in result["rounds"]:
        agents = [_flower_row(a) for a in r["agents"]]
        rows += agents
        per_round.append(_round_entry(r["round"], r["started"], r["ended"], agents)
                         | {"spawn_s_max": max(a["spawn_seconds"] for a in agents),
                            "setup_s_max": max(a["setup_seconds"] for a in agents)})
    final = [_flower_row(a) for a in result["final"]]
    return {
        "mode": mode, "launched": launched, "load_before": load_before, "load_after": load_average(),
        "nodes_ready": result.get("nodes_ready"), "main_started": result.get("main_started"),
        "first_round_started": result["rounds"][0]["started"], "first_round_done": result["rounds"][0]["ended"],
        "ended": time.time(), "rounds": per_round, "final": _final(final),
        "device_peak_vmhwm": _peak_by_backbone(rows + final, "peak_rss_mb"), "assigned": task["assigned"],
    }


def _flower_row(raw: dict[str, Any]) -> dict[str, Any]:
    """A Flower reply's metrics in the units of HeteroTune's metrics rows."""
    personal_total, global_total = int(raw["personal_total"]), int(raw["global_total"])
    return {**raw, "n_test": personal_total, "n_global_test": global_total,
            "personal_accuracy": raw["personal_correct"] / personal_total if personal_total else None,
            "global_accuracy": raw["global_correct"] / global_total if global_total else None}


# --- main ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds for all three runs (the demo has 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=MODES, action="append", help="run only these (repeatable)")
    parser.add_argument("--flower-venv", type=Path,
                        default=Path(os.environ.get(FLOWER_VENV_ENV, DEFAULT_VENV)),
                        help="venv with flwr[simulation]==1.42.*, torch==2.13.0 and this repo (pip install -e .)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "peers")
    parser.add_argument("--render-only", action="store_true", help="re-render docs/peers.md from docs/peers.json")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # Flower's processes run in other directories: every path they get is absolute
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results_path = args.out / "peers.json"
    if not args.render_only:
        if not (args.flower_venv / "bin" / "flwr").exists() and args.only != ["heterotune"]:
            print(f"error: no Flower venv at {args.flower_venv} (bin/flwr missing); create it as docs/peers.md "
                  f"says, or pass --flower-venv", file=sys.stderr)
            return 2
        args.out.mkdir(parents=True, exist_ok=True)
        previous = read_json(results_path) if results_path.exists() else {}
        task = prepare(args.out, args.rounds, args.seed)
        runs = dict(previous.get("runs", {})) if args.only else {}
        for mode in args.only or MODES:
            log(f"{mode}: {args.rounds} rounds, seed {args.seed}")
            if mode == "heterotune":
                runs[mode] = run_heterotune(args.out, task)
            elif mode == "flower-deployment":
                runs[mode] = run_flower_deployment(args.out, task, args.flower_venv)
            else:
                runs[mode] = run_flower_simulation(args.out, task, args.flower_venv)
            write_json(results_path, {"rounds": args.rounds, "seed": args.seed, "runs": runs,
                                      "machine": machine_facts(), "flower": _flower_versions(args.flower_venv)})
    from bench.peers_report import render

    if not args.render_only:
        write_json(PAGE_DATA, read_json(results_path))
    PAGE.write_text(render(read_json(PAGE_DATA)))
    log(f"wrote {PAGE}")
    return 0


def _flower_versions(venv: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in "
            "('flwr', 'ray', 'torch', 'grpcio', 'protobuf')} | {'python': sys.version.split()[0]}))")
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60,
                             check=True)
        return dict(json.loads(out.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())
