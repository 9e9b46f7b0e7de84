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
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, REPO, git_commit, log, machine_facts, read_json, write_json
from bench.methods_plan import BASELINES, CANDIDATES, METHODS, MODES, QUICK, BenchSettings, full_sweep
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


def run_jobs(jobs: list[dict[str, Any]], workers: int, job_dir: Path, reuse: bool) -> list[dict[str, Any]]:
    """Run the federations in a spawned pool; each finished one is saved at once (a crash keeps the rest)."""
    results: list[dict[str, Any]] = []
    todo = []
    for job in jobs:
        path = job_dir / f"{job['method']}-s{job['seed']}-{job['key']}.json"
        if reuse and path.exists():
            log(f"reusing {path.name}")
            results.append(read_json(path))
        else:
            todo.append((job, path))
    if not todo:
        return results
    context = multiprocessing.get_context("spawn")  # ORT sessions and fork do not mix
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(run_job, job): (job, path) for job, path in todo}
        for future in as_completed(futures):
            job, path = futures[future]
            result = future.result()
            write_json(path, result)
            results.append(result)
            log(f"done {job['method']} seed {job['seed']} in {result['wall_seconds']:.0f} s")
    return results


def run_settings(settings: BenchSettings, out: Path, results_md: Path, *, workers: int, reuse: bool,
                 command: str, job_dir: Path | None = None) -> dict[str, Any]:
    """Every method x seed of one settings: raw results to ``out`` and beside the page, then the page and its PNG."""
    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    log(f"mode {settings.mode}: {len(settings.methods)} methods x {len(settings.seeds)} seeds -> {out}")
    bundles = prepare_bundles(settings)
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
    results = run_jobs(jobs, workers, job_dir or out / "jobs", reuse)
    order = {(m, s): i for i, (m, s) in enumerate((m, s) for m in settings.methods for s in settings.seeds)}
    results.sort(key=lambda r: order[(r["method"], r["seed"])])
    regime = dataclasses.asdict(settings.regime) | {
        "per_agent_test": settings.regime.per_agent_file - settings.regime.train_per_agent}
    raw = {
        "command": command,
        "commit": git_commit(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "wall_seconds": time.time() - started,
        "workers": workers,
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_facts(),
        "settings": settings_dict | {"regime": regime, "smallest": settings.smallest()},
        "baselines": list(BASELINES),
        "cost_cards": {b: (bundle.manifest.cost_card.model_dump() if bundle.manifest.cost_card else {})
                       for b, bundle in bundles.items()},
        "fleets": {str(s): f["summary"] for s, f in fleets.items()},
        "jobs": results,
    }
    write_json(out / "results.json", raw)
    write_json(results_md.with_suffix(".json"), raw)  # beside the page, in git: --render-from reproduces it
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(render(raw, plot=plot_path(results_md)))
    log(f"wrote {results_md} and {out / 'results.json'} in {raw['wall_seconds']:.0f} s")
    return raw


FULL_PAGES = REPO / "docs" / "results-full"
DEFAULT_PUBLIC = 100  # public unlabelled samples per run when a method distils (--public)


def run_full(settings_list: list[BenchSettings], *, workers: int, command: str) -> int:
    """The sweep (datasets x regimes), one page per cell under docs/results-full/, then the index page.

    A sweep takes hours, more than one session, so it always resumes: each finished federation is kept in git
    under docs/results-full/jobs/CELL/ and reused while its settings are unchanged (the settings key in its
    file name); the index covers every cell whose page exists, whichever invocation produced it.
    """
    for settings in settings_list:
        page = FULL_PAGES / f"{settings.mode}.md"
        run_settings(settings, DEFAULT_OUT / "full" / settings.mode, page, workers=workers, reuse=True,
                     command=command, job_dir=FULL_PAGES / "jobs" / settings.mode)
        write_index(FULL_PAGES)  # after every cell: a long sweep shows progress
    return 0


def render_full(pages: Path) -> int:
    """Redraw every finished cell's page (and PNG) under ``pages`` from its stored JSON, then the index."""
    for cell in full_sweep():
        stored = pages / f"{cell.mode}.json"
        if stored.exists():
            rerender(stored, pages / f"{cell.mode}.md", "--full --render-from")
    write_index(pages)
    return 0


def write_index(pages: Path) -> None:
    """The sweep's index beside ``pages`` (docs/results-full.md), over every cell whose stored JSON exists."""
    planned = full_sweep()
    done = [read_json(pages / f"{cell.mode}.json") for cell in planned if (pages / f"{cell.mode}.json").exists()]
    index = pages.parent / f"{pages.name}.md"
    index.write_text(render_index(done, len(planned)))
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
    "full": "the sweep of issue 3: 3 datasets x 3 regimes x 5 seeds, one page per cell + an index",
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
    parser.add_argument("--workers", type=int, default=2, help="federations run at once (one core each)")
    parser.add_argument("--out", type=Path, help="raw results directory (default runs/bench/methods-MODE)")
    parser.add_argument("--results", type=Path, help="the page to write (default docs/results.md)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished federations with identical settings")
    parser.add_argument("--render-from", type=Path, metavar="RESULTS_JSON",
                        help="only re-render the page from a stored results.json (no training); with --full, the "
                        "directory of the cells' pages (docs/results-full)")
    args = parser.parse_args(argv)
    if args.render_from and args.mode == "full":
        return render_full(args.render_from)
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
        cells = full_sweep(settings.seeds if args.seeds else None, settings.methods if args.methods else None)
        try:
            cells = select_cells(cells, args.cells)
        except ValueError as error:
            parser.error(str(error))
        return run_full(cells, workers=args.workers, command=command)
    out = args.out or DEFAULT_OUT / f"methods-{settings.mode}"
    results_md = args.results or REPO / "docs" / "results.md"
    run_settings(settings, out, results_md, workers=args.workers, reuse=args.reuse, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
