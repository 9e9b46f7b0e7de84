"""The DP benchmark: heterotune's personal and global accuracy at epsilon 1, 4, 8 and without DP; docs/privacy.md.

    .venv/bin/python -m bench.privacy                     # --quick fleet, 5 seeds, epsilon 1, 4, 8 and no DP
    .venv/bin/python -m bench.privacy --seeds 0 1 2       # fewer seeds when the CPU is short
    .venv/bin/python -m bench.privacy --render-from runs/bench/privacy/results.json   # redraw the page only

Same fleet, data, seeds and training as `bench.methods --quick` (MiniLM-L3 + MiniLM-L6, 2 agents each, tweets,
3 rounds x 8 steps), through the same in-process runner (bench/methods_federation.py), so every setting of a
seed sees identical agents and data and differs only in the [privacy] table: a paired comparison. Every device
takes part in every round (population = agents per round = 4), so there is no sampling amplification: the
accountant charges each round in full. The noise seed is pinned per seed (1000 + seed) to make the page
reproducible; a real run leaves it unset so nobody can subtract the noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_OUT, REPO, git_commit, load_average, log, machine_facts, read_json, write_json
from bench.methods_plan import QUICK
from bench.methods_stats import mean_sd, paired

EPSILONS = (8.0, 4.0, 1.0)
SEEDS = (0, 1, 2, 3, 4)
DELTA = 1e-5
# C: a little under the median L2 norm of a device's round delta (global + group tensors) on this fleet without DP
# (2.36 on seed 0, from this script's --no-dp-only before the run; the page prints the per-seed medians it saw).
CLIP_NORM = 2.0


def _settings(seeds: tuple[int, ...]) -> Any:
    return dataclasses.replace(QUICK, mode="privacy", seeds=seeds, methods=("heterotune",))


def _config(job: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    from bench.methods_plan import method_config
    from bench.methods_worker import settings_from_dict
    from coordinator.config import RunConfig

    config, agents = method_config(settings_from_dict(job["settings"]), "heterotune", job["seed"])
    if job["epsilon"] is not None:
        privacy = {"clip_norm": job["clip_norm"], "target_epsilon": job["epsilon"], "delta": job["delta"],
                   "population": len(agents), "noise_seed": 1000 + job["seed"]}
        config = RunConfig.model_validate({**config.model_dump(), "privacy": privacy})
    return config, agents


def delta_norms(states: dict[int, Any], updates: dict[int, dict[str, dict[str, np.ndarray]]],
                groups: dict[str, str]) -> list[float]:
    """Each device's round delta norm over its travelling tensors (what DP clips), every round."""
    norms = []
    for round_id, uploads in updates.items():
        before = states[round_id - 1]
        for agent, tensors in uploads.items():
            reference = {**before.global_tensors, **before.group_tensors[groups[agent]]}
            norms.append(math.sqrt(sum(float(np.sum((np.asarray(tensors[n], np.float64) - reference[n]) ** 2))
                                       for n in reference)))
    return norms


def run_privacy_job(job: dict[str, Any]) -> dict[str, Any]:
    """One federation (a seed at one epsilon, or without DP); metrics only."""
    from bench.methods_federation import AgentSpec, run_inprocess
    from coordinator.config import privacy_plan
    from export.bundle import load_bundle

    started = time.time()
    config, agents = _config(job)
    plan = privacy_plan(config)
    bundles = {b: load_bundle(Path(job["bundle_dirs"][b])) for b in config.backbones}
    specs = [AgentSpec(a, b, Path(job["client_files"][a])) for a, b in agents.items()]
    run = run_inprocess(config, bundles, specs, Path(job["global_test_file"]), threads=1, final_eval=True,
                        keep_tensors=True)
    last = max(r.round for r in run.rounds)
    final = [r for r in run.rounds if r.round == last]
    return {
        "seed": job["seed"], "epsilon": job["epsilon"],
        "noise_multiplier": plan.noise_multiplier if plan else None,
        "planned_epsilon": plan.planned_epsilon if plan else None,
        "reported_epsilon": run.diagnostics[last].get("privacy", {}).get("epsilon"),
        "personal": sum(r.personal_correct for r in final) / sum(r.personal_total for r in final),
        "global": sum(e.correct for e in run.final_global.values()) / sum(e.total for e in run.final_global.values()),
        # Without DP: the raw delta norms (to judge C); with DP the uploads kept are already clipped.
        "delta_norms": delta_norms(run.states, run.updates, agents) if job["epsilon"] is None else [],
        "seconds": run.seconds, "wall_seconds": time.time() - started, "commit": job["commit"],
    }


def _label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"ε = {epsilon:g}"


def _job_file(out: Path, job: dict[str, Any]) -> Path:
    name = "nodp" if job["epsilon"] is None else f"eps{job['epsilon']:g}-c{job['clip_norm']:g}"
    return out / "jobs" / f"{name}-s{job['seed']}.json"


def render(raw: dict[str, Any]) -> str:
    """The page: one row per setting (mean ± sd over seeds) and paired differences against no DP."""
    results = raw["results"]
    settings = [None, *raw["epsilons"]]
    by = {(r["epsilon"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = ["# Differential privacy: accuracy against epsilon", "",
             "Generated by `bench/privacy.py`; do not edit by hand. Mechanism and accounting: "
             "[privacy-mechanism.md](privacy-mechanism.md).", "",
             f"- Command: `{raw['command']}`",
             f"- Commit: `{raw['commit']}`; {raw['finished_at']} UTC; {raw['wall_seconds'] / 60:.1f} min wall",
             f"- Machine: {raw['machine']['cpu']}, {raw['machine']['cores_usable']} usable cores (shared with other "
             f"work: load average {raw['load_before']} before, {raw['load_after']} after)",
             "- Fleet: the `bench.methods --quick` fleet (MiniLM-L3 + MiniLM-L6, 2 agents each, tweets, "
             "dirichlet-1.0, 100 train tweets per agent), heterotune (CMGA + group mean), 3 rounds × 8 local steps; "
             "every agent every round (population 4, 4 per round: no sampling amplification)",
             f"- DP: clip norm C = {raw['clip_norm']:g} on each device's round delta (global + group tensors), "
             f"Gaussian noise z·C on each group's sum, δ = {raw['delta']:g}; z calibrated by the RDP accountant "
             "(dp-accounting) so the 3 rounds spend exactly the target ε (fixed-size selection, replace-one)",
             f"- Seeds: {', '.join(map(str, seeds))} ({len(seeds)}); every setting of a seed runs on the same agents, "
             "data and training seed, so differences are paired; noise seed 1000 + seed",
             "- Federations from commits " + ", ".join(f"`{c}`" for c in sorted({str(r["commit"]) for r in results}))
             + " (a finished federation is reused with --reuse; the no-DP ones do not depend on the DP code)", ""]
    if len(seeds) < 5:
        lines += [f"**Only {len(seeds)} of the planned 5 seeds ran** (CPU time); rerun the full page with "
                  "`python -m bench.privacy --reuse` (5 seeds by default).", ""]
    lines += ["| setting | z | ε reported after round 3 | personal accuracy | global accuracy |",
              "|---|---|---|---|---|"]
    for eps in settings:
        rows = [by[(eps, s)] for s in seeds if (eps, s) in by]
        if not rows:
            continue
        z = rows[0]["noise_multiplier"]
        rep = rows[0]["reported_epsilon"]
        p_mean, p_sd = mean_sd([100 * r["personal"] for r in rows])
        g_mean, g_sd = mean_sd([100 * r["global"] for r in rows])
        lines.append(f"| {_label(eps)} | {'—' if z is None else f'{z:.3g}'} | {'—' if rep is None else f'{rep:.3g}'} "
                     f"| {p_mean:.1f} ± {p_sd:.1f} | {g_mean:.1f} ± {g_sd:.1f} |")
    lines += ["", "Accuracy in % (mean ± sample sd over seeds). *Personal*: each agent's own test split after its "
              "last round's local training, pooled over agents. *Global*: the final aggregate on the balanced "
              "held-out set (3 classes, chance 33.3 %), pooled over agents.", "",
              "## Paired differences against no DP (percentage points)", "",
              "| setting | personal Δ | p | global Δ | p |", "|---|---|---|---|---|"]
    for eps in raw["epsilons"]:
        cells = []
        for view in ("personal", "global"):
            d = paired({s: 100 * by[(eps, s)][view] for s in seeds if (eps, s) in by},
                       {s: 100 * by[(None, s)][view] for s in seeds if (None, s) in by})
            cells += [f"{d['mean']:+.1f} ± {d['sd']:.1f}", f"{d['p']:.3g}"]
        lines.append(f"| {_label(eps)} | " + " | ".join(cells) + " |")
    norms = {s: by[(None, s)]["delta_norms"] for s in seeds if (None, s) in by}
    if norms:
        medians = ", ".join(f"seed {s}: {float(np.median(v)):.3g}" for s, v in norms.items())
        clipped = sum(sum(n > raw["clip_norm"] for n in v) for v in norms.values())
        total = sum(len(v) for v in norms.values())
        lines += ["", f"Round-delta norms without DP (median per seed): {medians}; {clipped} of {total} device "
                  f"rounds exceed C = {raw['clip_norm']:g}.", ""]
    chance = 100 / 3
    dp_rows = {eps: [by[(eps, s)] for s in seeds if (eps, s) in by] for eps in raw["epsilons"]}
    dp_global = {eps: mean_sd([100 * r["global"] for r in rows])[0] for eps, rows in dp_rows.items() if rows}
    per_coordinate = {eps: rows[0]["noise_multiplier"] * raw["clip_norm"] / 2 for eps, rows in dp_rows.items() if rows}
    if dp_global:
        at_chance = all(abs(g - chance) < 3 for g in dp_global.values())
        lines += ["Noise std per coordinate on a group's mean delta (z·C/2 devices): "
                  + ", ".join(f"{v:.3g} at {_label(e)}" for e, v in per_coordinate.items())
                  + f", against a clipped delta of norm ≤ C = {raw['clip_norm']:g} over all the adapter coordinates. "
                  + ("Global accuracy under DP is within 3 points of chance (33.3 %) at every ε: on this fleet the "
                     "noisy aggregate carries no measurable task signal, so the settings do not differ from each "
                     "other." if at_chance else "Global accuracy under DP: "
                     + ", ".join(f"{g:.1f} % at {_label(e)}" for e, g in dp_global.items()) + "."), ""]
    lines += ["Sign-flip p over seeds (smallest possible: 2/2^n, 0.0625 with 5 seeds). Per-seed results: "
              "`docs/privacy.json` (redraw the page with `--render-from docs/privacy.json`).", "",
              "## Reading it", "",
              "With 4 devices a round, DP noise is large next to the signal: the noise on a group's mean delta has "
              "std z·C/m_g per coordinate with m_g = 2 devices, against a clipped delta of norm ≤ C spread over "
              "every coordinate of the adapters. Client-level DP pays off with hundreds or thousands of devices a "
              "round (the noise on the mean falls as 1/m while ε stays); this page measures the small-fleet end. "
              "Personal accuracy is measured after local training, which starts from the noisy aggregate each round.",
              ""]
    return "\n".join(lines)


def _render_finished(args: argparse.Namespace, seeds: tuple[int, ...], epsilons: list[float | None], commit: str,
                     started: float) -> int:
    """The page from the federations finished so far, keeping only seeds that have every setting; the wall time is
    the span of their job files (first federation's start to last one's end)."""
    found: dict[tuple[int, float | None], tuple[dict[str, Any], float]] = {}
    for s in seeds:
        for e in epsilons:
            path = _job_file(args.out, {"seed": s, "epsilon": e, "clip_norm": args.clip_norm})
            if path.exists():
                found[(s, e)] = (read_json(path), path.stat().st_mtime)
    complete = [s for s in seeds if all((s, e) in found for e in epsilons)]
    kept = [found[(s, e)] for s in complete for e in epsilons]
    if not kept:
        log("no seed has every setting finished yet")
        return 1
    span = max(t for _, t in kept) - min(t - r["wall_seconds"] for r, t in kept)
    load = load_average()
    raw = {"command": "python -m bench.privacy --reuse", "commit": commit,
           "finished_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "wall_seconds": span,
           "machine": machine_facts(), "load_before": load, "load_after": load, "clip_norm": args.clip_norm,
           "delta": args.delta, "epsilons": [e for e in epsilons if e is not None], "planned_seeds": list(seeds),
           "results": [r for r, _ in kept]}
    write_json(args.out / "results.json", raw)
    args.page.write_text(render(raw))
    write_json(args.page.with_suffix(".json"), raw)
    log(f"wrote {args.page} from seeds {complete} ({time.time() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    parser.add_argument("--clip-norm", type=float, default=CLIP_NORM)
    parser.add_argument("--delta", type=float, default=DELTA)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT / "privacy")
    parser.add_argument("--page", type=Path, default=REPO / "docs" / "privacy.md")
    parser.add_argument("--reuse", action="store_true", help="keep federations already finished under --out/jobs")
    parser.add_argument("--no-dp-only", action="store_true", help="run only the no-DP federations (to time one and "
                        "to see the delta norms C should clip)")
    parser.add_argument("--render-from", type=Path, help="redraw the page from a results.json")
    parser.add_argument("--render-finished", action="store_true", help="run nothing: write the page from the "
                        "federations already finished under --out/jobs, keeping only seeds that have every setting "
                        "(for a run stopped short of its seeds)")
    args = parser.parse_args(argv)
    if args.render_from:
        args.page.write_text(render(read_json(args.render_from)))
        return 0
    from bench.methods import prepare_bundles, prepare_fleets

    started, load_before = time.time(), load_average()
    settings = _settings(tuple(args.seeds))
    epsilons: list[float | None] = [None] if args.no_dp_only else [None, *args.epsilons]
    commit = git_commit()
    if args.render_finished:  # touches neither bundles nor fleet files (a run may still be reading them)
        return _render_finished(args, settings.seeds, epsilons, commit, started)
    bundles = prepare_bundles(settings)
    fleets = prepare_fleets(settings, args.out)
    jobs = [{"settings": settings.to_dict(), "seed": s, "epsilon": e, "clip_norm": args.clip_norm,
             "delta": args.delta, "commit": commit,
             "bundle_dirs": {b: str(bundle.directory) for b, bundle in bundles.items()},
             "client_files": fleets[s]["client_files"], "global_test_file": fleets[s]["global_test_file"]}
            for s in settings.seeds for e in epsilons]
    results, todo = [], []
    for job in jobs:
        path = _job_file(args.out, job)
        if args.reuse and path.exists():
            results.append(read_json(path))
        else:
            todo.append(job)
    log(f"{len(jobs)} federations, {len(todo)} to run on {args.workers} workers")
    if todo:
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_privacy_job, job): job for job in todo}
            for future in as_completed(futures):
                job, result = futures[future], future.result()
                write_json(_job_file(args.out, job), result)
                results.append(result)
                log(f"{_label(job['epsilon'])} seed {job['seed']}: personal {result['personal']:.3f} global "
                    f"{result['global']:.3f} in {result['wall_seconds']:.0f} s")
    raw = {"command": "python -m bench.privacy " + shlex.join(sys.argv[1:] if argv is None else argv),
           "commit": commit, "finished_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "wall_seconds": time.time() - started, "machine": machine_facts(), "load_before": load_before,
           "load_after": load_average(), "clip_norm": args.clip_norm, "delta": args.delta,
           "epsilons": [] if args.no_dp_only else args.epsilons,
           "results": sorted(results, key=lambda r: (r["seed"], -1 if r["epsilon"] is None else r["epsilon"]))}
    write_json(args.out / "results.json", raw)
    if args.no_dp_only:
        for r in raw["results"]:
            print(f"seed {r['seed']}: {r['wall_seconds']:.0f} s, delta norms median {np.median(r['delta_norms']):.4g} "
                  f"min {min(r['delta_norms']):.4g} max {max(r['delta_norms']):.4g}")
        return 0
    args.page.write_text(render(raw))
    write_json(args.page.with_suffix(".json"), raw)
    log(f"wrote {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
