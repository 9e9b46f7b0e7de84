"""`edge-agent`: the device-side command line (join a coordinator, show this device's profile)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import Annotated, Literal

import typer

from edge_agent.bundle_store import default_cache_dir
from protocols.brokers import BrokerAddress, parse_broker_list

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="HeteroTune edge agent: fine-tunes adapters on this device and shares only part of them.")


def _brokers(address: str) -> tuple[BrokerAddress, ...]:
    try:
        return parse_broker_list(address)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--broker") from None


@app.command()
def join(
    broker: Annotated[str, typer.Option(help="MQTT broker as HOST:PORT, or a cluster's nodes as "
                                             "HOST:PORT,HOST:PORT,... (fails over when its node dies)")],
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
    state_dir: Annotated[Path | None, typer.Option(
        help="where this device keeps its trained model, saved after every round and resumed after a restart "
             "(default: heterotune-state/ID beside --data)", file_okay=False)] = None,
    max_idle: Annotated[float, typer.Option(help="give up after this many seconds without messages")] = 900.0,
    username: Annotated[str | None, typer.Option(help="MQTT username (defaults to none)")] = None,
    password: Annotated[str | None, typer.Option(
        envvar="HETEROTUNE_MQTT_PASSWORD", help="MQTT password; prefer --password-file or the environment variable "
                                                "(a password on the command line is visible in `ps`)")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="file holding the MQTT password (agents/ID/password from `coordinator provision`, mode 0600)")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate of a TLS broker (from `coordinator provision`)",
                                                exists=True, dir_okay=False)] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="client certificate, for a broker provisioned with --client-certs", exists=True, dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(help="private key of --tls-cert", exists=True, dir_okay=False)] = None,
    enforce_memory: Annotated[bool, typer.Option(
        help="abort a round (no upload, the agent carries on) once this process's RSS crosses --max-memory")] = True,
    slowdown: Annotated[float, typer.Option(
        min=1.0, help="emulate a device this many times slower than this machine: sleep after every step and "
                      "report GFLOP/s divided by it (emulated fleets)")] = 1.0,
    coordinator_key: Annotated[Path | None, typer.Option(
        help="the coordinator's public run key (.pub from `coordinator provision` or the run directory's keys/): "
             "only messages signed with it are acted on", exists=True, dir_okay=False)] = None,
    insecure_no_verify: Annotated[bool, typer.Option(
        "--insecure-no-verify", help="act on control messages without checking their signature (anyone who can "
                                     "publish to the broker can then stop or steer this device)")] = False,
    join_token_file: Annotated[Path | None, typer.Option(
        help="file holding the run's join token (or set HETEROTUNE_JOIN_TOKEN); the token itself is never sent",
        exists=True, dir_okay=False)] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a coordinator and train every round it assigns until the run ends.

    \b
    Exit codes:
      0  the run finished all its rounds
      2  bad input: data, labels, key or options
      3  the coordinator refused this device
      4  broker unreachable, or a download it never completed
      5  no word from any coordinator for --max-idle seconds
      6  stopped by its owner (SIGTERM / Ctrl-C)
      7  the run ended early: aborted by the coordinator
         (too few agents, a round missed its minimum) or the
         coordinator was stopped; the reason is logged
    """
    from edge_agent.allocator import fix_mmap_threshold

    fix_mmap_threshold()  # before the trainer allocates anything (edge_agent/allocator.py says why)
    from edge_agent.agent import EXIT_BAD_INPUT, EXIT_BROKER, EXIT_STOPPED, AgentConfig, AgentStopped, EdgeAgent
    from protocols.credentials import CredentialError, password_on_command_line, resolve_password
    from protocols.errors import BrokerUnavailable
    from protocols.topics import validate_agent_id

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=f"%(asctime)s {agent_id} %(levelname)s %(message)s")
    first, *others = _brokers(broker)
    from protocols.credentials import read_secret

    try:
        validate_agent_id(agent_id)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
        raise typer.BadParameter("client certificates need --tls-cert, --tls-key and --tls-ca together")
    if password_on_command_line(password):
        logging.getLogger("edge_agent").warning("the MQTT password is on the command line, where `ps` shows it to "
                                                "every user; use --password-file or HETEROTUNE_MQTT_PASSWORD")
    try:
        password = resolve_password(password, password_file)
    except CredentialError as exc:
        raise typer.BadParameter(str(exc)) from None
    config = AgentConfig(agent_id=agent_id, host=first.host, port=first.port, failover=tuple(others),
                         data=data, global_test=global_test, public=public,
                         max_memory_mb=max_memory, max_round_seconds=max_round_seconds, threads=threads,
                         backend=backend, cache_dir=cache_dir or default_cache_dir(), max_idle_seconds=max_idle,
                         username=username, password=password, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                         enforce_memory=enforce_memory, slowdown=slowdown, state_dir=state_dir,
                         coordinator_key=coordinator_key, insecure_no_verify=insecure_no_verify)

    def stop(signum: int, _frame: object) -> None:
        raise AgentStopped(f"stopped by its owner ({signal.Signals(signum).name})")

    signal.signal(signal.SIGTERM, stop)  # the agent tells the coordinator it leaves, then exits
    try:
        config.join_token = read_secret(join_token_file, "HETEROTUNE_JOIN_TOKEN")
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


def _state_dir(state_dir: Path | None, data: Path | None, agent_id: str | None) -> Path | None:
    """--state-dir, else the default `join` uses for --data and --id, else None."""
    if state_dir is not None:
        return state_dir
    if data is not None and agent_id is not None:
        from edge_agent.device_state import default_state_dir

        return default_state_dir(data, agent_id)
    return None


StateDirOption = Annotated[Path | None, typer.Option(help="the device state directory (default: beside --data, "
                                                          "for --id, as `join` uses)")]
DataOption = Annotated[Path | None, typer.Option(help="the data file the agent joined with (locates the state)")]
IdOption = Annotated[str | None, typer.Option("--id", help="the agent id the device joined with")]
RunOption = Annotated[str | None, typer.Option(help="run id (default: the most recently saved run)")]


@app.command()
def predict(
    model: Annotated[Path | None, typer.Option(help="an exported model directory (`edge-agent export --out`)")] = None,
    state_dir: StateDirOption = None,
    data: DataOption = None,
    agent_id: IdOption = None,
    run: RunOption = None,
    text: Annotated[list[str] | None, typer.Option(help="a text to classify (repeatable)")] = None,
    file: Annotated[Path | None, typer.Option(help="JSONL/CSV of texts or .npz of images (labels optional: "
                                                   "accuracy is printed when every input has one)")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="an image file to classify (repeatable; needs Pillow)")
                     ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    batch_size: Annotated[int, typer.Option(help="inputs per inference call")] = 16,
    threads: Annotated[int, typer.Option(help="compute threads (0 = onnxruntime's default)")] = 1,
    int8: Annotated[bool, typer.Option("--int8", help="use the package's int8 model")] = False,
) -> None:
    """Classify texts or images with this device's fine-tuned model (onnxruntime inference only)."""
    from edge_agent.predict_cli import run_predict

    raise typer.Exit(run_predict(model=model, state_dir=_state_dir(state_dir, data, agent_id), run=run,
                                 texts=text or [], file=file, images=image or [], as_json=as_json,
                                 batch_size=batch_size, threads=threads, int8=int8))


@app.command("export")
def export_model(
    out: Annotated[Path, typer.Option(help="directory to write the inference package into")],
    state_dir: StateDirOption = None,
    data: DataOption = None,
    agent_id: IdOption = None,
    run: RunOption = None,
    int8: Annotated[bool, typer.Option("--int8", help="also write a dynamic int8 model, its size and accuracy "
                                                      "change (on this device's test split of --data) measured")
                    ] = False,
    threads: Annotated[int, typer.Option(help="compute threads for the int8 measurement")] = 1,
) -> None:
    """Export this device's fine-tuned model as a self-contained inference package."""
    from edge_agent.predict_cli import EXIT_BAD_INPUT, run_export

    where = _state_dir(state_dir, data, agent_id)
    if where is None:
        typer.echo("error: give --state-dir, or --data and --id as given to `edge-agent join`", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    raise typer.Exit(run_export(state_dir=where, run=run, out=out, int8=int8, data=data, threads=threads))


if __name__ == "__main__":
    app()
