"""docs/results.md from the benchmark's raw results: tables, paired differences, bytes, and plain statements.

Why generated: the page must say what was measured and nothing else, so every number and every sentence that
interprets a number comes from the results file, with the command, commit and machine at the top. The
statements are rules over the paired differences (sign in every seed, size of the sign-flip p-value), not
judgements typed after reading the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.common import fmt, table
from bench.methods_plan import CANDIDATES, FULL_REGIMES, SweepBudget, fair_baseline
from bench.methods_plots import plot_views
from bench.methods_stats import OVERALL, cosine_summary, headline, mean_sd, paired, view_table
from export.catalog import get_backbone

# Dataset -> (how the page names it, its unit in the plural).
DATASET_WORDS: dict[str, tuple[str, str]] = {"tweet-sentiment": ("tweet sentiment", "tweets"),
                                             "bbc-news": ("BBC News topics", "articles"),
                                             "fashion-mnist": ("Fashion-MNIST", "images")}


def dataset_words(settings: Mapping[str, Any]) -> tuple[str, str]:
    """Results stored before datasets were configurable are tweet runs."""
    return DATASET_WORDS[settings.get("dataset", "tweet-sentiment")]


VIEWS = (("personal", "personalised (own test split, after local training)"),
         ("global", "global (balanced held-out set, received model)"))


def _pm(values: Sequence[float]) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.1f} ± {sd:.1f}" if not math.isnan(sd) else f"{mean:.1f}"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:+.1f}"


def summarise(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Per method: per-seed headline numbers and curves; per (method, baseline): paired differences."""
    settings = raw["settings"]
    groups = list(settings["backbones"])
    last = settings["rounds"]
    per: dict[str, dict[int, Any]] = {}
    for job in raw["jobs"]:
        per.setdefault(job["method"], {})[job["seed"]] = view_table(job, groups)
    heads = {m: {s: headline(t, last) for s, t in seeds.items()} for m, seeds in per.items()}
    diffs: dict[str, dict[str, Any]] = {}
    for method in per:
        twin = fair_baseline(method)
        for base in [*raw["baselines"], *([twin] if twin else [])]:
            if base == method or base not in per or f"{base}|{method}" in diffs:
                continue  # an inverse pair (local - group-fedavg) says nothing its mirror does not
            diffs[f"{method}|{base}"] = {
                view: {g: paired({s: h[view][g] for s, h in heads[method].items()},
                                 {s: h[view][g] for s, h in heads[base].items()}) for g in [*groups, OVERALL]}
                for view, _ in VIEWS}
    return {"tables": per, "headline": heads, "paired": diffs, "groups": groups}


def _statement(name: str, base: str, d: Mapping[str, Any], view: str, n_seeds: int) -> str:
    overall = d[view][OVERALL]
    diffs = overall["diffs"]
    if not diffs:
        return f"- {name} vs {base}, {view}: not measured."
    ups = sum(1 for x in diffs if x > 0)
    downs = sum(1 for x in diffs if x < 0)
    per_seed = "/".join(_signed(x) for x in diffs)
    every = "both seeds" if len(diffs) == 2 else f"all {len(diffs)} seeds"
    if ups == len(diffs):
        direction = f"higher in {every}"
    elif downs == len(diffs):
        direction = f"lower in {every}"
    elif ups == downs == 0:
        direction = "equal in every seed"
    else:
        ties = len(diffs) - ups - downs
        direction = f"higher in {ups}, lower in {downs}" + (f", equal in {ties}" if ties else "") + \
            f" of {len(diffs)} seeds"
    verdict = ("a difference distinguishable from zero at p < 0.05" if overall["p"] < 0.05 else
               f"not distinguishable from zero (sign-flip p = {overall['p']:.2f}; with {n_seeds} seeds the smallest "
               f"possible p is {2 / 2 ** n_seeds:.2f})")
    return (f"- **{name} − {base}, {view} view, overall: {_signed(overall['mean'])} pp** (per seed {per_seed}); "
            f"{direction}; {verdict}.")


def render(raw: Mapping[str, Any], note: str | None = None, *, plot: Path | None = None) -> str:
    """The page; with ``plot``, also draws both views versus round into that PNG (beside the page) and links it."""
    s = summarise(raw)
    settings, facts = raw["settings"], raw["machine"]
    groups, last, seeds = s["groups"], settings["rounds"], list(settings["seeds"])
    regime = settings["regime"]
    methods = [m for m in settings["methods"] if m in s["tables"]]
    dataset_title, unit = dataset_words(settings)
    n_classes = len(raw["fleets"][next(iter(raw["fleets"]))]["labels"])
    lines = [
        "# Method benchmark: results",
        "",
        f"Generated by `{raw['command']}` — **do not edit by hand**; run the command again to regenerate.",
        *([note] if note else []),
        "",
        f"- commit `{raw['commit']}`, started {raw['started_utc']} UTC, wall time {raw['wall_seconds']:.0f} s "
        + ("(first federation start to last end, inside the sweep's one pool; "
           if raw.get("wall_scope") == "federations" else "(")
        + f"{raw['workers']} worker processes, one ONNX Runtime thread each)" + _job_commits(raw),
        f"- machine: {facts['cpu']}, {facts['cores']} cores, {facts['ram_gb']} GB RAM, Python {facts['python']}, "
        f"onnxruntime-training {facts['versions'].get('onnxruntime-training-cpu')}; load average "
        f"{raw['load_before']} before and {raw['load_after']} after (the machine is shared, so wall times are "
        "upper bounds)",
        f"- mode `{settings['mode']}`: backbones {', '.join(groups)}, {settings['agents_per_backbone']} agents per "
        f"backbone ({len(groups) * settings['agents_per_backbone']} agents), {dataset_title} ({n_classes} classes), "
        f"{regime['name']}: Dirichlet α = {regime['alpha']}, {regime['train_per_agent']} training {unit} and "
        f"{regime['per_agent_test']} local test {unit} per agent, balanced held-out set of "
        f"{regime['global_per_class']} per class; {settings['rounds']} rounds × {settings['local_steps']} local "
        f"steps (batch {settings['batch_size']}, max length {settings['max_length']}, lr {settings['learning_rate']}, "
        f"AdamW with fresh moments each round, as on the device); seeds {', '.join(map(str, seeds))}; "
        f"{_dema_text(settings.get('dema') or {})}; head `local` in every method",
        "- path: in-process (`bench/methods_federation.py`): the agents' `LocalLearner` + `OrtTrainer`, the "
        "bundles from `build_bundle`, `make_strategy` + `scopes_for` + `coordinator/federation_state.py`, no broker. "
        "`tests/test_inprocess_equivalence.py` checks that one round gives the MQTT path's tensors (1e-5).",
        "- methods: `heterotune` (DeMA + CMGA), `heterotune-noalign` (plain weighted mean of the global tensors), "
        "`group-fedavg` (all shared tensors averaged only within a backbone group), `local` (nothing leaves the "
        "device), `smallest-common` (every device on the smallest backbone, `group-fedavg` with one group = FedAvg "
        "of every adapter tensor; the head stays local), `fedproto` (nothing of the model leaves the device; class "
        "prototypes in the DeMA r-space travel, and each device's loss adds lambda = 1 times the mean squared "
        "distance of a sample's representation to its class's global prototype; tests/test_fedproto.py). "
        "Groups below are device classes: in `smallest-common` the "
        f"`{groups[-1]}` devices run `{settings['smallest']}`.",
        *_candidate_lines(methods),
        "- views: **personalised** = each agent's model right after its local training in a round, on its own "
        "test split (pooled over the group's agents); **global** = the model each agent receives (shared tensors "
        "+ its own local head) before training, on the balanced held-out set; *final* = received after the last "
        "aggregation. Accuracy in %.",
        "",
        "## What this run shows, and what it does not",
        "",
    ]
    lines += _findings(s, raw, methods, len(seeds))
    lines += ["", "## Both views per method (mean ± sd over seeds)", "",
              f"Personalised after round {last}; global of the final aggregate.", ""]
    header = ["method"] + [f"personal {g}" for g in [OVERALL, *groups]] + [f"global {g}" for g in [OVERALL, *groups]]
    rows = []
    for m in methods:
        h = s["headline"][m]
        rows.append([f"`{m}`"] + [_pm([h[sd][v][g] for sd in sorted(h)]) for v, _ in VIEWS for g in [OVERALL, *groups]])
    lines += [table(header, rows), ""]
    lines += ["## Paired per-seed differences (pp, method − baseline; [mean ± sd, sign-flip p])", ""]
    for view, title in VIEWS:
        lines += [f"**{title}**", ""]
        rows = []
        for key, d in s["paired"].items():
            method, base = key.split("|")
            cells = []
            for g in [OVERALL, *groups]:
                c = d[view][g]
                cells.append("/".join(_signed(x) for x in c["diffs"]) +
                             f" [{_signed(c['mean'])} ± {fmt(c['sd'])}, p {fmt(c['p'], 2)}]")
            rows.append([f"`{method}` − `{base}`", *cells])
        lines += [table(["comparison", *[f"{g}" for g in [OVERALL, *groups]]], rows), ""]
    lines += _curves(s, methods, last)
    if plot is not None:
        plot_views(s["tables"], methods, last, f"{dataset_title}, {regime['name']} ({settings['mode']}, "
                   f"{len(seeds)} seeds, overall)", plot)
        lines += [f"![Both views versus round, overall, mean over seeds]({plot.name})", ""]
    lines += _bytes(raw, methods)
    lines += _costs(raw)
    lines += _cmga(raw)
    lines += _data(raw)
    lines += _timing(raw)
    return "\n".join(lines) + "\n"


def verdict_lines(s: Mapping[str, Any], n_seeds: int) -> list[str]:
    """The issue's question in one line: does sharing across backbones beat sharing within a group, here? A view
    counts only when every seed moves the same way (sign-flip p at its floor for 5 seeds, 0.0625)."""
    pair = s["paired"].get("heterotune|group-fedavg")
    if pair is None:
        return []
    wins = [view for view, _ in VIEWS if pair[view][OVERALL]["mean"] > 0 and pair[view][OVERALL]["p"] <= 0.0625]
    losses = [view for view, _ in VIEWS if pair[view][OVERALL]["mean"] < 0 and pair[view][OVERALL]["p"] <= 0.0625]
    if wins:
        head = f"`heterotune` beats `group-fedavg` on the {' and '.join(wins)} view here (sign-flip p <= 0.06)"
    elif losses:
        head = f"`group-fedavg` beats `heterotune` on the {' and '.join(losses)} view here (sign-flip p <= 0.06)"
    else:
        head = "`heterotune` does not measurably beat `group-fedavg` here"
    floor = (f"; with {n_seeds} seeds the sign-flip test cannot go below p = {2 / 2 ** n_seeds:.2f}"
             if 2 / 2 ** n_seeds > 0.0625 else "")
    return [f"- **Plainly: {head}** (sharing adapters across backbones against sharing them only within a "
            f"backbone group, both views, overall{floor}). The designs tried to make cross-backbone sharing pay "
            "off, and what each measured, are in `docs/design-search/README.md`."]


def _findings(s: Mapping[str, Any], raw: Mapping[str, Any], methods: Sequence[str], n_seeds: int) -> list[str]:
    out = verdict_lines(s, n_seeds)
    for name, base in (("heterotune", "group-fedavg"), ("heterotune", "local"), ("heterotune", "smallest-common"),
                       ("heterotune", "heterotune-noalign"), ("heterotune", "fedproto"), ("fedproto", "local"),
                       ("group-fedavg", "local")):
        key = f"{name}|{base}"
        if key in s["paired"]:
            for view, _ in VIEWS:
                out.append(_statement(name, base, s["paired"][key], view, n_seeds))
        elif name in methods and base in methods:
            # Not a configured baseline: compute the pair here so the statement can still be made.
            heads = s["headline"]
            d = {view: {OVERALL: paired({sd: h[view][OVERALL] for sd, h in heads[name].items()},
                                        {sd: h[view][OVERALL] for sd, h in heads[base].items()})}
                 for view, _ in VIEWS}
            for view, _ in VIEWS:
                out.append(_statement(name, base, d, view, n_seeds))
    for key, d in s["paired"].items():  # the cross-model part of each design candidate
        name, base = key.split("|")
        if fair_baseline(name) == base:
            out += [_statement(name, base, d, view, n_seeds) for view, _ in VIEWS]
    settings = raw["settings"]
    finals = {m: mean_sd([h["global"][OVERALL] for h in s["headline"][m].values()])[0] for m in methods}
    personals = {m: mean_sd([h["personal"][OVERALL] for h in s["headline"][m].values()])[0] for m in methods}
    n_classes = len(raw["fleets"][next(iter(raw["fleets"]))]["labels"])
    within = "within" if raw["wall_seconds"] <= 600 else "**not** within"
    widths = {get_backbone(b).hidden for b in settings["backbones"]}
    others = [d for d in DATASET_WORDS if d != settings.get("dataset", "tweet-sentiment")]
    out += [
        "",
        f"- Range over methods (mean over seeds): personalised {min(personals.values()):.1f}–"
        f"{max(personals.values()):.1f} %, global {min(finals.values()):.1f}–{max(finals.values()):.1f} % "
        f"(a constant predictor scores {100 / n_classes:.1f} % on the balanced set). Heads are private and fitted "
        "to each device's skewed labels; the pilot found that this makes the balanced-set view largely a measure "
        "of label-prior mismatch.",
        f"- This run took {raw['wall_seconds']:.0f} s"
        + (f", {within} the 10-minute budget of `--{settings['mode']}`" if settings["mode"].startswith("quick")
           else "")
        + f" on {raw['machine']['cores']} shared cores (1-minute load average {raw['load_before'][0]} at the start, "
        f"{raw['load_after'][0]} at the end; federations took {_job_range(raw)}; see the last table).",
        *_resolution(raw),
        *_cmga_statement(raw),
        "",
        "What it does **not** show: anything statistically significant (with "
        f"{n_seeds} seeds the sign-flip test cannot go below p = {2 / 2 ** n_seeds:.2f}), other datasets "
        f"({', '.join(DATASET_WORDS[d][0] for d in others)}; see their own pages), other regimes "
        f"({_other_regimes(settings['regime'])}), longer training (only {settings['rounds']} rounds × "
        f"{settings['local_steps']} local "
        "steps), more agents, "
        + (f"backbones of different widths ({', '.join(settings['backbones'])} are all {widths.pop()} wide), "
           if len(widths) == 1 else "")
        + ("" if "fedproto" in methods else "fedproto, ")
        + ("or any design change meant to make cross-model sharing pay off" if not any(
            m in CANDIDATES for m in methods) else "or design candidates other than the ones listed above")
        + ". It is a slice of the "
        "benchmark of issue 3; the pilot "
        "measured a paired noise floor of about ±2–3 pp with 3–5 seeds, so differences of that size here are "
        "not evidence either way.",
    ]
    return out


def _other_regimes(regime: Mapping[str, Any]) -> str:
    """The label skews and data sizes of the sweep's regimes (methods_plan.FULL_REGIMES) this page is not about."""
    skews = [f"Dirichlet {alpha}" for alpha in sorted({r.alpha for r in FULL_REGIMES}) if alpha != regime["alpha"]]
    most = max(r.train_per_agent for r in FULL_REGIMES)
    data = "more data per agent" if regime["train_per_agent"] < most else "less data per agent"
    return ", ".join([*skews, data])


def _candidate_lines(methods: Sequence[str]) -> list[str]:
    """Design candidates (bench/methods_plan.py CANDIDATES): an engine method with scopes or prototypes changed."""
    described = [f"`{m}` = {CANDIDATES[m].describe()}" for m in methods if m in CANDIDATES]
    if not described:
        return []
    return [f"- design candidates (same bundles, only what travels differs): {'; '.join(described)}."]


def _curves(s: Mapping[str, Any], methods: Sequence[str], last: int) -> list[str]:
    lines = ["## Per round (overall, mean over seeds)", "",
             "Round r: global = model received at the start of round r (round 1 = the initial model: frozen "
             "backbone, untrained head); personal = after round r's local training.", ""]
    cols = [*range(1, last + 1), "final"]
    header = ["method", "view", *[f"round {c}" if c != "final" else "final" for c in cols]]
    rows = []
    for m in methods:
        seeds = s["tables"][m]
        for view, _ in VIEWS:
            cells = []
            for c in cols:
                key: Any = c
                vals = [seeds[sd][view][OVERALL].get(key, float("nan")) for sd in sorted(seeds)]
                cells.append("–" if any(math.isnan(v) for v in vals) else f"{sum(vals) / len(vals):.1f}")
            rows.append([f"`{m}`", view, *cells])
    per_group = ["", "Per group (mean over seeds):", ""]
    g_rows = []
    for m in methods:
        seeds = s["tables"][m]
        for view, _ in VIEWS:
            for g in s["groups"]:
                cells = []
                for c in cols:
                    vals = [seeds[sd][view][g].get(c, float("nan")) for sd in sorted(seeds)]
                    cells.append("–" if any(math.isnan(v) for v in vals) else f"{sum(vals) / len(vals):.1f}")
                g_rows.append([f"`{m}`", f"{view} {g}", *cells])
    return [*lines, table(header, rows), *per_group, table(header, g_rows), ""]


def _bytes(raw: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    lines = ["## Communication per agent per round", "",
             "Measured: the safetensors blobs the MQTT path would carry (before 256 KiB chunking and MQTT framing); "
             "raw = float32 payload alone. Full-model FedAvg = every parameter of the device's model "
             "(frozen backbone + adapters + head) each way each round. The bundle itself is downloaded once per "
             "device and is not included.", ""]
    rows = []
    for m in methods:
        job = next(j for j in raw["jobs"] if j["method"] == m)
        for backbone in sorted(job["payload_bytes"]):
            mine = [r for r in job["rounds"] if r["backbone"] == backbone]
            up = sum(r["bytes_up"] for r in mine) / len(mine)
            down = sum(r["bytes_down"] for r in mine) / len(mine)
            full = job["full_model_bytes"][backbone]
            rows.append([f"`{m}`", backbone, f"{up / 1024:,.1f} KiB", f"{down / 1024:,.1f} KiB",
                         f"{job['payload_bytes'][backbone] / 1024:,.1f} KiB", f"{full / 1e6:,.1f} MB",
                         f"{100 * up / full:.2f} %"])
    header = ["method", "backbone run", "up", "down", "raw payload", "full-model FedAvg (each way)",
              "up / full model"]
    return [*lines, table(header, rows), ""]


def _costs(raw: Mapping[str, Any]) -> list[str]:
    rows = [[b, fmt(c.get("peak_train_rss_mb"), 0, " MB"), fmt(c.get("step_seconds"), 2, " s"),
             fmt(c.get("bundle_bytes", 0) / 1e6, 0, " MB")] for b, c in raw["cost_cards"].items()]
    return ["## Device cost per backbone (from the bundles' cost cards, measured at export, not in this run)", "",
            table(["backbone", "peak training RSS (probe)", "training step (batch × max length, 1 thread)",
                   "bundle"], rows), ""]


def _cmga(raw: Mapping[str, Any]) -> list[str]:
    lines = ["## Cross-group geometry of the global tensors", "",
             "Cosine between the two groups' pseudo-gradients per global tensor and round (pooled over seeds); "
             "projections = times CMGA projected one group's update off another's.", ""]
    rows = []
    for method in ("heterotune", "heterotune-noalign"):
        jobs = [j for j in raw["jobs"] if j["method"] == method]
        summary = cosine_summary(jobs)
        if summary is None:
            continue
        rows.append([f"`{method}`", summary["n"], f"{summary['mean']:+.3f}", f"{summary['mean_abs']:.3f}",
                     summary["negative"], f"{summary['min']:+.3f}",
                     summary["projections"] if method == "heterotune" else "– (none applied)"])
    if not rows:
        return []
    return [*lines, table(["method", "(tensor, round) pairs", "mean cos", "mean |cos|", "negative", "min",
                           "projections"], rows), ""]


def _data(raw: Mapping[str, Any]) -> list[str]:
    labels = "/".join(raw["fleets"][next(iter(raw["fleets"]))]["labels"])
    lines = [f"## Fleet data per seed (label counts {labels} of each agent's file, before its 75/25 split)", ""]
    for seed, fleet in sorted(raw["fleets"].items(), key=lambda kv: int(kv[0])):
        parts = [f"{a} {'/'.join(map(str, c['label_counts']))}" for a, c in fleet["clients"].items()]
        lines.append(f"- seed {seed}: " + "; ".join(parts) +
                     f"; held-out set {'/'.join(map(str, fleet['global_test']['label_counts']))}")
    return [*lines, ""]


def _timing(raw: Mapping[str, Any]) -> list[str]:
    rows = [[f"`{j['method']}`", j["seed"], f"{j['seconds']:.0f} s"] for j in raw["jobs"]]
    return ["## Wall time per federation", "", table(["method", "seed", "seconds"], rows), ""]


def _job_range(raw: Mapping[str, Any]) -> str:
    seconds = [j["seconds"] for j in raw["jobs"]]
    return f"{min(seconds):.0f}–{max(seconds):.0f} s each" if seconds else "no time"


def _cmga_statement(raw: Mapping[str, Any]) -> list[str]:
    """Did CMGA change anything a test set can see? Compare heterotune and noalign prediction counts exactly."""
    pairs = []
    for job in raw["jobs"]:
        if job["method"] != "heterotune":
            continue
        other = next((j for j in raw["jobs"] if j["method"] == "heterotune-noalign" and j["seed"] == job["seed"]), None)
        if other is not None:
            pairs.append((job, other))
    if not pairs:
        return []
    fired = {r: sum(int(j["diagnostics"].get(str(r), {}).get("num_projections", 0)) for j, _ in pairs)
             for r in range(1, raw["settings"]["rounds"] + 1)}
    same = all(_predictions(a) == _predictions(b) for a, b in pairs)
    per_round = ", ".join(f"round {r}: {n}" for r, n in fired.items())
    unit = dataset_words(raw["settings"])[1][:-1]
    outcome = (f"heterotune and heterotune-noalign classified every local and held-out test {unit} identically in "
               "every round and seed" if same else "heterotune and heterotune-noalign differ in some predictions "
               "(see the tables)")
    return [f"- CMGA projections fired ({per_round}; summed over seeds); {outcome}."]


def _predictions(job: Mapping[str, Any]) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Correct counts per agent and round, plus the final global view: equal counts = no visible difference."""
    rows = [(r["round"], r["agent_id"], r["personal_correct"], r["global_correct"]) for r in job["rounds"]]
    return rows, {k: v["correct"] for k, v in job["final_global"].items()}


def _resolution(raw: Mapping[str, Any]) -> list[str]:
    """How much one test sample moves a group's number: the smallest step any difference above can take."""
    settings, regime = raw["settings"], raw["settings"]["regime"]
    unit = dataset_words(settings)[1]
    per_group = settings["agents_per_backbone"]
    personal_n = per_group * regime["per_agent_test"]
    global_n = per_group * regime["global_per_class"] * len(raw["fleets"][next(iter(raw["fleets"]))]["labels"])
    return [f"- Resolution: one {unit[:-1]} is {100 / personal_n:.2f} pp of a group's personalised number "
            f"({personal_n} local test {unit} per group) and {100 / global_n:.2f} pp of its global number "
            f"({per_group} agents × the same {global_n // per_group} held-out {unit}); overall numbers pool all "
            "groups."]


def _dema_text(overrides: dict[str, int]) -> str:
    """The DeMA shape the run's bundles were built with: the defaults, or the defaults plus the overrides."""
    from export.dema.config import DemaConfig

    dema = DemaConfig(**overrides)
    shape = f"r {dema.rank}, {dema.slots} slots, {dema.experts} experts"
    if dema.private_experts:
        shape += f", {dema.private_experts} private expert{'s' if dema.private_experts > 1 else ''} (never sent)"
    return f"DeMA {'defaults' if not overrides else 'changed'} ({shape})"


def _job_commits(raw: Mapping[str, Any]) -> str:
    """Where a resumed run reused federations finished at other commits, say which (a job from before jobs recorded
    their commit ran in the run it is stored with)."""
    commits = sorted({str(job.get("commit", raw["commit"])) for job in raw["jobs"]})
    if commits == [raw["commit"]]:
        return ""
    return ("; federations from commits " + ", ".join(f"`{c}`" for c in commits)
            + " (finished federations reused with --reuse or by a resumed sweep; settings unchanged)")


def render_index(raws: Sequence[Mapping[str, Any]], cells_planned: int, *, pages: str, flags: str,
                 sweep: Mapping[str, Any] | None, budget: SweepBudget) -> str:
    """The sweep's front page: per cell, the default method against each baseline on both views.

    ``sweep`` is the record of the last invocation that ran every cell (docs/<pages>/sweep.json, with its wall
    time), None while the cells were only run piecemeal."""
    first = raws[0]
    commits = sorted({str(job.get("commit", "?"))[:12] for raw in raws for job in raw["jobs"]})
    federation_minutes = [sum(job["wall_seconds"] for job in raw["jobs"]) / 60 for raw in raws]
    lines = [
        f"# Method benchmark, {budget.name} sweep: index",
        "",
        *([budget.history, ""] if budget.history else []),
        f"Generated by `python -m bench.methods {flags}` (it resumes; `--cells` runs part of the sweep, `{flags} "
        f"--render-from docs/{pages}` redraws from the stored results) — **do not edit by hand**. "
        f"{len(raws)} of {cells_planned} cells done; each cell links its own page (the command that ran it, tables, "
        "per-round curves, bytes, costs, timing).",
        "",
        f"- budget `{budget.name}`: {budget.agents_per_backbone} agents per backbone, {budget.rounds} rounds x "
        f"{budget.local_steps} local steps, {len(first['settings']['seeds'])} seeds, every method on the same fleets "
        "and seeds",
        f"- federations from commits {', '.join(f'`{c}`' for c in commits)}; machine: {first['machine']['cpu']}, "
        f"{first['machine']['cores']} cores",
        "- cell = one dataset x one regime; numbers are paired per-seed differences, mean over seeds in pp "
        "(method − baseline), with the sign-flip p-value; *personal* after the last round, *global* of the final "
        "aggregate.",
        *_sweep_time(sweep, federation_minutes),
        "",
    ]
    header = ["cell", "federation time", *[f"heterotune − {b} ({v})"
                                           for b in ("group-fedavg", "local", "smallest-common")
                                           for v in ("personal", "global")]]
    rows = []
    for raw, minutes in zip(raws, federation_minutes, strict=True):
        s = summarise(raw)
        heads = s["headline"]
        cells = []
        for base in ("group-fedavg", "local", "smallest-common"):
            for view in ("personal", "global"):
                if "heterotune" not in heads or base not in heads:
                    cells.append("–")
                    continue
                d = paired({sd: h[view][OVERALL] for sd, h in heads["heterotune"].items()},
                           {sd: h[view][OVERALL] for sd, h in heads[base].items()})
                cells.append(f"{_signed(d['mean'])} (p {fmt(d['p'], 2)})")
        mode = raw["settings"]["mode"]
        rows.append([f"[{mode}]({pages}/{mode}.md)", f"{minutes:.0f} min", *cells])
    lines += [table(header, rows), ""]
    return "\n".join(lines) + "\n"


def _sweep_time(sweep: Mapping[str, Any] | None, federation_minutes: Sequence[float]) -> list[str]:
    """The sweep's time: its own wall clock when one invocation ran every cell, else the federations' sum."""
    lines = ["- *federation time* = the wall times of the cell's federations added up; the sweep runs two at once on "
             f"2 cores. Done cells: {sum(federation_minutes):.0f} min in all, about {sum(federation_minutes) / 2:.0f} "
             "min of wall time at two workers (each cell page gives the machine's load; on a busy machine these are "
             "upper bounds)."]
    if sweep is None:
        return [*lines, "- no single invocation has run every cell yet (cells resumed across sessions), so the "
                "sweep has no wall time of its own"]
    load = f"1-minute load average {sweep['load_before'][0]} at the start, {sweep['load_after'][0]} at the end"
    return [*lines, f"- **whole sweep, one invocation: {sweep['wall_seconds'] / 60:.0f} min wall** "
            f"(`{sweep['command']}`, commit `{str(sweep['commit'])[:12]}`, started {sweep['started_utc']} UTC, "
            f"{sweep['workers']} workers on {sweep['machine']['cores']} cores, {load}); it ran "
            f"{sweep['federations_run']} federations and reused {sweep['federations_reused']}, and spent "
            f"{sweep['bundle_seconds']:.0f} s building or loading bundles"]
