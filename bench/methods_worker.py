"""One benchmark job (a method on a seed's fleet) in a worker process, returned as plain JSON-able data.

Why a separate module: jobs run in a spawned process pool (one ORT thread each, two jobs on two cores), and a
spawned worker imports the job function by module name; keeping it here keeps the pool free of the CLI and
report code. The result holds metrics only (no tensors), so it is cheap to send back and to store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.methods_federation import AgentRound, AgentSpec, run_inprocess
from bench.methods_plan import BenchSettings, Regime, method_config
from coordinator.federation_state import full_model_bytes, payload_bytes, upload_names
from coordinator.methods import public_kind_for, public_samples_for, scopes_for, uses_prototypes
from export.bundle import load_bundle


def settings_from_dict(raw: dict[str, Any]) -> BenchSettings:
    fields = dict(raw)
    fields["regime"] = Regime(**fields["regime"])
    for key in ("backbones", "seeds", "methods"):
        fields[key] = tuple(fields[key])
    return BenchSettings(**fields)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one (method, seed) federation; ``job`` holds settings, method, seed, bundle dirs and data files."""
    started = time.time()
    settings = settings_from_dict(job["settings"])
    method, seed = job["method"], job["seed"]
    config, agents = method_config(settings, method, seed)
    bundles = {b: load_bundle(Path(job["bundle_dirs"][b])) for b in config.backbones}
    files = {a: Path(p) for a, p in job["client_files"].items()}
    specs = [AgentSpec(a, backbone, files[a]) for a, backbone in agents.items()]
    public_file = job.get("public_file")
    run = run_inprocess(config, bundles, specs, Path(job["global_test_file"]), threads=1, final_eval=True,
                        public_file=Path(public_file) if public_file else None)
    home = settings.agents()  # device class = the backbone the device would get on its own
    scopes = scopes_for(config.method, config.scopes)
    prototypes = uses_prototypes(config)
    public: dict[str, Any] = {"public_samples": public_samples_for(config), "public_kind": public_kind_for(config)}
    return {
        "method": method,
        "seed": seed,
        "engine_method": config.method,
        "agents": agents,
        "home_backbone": home,
        "rounds": [_row(r, home[r.agent_id]) for r in run.rounds],
        "final_global": {a: {"correct": e.correct, "total": e.total, "home_backbone": home[a],
                             "backbone": agents[a]} for a, e in run.final_global.items()},
        "payload_bytes": {b: payload_bytes(bundles[b].manifest,
                                           upload_names(bundles[b].manifest, scopes, prototypes=prototypes,
                                                        **public),
                                           **public)
                          for b in config.backbones},
        "full_model_bytes": {b: full_model_bytes(bundles[b].manifest) for b in config.backbones},
        "diagnostics": {str(k): _compact(v) for k, v in run.diagnostics.items()},
        "seconds": run.seconds,
        "commit": job["commit"],  # a resumed sweep mixes federations from several commits: each says its own
        "started_at": started,  # epoch seconds: a sweep cell's span is its federations' first start to last end
        "wall_seconds": time.time() - started,
    }


def _row(r: AgentRound, home: str) -> dict[str, Any]:
    return {
        "round": r.round, "agent_id": r.agent_id, "backbone": r.backbone, "home_backbone": home,
        "n_train": r.n_train, "personal_correct": r.personal_correct, "personal_total": r.personal_total,
        "global_correct": r.global_correct, "global_total": r.global_total, "train_loss": r.train_loss,
        "bytes_up": r.bytes_up, "bytes_down": r.bytes_down, "train_seconds": r.train_seconds,
        "eval_seconds": r.eval_seconds,
    }


def _compact(diagnostics: dict[str, Any]) -> dict[str, Any]:
    """Keep what the report uses: per global tensor, the cross-group cosine and whether CMGA projected."""
    out: dict[str, Any] = {k: v for k, v in diagnostics.items() if k in ("strategy", "num_updates",
                                                                         "num_projections", "group_samples")}
    cosines: list[float] = []
    for info in (diagnostics.get("tensors") or {}).values():
        cosines.extend(c for c in (info.get("cosines") or {}).values() if c is not None)
    if cosines:
        out["cosines"] = cosines
    return out
