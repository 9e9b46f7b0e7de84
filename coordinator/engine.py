"""The round engine: register agents, assign backbones, run rounds over MQTT, aggregate, commit.

One thread does all the work. paho's network thread only enqueues messages, and the engine pumps that queue
between steps, so nothing blocks inside a callback and the order of events is easy to follow.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.aggregation import ClientUpdate, FederatedState, make_strategy
from coordinator.assignment import CostCard, DeviceBudget, assign_backbone
from coordinator.config import RunConfig
from coordinator.methods import scopes_for
from coordinator.store import MetricRow, RunStore
from export.bundle import Bundle
from protocols import topics
from protocols.chunks import BlobAssembler, BlobRef, decode_chunk
from protocols.errors import BlobIntegrityError, ChunkError, MessageError, ProtocolError, TopicError
from protocols.messages import (
    AgentStatus,
    Assignment,
    BlobRefModel,
    CoordStatus,
    Finish,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    ResendRequest,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)
from protocols.mqtt import Inbound, MqttEndpoint, Will, clear_blob, publish_blob
from protocols.tensors import TensorDecodeError, check_tensors, decode_tensors, encode_tensors

log = logging.getLogger("coordinator")

RESEND_GRACE_S = 3.0


@dataclass
class AgentRecord:
    agent_id: str
    backbone: str
    n_train: int
    profile: dict[str, Any]
    status: str = "online"


@dataclass
class PendingUpload:
    """One selected agent's upload for the current round, as its pieces arrive."""

    agent_id: str
    nonce: str
    report: UpdateReport | None = None
    assembler: BlobAssembler | None = None
    report_time: float = 0.0
    resend_asked: bool = False
    done: bool = False


@dataclass
class RoundResult:
    round_id: int
    metrics: list[MetricRow]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    """Owns the run: its state is the truth, the broker is only a transport."""

    def __init__(self, config: RunConfig, bundles: dict[str, Bundle], endpoint: MqttEndpoint, store: RunStore,
                 *, on_round: Callable[[RoundResult], None] | None = None) -> None:
        self.config = config
        self.bundles = bundles
        self.endpoint = endpoint
        self.store = store
        self.on_round = on_round
        self.run_id = f"{config.run_name}-{secrets.token_hex(4)}"
        self.strategy = make_strategy(config.method, **config.method_options)
        self.scopes = scopes_for(config.method, config.scopes)
        self.agents: dict[str, AgentRecord] = {}
        self.refused: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}  # sha -> bytes we serve (bundles, round weights)
        self.bundle_refs: dict[str, BlobRef] = {}
        self.pending: dict[str, PendingUpload] = {}
        self.current_round = 0
        self.state = self._initial_state()
        self.cards = [self._cost_card(b) for b in bundles.values()]

    @staticmethod
    def endpoint_for(host: str, port: int, **kwargs: Any) -> MqttEndpoint:
        offline = encode_message(CoordStatus(state="offline"))
        return MqttEndpoint("coordinator", host, port, will=Will(topics.coord_status(), offline, retain=True),
                            clean_start=True, **kwargs)

    # --- state -------------------------------------------------------------------------------------

    def _names(self, backbone: str, scope: str) -> list[str]:
        manifest = self.bundles[backbone].manifest
        return [t.name for t in manifest.tensors if self.scopes[t.family] == scope]

    def _initial_state(self) -> FederatedState:
        """Global tensors must start identical on every backbone (seeded by name at export); check it."""
        global_tensors: dict[str, np.ndarray] = {}
        groups: dict[str, dict[str, np.ndarray]] = {}
        for backbone, bundle in self.bundles.items():
            initial = bundle.initial_tensors()
            groups[backbone] = {n: initial[n].copy() for n in self._names(backbone, "group")}
            for name in self._names(backbone, "global"):
                if name in global_tensors and not np.array_equal(global_tensors[name], initial[name]):
                    raise ValueError(f"global tensor '{name}' differs between backbones at export; "
                                     "rebuild the bundles with one DeMA config and seed")
                global_tensors.setdefault(name, initial[name].copy())
        return FederatedState(global_tensors=global_tensors, group_tensors=groups)

    def _cost_card(self, bundle: Bundle) -> CostCard:
        card = bundle.manifest.cost_card
        if card is None:
            raise ValueError(f"bundle for {bundle.manifest.backbone} has no cost card; rebuild it with costs")
        return CostCard(backbone=bundle.manifest.backbone, peak_train_rss_mb=card.peak_train_rss_mb,
                        step_seconds=card.step_seconds, eval_seconds_per_sample=card.eval_seconds_per_sample,
                        flops_per_step=card.flops_per_step, payload_bytes=card.payload_bytes,
                        bundle_bytes=card.bundle_bytes, builder_gflops=card.builder_gflops,
                        layers=bundle.manifest.layers, hidden=bundle.manifest.hidden)

    def upload_names(self, backbone: str) -> list[str]:
        return sorted(self._names(backbone, "global") + self._names(backbone, "group"))

    # --- run ---------------------------------------------------------------------------------------

    def run(self) -> list[RoundResult]:
        self.endpoint.start()
        try:
            for kind in ("join", "report", "request", "status"):
                self.endpoint.subscribe(topics.agents_filter(kind))
            self.endpoint.subscribe(topics.update_filter())
            self._announce("online")
            self.store.set_meta("run_id", self.run_id)
            self.store.save_state(0, self.state)
            self._wait_for_agents()
            results = []
            round_id = 1
            while round_id <= self.config.rounds:
                result = self._run_round(round_id)
                if result is None:
                    continue  # abandoned: retried with the same round id
                results.append(result)
                if self.on_round:
                    self.on_round(result)
                round_id += 1
            self._finish("completed all rounds")
            return results
        finally:
            self.endpoint.stop()

    def _announce(self, state: str) -> None:
        status = CoordStatus(state=state, run_id=self.run_id)
        self.endpoint.publish(topics.coord_status(), encode_message(status), retain=True)

    def _wait_for_agents(self) -> None:
        deadline = time.monotonic() + self.config.join_timeout_s
        while len(self.agents) < self.config.min_agents:
            if time.monotonic() > deadline:
                if not self.agents:
                    raise TimeoutError(f"no agent joined within {self.config.join_timeout_s:.0f} s; start agents "
                                       f"with: edge-agent join --broker {self.endpoint.address} --id ID --data FILE")
                log.warning("only %d of %d agents joined in time; starting with them", len(self.agents),
                            self.config.min_agents)
                return
            self._pump(0.5)
        # Late joiners are welcome between rounds; give simultaneous starters a moment to land.
        self._pump_until(time.monotonic() + 0.5)

    def _pump_until(self, until: float) -> None:
        while time.monotonic() < until:
            self._pump(max(0.0, until - time.monotonic()))

    def _pump(self, timeout: float) -> None:
        item = self.endpoint.get(timeout=timeout)
        if item is not None:
            self._dispatch(item)

    def _dispatch(self, item: Inbound) -> None:
        try:
            agent_id, kind, extra = topics.parse_agent_topic(item.topic)
        except TopicError:
            return
        if not item.payload:
            return
        if kind == "update":
            self._on_chunk(agent_id, extra, item.payload)
            return
        try:
            message = decode_message(item.payload)
        except MessageError as exc:
            log.warning("malformed message from %s on %s: %s", agent_id, item.topic, exc)
            return
        if getattr(message, "agent_id", agent_id) != agent_id:
            log.warning("message on %s claims to be from %s; ignored", item.topic, message.agent_id)  # type: ignore[union-attr]
            return
        if isinstance(message, JoinRequest):
            self._on_join(message)
        elif isinstance(message, UpdateReport):
            self._on_report(message)
        elif isinstance(message, ResendRequest):
            self._on_resend(message)
        elif isinstance(message, AgentStatus) and agent_id in self.agents:
            self.agents[agent_id].status = message.state

    # --- joining -----------------------------------------------------------------------------------

    def _on_join(self, request: JoinRequest) -> None:
        profile = request.profile
        budget = DeviceBudget(agent_id=request.agent_id, memory_budget_mb=profile.memory_budget_mb,
                              gflops=max(profile.gflops, 1e-3), max_round_seconds=profile.max_round_seconds)
        pinned = self.config.pinned.get(request.agent_id)
        cards = [c for c in self.cards if c.backbone == pinned] if pinned else self.cards
        decision = assign_backbone(budget, cards, local_steps=self.config.local_steps,
                                   eval_samples=request.n_test + request.n_global_test,
                                   memory_fraction=self.config.memory_fraction,
                                   deadline_seconds=self.config.round_timeout_s)
        inbox = topics.agent_inbox(request.agent_id)
        if decision.backbone is None:
            self.refused[request.agent_id] = decision.reason
            self.store.upsert_agent(request.agent_id, None, "refused", profile.model_dump(), decision.reason)
            log.warning("refused %s: %s", request.agent_id, decision.reason)
            refusal = JoinRefused(agent_id=request.agent_id, reason=decision.reason)
            self.endpoint.publish(inbox, encode_message(refusal))
            return
        bundle_ref = self._serve_bundle(decision.backbone)
        self.agents[request.agent_id] = AgentRecord(request.agent_id, decision.backbone, request.n_train,
                                                    profile.model_dump())
        self.store.upsert_agent(request.agent_id, decision.backbone, "joined", profile.model_dump(),
                                decision.reason)
        log.info("%s joined -> %s (%s)", request.agent_id, decision.backbone, decision.reason)
        accepted = JoinAccepted(run_id=self.run_id, agent_id=request.agent_id, backbone=decision.backbone,
                                bundle=BlobRefModel.from_ref(bundle_ref), explanation=decision.reason)
        self.endpoint.publish(inbox, encode_message(accepted))

    def _serve_bundle(self, backbone: str) -> BlobRef:
        if backbone not in self.bundle_refs:
            data = self.bundles[backbone].archive_bytes()
            self.bundle_refs[backbone] = self._serve(data)
        return self.bundle_refs[backbone]

    def _serve(self, data: bytes) -> BlobRef:
        ref = publish_blob(self.endpoint, data, retain=True)
        self.blobs[ref.sha256] = data
        return ref

    def _on_resend(self, request: ResendRequest) -> None:
        data = self.blobs.get(request.blob)
        if data is not None:
            publish_blob(self.endpoint, data, retain=True, indices=request.indices)

    # --- one round ---------------------------------------------------------------------------------

    def _run_round(self, round_id: int) -> RoundResult | None:
        started = time.time()
        self.current_round = round_id
        selected = sorted(a for a, rec in self.agents.items() if rec.status not in ("lost", "left"))
        if not selected:
            raise RuntimeError("no live agents left to train; restart agents and resume the run")
        weights = self._publish_weights({self.agents[a].backbone for a in selected})
        deadline = time.time() + self.config.round_timeout_s
        self.pending = {}
        for agent_id in selected:
            record = self.agents[agent_id]
            nonce = secrets.token_hex(8)
            self.pending[agent_id] = PendingUpload(agent_id, nonce)
            assignment = Assignment(
                run_id=self.run_id, round=round_id, nonce=nonce, backbone=record.backbone,
                bundle=BlobRefModel.from_ref(self._serve_bundle(record.backbone)),
                weights=BlobRefModel.from_ref(weights[record.backbone]),
                upload_names=self.upload_names(record.backbone), local_steps=self.config.local_steps,
                batch_size=self.config.task.batch_size, learning_rate=self.config.learning_rate,
                deadline_unix=deadline, seed=self.config.seed)
            self.endpoint.publish(topics.agent_inbox(agent_id), encode_message(assignment),
                                  expiry_seconds=int(self.config.round_timeout_s))
        accepted: list[ClientUpdate] = []
        rows: list[MetricRow] = []
        while time.time() < deadline and not all(p.done for p in self.pending.values()):
            self._pump(0.2)
            for upload in self.pending.values():
                outcome = self._try_finalize(upload)
                if outcome is not None:
                    update, row = outcome
                    rows.append(row)
                    if update is not None:
                        accepted.append(update)
        for blob_ref in weights.values():
            clear_blob(self.endpoint, blob_ref)
            self.blobs.pop(blob_ref.sha256, None)
        needed = math.ceil(self.config.min_fraction * len(selected))
        if len(accepted) < needed:
            log.warning("round %d: %d of %d updates accepted, %d needed; abandoning and retrying", round_id,
                        len(accepted), len(selected), needed)
            return None
        result = self.strategy.aggregate(self.state, accepted, round_id)
        self.state = result.state
        self.store.commit_round(round_id, self.state, started=started, selected=len(selected), metrics=rows,
                                diagnostics=result.diagnostics)
        return RoundResult(round_id, rows, time.time() - started, result.diagnostics)

    def _publish_weights(self, backbones: set[str]) -> dict[str, BlobRef]:
        refs = {}
        for backbone in sorted(backbones):
            tensors = {**self.state.global_tensors, **self.state.group_tensors.get(backbone, {})}
            refs[backbone] = self._serve(encode_tensors(tensors))
        return refs

    def _on_chunk(self, agent_id: str, round_text: str | None, payload: bytes) -> None:
        upload = self.pending.get(agent_id)
        if upload is None or round_text != str(self.current_round):
            return  # late or replayed chunk of an earlier round
        try:
            chunk = decode_chunk(payload)
            if upload.assembler is None:
                upload.assembler = BlobAssembler(BlobRef(chunk.blob_sha, chunk.blob_size, chunk.count))
            upload.assembler.add(chunk)
        except ChunkError as exc:
            log.warning("bad update chunk from %s: %s", agent_id, exc)

    def _on_report(self, report: UpdateReport) -> None:
        upload = self.pending.get(report.agent_id)
        if upload is None or report.round != self.current_round or report.nonce != upload.nonce \
                or report.run_id != self.run_id:
            log.warning("stale or replayed report from %s (round %d) ignored", report.agent_id, report.round)
            return
        if upload.report is None:
            upload.report = report
            upload.report_time = time.monotonic()
            if upload.assembler is None or upload.assembler.ref.sha256 != report.update.sha256:
                upload.assembler = BlobAssembler(report.update.to_ref())

    def _try_finalize(self, upload: PendingUpload) -> tuple[ClientUpdate | None, MetricRow] | None:
        """Accept or reject a complete upload (once); ask for missing chunks after a grace period."""
        report, assembler = upload.report, upload.assembler
        if upload.done or report is None or assembler is None:
            return None
        if not assembler.complete:
            if not upload.resend_asked and time.monotonic() - upload.report_time > RESEND_GRACE_S:
                upload.resend_asked = True
                request = ResendRequest(blob=report.update.sha256, indices=assembler.missing())
                self.endpoint.publish(topics.agent_inbox(upload.agent_id), encode_message(request))
            return None
        upload.done = True
        record = self.agents[upload.agent_id]
        try:
            tensors = decode_tensors(assembler.assemble())
            manifest = self.bundles[record.backbone].manifest
            expected = {n: (tuple(manifest.tensor(n).shape), "float32") for n in self.upload_names(record.backbone)}
            check_tensors(tensors, expected, max_norm=self.config.max_update_norm)
            update = ClientUpdate(upload.agent_id, record.backbone, report.n_train, dict(tensors))
            self.store.save_update(self.current_round, upload.agent_id, tensors)
            reason = ""
        except (BlobIntegrityError, TensorDecodeError, ProtocolError) as exc:
            update, reason = None, str(exc)
            log.warning("round %d: rejected update from %s: %s", self.current_round, upload.agent_id, reason)
        ack = UpdateAck(round=self.current_round, nonce=upload.nonce, accepted=update is not None, reason=reason)
        self.endpoint.publish(topics.agent_inbox(upload.agent_id), encode_message(ack))
        m = report.metrics
        row = MetricRow(
            round=self.current_round, agent_id=upload.agent_id, backbone=record.backbone,
            personal_accuracy=m.personal_accuracy, global_accuracy=m.global_accuracy, n_test=m.n_test,
            n_global_test=m.n_global_test, n_train=report.n_train, train_loss=m.train_loss,
            bytes_up=report.update.size, bytes_down=m.bytes_down, train_seconds=m.train_seconds,
            eval_seconds=m.eval_seconds, peak_rss_mb=m.peak_rss_mb, backend=m.backend,
            accepted=update is not None, reason=reason)
        return update, row

    # --- end ---------------------------------------------------------------------------------------

    def _finish(self, reason: str) -> None:
        finish = encode_message(Finish(run_id=self.run_id, reason=reason))
        mids = [self.endpoint.publish(topics.agent_inbox(agent_id), finish) for agent_id in self.agents]
        for ref in self.bundle_refs.values():
            clear_blob(self.endpoint, ref)
        self._announce("offline")
        for mid in mids:  # let the finish messages reach the broker before disconnecting
            self.endpoint.wait_published(mid, timeout=5.0)


def run_dir_for(base: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return base / f"{name}-{stamp}"
