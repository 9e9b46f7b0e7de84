"""Run every performance benchmark and regenerate docs/performance.md (issue 7). One command:

    .venv/bin/python -m bench.performance              # everything (about 20-25 minutes on 2 cores)
    .venv/bin/python -m bench.performance --quick      # small sizes, for checking the scripts (~6 minutes)
    .venv/bin/python -m bench.performance --only scale,bytes --from-results   # re-render parts from saved JSON

Parts: `device` (ORT versus PyTorch per backbone), `overhead` (demo fleet round overhead), `bytes` (traffic
per round), `scale` (synthetic agents against one broker and the real coordinator, plus aggregation memory).
Raw results go to runs/bench/results.json; the document is written from them by `bench.report`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import DEFAULT_OUT, REPO, git_commit, log, machine_facts, read_json, write_json

PARTS = ("device", "overhead", "bytes", "scale")
DOC = REPO / "docs" / "performance.md"


def run_device(results: dict[str, Any], quick: bool) -> None:
    from bench.device_cost import compare, investigate
    from export.catalog import CATALOG

    backbones = list(CATALOG)
    compared = compare(backbones, repetitions=1 if quick else 3, steps=4 if quick else 10, warmup=2 if quick else 3,
                       time_limit_s=300 if quick else 720)
    results["device"] = compared
    real = [n for n in backbones if not n.startswith("tiny")]
    losing = [n for n in real if n in compared["backbones"]
              and (compared["backbones"][n]["step_ratio"] > 1.0 or compared["backbones"][n]["rss_ratio"] > 0.6)]
    if losing:
        target = max(losing, key=lambda n: CATALOG[n].layers * CATALOG[n].hidden ** 2)
        log(f"device cost: ORT misses a goal on {', '.join(losing)}; investigating {target}")
        results["device_investigation"] = investigate(target, repetitions=1 if quick else 2,
                                                      steps=3 if quick else 6, time_limit_s=240 if quick else 420)


def run_overhead(results: dict[str, Any], quick: bool, out: Path) -> None:
    from bench.overhead import run, summarise

    outcome = run(out / "overhead", rounds=2 if quick else 3)
    outcome["summary"] = summarise(outcome)
    results["overhead"] = outcome


def run_bytes(results: dict[str, Any]) -> None:
    from bench.device_cost import bundles_for
    from bench.traffic import measure
    from export.catalog import CATALOG

    updates = results.get("overhead", {}).get("updates_dir")
    results["bytes"] = measure(bundles_for(list(CATALOG)), Path(updates) if updates else None)


def run_scale(results: dict[str, Any], quick: bool, out: Path) -> None:
    from bench.aggregation_memory import measure
    from bench.scale import run

    sizes = [10, 100] if quick else [10, 100, 500, 1000]
    results["scale"] = run(sizes, rounds=2 if quick else 3, out_dir=out / "scale",
                           time_limit_s=300 if quick else 600, profile_size=sizes[-1])
    n = 100 if quick else 1000
    results["aggregation_memory"] = measure([(["tiny-3", "tiny-6"], n), (["minilm-l3", "minilm-l6"], n)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the scripts, not the numbers")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where raw results and run folders go")
    parser.add_argument("--doc", type=Path, default=DOC, help="the document to write")
    parser.add_argument("--from-results", action="store_true", help="re-render from the saved results.json")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    saved = args.out / "results.json"
    results: dict[str, Any] = read_json(saved) if saved.exists() and (args.from_results or set(parts) != set(PARTS)) \
        else {}
    if not args.from_results:
        started = time.time()
        previous_runs = results.get("meta", {}).get("part_runs", {})
        results["meta"] = {
            "command": " ".join([".venv/bin/python -m bench.performance", *map(shlex.quote, sys.argv[1:])]),
            "commit": git_commit(),
            "started": started,
            "quick": args.quick,
            "parts": parts,
            "machine": machine_facts(),
            "part_runs": previous_runs,  # which run produced each part's numbers
        }
        for part in PARTS:
            if part not in parts:
                continue
            log(f"part {part}")
            t0 = time.time()
            if part == "device":
                run_device(results, args.quick)
            elif part == "overhead":
                run_overhead(results, args.quick, args.out)
            elif part == "bytes":
                run_bytes(results)
            else:
                run_scale(results, args.quick, args.out)
            results["meta"]["part_runs"][part] = {"commit": git_commit(), "finished": time.time(),
                                                  "seconds": time.time() - t0, "quick": args.quick}
            write_json(saved, results)  # keep what is done if a later part fails
        results["meta"]["seconds"] = time.time() - started
        results["meta"]["load_average_end"] = machine_facts()["load_average"]
        write_json(saved, results)
    from bench.report import render

    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(render(results))
    log(f"wrote {args.doc} (raw results: {saved})")


if __name__ == "__main__":
    main()
