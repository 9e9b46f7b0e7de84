"""Flower ServerApp: the demo's rounds with the product's aggregation, as a custom ``@app.main()`` loop.

Each backbone group gets its own tensors (HeteroTune's per-backbone weights), so a built-in strategy (which
insists on identical keys) does not fit; the loop mirrors bench/methods_federation.run_inprocess: the same
initial state, upload names, plan, update admission and ``strategy.aggregate``. It writes one JSON result
(timestamps, per-agent rows, message sizes) for bench/peers.py to read; the exit code of `flwr run` says
nothing about success (it is 0 on a failed run).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.aggregation import ClientUpdate
from coordinator.aggregation.dp import admit
from coordinator.config import RunConfig
from coordinator.federation_state import initial_state, upload_names, weights_for
from coordinator.methods import scopes_for, strategy_for
from hetero_flwr.task import Spec, from_record, load_spec, record_bytes, to_record
from protocols.bundle_manifest import MANIFEST_NAME, BundleManifest
from protocols.durable import write_atomic

app = ServerApp()
TIMEOUT_S = 1800.0


class DiskBundle:
    """What coordinator.federation_state needs of a bundle (manifest + initial tensors), read from its directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = BundleManifest.model_validate_json((directory / MANIFEST_NAME).read_text())

    def initial_tensors(self) -> dict[str, Any]:
        from safetensors.numpy import load_file

        return load_file(str(self.directory / self.manifest.initial_tensors))


def message_bytes(message: Message) -> int:
    """A message's serialized size as Flower puts it on the wire (protobuf), or its array payload if the
    serializer is not where 1.42 keeps it."""
    try:
        from flwr.common.serde import message_to_proto

        return int(message_to_proto(message).ByteSize())
    except Exception:
        return sum(record_bytes(r) for r in message.content.array_records.values())


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float = 600.0) -> list[int]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        time.sleep(0.5)
    raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {count} nodes connected in {timeout_s:.0f} s")


def _replies(grid: Grid, messages: list[Message]) -> list[Message]:
    replies = list(grid.send_and_receive(messages, timeout=TIMEOUT_S))
    failed = [m.error.reason for m in replies if m.has_error()]
    if failed or len(replies) != len(messages):
        raise RuntimeError(f"{len(replies)}/{len(messages)} replies, errors: {failed[:2]}")
    return replies


def _row(round_id: int, agent_id: str, backbone: str, metrics: Any, up: int, down: int) -> dict[str, Any]:
    return {"round": round_id, "agent_id": agent_id, "backbone": backbone, "bytes_up": up, "bytes_down": down,
            **{key.replace("-", "_"): metrics[key] for key in metrics}}


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.time()
    spec: Spec = load_spec(context)
    result: dict[str, Any] = {"main_started": started, "rounds": [], "final": [], "error": None}
    try:
        _run(grid, spec, result)
    except Exception as exc:  # recorded for bench/peers.py, then re-raised so flwr marks the run failed
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        result["main_ended"] = time.time()
        write_atomic(spec.result, json.dumps(result, indent=1).encode())


def _run(grid: Grid, spec: Spec, result: dict[str, Any]) -> None:
    config = RunConfig.model_validate(spec.config)
    bundles = {b: DiskBundle(d) for b, d in spec.bundles.items()}
    nodes = _wait_for_nodes(grid, len(spec.agents))
    result["nodes_ready"] = time.time()
    hello = [Message(RecordDict({"q": ConfigRecord({"what": "agent"})}), dst_node_id=n,
                     message_type=MessageType.QUERY) for n in nodes]
    who = {m.metadata.src_node_id: (str(m.content.config_records["info"]["agent-id"]),
                                    str(m.content.config_records["info"]["backbone"])) for m in _replies(grid, hello)}
    result["handshake_done"] = time.time()
    scopes = scopes_for(config.method, config.scopes)
    strategy = strategy_for(config)
    used = sorted({backbone for _, backbone in who.values()})
    state = initial_state({b: bundles[b] for b in used}, scopes)
    names = {b: upload_names(bundles[b].manifest, scopes) for b in used}
    for round_id in range(1, config.rounds + 1):
        round_start = time.time()
        messages = []
        for node in sorted(who, key=lambda n: who[n][0]):
            backbone = who[node][1]
            plan = ConfigRecord({"round": round_id, "local-steps": config.local_steps,
                                 "batch-size": config.task.batch_size, "learning-rate": config.learning_rate,
                                 "seed": config.seed, "upload-names": list(names[backbone])})
            messages.append(Message(RecordDict({"tensors": to_record(weights_for(state, backbone)), "plan": plan}),
                                    dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_id)))
        down = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        replies = _replies(grid, messages)
        received = time.time()
        updates, rows = [], []
        for reply in sorted(replies, key=lambda m: who[m.metadata.src_node_id][0]):
            node = reply.metadata.src_node_id
            agent_id, backbone = who[node]
            metrics = reply.content.metric_records["metrics"]
            tensors = from_record(reply.content.array_records["tensors"])
            updates.append(admit(strategy, state, ClientUpdate(agent_id, backbone, int(metrics["n-train"]), tensors)))
            rows.append(_row(round_id, agent_id, backbone, metrics, message_bytes(reply), down[node]))
        state = strategy.aggregate(state, updates, round_id).state
        result["rounds"].append({"round": round_id, "started": round_start, "replies_in": received,
                                 "ended": time.time(), "agents": rows})
    final_start = time.time()
    messages = [Message(RecordDict({"tensors": to_record(weights_for(state, who[n][1]))}), dst_node_id=n,
                        message_type=MessageType.EVALUATE, group_id="final") for n in sorted(who)]
    for reply in _replies(grid, messages):
        agent_id, backbone = who[reply.metadata.src_node_id]
        result["final"].append(_row(config.rounds + 1, agent_id, backbone, reply.content.metric_records["metrics"],
                                    message_bytes(reply), 0))
    result["final_seconds"] = time.time() - final_start
