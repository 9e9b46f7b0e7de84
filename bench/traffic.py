"""Part 3: bytes up and down per agent per round, per backbone, versus the bundle and full-model FedAvg.

Counted with the real encoders: the weights and update blobs are `protocols.tensors.encode_tensors` of the
bundle's shared tensors, cut into `protocols.chunks` frames; the control messages are real `Assignment`,
`UpdateReport`, `UpdateAck` and `AgentStatus` objects through `encode_message`. MQTT 5 framing (fixed
header, topic, packet id, properties, PUBACK, SUBSCRIBE/UNSUBSCRIBE for the weights blob) is added from
the packet layout, so "wire" is what crosses the agent's TCP connection, TCP/IP headers excluded.

Full-model FedAvg of the same backbone sends every parameter (frozen backbone, adapters and head) as fp32
in each direction every round. Alternatives that would shrink the adapter payload (fp16, int8 with one
scale per tensor, zlib) are computed on the same tensors for comparison; fp16 and int8 (per-row scales) are
implemented as the plan's [exchange] encoding and counted for real by ``per_round(..., encoding=...)``
(bench/wire.py, docs/wire-encodings.md).
"""

from __future__ import annotations

import math
import secrets
import zlib
from pathlib import Path
from typing import Any

import numpy as np

PUBACK_BYTES = 4  # MQTT 5 PUBACK with reason "success" and no properties: fixed header 2 + packet id 2


def _varint_len(value: int) -> int:
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4


def publish_bytes(topic: str, payload: int, properties: int = 0) -> int:
    """One MQTT 5 QoS 1 PUBLISH packet: fixed header + topic + packet id + properties + payload."""
    remaining = 2 + len(topic.encode()) + 2 + _varint_len(properties) + properties + payload
    return 1 + _varint_len(remaining) + remaining


def subscribe_bytes(topic_filter: str) -> int:
    """SUBSCRIBE (agent -> broker) of one filter; the SUBACK (5 bytes) comes back."""
    remaining = 2 + 1 + 2 + len(topic_filter.encode()) + 1
    return 1 + _varint_len(remaining) + remaining


def _ref(size: int) -> Any:
    from protocols.chunks import CHUNK_SIZE
    from protocols.messages import BlobRefModel

    return BlobRefModel(sha256=secrets.token_hex(32), size=size, chunks=max(1, math.ceil(size / CHUNK_SIZE)))


def per_round(manifest: Any, bundle_size: int, run_id: str = "demo-0123abcd", encoding: str = "fp32"
              ) -> dict[str, Any]:
    """Exact payloads and estimated MQTT framing of one round for one agent on this backbone, with the weights
    and the update blobs in the wire ``encoding`` (protocols/tensor_codec.py; the plan's [exchange] encoding)."""
    from coordinator.methods import scopes_for
    from protocols import topics
    from protocols.chunks import encode_chunk, split_blob
    from protocols.messages import (
        AgentStatus,
        Assignment,
        RoundMetrics,
        UpdateAck,
        UpdateReport,
        encode_message,
    )
    from protocols.tensor_codec import encode_blob
    from protocols.tensors import encode_tensors

    scopes = scopes_for("heterotune")
    shared = [t for t in manifest.tensors if scopes[t.family] in ("global", "group")]
    rng = np.random.default_rng(0)
    tensors = {t.name: rng.normal(0, 0.02, t.shape).astype(np.float32) for t in shared}
    blob = encode_blob(tensors, encoding)
    frames = [encode_chunk(c) for c in split_blob(blob)]
    agent = "pi4-kitchen-01"
    sha = secrets.token_hex(32)
    assignment = encode_message(Assignment(
        run_id=run_id, round=12, nonce=secrets.token_hex(8), backbone=manifest.backbone, bundle=_ref(bundle_size),
        weights=_ref(len(blob)), upload_names=sorted(tensors), local_steps=20, batch_size=16, learning_rate=2e-3,
        deadline_unix=1.8e9, seed=0, encoding=encoding))
    metrics = RoundMetrics(personal_accuracy=0.8125, global_accuracy=0.4433, n_test=150, n_global_test=300,
                           train_loss=0.512, train_seconds=12.3, eval_seconds=10.2, peak_rss_mb=351.2,
                           bytes_down=len(blob), backend="ort")
    report = encode_message(UpdateReport(run_id=run_id, agent_id=agent, round=12, nonce=secrets.token_hex(8),
                                         update=_ref(len(blob)), n_train=450, metrics=metrics,
                                         encoding=encoding))
    ack = encode_message(UpdateAck(round=12, nonce=secrets.token_hex(8), accepted=True))
    statuses = [encode_message(AgentStatus(agent_id=agent, state=s)) for s in ("training", "uploading", "idle")]

    inbox, blob_topic = topics.agent_inbox(agent), topics.blob_chunk(sha, 0)
    update_topic, status_topic = topics.agent_update_chunk(agent, 12), topics.agent_status(agent)
    down_packets = [publish_bytes(inbox, len(assignment), properties=5)]  # MessageExpiryInterval
    down_packets += [publish_bytes(blob_topic, len(f)) for f in frames]
    down_packets += [publish_bytes(inbox, len(ack)), 5, 4]  # + SUBACK, UNSUBACK
    up_packets = [publish_bytes(update_topic, len(f)) for f in frames]
    up_packets += [publish_bytes(topics.agent_report(agent), len(report))]
    up_packets += [publish_bytes(status_topic, len(s)) for s in statuses]
    up_packets += [subscribe_bytes(topics.blob_filter(sha)), subscribe_bytes(topics.blob_filter(sha)) - 1]
    sent_to_agent = 1 + len(frames) + 1  # QoS 1 messages the agent acknowledges
    sent_by_agent = len(frames) + 1 + len(statuses)
    up_wire = sum(up_packets) + PUBACK_BYTES * sent_to_agent
    down_wire = sum(down_packets) + PUBACK_BYTES * sent_by_agent
    params = sum(int(np.prod(t.shape)) for t in shared)
    return {
        "shared_params": params,
        "global_params": sum(int(np.prod(t.shape)) for t in shared if scopes[t.family] == "global"),
        "tensor_bytes": 4 * params,
        "blob_bytes": len(blob),
        "chunks": len(frames),
        "chunk_frame_overhead": sum(len(f) for f in frames) - len(blob),
        "assignment_bytes": len(assignment),
        "report_bytes": len(report),
        "up_payload": len(blob),
        "down_payload": len(blob),
        "up_wire": up_wire,
        "down_wire": down_wire,
        "fp16_blob_bytes": len(encode_tensors({n: v.astype(np.float16) for n, v in tensors.items()})),
        # values + header + one scale each
        "int8_blob_bytes": params + len(encode_tensors(tensors)) - 4 * params + 4 * len(tensors),
    }


def full_model_bytes(manifest: Any) -> int:
    """Every parameter of the backbone plus adapters and head, fp32 (one direction, one round)."""
    return 4 * (manifest.backbone_params + sum(int(np.prod(t.shape)) for t in manifest.tensors))


def zlib_ratio(update_files: list[Path]) -> float | None:
    """Compressed / raw size of real fp32 updates (safetensors files from a demo run), zlib level 6."""
    raw = [p.read_bytes() for p in update_files]
    if not raw:
        return None
    return sum(len(zlib.compress(b, 6)) for b in raw) / sum(len(b) for b in raw)


def measure(bundle_dirs: dict[str, Path], demo_updates: Path | None = None) -> dict[str, Any]:
    from export.bundle import load_bundle

    out: dict[str, Any] = {}
    for name, directory in bundle_dirs.items():
        bundle = load_bundle(directory)
        manifest = bundle.manifest
        counted = per_round(manifest, bundle.download_bytes())
        full = full_model_bytes(manifest)
        counted.update({
            "bundle_bytes": bundle.download_bytes(),
            "full_model_bytes": full,
            "backbone_params": manifest.backbone_params,
            "up_ratio_wire": counted["up_wire"] / full,
            "down_ratio_wire": counted["down_wire"] / full,
            "payload_ratio": counted["blob_bytes"] / full,
            "fp16_ratio": counted["fp16_blob_bytes"] / full,
            "int8_ratio": counted["int8_blob_bytes"] / full,
            "rounds_per_bundle": bundle.download_bytes() / (counted["up_wire"] + counted["down_wire"]),
        })
        if demo_updates is not None and demo_updates.exists():
            counted["zlib_ratio_demo_updates"] = zlib_ratio(_updates_of(demo_updates, name))
        out[name] = counted
    return out


def _updates_of(folder: Path, backbone: str) -> list[Path]:
    """Accepted-update files of one backbone in a demo run (agents named pi4-* ran L3, orin-* ran L6)."""
    prefix = {"minilm-l3": "pi4-", "minilm-l6": "orin-"}.get(backbone)
    if prefix is None:
        return []
    return sorted(folder.glob(f"round-*/{prefix}*.safetensors"))[:8]


if __name__ == "__main__":
    import json

    from bench.device_cost import bundles_for

    result = measure(bundles_for(["tiny-3", "minilm-l3", "minilm-l6"]))
    print(json.dumps({n: {k: v for k, v in r.items() if "ratio" in k or k.endswith("wire")} for n, r in
                      result.items()}, indent=2))
