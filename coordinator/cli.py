"""`coordinator`: run a federation from a config file, or the self-contained demo."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="HeteroTune coordinator: assigns backbones, runs rounds over MQTT, aggregates adapters.")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@app.command()
def run(
    config: Annotated[Path, typer.Option(help="run configuration (TOML)")],
    broker: Annotated[str | None, typer.Option(help="use this broker HOST:PORT instead of starting one")] = None,
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/run"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a federation; agents join with `edge-agent join --broker HOST:PORT ...`."""
    from coordinator.config import ConfigError, load_config
    from coordinator.runner import run_federation

    _logging(verbose)
    try:
        run_config = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    summary = run_federation(run_config, out, broker=broker)
    typer.echo(json.dumps({k: summary[k] for k in ("run_id", "rounds", "wall_seconds")}, indent=2))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    rounds: Annotated[int, typer.Option(min=1)] = 5,
    seed: int = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """A real federated run on this machine: own mosquitto on loopback + 4 emulated edge agents."""
    from coordinator.demo import run_demo
    from coordinator.report import _pct

    _logging(verbose)
    summary = run_demo(out, rounds=rounds, seed=seed)
    typer.echo(f"\ndemo finished in {summary['wall_seconds']:.0f} s; run directory: {out}")
    for entry in summary["per_round"]:
        typer.echo(f"  round {entry['round']}: global accuracy {_pct(entry['global_accuracy'])} %, "
                   f"personal accuracy {_pct(entry['personal_accuracy'])} %")


if __name__ == "__main__":
    app()
