"""`coordinator`: run a federation from a config file, or the self-contained demo."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from coordinator.config import RunConfig
    from coordinator.fleet import DataSplit, EmulatedAgent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="HeteroTune coordinator: assigns backbones, runs rounds over MQTT, aggregates adapters.")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (SystemExit through every finally), so the run's own broker is stopped too."""
    import signal
    import sys

    def handler(signum: int, _frame: object) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@app.command()
def run(
    config: Annotated[Path | None, typer.Option(help="run configuration (TOML)")] = None,
    broker: Annotated[str | None, typer.Option(
        help="use this broker HOST:PORT instead of starting one (on --resume: instead of the run's own); a "
             "cluster's nodes as HOST:PORT,HOST:PORT,...: the coordinator fails over when its node dies")] = None,
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/run"),
    resume: Annotated[Path | None, typer.Option(
        help="continue this run directory after a crash, on the broker it used (restarted if it died)")] = None,
    username: Annotated[str | None, typer.Option(help="MQTT user (see `coordinator provision`)")] = None,
    password: Annotated[str | None, typer.Option(
        envvar="HETEROTUNE_MQTT_PASSWORD", help="MQTT password; prefer --password-file or the environment variable "
                                                "(a password on the command line is visible in `ps`)")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="file holding the MQTT password (coordinator/password from `coordinator provision`, mode 0600)")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA certificate of a TLS broker", exists=True)] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="client certificate, for a broker provisioned with --client-certs", exists=True)] = None,
    tls_key: Annotated[Path | None, typer.Option(help="private key of --tls-cert", exists=True)] = None,
    listen: Annotated[str, typer.Option(
        help="interface the run's own broker listens on (without --broker); anything but loopback needs --insecure")]
    = "127.0.0.1",
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="allow an own broker without passwords on a non-loopback --listen (warns every round)")]
    = False,
    signing_key: Annotated[Path | None, typer.Option(
        help="run key that signs every control message (from `coordinator provision`); default: generated into "
             "RUN_DIR/keys/run-key, give agents the .pub", exists=True, dir_okay=False)] = None,
    join_token_file: Annotated[Path | None, typer.Option(
        help="file with the join token devices must prove (or set HETEROTUNE_JOIN_TOKEN)", exists=True,
        dir_okay=False)] = None,
    tracking: Annotated[str | None, typer.Option(
        help="also log every committed round (accuracy per backbone group in both views, agent outcomes, bytes, "
             "seconds) as TensorBoard scalars: tensorboard:DIR. Off by default; needs the `tracking` extra "
             "(tensorboardX)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a federation; agents join with `edge-agent join --broker HOST:PORT --coordinator-key KEY.pub ...`."""
    from coordinator.config import ConfigError, load_config
    from coordinator.run_broker import InsecureBrokerRefused, NoRecordedBroker
    from coordinator.runner import RunDirectoryInUse, resume_config, run_federation
    from protocols.credentials import CredentialError, password_on_command_line, read_secret

    _logging(verbose)
    _stop_on_sigterm()
    if (config is None) == (resume is None):
        typer.echo("error: give either --config FILE (a new run) or --resume RUN_DIR (continue one)", err=True)
        raise typer.Exit(2)
    if (tls_cert is None) != (tls_key is None):
        typer.echo("error: a client certificate needs both --tls-cert and --tls-key", err=True)
        raise typer.Exit(2)
    if password_on_command_line(password):
        logging.getLogger("coordinator").warning("the MQTT password is on the command line, where `ps` shows it to "
                                                 "every user; use --password-file or HETEROTUNE_MQTT_PASSWORD")
    try:
        run_config = load_config(config) if config is not None else resume_config(resume)  # type: ignore[arg-type]
        token = read_secret(join_token_file, "HETEROTUNE_JOIN_TOKEN")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    mqtt = {"username": username, "password": password, "password_file": password_file, "tls_ca": tls_ca,
            "tls_cert": tls_cert, "tls_key": tls_key}
    try:
        summary = run_federation(run_config, resume or out, broker=broker, resume=resume is not None,
                                 mqtt_options=mqtt, listen=listen, insecure=insecure, signing_key=signing_key,
                                 join_token=token, tracking=tracking)
    except (RunDirectoryInUse, InsecureBrokerRefused, NoRecordedBroker, CredentialError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({k: summary[k] for k in ("run_id", "rounds", "wall_seconds", "stopped")}, indent=2))
    if summary["stopped"]:
        typer.echo(f"error: the run stopped early: {summary['stopped']}", err=True)
        raise typer.Exit(1)


FleetOption = Annotated[Path | None, typer.Option(help="fleet file (TOML) of device classes to emulate; "
                                                       "default: the demo's 2 x 384 MB + 2 x 2048 MB")]
ConfigOption = Annotated[Path | None, typer.Option(help="run configuration (TOML); default: the demo's")]


def _fleet_inputs(fleet: Path | None, config: Path | None, rounds: int | None,
                  seed: int) -> tuple[list[EmulatedAgent], RunConfig, DataSplit, str]:
    """The agents, run configuration and data split a fleet command works on; exit 2 with the reason if invalid."""
    from coordinator.config import ConfigError, load_config
    from coordinator.demo import demo_agents, demo_config
    from coordinator.fleet import DataSplit, FleetError, load_fleet

    try:
        run_config = (load_config(config, {"rounds": rounds} if rounds else None) if config is not None
                      else demo_config(rounds or 5, seed))
        if fleet is None:
            return demo_agents(), run_config, DataSplit.model_validate({}), "the demo fleet"
        parsed = load_fleet(fleet)
    except (ConfigError, FleetError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return parsed.agents(), run_config, parsed.data, f"fleet {parsed.name} ({fleet})"


@app.command()
def assign(
    fleet: FleetOption = None,
    config: ConfigOption = None,
    explain: Annotated[bool, typer.Option("--explain", help="show the cost cards and each candidate's arithmetic")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable decisions")] = False,
) -> None:
    """Which backbone each device of a fleet would get, and why, without running anything.

    Uses the cost cards of the run's bundles (built now if they do not exist yet), for each device the card of
    its trainer backend (the fleet file's ``backend``; ORT when unset).
    """
    from coordinator.assignment import cost_cards_of
    from coordinator.fleet import format_plan, plan_as_json, plan_fleet
    from coordinator.runner import build_bundles

    agents, run_config, data, source = _fleet_inputs(fleet, config, None, 0)
    # Every backend's card: each device is judged by the card of the backend it trains with.
    cards = [card for b in build_bundles(run_config).values() for card in cost_cards_of(b.manifest)]
    plans = plan_fleet(agents, cards, run_config, eval_samples=data.eval_samples(len(run_config.task.labels)))
    if as_json:
        typer.echo(json.dumps(plan_as_json(plans), indent=2))
    else:
        typer.echo(format_plan(plans, cards, run_config, source=source, explain=explain))


AlphaOption = Annotated[float | None, typer.Option(
    min=1e-3, help="Dirichlet label skew of the split (e.g. 0.3 = strong skew); default: an even (IID) split")]


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo"),
    rounds: Annotated[int | None, typer.Option(min=1, help="rounds (default: 5, or the config's)")] = None,
    seed: int = 0,
    fleet: FleetOption = None,
    config: ConfigOption = None,
    data: Annotated[Path | None, typer.Option(
        help="your own labelled data instead of the tweets: JSONL/CSV with text,label; an .npz with images, labels; "
             "or a folder with one sub-folder of PNG/JPEG images per class")] = None,
    alpha: AlphaOption = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """A real federated run on this machine: own mosquitto on loopback + emulated edge agents (4 by default)."""
    from coordinator.demo import model_locations, plan_for, run_demo, run_fleet
    from coordinator.fleet import format_plan
    from coordinator.report import _pct
    from coordinator.runner import set_aside

    if alpha is not None and data is None:
        typer.echo("error: --alpha splits your --data; the tweets' skew is the fleet file's [data] alpha", err=True)
        raise typer.Exit(2)
    _logging(verbose)
    moved = set_aside(out)  # the demo is meant to be run again: keep the previous run beside the new one
    if moved is not None:
        typer.echo(f"the previous run in {out} was moved to {moved}", err=True)
    if data is not None:
        summary, models = _user_data_demo(out, data, fleet, config, rounds, seed, alpha)
    elif fleet is None and config is None:
        summary = run_demo(out, rounds=rounds or 5, seed=seed)
    else:
        agents, run_config, tweets, source = _fleet_inputs(fleet, config, rounds, seed)
        run_config, plans = plan_for(agents, run_config, tweets)
        typer.echo(format_plan(plans, [], run_config, source=source, explain=False), err=True)
        summary = run_fleet(out, agents, run_config, tweets, seed=seed)
    typer.echo(f"\ndemo finished in {summary['wall_seconds']:.0f} s; run directory: {out}")
    for agent_id, backbone in sorted(summary["agents"].items()):
        typer.echo(f"  {agent_id}: {backbone}")
    for agent_id, reason in sorted(summary["refused"].items()):
        typer.echo(f"  {agent_id}: {reason}")
    for entry in summary["per_round"]:
        typer.echo(f"  round {entry['round']}: global accuracy {_pct(entry['global_accuracy'])} %, "
                   f"personal accuracy {_pct(entry['personal_accuracy'])} %")
    final = summary["final"]  # the model after the last round's aggregation, measured by the agents
    typer.echo(f"  final model: global accuracy {_pct(final['global_accuracy'])} %, "
               f"personal accuracy {_pct(final['personal_accuracy'])} %")
    if data is not None:
        typer.echo("\neach device's model, and how to use it:")
        for line in models:
            typer.echo(line)
    else:
        for line in model_locations(out, list(summary["agents"])):
            typer.echo(line)


def _user_data_demo(out: Path, data: Path, fleet: Path | None, config: Path | None, rounds: int | None, seed: int,
                    alpha: float | None) -> tuple[dict[str, Any], list[str]]:
    """`demo --data`: the user's data split over the fleet, its labels and the modality's backbones (or the
    --config's backbones); returns the summary and the lines saying where each device's model is."""
    from coordinator.datasets import FLEET_SUMMARY
    from coordinator.demo import device_state_dir, plan_for, run_agents
    from coordinator.fleet import DataSplit, format_plan
    from coordinator.user_data import (
        example_input,
        load_user_data,
        predict_command,
        split_user_data,
        user_config,
    )

    agents, base, _tweets, source = _fleet_inputs(fleet, config, rounds, seed)
    try:
        dataset = load_user_data(data)
        run_config = user_config(dataset, base, keep_backbones=config is not None)
        files = split_user_data(dataset, [a.agent_id for a in agents], out / "data", alpha=alpha, seed=seed)
    except (ValueError, FileNotFoundError) as exc:  # UserDataError, or the agents' own reader's message
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    sizes = [sum(counts) for counts in files.label_counts.values()]
    held_out = json.loads((out / "data" / FLEET_SUMMARY).read_text())["global_test"]["size"]
    split = DataSplit(samples_per_agent=max(8, *sizes), global_test_per_class=max(1, held_out // len(dataset.labels)))
    run_config, plans = plan_for(agents, run_config, split)
    typer.echo(format_plan(plans, [], run_config, source=f"{source}, data {data}", explain=False), err=True)
    summary = run_agents(out, agents, run_config, files)
    example = example_input(dataset, data)
    lines = [f"  {agent_id}: {device_state_dir(out, agent_id)}\n"
             f"    {predict_command(device_state_dir(out, agent_id), dataset, example)}"
             for agent_id in sorted(summary["agents"])]
    return summary, lines


@app.command()
def split(
    data: Annotated[Path, typer.Argument(help="labelled data: JSONL/CSV (text,label), .npz (images, labels) or a "
                                              "folder with one sub-folder of PNG/JPEG images per class")],
    agents: Annotated[int, typer.Option(min=1, max=1000, help="number of devices to split the data over")],
    out: Annotated[Path, typer.Option(help="directory for the device files, the held-out set and config.toml")],
    alpha: AlphaOption = None,
    seed: int = 0,
    broker: Annotated[str, typer.Option(help="the broker address the printed join lines use")] = "127.0.0.1:1883",
) -> None:
    """Split your labelled data for a fleet of real agents: a balanced held-out set, one file per device, a run
    configuration with the data's labels, and the `edge-agent join` line of every device."""
    from coordinator.user_data import join_command, load_user_data, split_user_data, user_config, write_run_config

    try:
        dataset = load_user_data(data)
        ids = [f"device-{i:0{max(2, len(str(agents)))}d}" for i in range(1, agents + 1)]
        files = split_user_data(dataset, ids, out, alpha=alpha, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    from coordinator.config import RunConfig
    from protocols.signing import ensure_key_pair, public_path

    run_config = user_config(dataset, RunConfig(min_agents=agents, allowed_agents=tuple(ids)))
    config_path = write_run_config(out / "config.toml", run_config)
    run_key = out / "keys" / "run-key"  # the coordinator signs with it; every device verifies with its .pub
    ensure_key_pair(run_key)
    typer.echo(f"{len(dataset.label_array())} examples, labels {', '.join(dataset.labels)}; held-out set "
               f"{files.global_test_file}, device files in {out / 'clients'} (fleet.json has the counts); run key "
               f"{run_key} (0600, the coordinator's) and {public_path(run_key)} (for every device)")
    typer.echo(f"\n# the coordinator (with a mosquitto at {broker}):")
    typer.echo(f"coordinator run --config {config_path} --broker {broker} --out {out / 'run'} --signing-key {run_key}")
    typer.echo("\n# one agent per device (each on its own machine, or here in its own terminal):")
    for agent_id in ids:
        typer.echo(join_command(files, agent_id, broker, public_path(run_key)))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (the --out of `coordinator run` or `demo`)")],
    out: Annotated[Path | None, typer.Option(help="where to write the page and plots (default RUN_DIR/report)")]
    = None,
) -> None:
    """Plots (accuracy per backbone group in both views, bytes, round time, outcomes) and a one-page summary."""
    from coordinator.run_report import ReportError, write_report

    try:
        written = write_report(run_dir, out)
    except ReportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for path in written:
        typer.echo(str(path))


@app.command()
def provision(
    out: Annotated[Path, typer.Option(help="directory for the CA, the broker's files and each party's credentials")],
    agents: Annotated[list[str], typer.Option("--agent", help="agent id (repeat for each agent)")],
    host: Annotated[str, typer.Option(help="the broker's address as agents reach it (IP or DNS name)")] = "127.0.0.1",
    tls_port: Annotated[int, typer.Option(help="TLS listener port")] = 8883,
    bind: Annotated[str | None, typer.Option(
        help="interface the TLS listener binds (default: --host; 0.0.0.0 for all)")] = None,
    client_certs: Annotated[bool, typer.Option(
        "--client-certs", help="require a client certificate (CN = agent id) on the TLS listener instead of "
                               "passwords; one certificate per party is written")] = False,
    plain_port: Annotated[int | None, typer.Option(
        help="also open a plaintext listener (passwords still required) on this port, on 127.0.0.1 only")] = None,
) -> None:
    """Write a complete secured mosquitto set-up: TLS, one password (or client certificate) per party, ACLs."""
    from coordinator.provision import COORDINATOR_USER
    from coordinator.provision import provision as write_security
    from coordinator.provision_keys import write_run_key

    try:
        result = write_security(out, agents, host=host, tls_port=tls_port, bind=bind, client_certs=client_certs,
                                plain_port=plain_port)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    d = result.directory
    run_key = write_run_key(out)
    for agent_id in agents:  # each device's folder is complete: it also verifies the coordinator with the key
        shutil.copyfile(run_key.with_name(run_key.name + ".pub"), result.party_dir(agent_id) / "run-key.pub")
    files = "ca.crt, client.crt, client.key" if client_certs else "ca.crt, password"
    auth = ("--tls-cert DIR/client.crt --tls-key DIR/client.key" if client_certs
            else "--username ID --password-file DIR/password")
    typer.echo(f"wrote {d}:\n"
               f"  ca/ca.key        the CA's private key (0600): keep it off the broker and the devices\n"
               f"  broker/          start the broker with: mosquitto -c {result.config_path}\n"
               f"  {COORDINATOR_USER}/     the coordinator's credentials\n"
               f"  run-key/run-key  the run key (0600) that signs every control message: coordinator only\n"
               f"  agents/ID/       copy to device ID: {files}, run-key.pub")
    typer.echo(f"coordinator: coordinator run --config RUN.toml --broker {host}:{tls_port} --tls-ca DIR/ca.crt {auth} "
               f"--signing-key {run_key} "
               f"(DIR = {d / COORDINATOR_USER}{', ID = coordinator' if not client_certs else ''})")
    typer.echo(f"agents:      edge-agent join --broker {host}:{tls_port} --id ID --tls-ca DIR/ca.crt {auth} "
               "--coordinator-key DIR/run-key.pub --data FILE (DIR = agents/ID)")


@app.command("broker")
def broker_command(
    config: Annotated[Path, typer.Option(
        help="directory written by `coordinator provision` (or a mosquitto.conf)", exists=True)],
) -> None:
    """Run mosquitto in the foreground with exactly the provisioned configuration (the same as
    `mosquitto -c DIR/broker/mosquitto.conf`, but finds the binary in sbin directories too)."""
    from coordinator.broker import MosquittoNotFound, find_mosquitto

    path = config / "broker" / "mosquitto.conf" if config.is_dir() else config
    if not path.is_file():
        typer.echo(f"error: {path} does not exist; give the directory `coordinator provision --out` wrote", err=True)
        raise typer.Exit(2)
    try:
        exe = find_mosquitto()
    except MosquittoNotFound as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    os.execv(exe, [exe, "-c", str(path.resolve())])  # the broker replaces this process: signals reach it directly


@app.command("export")
def export_model(
    run_dir: Annotated[Path, typer.Argument(help="the run directory (`coordinator run --out`)")],
    backbone: Annotated[str, typer.Option(help="the backbone group whose aggregated model to export")],
    out: Annotated[Path, typer.Option(help="directory to write the inference package into")],
    int8: Annotated[bool, typer.Option("--int8", help="also write a dynamic int8 model")] = False,
) -> None:
    """Export a backbone group's aggregated model (runs with a shared head only) as an inference package."""
    from coordinator.model_export import export_federation_model

    try:
        card = export_federation_model(run_dir, backbone, out, int8=int8)
    except (ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported the {backbone} group's model (run {card.run_id}, round {card.rounds}) to {out}; "
               f"try: edge-agent predict --model {out} {'--image FILE' if card.modality == 'image' else '--text ...'}")


if __name__ == "__main__":
    app()
