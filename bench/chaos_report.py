"""The chaos soak's checks and page: computed from the run directories and the observed round events only.

Definitions (also printed on the page):

* **every round committed or retried**: the store holds rounds 1..N exactly, the run did not stop early, and for
  every round the observed attempts are 0, 1, .. k with every attempt but the last abandoned and the last
  committed.
* **nothing accepted lost**: for every committed round, the agents whose last outcome in the committing attempt
  was ``accepted`` are exactly the round's accepted rows in the store, each has its update file, and the round's
  committed tensors equal the sample-weighted mean of exactly those update files (the heterotune rule for one
  backbone group, recomputed here independently; rtol 1e-5, atol 1e-6). An update accepted in an attempt that
  was abandoned counts as retried (its round ran again), never as lost.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from coordinator.run_report import write_report
from coordinator.store import STORE_FILE, load_state
from protocols.durable import write_atomic

BACKBONE = "minilm-l3"
# Coordinator log lines that show how the system reacted, counted on the page.
REACTIONS = {
    "replaced from standby": "from standby in place of",
    "noticed stalled": "stalled (no heartbeat",
    "noticed lost (last will)": "was lost mid-round",
    "heard again after a stall": "heard again after a stall",
    "rejoined mid-round": "rejoined mid-round",
    "left the run": "left the run",
    "attempt abandoned": "abandoning",
    "rejected update": "rejected update from",
    "rejected report": "rejected report from",
}
REACTION_NAMES = tuple(REACTIONS)


def check_rounds(result: dict[str, Any], run_dir: Path) -> tuple[bool, list[str], dict[int, list[bool]]]:
    """Every round 1..N committed, retried attempts before it abandoned; returns (ok, problems, attempts)."""
    rounds = int(result["config"]["rounds"])
    problems: list[str] = []
    with sqlite3.connect(run_dir / STORE_FILE) as db:
        stored = [r[0] for r in db.execute("SELECT round_id FROM rounds ORDER BY round_id")]
    if stored != list(range(1, rounds + 1)):
        problems.append(f"store holds rounds {stored}, expected 1..{rounds}")
    if result["summary"].get("stopped") or result["error"]:
        problems.append(f"run stopped early: {result['summary'].get('stopped') or result['error']}")
    attempts: dict[int, list[bool]] = defaultdict(list)
    for event in result["events"]:
        if event["event"] == "round_ended" and event["round_id"] <= rounds:
            if event["attempt"] != len(attempts[event["round_id"]]):
                problems.append(f"round {event['round_id']}: attempt {event['attempt']} out of order")
            attempts[event["round_id"]].append(bool(event["committed"]))
    for round_id in range(1, rounds + 1):
        outcome = attempts.get(round_id, [])
        if not outcome or not outcome[-1] or any(outcome[:-1]):
            problems.append(f"round {round_id}: attempts {outcome} (wanted abandoned..., committed)")
    return not problems, problems, dict(attempts)


def latest_outcomes(events: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, str]]:
    """(round, attempt) -> agent -> its last outcome (a later event replaces an earlier one)."""
    out: dict[tuple[int, int], dict[str, str]] = defaultdict(dict)
    for event in events:
        if event["event"] == "update_handled":
            out[(event["round_id"], event["attempt"])][event["agent_id"]] = event["outcome"]
    return out


def check_accepted(result: dict[str, Any], run_dir: Path,
                   attempts: dict[int, list[bool]]) -> tuple[bool, list[str], dict[str, int]]:
    """Nothing accepted lost (see the module docstring); returns (ok, problems, counts)."""
    problems: list[str] = []
    counts = Counter[str]()
    outcomes = latest_outcomes(result["events"])
    with sqlite3.connect(run_dir / STORE_FILE) as db:
        rows = db.execute("SELECT round_id, agent_id, n_train FROM metrics WHERE accepted = 1").fetchall()
        recorded = dict(db.execute("SELECT round_id, accepted FROM rounds").fetchall())
    accepted_rows: dict[int, dict[str, int]] = defaultdict(dict)
    for round_id, agent_id, n_train in rows:
        accepted_rows[round_id][agent_id] = int(n_train)
    for round_id, tries in sorted(attempts.items()):
        for attempt, committed in enumerate(tries):
            seen = {a for a, o in outcomes.get((round_id, attempt), {}).items() if o == "accepted"}
            if not committed:
                counts["accepted in an abandoned attempt (retried)"] += len(seen)
                continue
            stored = accepted_rows.get(round_id, {})
            counts["accepted and committed"] += len(stored)
            if seen != set(stored):
                problems.append(f"round {round_id}: accepted events {sorted(seen)} != stored {sorted(stored)}")
            if recorded.get(round_id) != len(stored):
                problems.append(f"round {round_id}: rounds.accepted {recorded.get(round_id)} != {len(stored)} rows")
            problems += _recompute(run_dir, round_id, stored)
            counts["rounds recomputed"] += 1
    return not problems, problems, dict(counts)


def _recompute(run_dir: Path, round_id: int, weights: dict[str, int]) -> list[str]:
    """The committed tensors against the weighted mean of the accepted update files, independently."""
    folder = run_dir / "updates" / f"round-{round_id:04d}"
    missing = [a for a in weights if not (folder / f"{a}.safetensors").is_file()]
    if missing or not weights:
        return [f"round {round_id}: update files missing for {missing or 'every agent (none accepted)'}"]
    updates = {a: load_file(str(folder / f"{a}.safetensors")) for a in weights}
    total = float(sum(weights.values()))
    before = load_state(run_dir / "tensors" / f"round-{round_id - 1:04d}.safetensors")
    after = load_state(run_dir / "tensors" / f"round-{round_id:04d}.safetensors")
    problems = []
    named = [("global", n, after.global_tensors[n]) for n in before.global_tensors]
    named += [("group", n, after.group_tensors[BACKBONE][n]) for n in before.group_tensors.get(BACKBONE, {})]
    for scope, name, value in named:
        mean = sum(w * updates[a][name].astype(np.float64) for a, w in weights.items()) / total
        if not np.allclose(value, mean, rtol=1e-5, atol=1e-6):
            problems.append(f"round {round_id}: {scope} tensor {name} differs from the mean of its accepted updates "
                            f"(max |diff| {float(np.max(np.abs(value - mean))):.3g})")
    return problems


def final_accuracy(result: dict[str, Any], agents: set[str] | None = None) -> dict[str, float | None]:
    """Both views of the final evaluation, pooled by test-set size, over ``agents`` (default: all evaluated)."""
    final = result["summary"].get("final") or {}
    per = {a: v for a, v in (final.get("agents") or {}).items() if agents is None or a in agents}
    out: dict[str, float | None] = {}
    for view, n_key in (("personal", "n_test"), ("global", "n_global_test")):
        pairs = [(v[f"{view}_accuracy"], v[n_key]) for v in per.values() if v[f"{view}_accuracy"] is not None]
        n = sum(w for _, w in pairs)
        out[view] = 100.0 * sum(a * w for a, w in pairs) / n if n else None
    out["agents"] = float(len(per))
    return out


def connections(run_dir: Path) -> Counter[str]:
    """Client id -> connections the broker accepted (from its log; the restarted broker appends to it)."""
    log = run_dir / "broker" / "mosquitto.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return Counter(re.findall(r"New client connected from \S+ as (\S+)", text))


def round_seconds(result: dict[str, Any]) -> list[float]:
    return [e["seconds"] for e in result["events"] if e["event"] == "round_ended" and e["committed"]]


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _accuracy_plot(results: dict[str, Any], out: Path, path: Path) -> None:
    """Pooled global and personal accuracy per round, quiet vs chaos, with the chaos faults marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coordinator.run_report import load_run, round_series

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for name, style in (("quiet", "-"), ("chaos", "--")):
        series = round_series(load_run(out / name / "run"))
        for ax, view in zip(axes, ("global", "personal"), strict=True):
            xs = [s.round_id for s in series]
            ys = [100 * (s.accuracy[view].get(BACKBONE) or np.nan) for s in series]
            ax.plot(xs, ys, style, marker=".", label=name)
    colors = {"kill": "tab:red", "stall": "tab:orange", "cut": "tab:blue", "broker_restart": "black"}
    for fault in results["plan"]:
        for ax in axes:
            ax.axvline(fault["round_id"], color=colors[fault["kind"]], alpha=0.25, lw=1)
    for ax, view in zip(axes, ("global", "personal"), strict=True):
        ax.set_title(f"{view} accuracy per round (pooled); faults: red kill, orange stall, blue cut, black broker")
        ax.title.set_fontsize(8)
        ax.set_xlabel("round")
        ax.legend()
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_page(results: dict[str, Any], out: Path, page: Path, plots: Path, *, tolerance: float) -> bool:
    """Run every check, copy the chaos run's report plots into ``plots`` and write ``page``; True if all pass."""
    quiet, chaos = results["runs"]["quiet"], results["runs"]["chaos"]
    chaos_dir, quiet_dir = out / "chaos" / "run", out / "quiet" / "run"
    rounds_ok, round_problems, attempts = check_rounds(chaos, chaos_dir)
    quiet_rounds_ok, quiet_problems, quiet_attempts = check_rounds(quiet, quiet_dir)
    kept_ok, kept_problems, kept = check_accepted(chaos, chaos_dir, attempts)
    quiet_kept_ok, quiet_kept_problems, _ = check_accepted(quiet, quiet_dir, quiet_attempts)
    acc_all = {n: final_accuracy(r) for n, r in (("quiet", quiet), ("chaos", chaos))}
    common = set((quiet["summary"].get("final") or {}).get("agents", {})) & \
        set((chaos["summary"].get("final") or {}).get("agents", {}))
    acc_common = {n: final_accuracy(r, common) for n, r in (("quiet", quiet), ("chaos", chaos))}
    gaps = {view: _gap(acc_all["quiet"][view], acc_all["chaos"][view]) for view in ("personal", "global")}
    passed = {view: gap is not None and abs(gap) <= tolerance for view, gap in gaps.items()}
    acc_ok = all(passed.values())
    plots.mkdir(parents=True, exist_ok=True)
    written = write_report(chaos_dir, out / "chaos" / "report")
    pngs = []
    for path in written:
        if path.suffix == ".png":
            shutil.copy(path, plots / path.name)
            pngs.append(path.name)
    _accuracy_plot(results, out, plots / "quiet-vs-chaos.png")
    ok = rounds_ok and kept_ok and acc_ok and quiet_rounds_ok and quiet_kept_ok

    done = Counter(e["action"] for e in chaos["chaos"])
    reactions = chaos["reactions"]
    outcome_counts = {n: Counter(e["outcome"] for e in r["events"] if e["event"] == "update_handled")
                      for n, r in (("quiet", quiet), ("chaos", chaos))}
    reasons = Counter(re.sub(r"\d+(\.\d+)?", "#", e["reason"])[:70] for e in chaos["events"]
                      if e["event"] == "update_handled" and e["outcome"] in ("rejected", "lost") and e["reason"])
    conns = {n: connections(out / n / "run") for n in ("quiet", "chaos")}
    extra_conns = {n: sum(max(0, c - 1) for a, c in conns[n].items() if a.startswith("edge-")) for n in conns}
    retried = {r: len(t) - 1 for r, t in attempts.items() if len(t) > 1}
    secs = {n: round_seconds(r) for n, r in (("quiet", quiet), ("chaos", chaos))}
    exits = {a: codes for a, codes in chaos["exits"].items()}
    final_exits = Counter(str(codes[-1]) for codes in exits.values())
    args = results["args"]
    cfg = chaos["config"]
    lines = [
        "# Chaos soak: kills, stalls, link cuts and a broker restart against a quiet run",
        "",
        "Generated by `.venv/bin/python -m bench.chaos_soak` (bench/chaos_soak.py; do not edit by hand). "
        f"Commit `{results['commit'][:12]}`, seed {args['seed']}, load average before/after the chaos run "
        f"{_load(chaos['load_before'])} / {_load(chaos['load_after'])} on {os.cpu_count()} shared cores.",
        "",
        f"**Checks: {'all passed' if ok else 'FAILED'}.**",
        "",
        "| check | result |",
        "|---|---|",
        f"| every round committed or retried (chaos run) | {'pass' if rounds_ok else 'FAIL'}: "
        f"{len(attempts)} rounds, {len(retried)} retried ({sum(retried.values())} abandoned attempts) |",
        f"| nothing accepted lost (chaos run) | {'pass' if kept_ok else 'FAIL'}: "
        f"{kept.get('accepted and committed', 0)} accepted updates in {kept.get('rounds recomputed', 0)} recomputed "
        f"aggregates, {kept.get('accepted in an abandoned attempt (retried)', 0)} accepted in abandoned attempts |",
        f"| the same two checks on the quiet run | {'pass' if quiet_rounds_ok and quiet_kept_ok else 'FAIL'} |",
        f"| final global accuracy, chaos vs quiet (within {tolerance:g} points) | {_pass(passed['global'])}: "
        f"{_fmt(acc_all['chaos']['global'])} vs {_fmt(acc_all['quiet']['global'])} |",
        f"| final personal accuracy, chaos vs quiet (within {tolerance:g} points) | {_pass(passed['personal'])}: "
        f"{_fmt(acc_all['chaos']['personal'])} vs {_fmt(acc_all['quiet']['personal'])} |",
        "",
    ]
    for problem in (round_problems + kept_problems + quiet_problems + quiet_kept_problems)[:20]:
        lines.append(f"- problem: {problem}")
    lines += [
        "## Set-up",
        "",
        f"- Fleet: {args['agents']} real `edge-agent join` processes (ORT backend, 1 thread each), MiniLM-L3 text "
        "(tweet sentiment, Dirichlet alpha 1.0, 150 samples per device at most, a 150-sample balanced global test "
        "set), "
        f"{cfg['rounds']} rounds, {cfg['local_steps']} local steps, batch {cfg['task']['batch_size']}, max length "
        f"{cfg['task']['max_length']}; `agents_per_round` {cfg['agents_per_round']}, `over_selection` "
        f"{cfg['over_selection']}, `min_fraction` {cfg['min_fraction']}, `max_round_attempts` "
        f"{cfg['max_round_attempts']}, `round_timeout_s` {cfg['round_timeout_s']:g}.",
        f"- A third of the agents ({', '.join(chaos['linked'])}) reach the broker through the emulated link "
        "(bench/link_emulator.py, unshaped, 20 ms round trip) in both runs; the others connect directly.",
        "- The broker is the run's own mosquitto (`coordinator run` without `--broker`, persistence on, autosave "
        "every 30 s). The broker fault is a restart of that one node: SIGTERM (it saves its persistence file), 3 s "
        "down, then `mosquitto -c` with the same mosquitto.conf on the same port (what `coordinator run --resume` "
        "does with a dead broker). A clustered broker (two nodes, failover) is another branch's work; the script "
        "takes `--broker HOST:PORT` for an external broker, where it skips the restart it cannot do.",
        "- Quiet run: the same data, configuration, seeds and links, no faults. Chaos run: the seeded schedule of "
        "bench/chaos_plan.py, tied to round starts seen through the observer hooks, no faults in the last two "
        "rounds (every agent is back for the final evaluation).",
        "",
        "## Faults done and how the system reacted",
        "",
        "| fault | planned | done | the system's reaction (counted) |",
        "|---|---|---|---|",
        f"| SIGKILL an invited agent, restarted with the same id and state after 2-8 s | {_planned(results, 'kill')} | "
        f"{done.get('kill', 0)} (restarted {done.get('restarted', 0)}) | rejoined mid-round: "
        f"{reactions.get('rejoined mid-round', 0)}; lost by last will: "
        f"{reactions.get('noticed lost (last will)', 0)} |",
        f"| SIGSTOP an invited agent for 4, 16 or 24 s | {_planned(results, 'stall')} | {done.get('stall', 0)} "
        f"(resumed {done.get('resumed', 0)}) | noticed stalled: {reactions.get('noticed stalled', 0)}; heard again: "
        f"{reactions.get('heard again after a stall', 0)} |",
        f"| cut an agent's link, refusing reconnects for 0, 3 or 15 s | {_planned(results, 'cut')} | "
        f"{done.get('cut', 0)} | broker connections beyond each agent's first: {extra_conns['chaos']} (quiet run: "
        f"{extra_conns['quiet']}) |",
        f"| restart the broker node | {_planned(results, 'broker_restart')} | {done.get('broker_stopped', 0)} "
        f"stopped, {done.get('broker_started', 0)} started | every client reconnected (counted above) |",
        f"| (any) | | skipped: {done.get('skipped', 0)}, failed: {done.get('failed', 0)} | replaced from standby: "
        f"{reactions.get('replaced from standby', 0)}; attempts abandoned: {reactions.get('attempt abandoned', 0)} |",
        "",
        "The coordinator's reaction lines counted in both runs (the quiet run has no faults; what it shows is the "
        "shared machine's load, e.g. an agent starved of CPU for 12 s counts as stalled):",
        "",
        "| reaction (coordinator log) | quiet | chaos |",
        "|---|---|---|",
        *[f"| {name} | {quiet['reactions'].get(name, 0)} | {reactions.get(name, 0)} |" for name in REACTION_NAMES],
        "",
        "A SIGKILLed agent stops beating too: it counts as stalled after 12 s of silence or as lost when its will "
        "arrives (10 s will delay), whichever comes first, so `noticed stalled` also counts kills and CPU-starved "
        "agents. Broker connections beyond the first include the restarts after kills, the reconnects after cuts and "
        "every client's reconnect after the broker restart.",
        "",
        *([f"No attempt was abandoned: with `min_fraction` {cfg['min_fraction']} ({_needed(chaos)} of "
           f"{cfg['agents_per_round']} updates needed), over-selection and standby replacement, every round reached "
           "its minimum at the first attempt, so this soak did not exercise the retry path (tests/test_stalls.py and "
           "tests/test_faults.py do).", ""] if not retried else []),
        "Outcomes of invited agents over all rounds (a later outcome for the same agent and attempt replaces an "
        "earlier one in the checks, but every event is counted here):",
        "",
        "| run | accepted | rejected | declined | lost (stalled or last will) |",
        "|---|---|---|---|---|",
    ]
    for name in ("quiet", "chaos"):
        n = outcome_counts[name]
        lines.append(f"| {name} | {n['accepted']} | {n['rejected']} | {n['declined']} | {n['lost']} |")
    lines += ["", "Reasons for rejected or lost updates in the chaos run (numbers as #):", ""]
    lines += [f"- {count} x `{reason}`" for reason, count in reasons.most_common(10)] or ["- none"]
    lines += [
        "",
        f"Agent exit codes at the end of the chaos run (last process of each id): {dict(final_exits)}; "
        "0 = finished all rounds (`edge-agent join --help`).",
        "",
        "## Accuracy and time",
        "",
        "| run | final global accuracy | final personal accuracy | agents evaluated | same, agents evaluated "
        "in both runs (global / personal) | round seconds, median (max) | wall seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in (("quiet", quiet), ("chaos", chaos)):
        a, c = acc_all[name], acc_common[name]
        s = secs[name]
        lines.append(f"| {name} | {_fmt(a['global'])} | {_fmt(a['personal'])} | {int(a['agents'] or 0)} | "
                     f"{_fmt(c['global'])} / {_fmt(c['personal'])} | "
                     f"{_fmt(float(np.median(s)) if s else None)} ({_fmt(max(s) if s else None)}) | "
                     f"{run['wall_seconds']:.0f} |")
    lines += [
        "",
        "Accuracy is pooled over the devices' test sets in the final evaluation (after the last round): global = "
        "the aggregate on the shared 150-sample global test set, personal = each device's own model on its own "
        "test split. One seed, one run each: the gap is one sample of run-to-run variation, not a mean.",
        "",
        "![accuracy per round, quiet vs chaos](chaos-soak/quiet-vs-chaos.png)",
        "",
        "Per round, accuracy is pooled over the agents that reported in that round (a different subset each round, "
        "hence the jumps in the personal view); the final values above are over all twelve.",
        "",
        "## Found while building the soak",
        "",
        "- The chaos script's first broker restart found nothing to stop: with a relative run directory (the default "
        "`coordinator run --out runs/run`), the run's own mosquitto was started as `mosquitto -c runs/.../"
        "mosquitto.conf` and wrote its log and persistence to relative paths, while broker.json recorded the "
        "absolute config path. `mosquitto_pid_running` therefore never recognised it: `coordinator run --resume` "
        "after a coordinator kill -9 started a second mosquitto on the busy port and left the first one running "
        "for ever, and a dead broker restarted from another working directory logged and persisted elsewhere. "
        "Fixed in coordinator/broker.py (the broker's directory is made absolute; a relative `-c` is resolved "
        "against the process's cwd); tests/test_run_broker_paths.py (real mosquitto) fails without the fix.",
        "",
        "The chaos run's `coordinator report` plots:",
        "",
    ]
    lines += [f"![{name}](chaos-soak/{name})" for name in pngs]
    lines += [
        "",
        "## Definitions of the checks",
        "",
        "- Every round committed or retried: the store holds rounds 1..N exactly, the run did not stop early, and "
        "each round's observed attempts are abandoned..., committed (`RoundEnded` events, coordinator/observers.py).",
        "- Nothing accepted lost: for every committed round, the agents whose last `UpdateHandled` outcome in the "
        "committing attempt was `accepted` are exactly the round's accepted rows in coordinator.sqlite, each has its "
        "kept update file (`updates/round-NNNN/`), and the round's committed tensors equal the n_train-weighted mean "
        "of exactly those files (the heterotune rule for one backbone group, recomputed independently in "
        "bench/chaos_report.py; rtol 1e-5, atol 1e-6). An update accepted in an abandoned attempt counts as "
        "retried: its round ran again.",
        "",
        "Reproduce: `.venv/bin/python -m bench.chaos_soak` (both runs, then this page; records in "
        "runs/bench/chaos-soak/).",
        "",
    ]
    write_atomic(page, "\n".join(lines).encode("utf-8"))
    (out / "checks.json").write_text(json.dumps({"ok": ok, "rounds": round_problems, "accepted": kept_problems,
                                                 "quiet": quiet_problems + quiet_kept_problems, "counts": kept,
                                                 "accuracy": acc_all, "gaps": gaps}, indent=1))
    return ok


def _gap(quiet: float | None, chaos: float | None) -> float | None:
    """Points the chaos run lost against the quiet run (negative: it did better)."""
    return None if quiet is None or chaos is None else quiet - chaos


def _pass(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _needed(result: dict[str, Any]) -> str:
    """Updates a round needed to commit, as its RoundStarted events said."""
    seen = sorted({e["needed"] for e in result["events"] if e["event"] == "round_started" and e["needed"]})
    return "/".join(str(n) for n in seen) or "?"


def _planned(results: dict[str, Any], kind: str) -> int:
    return sum(1 for f in results["plan"] if f["kind"] == kind)


def _load(load: Any) -> str:
    return "/".join(f"{x:.1f}" for x in load)
