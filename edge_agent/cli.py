"""`edge-agent`: the device-side command line (join a coordinator, show this device's profile)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Literal

import typer

from edge_agent.bundle_store import default_cache_dir

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="HeteroTune edge agent: fine-tunes adapters on this device and shares only part of them.")


def _broker(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise typer.BadParameter(f"'{address}' is not HOST:PORT (e.g. 127.0.0.1:1883)")
    return host, int(port)


@app.command()
def join(
    broker: Annotated[str, typer.Option(help="MQTT broker as HOST:PORT")],
    agent_id: Annotated[str, typer.Option("--id", help="this device's id (also its MQTT client id)")],
    data: Annotated[Path, typer.Option(help="private data: JSONL or CSV with text,label", exists=True,
                                       dir_okay=False)],
    global_test: Annotated[Path | None, typer.Option(help="optional balanced held-out set (emulated fleets)",
                                                     exists=True, dir_okay=False)] = None,
    public: Annotated[Path | None, typer.Option(
        help="the run's public unlabelled set (same format as --data; labels, if any, are never read): needed when "
             "the run distils", exists=True, dir_okay=False)] = None,
    max_memory: Annotated[float | None, typer.Option(help="memory cap in MB")] = None,
    max_round_seconds: Annotated[float | None, typer.Option(help="longest round this device accepts")] = None,
    threads: Annotated[int, typer.Option(help="compute threads (0 = runtime default)")] = 0,
    backend: Annotated[Literal["auto", "ort", "torch"], typer.Option(
        help="trainer backend: ort (ONNX Runtime Training), torch (PyTorch; Linux aarch64 devices such as "
             "Raspberry Pi and Jetson, where no ORT training wheel exists), auto (ort where it loads, else torch)"),
    ] = "auto",
    cache_dir: Annotated[Path | None, typer.Option(help="bundle cache")] = None,
    max_idle: Annotated[float, typer.Option(help="give up after this many seconds without messages")] = 900.0,
    username: Annotated[str | None, typer.Option(help="MQTT username (defaults to none)")] = None,
    password: Annotated[str | None, typer.Option(envvar="HETEROTUNE_MQTT_PASSWORD")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate of a TLS broker (from `coordinator provision`)",
                                                exists=True, dir_okay=False)] = None,
    enforce_memory: Annotated[bool, typer.Option(
        help="abort a round (no upload, the agent carries on) once this process's RSS crosses --max-memory")] = True,
    slowdown: Annotated[float, typer.Option(
        min=1.0, help="emulate a device this many times slower than this machine: sleep after every step and "
                      "report GFLOP/s divided by it (emulated fleets)")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a coordinator and train every round it assigns until the run ends."""
    from edge_agent.allocator import fix_mmap_threshold

    fix_mmap_threshold()  # before the trainer allocates anything (edge_agent/allocator.py says why)
    from edge_agent.agent import EXIT_BAD_INPUT, EXIT_BROKER, EXIT_STOPPED, AgentConfig, AgentStopped, EdgeAgent
    from protocols.errors import BrokerUnavailable
    from protocols.topics import validate_agent_id

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s {agent_id} %(levelname)s %(message)s")
    host, port = _broker(broker)
    try:
        validate_agent_id(agent_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = AgentConfig(agent_id=agent_id, host=host, port=port, data=data, global_test=global_test, public=public,
                         max_memory_mb=max_memory, max_round_seconds=max_round_seconds, threads=threads,
                         backend=backend, cache_dir=cache_dir or default_cache_dir(), max_idle_seconds=max_idle,
                         username=username, password=password, tls_ca=tls_ca, enforce_memory=enforce_memory,
                         slowdown=slowdown)
    def stop(signum: int, _frame: object) -> None:
        raise AgentStopped(f"stopped by its owner ({signal.Signals(signum).name})")

    signal.signal(signal.SIGTERM, stop)  # the agent tells the coordinator it leaves, then exits
    try:
        code = EdgeAgent(config).run()
    except AgentStopped as exc:
        typer.echo(f"{agent_id}: {exc}; the coordinator was told", err=True)
        code = EXIT_STOPPED
    except BrokerUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        code = EXIT_BROKER
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        code = EXIT_BAD_INPUT
    except TimeoutError as exc:  # a download the broker never completed; the coordinator was told we left
        typer.echo(f"error: {exc}; check the broker and the coordinator, then join again", err=True)
        code = EXIT_BROKER
    raise typer.Exit(code)


@app.command()
def profile(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    max_memory: Annotated[float | None, typer.Option(help="memory cap in MB")] = None,
    max_round_seconds: Annotated[float | None, typer.Option(help="longest round this device accepts")] = None,
    backend: Annotated[Literal["auto", "ort", "torch"], typer.Option(
        help="the trainer backend `join --backend` would use (auto: ort where it loads, else torch)")] = "auto",
) -> None:
    """Measure this device: RAM, cores, architecture, matmul GFLOP/s, disk, trainer backends."""
    from edge_agent.profile import format_profile_table, profile_device

    measured = profile_device(max_memory_mb=max_memory, max_round_seconds=max_round_seconds,
                              backend=None if backend == "auto" else backend)
    typer.echo(json.dumps(measured, indent=2) if as_json else format_profile_table(measured))


if __name__ == "__main__":
    app()
