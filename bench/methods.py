"""The method benchmark (issue 3): every method on the same fleet, data and seeds; writes docs/results.md.

    .venv/bin/python -m bench.methods --quick      # MiniLM-L3 + MiniLM-L6, tweets, 4 agents, 2 seeds (under 10 min)
    .venv/bin/python -m bench.methods --smoke      # tiny random backbones: checks the runner, not learning

Federations run in process (bench/methods_federation.py: the agent's trainer, the export's bundles and the
coordinator's aggregation, without the broker), two at a time on two cores with one ORT thread each. Each
seed's fleet data is written once and shared by every method, so the comparison is paired. Raw results go
to runs/bench/methods-MODE/results.json (one file per finished federation under jobs/, reused with --reuse)
and beside the page (docs/results.json, kept in git so `--render-from` can redraw the page and its PNG), the page
to docs/results.md (--results to put it elsewhere: docs/results-vision.md, docs/results-bbc.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, REPO, git_commit, load_average, log, machine_facts, read_json, write_json
from bench.methods_plan import (
    BASELINES,
    CANDIDATES,
    METHODS,
    MODES,
    QUICK,
    SWEEP_BUDGETS,
    BenchSettings,
    full_sweep,
)
from bench.methods_report import render, render_index
from bench.methods_worker import run_job


def prepare_fleets(settings: BenchSettings, out: Path) -> dict[int, dict[str, Any]]:
    """Write each seed's fleet (agent files + balanced held-out set) once; every method reads the same files."""
    from coordinator.datasets import (
        LabeledDataset,
        load_bbc_news,
        load_fashion_mnist,
        load_tweet_sentiment,
        write_fleet_data,
    )

    loaders: dict[str, Callable[..., LabeledDataset]] = {
        "tweet-sentiment": load_tweet_sentiment, "bbc-news": load_bbc_news, "fashion-mnist": load_fashion_mnist}
    regime = settings.regime
    fleets: dict[int, dict[str, Any]] = {}
    for seed in settings.seeds:
        dataset = loaders[settings.dataset](max_samples=regime.dataset_samples, seed=seed)
        data = write_fleet_data(dataset, list(settings.agents()), out / "data" / f"seed-{seed}", alpha=regime.alpha,
                                seed=seed, global_per_class=regime.global_per_class,
                                max_per_client=regime.per_agent_file, min_per_client=regime.per_agent_file,
                                public_size=settings.public_samples)
        summary = read_json(out / "data" / f"seed-{seed}" / "fleet.json")
        public = summary.get("public")
        fleets[seed] = {"client_files": {a: str(p) for a, p in data.client_files.items()},
                        "global_test_file": str(data.global_test_file), "summary": summary,
                        "public_file": str(out / "data" / f"seed-{seed}" / public["file"]) if public else None}
    return fleets


def prepare_bundles(settings: BenchSettings) -> dict[str, Any]:
    """Build (or reuse) one bundle per backbone exactly as the MQTT runner does (coordinator.runner)."""
    from coordinator.config import RunConfig
    from coordinator.runner import build_bundles

    return build_bundles(RunConfig(backbones=settings.backbones, task=settings.task(), dema=settings.dema or {}))


def job_cost(settings: BenchSettings, method: str) -> float:
    """Relative cost, to start the longest federations first (smallest-common runs only the small backbone)."""
    return 0.5 if method == "smallest-common" else 1.0


def settings_key(settings: BenchSettings) -> str:
    """What a federation's result depends on. Not the method list or the seeds (each job file is named by its own
    method and seed), so --reuse keeps finished jobs when methods or seeds are added. A setting added later is
    left out while it has its default (no public set), so the federations already kept stay reusable."""
    shared = {k: v for k, v in settings.to_dict().items() if k not in ("methods", "seeds", "mode")}
    if not shared["public_samples"]:
        del shared["public_samples"]
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class CellPlan:
    """One settings' federations, ready to run: its bundles, fleets and jobs, and where its page goes."""

    settings: BenchSettings
    out: Path
    results_md: Path
    command: str
    started: float
    load_before: list[float]
    bundle_seconds: float
    bundles: dict[str, Any]
    fleets: dict[int, dict[str, Any]]
    jobs: list[tuple[dict[str, Any], Path]]  # (job, the file its result is kept in)


def plan_cell(settings: BenchSettings, out: Path, results_md: Path, *, command: str,
              job_dir: Path | None = None) -> CellPlan:
    """Build (or load) the bundles, write each seed's fleet, and list every method x seed federation."""
    started = time.time()
    load_before = load_average()
    log(f"mode {settings.mode}: {len(settings.methods)} methods x {len(settings.seeds)} seeds -> {out}")
    bundles = prepare_bundles(settings)
    bundle_seconds = time.time() - started
    fleets = prepare_fleets(settings, out)
    key = settings_key(settings)
    settings_dict = settings.to_dict()
    commit = git_commit()  # the code this invocation imported; a job finishing after a new commit still ran this
    jobs = [{"settings": settings_dict, "method": m, "seed": s, "key": key, "commit": commit,
             "bundle_dirs": {b: str(bundle.directory) for b, bundle in bundles.items()},
             "client_files": fleets[s]["client_files"], "global_test_file": fleets[s]["global_test_file"],
             "public_file": fleets[s]["public_file"]}
            for m in settings.methods for s in settings.seeds]
    jobs.sort(key=lambda j: -job_cost(settings, j["method"]))
    jobs_dir = job_dir or out / "jobs"
    return CellPlan(settings, out, results_md, command, started, load_before, bundle_seconds, bundles, fleets,
                    [(job, jobs_dir / f"{job['method']}-s{job['seed']}-{job['key']}.json") for job in jobs])


def run_jobs(plans: list[CellPlan], workers: int, reuse: bool,
             on_cell_done: Callable[[CellPlan, list[dict[str, Any]]], None]) -> None:
    """Run every plan's federations in one spawned pool; each finished one is saved at once (a crash keeps the
    rest), and ``on_cell_done`` gets a plan's results as soon as its last federation is in.

    One pool for all cells: a pool per cell idled one core while each cell's last federation ran. A reused
    federation is marked ``reused`` in the results (not in its stored file), so a sweep can say whether its
    wall time covers every federation it reports."""
    results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(plans))}
    todo: list[tuple[int, dict[str, Any], Path]] = []
    for i, plan in enumerate(plans):
        for job, path in plan.jobs:
            if reuse and path.exists():
                log(f"reusing {path.name}")
                results[i].append(read_json(path) | {"reused": True})
            else:
                todo.append((i, job, path))

    def collect(i: int, result: dict[str, Any]) -> None:
        results[i].append(result)
        if len(results[i]) == len(plans[i].jobs):
            on_cell_done(plans[i], results[i])

    for i, plan in enumerate(plans):
        if plan.jobs and len(results[i]) == len(plan.jobs):
            on_cell_done(plan, results[i])
    if not todo:
        return
    context = multiprocessing.get_context("spawn")  # ORT sessions and fork do not mix
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, job): (i, job, path) for i, job, path in todo}
        for future in as_completed(futures):
            i, job, path = futures[future]
            result = future.result()
            write_json(path, result)
            log(f"done {plans[i].settings.mode} {job['method']} seed {job['seed']} in {result['wall_seconds']:.0f} s")
            collect(i, result)


def finish_cell(plan: CellPlan, results: list[dict[str, Any]], workers: int, *, in_sweep: bool = False
                ) -> dict[str, Any]:
    """One settings' raw results to ``plan.out`` and beside its page, then the page and its PNG.

    A sweep's cell shares one pool with the other cells, so the time since it was planned (at the sweep's
    start) says nothing about it; its wall time is then the span of the federations it ran, first start to last
    end (a neighbouring cell's federation may run beside its first and last ones)."""
    settings = plan.settings
    started, wall = plan.started, time.time() - plan.started
    ran = [r for r in results if not r.get("reused") and "started_at" in r]
    if in_sweep and ran:
        started = min(r["started_at"] for r in ran)
        wall = max(r["started_at"] + r["wall_seconds"] for r in ran) - started
    order = {(m, s): i for i, (m, s) in enumerate((m, s) for m in settings.methods for s in settings.seeds)}
    results = sorted(results, key=lambda r: order[(r["method"], r["seed"])])
    regime = dataclasses.asdict(settings.regime) | {
        "per_agent_test": settings.regime.per_agent_file - settings.regime.train_per_agent}
    raw = {
        "command": plan.command,
        "commit": git_commit(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_seconds": wall,
        "wall_scope": "federations" if in_sweep and ran else "run",
        "bundle_seconds": plan.bundle_seconds,  # building (first run) or loading the bundles
        "workers": workers,
        "load_before": plan.load_before,
        "load_after": load_average(),
        "machine": machine_facts(),
        "settings": settings.to_dict() | {"regime": regime, "smallest": settings.smallest()},
        "baselines": list(BASELINES),
        "cost_cards": {b: (bundle.manifest.cost_card.model_dump() if bundle.manifest.cost_card else {})
                       for b, bundle in plan.bundles.items()},
        "fleets": {str(s): f["summary"] for s, f in plan.fleets.items()},
        "jobs": results,
    }
    write_json(plan.out / "results.json", raw)
    write_json(plan.results_md.with_suffix(".json"), raw)  # beside the page, in git: --render-from reproduces it
    plan.results_md.parent.mkdir(parents=True, exist_ok=True)
    plan.results_md.write_text(render(raw, plot=plot_path(plan.results_md)))
    log(f"wrote {plan.results_md} and {plan.out / 'results.json'} in {raw['wall_seconds']:.0f} s")
    return raw


def run_settings(settings: BenchSettings, out: Path, results_md: Path, *, workers: int, reuse: bool,
                 command: str) -> dict[str, Any]:
    """Every method x seed of one settings, then its page."""
    plan = plan_cell(settings, out, results_md, command=command)
    raws: list[dict[str, Any]] = []
    run_jobs([plan], workers, reuse, lambda done, results: raws.append(finish_cell(done, results, workers)))
    return raws[0]


DEFAULT_PUBLIC = 100  # public unlabelled samples per run when a method distils (--public)


def sweep_pages(budget: str) -> Path:
    """Where a sweep budget's cell pages and kept federations live (docs/results-full/ for the standard one)."""
    return REPO / "docs" / SWEEP_BUDGETS[budget].pages


def sweep_flags(budget: str) -> str:
    return "--full" if budget == "standard" else f"--full --{budget}"


def run_full(settings_list: list[BenchSettings], *, budget: str, workers: int, command: str, every_cell: bool,
             pages: Path | None = None, out: Path = DEFAULT_OUT / "full") -> int:
    """The sweep (datasets x regimes), one page per cell under the budget's pages, then the index page.

    A sweep may take more than one session, so it always resumes: each finished federation is kept in git
    under docs/<pages>/jobs/CELL/ and reused while its settings are unchanged (the settings key in its file
    name); the index covers every cell whose page exists, whichever invocation produced it. An invocation that
    ran every cell records its own wall time in docs/<pages>/sweep.json: the number issue 3 budgets (2 h).
    """
    pages = pages or sweep_pages(budget)
    started = time.time()
    load_before = load_average()
    plans = [plan_cell(settings, out / budget / settings.mode, pages / f"{settings.mode}.md",
                       command=command, job_dir=pages / "jobs" / settings.mode)
             for settings in settings_list]
    raws: list[dict[str, Any]] = []

    def cell_done(plan: CellPlan, results: list[dict[str, Any]]) -> None:
        raws.append(finish_cell(plan, results, workers, in_sweep=True))
        write_index(pages, budget)  # after every cell: a long sweep shows progress

    run_jobs(plans, workers, True, cell_done)
    if every_cell:
        jobs = [job for raw in raws for job in raw["jobs"]]
        write_json(pages / "sweep.json", {
            "command": command, "commit": git_commit(), "workers": workers,
            "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "wall_seconds": time.time() - started,
            "bundle_seconds": sum(plan.bundle_seconds for plan in plans),
            "federations_run": sum(not job.get("reused") for job in jobs),
            "federations_reused": sum(bool(job.get("reused")) for job in jobs),
            "load_before": load_before, "load_after": load_average(),
            "machine": machine_facts()})
        write_index(pages, budget)
    return 0


def render_full(pages: Path, budget: str) -> int:
    """Redraw every finished cell's page (and PNG) under ``pages`` from its stored JSON, then the index."""
    for cell in full_sweep(budget=budget):
        stored = pages / f"{cell.mode}.json"
        if stored.exists():
            rerender(stored, pages / f"{cell.mode}.md", f"{sweep_flags(budget)} --render-from")
    write_index(pages, budget)
    return 0


def write_index(pages: Path, budget: str) -> None:
    """The sweep's index beside ``pages`` (docs/results-full.md), over every cell whose stored JSON exists."""
    planned = full_sweep(budget=budget)
    done = [read_json(pages / f"{cell.mode}.json") for cell in planned if (pages / f"{cell.mode}.json").exists()]
    sweep = read_json(pages / "sweep.json") if (pages / "sweep.json").exists() else None
    index = pages.parent / f"{pages.name}.md"
    index.write_text(render_index(done, len(planned), pages=pages.name, flags=sweep_flags(budget), sweep=sweep,
                                  budget=SWEEP_BUDGETS[budget]))
    log(f"wrote {index} ({len(done)} of {len(planned)} cells)")


def rerender(stored: Path, page: Path, flags: str) -> None:
    """Redraw ``page`` (and its PNG) from a stored results JSON, saying so at its top; no training."""
    shown = stored.relative_to(REPO) if stored.is_relative_to(REPO) else stored
    note = (f"Re-rendered from the stored results of that run (`{shown}`) by `python -m bench.methods {flags}` at "
            f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC (commit `{git_commit()}`); no number was "
            "recomputed by hand.")
    page.write_text(render(read_json(stored), note, plot=plot_path(page)))
    log(f"re-rendered {page} from {stored}")


def select_cells(cells: list[BenchSettings], patterns: str | None) -> list[BenchSettings]:
    """The cells whose name contains any of the comma-separated ``patterns`` (all cells without patterns)."""
    if not patterns:
        return cells
    wanted = [p for p in patterns.split(",") if p]
    chosen = [c for c in cells if any(p in c.mode for p in wanted)]
    if not chosen:
        raise ValueError(f"--cells {patterns!r} matches no cell; cells: {', '.join(c.mode for c in cells)}")
    return chosen


# The modes on the command line, in the order `--help` lists them (the settings themselves: methods_plan.MODES).
MODE_HELP = {
    "quick": "real MiniLM-L3/L6, tweets, 4 agents, 2 seeds, 3 rounds (under 10 minutes on 2 idle cores)",
    "design": "the design search's fleet: as --quick with 6 agents (use with --seeds 100,101)",
    "quick-bbc": "real MiniLM-L3/L6, BBC News topics, 6 agents, 2 seeds, 3 rounds",
    "quick-vision": "real DINOv2-S/14 at depths 4/8/12, Fashion-MNIST, 9 agents, 2 seeds, 3 rounds",
    "quick-wide": "MiniLM-L3 (384 wide) beside MPNet-base (768 wide), tweets, 4 agents, 2 seeds, 3 rounds",
    "full": "the sweep of issue 3: 3 datasets x 3 regimes x 5 seeds x 6 methods, 4-6 agents, 3 rounds x 8 steps, "
            "one page per cell + an index (about 2 h on 2 idle cores; --long for the 9 h budget)",
    "smoke": "tiny random backbones: checks the runner end to end in about a minute",
}


def plot_path(results_md: Path) -> Path:
    """The curves PNG lives beside its page: docs/results.md -> docs/results-curves.png."""
    return results_md.with_name(results_md.stem + "-curves.png")


def parse_dema(text: str) -> dict[str, int]:
    """'private_experts=1,rank=32' -> {'private_experts': 1, 'rank': 32}, checked by the run config's rules."""
    from pydantic import ValidationError

    from coordinator.config import DemaSettings

    overrides: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--dema expects KEY=INTEGER pairs, got {item!r}")
        overrides[key.strip()] = int(value)
    try:
        DemaSettings(**overrides)  # an unknown key is rejected too (strict model)
    except ValidationError as error:
        raise ValueError(f"--dema {text}: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    for name, summary in MODE_HELP.items():
        mode.add_argument(f"--{name}", action="store_const", dest="mode", const=name, help=summary)
    parser.add_argument("--methods", help=f"comma-separated methods instead of the mode's (known: "
                        f"{', '.join((*METHODS, *CANDIDATES))})")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the mode's (e.g. 100,101 as a validation "
                        "split for choosing a design: test seeds are 0..4)")
    parser.add_argument("--alpha", type=float, help="Dirichlet label-skew concentration instead of the mode's")
    parser.add_argument("--rounds", type=int, help="rounds instead of the mode's")
    parser.add_argument("--local-steps", type=int, help="local steps per round instead of the mode's")
    parser.add_argument("--dema", help="comma-separated DeMA settings for every bundle of the run instead of the "
                        "defaults, e.g. private_experts=1 or rank=32,experts=2 (a design-search knob)")
    parser.add_argument("--public", type=int, help="samples in the public unlabelled set every agent holds "
                        f"(default {DEFAULT_PUBLIC} when a method distils, else none)")
    parser.add_argument("--cells", help="--full only: comma-separated parts of cell names to run (e.g. "
                        "tweet-sentiment,bbc-news-low-data); the index still covers every finished cell")
    parser.add_argument("--long", action="store_true", help="--full only: the long budget (3 agents per backbone, "
                        "5 rounds x 10 steps, ~9 h on 2 cores; pages in docs/results-long)")
    parser.add_argument("--workers", type=int, default=2, help="federations run at once (one core each)")
    parser.add_argument("--out", type=Path, help="raw results directory (default runs/bench/methods-MODE)")
    parser.add_argument("--results", type=Path, help="the page to write (default docs/results.md)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished federations with identical settings")
    parser.add_argument("--render-from", type=Path, metavar="RESULTS_JSON",
                        help="only re-render the page from a stored results.json (no training); with --full, the "
                        "directory of the cells' pages (docs/results-full, or docs/results-long with --long)")
    args = parser.parse_args(argv)
    if args.long and args.mode != "full":
        parser.error("--long is a budget of the sweep: use it with --full")
    budget = "long" if args.long else "standard"
    if args.render_from and args.mode == "full":
        return render_full(args.render_from, budget)
    if args.render_from:
        rerender(args.render_from, args.results or REPO / "docs" / "results.md", "--render-from")
        return 0

    # Children (the spawned pool) inherit this: one BLAS/OpenMP thread per federation, offline model loading.
    os.environ.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if args.mode is None:
        parser.error("choose a mode: --quick, --quick-vision, --quick-bbc, --full or --smoke")
    settings = MODES.get(args.mode, QUICK)
    if args.methods:
        unknown = sorted(set(args.methods.split(",")) - {*METHODS, *CANDIDATES})
        if unknown:
            parser.error(f"unknown methods {unknown}; known: {', '.join((*METHODS, *CANDIDATES))}")
        settings = dataclasses.replace(settings, methods=tuple(args.methods.split(",")))
    if args.seeds:
        settings = dataclasses.replace(settings, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.alpha:
        regime = settings.regime
        settings = dataclasses.replace(settings, regime=dataclasses.replace(
            regime, alpha=args.alpha, name=regime.name.replace(f"dirichlet-{regime.alpha}", f"dirichlet-{args.alpha}")))
    if args.rounds:
        settings = dataclasses.replace(settings, rounds=args.rounds)
    if args.local_steps:
        settings = dataclasses.replace(settings, local_steps=args.local_steps)
    needs_public = any(CANDIDATES[m].uses_public_set for m in settings.methods if m in CANDIDATES)
    public = args.public if args.public is not None else (DEFAULT_PUBLIC if needs_public else 0)
    if needs_public and public < 1:
        parser.error("the distillation and anchoring methods need a public set: --public N with N >= 1")
    settings = dataclasses.replace(settings, public_samples=public)
    if args.dema:
        try:
            settings = dataclasses.replace(settings, dema=parse_dema(args.dema))
        except ValueError as error:
            parser.error(str(error))
    given = argv if argv is not None else sys.argv[1:]
    command = "python -m bench.methods " + " ".join(shlex.quote(a) for a in given)
    if args.mode == "full":
        every = full_sweep(settings.seeds if args.seeds else None, settings.methods if args.methods else None,
                           budget=budget)
        try:
            cells = select_cells(every, args.cells)
        except ValueError as error:
            parser.error(str(error))
        whole = cells == every and not (args.seeds or args.methods)
        return run_full(cells, budget=budget, workers=args.workers, command=command, every_cell=whole)
    out = args.out or DEFAULT_OUT / f"methods-{settings.mode}"
    results_md = args.results or REPO / "docs" / "results.md"
    run_settings(settings, out, results_md, workers=args.workers, reuse=args.reuse, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
