"""The round engine: register agents, assign backbones, run rounds over MQTT, aggregate, commit.

One thread does all the work. paho's network thread only enqueues messages, and the engine pumps that queue
between steps, so nothing blocks inside a callback and the order of events is easy to follow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.numpy import load_file

from coordinator import federation_state
from coordinator.admission import AdmissionPolicy, authentic_body
from coordinator.aggregation import ClientUpdate
from coordinator.aggregation.dp import admit
from coordinator.aggregation.robust import robust_group_updates
from coordinator.aggregation.streaming import GroupAccumulator
from coordinator.assignment import DeviceBudget, assign_backbone, cost_cards_of
from coordinator.config import RunConfig, privacy_plan
from coordinator.liveness import heartbeat_seq, replacements_wanted, stalled, time_allows_replacement
from coordinator.methods import (
    anchor_weight_for,
    prototype_weight_for,
    public_kind_for,
    public_samples_for,
    public_scope_for,
    scopes_for,
    strategy_for,
    uses_prototypes,
)
from coordinator.observers import ObserverSet, RoundEnded, RoundObserver, RoundStarted, UpdateHandled
from coordinator.privacy import check_resumed_privacy
from coordinator.report_checks import (
    Candidate,
    blob_ref_refusal,
    join_refusal,
    max_update_bytes,
    n_train_refusal,
    relative_norm_refusals,
)
from coordinator.store import MetricRow, RunStore, load_state
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
    FinishCode,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    ResendRequest,
    RoundDeclined,
    UpdateAck,
    UpdateReport,
    _Message,
    decode_message,
    encode_message,
)
from protocols.mqtt import Inbound, MqttEndpoint, Will, clear_blob, publish_blob
from protocols.rate_limited_log import RateLimitedLog
from protocols.signing import Signer, generate_key
from protocols.tensor_codec import decode_blob, encode_blob
from protocols.tensors import TensorDecodeError, check_tensors, l2_norm

GREET_INTERVAL_S = 2.0  # send an unknown device that came online our status at most this often (_greet)
GREETED_MAX = 10_000  # devices remembered for that limit; forgotten all at once beyond it

log = logging.getLogger("coordinator")

RESEND_GRACE_S = 3.0
LOST_GRACE_S = 5.0
RETRY_PAUSE_S = 3.0  # between an abandoned round and its retry: lets reconnecting agents report back in
MAX_REFUSED_RECORDED = 1000  # refusals kept for the summary: a flood of forged joins must not grow memory


class RunStopped(RuntimeError):
    """The run cannot go on (no live agents, a round missed its minimum): it ends cleanly with what it has."""


@dataclass
class AgentRecord:
    agent_id: str
    backbone: str
    n_train: int
    profile: dict[str, Any]
    status: str = "online"
    lost_since: float | None = None  # monotonic time of the "lost" will, until the agent is heard again
    key: str | None = None  # the agent's report-signing key (hex) from its join; None: it joined without one
    join_nonce: str | None = None
    heard: float | None = None  # monotonic time of its last authentic heartbeat (coordinator/liveness.py)
    beat_seq: int = -1  # the highest heartbeat sequence accepted: replays are ignored

    def live(self, now: float) -> bool:
        """Selectable: not lost, not left, and not silent for longer than STALL_AFTER_S."""
        return self.status not in ("lost", "left") and not stalled(self.heard, now)

    def gone(self, now: float) -> bool:
        """Left, or lost for longer than LOST_GRACE_S: a broker that shuts down sends every will at once, and
        agents that reconnect within seconds must not lose their round for it."""
        if self.status == "left":
            return True
        return self.status == "lost" and self.lost_since is not None and now - self.lost_since >= LOST_GRACE_S


@dataclass
class PendingUpload:
    """One selected agent's upload for the current round, as its pieces arrive."""

    agent_id: str
    nonce: str
    backbone: str  # as assigned: a rejoin mid-round may change the agent's record, not this upload's group
    report: UpdateReport | None = None
    assembler: BlobAssembler | None = None
    report_time: float = 0.0
    resend_asked: bool = False
    done: bool = False
    assignment: Assignment | None = None  # as sent, to send again to an agent that reconnects without reporting
    evaluate_only: bool = False  # the final evaluation: metrics only, an empty update


@dataclass
class RoundResult:
    round_id: int
    metrics: list[MetricRow]
    seconds: float
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    """Owns the run: its state is the truth, the broker is only a transport."""

    def __init__(self, config: RunConfig, bundles: dict[str, Bundle], endpoint: MqttEndpoint, store: RunStore,
                 *, on_round: Callable[[RoundResult], None] | None = None,
                 signing_key: Ed25519PrivateKey | None = None, admission: AdmissionPolicy | None = None,
                 observers: Sequence[RoundObserver] = ()) -> None:
        self.config = config
        self.bundles = bundles
        self.endpoint = endpoint
        self.store = store
        self.on_round = on_round
        self.observers = ObserverSet(list(observers))
        self._watch = self.observers  # who sees this round's events (nobody for the final evaluation)
        self.attempt = 0
        self.run_id = f"{config.run_name}-{secrets.token_hex(4)}"
        self.strategy = strategy_for(config)
        self.public_samples = public_samples_for(config)
        self.public_kind = public_kind_for(config)
        self.scopes = scopes_for(config.method, config.scopes)
        self.prototypes = uses_prototypes(config)
        self.agents: dict[str, AgentRecord] = {}
        self.refused: dict[str, str] = {}
        self.blobs: dict[str, bytes] = {}  # sha -> bytes we serve (bundles, round weights)
        self.bundle_refs: dict[str, BlobRef] = {}
        self.pending: dict[str, PendingUpload] = {}
        self.declined_rows: list[MetricRow] = []
        self.current_round = 0
        self.final: RoundResult | None = None  # the final model's evaluation, after the last round
        self.state = federation_state.initial_state(bundles, self.scopes, prototypes=self.prototypes,
                                                    public_samples=self.public_samples,
                                                    public_scope=public_scope_for(config),
                                                    public_kind=self.public_kind)
        # Every bundle's card for every backend it was measured with; each join is judged by its backend's card.
        self.cards = [card for b in bundles.values() for card in cost_cards_of(b.manifest)]
        # Every message to agents is signed with the run key (protocols/signing.py); without one given, a fresh
        # key nobody else has (agents then need --insecure-no-verify: only for tests that do not verify).
        self.signer = Signer(signing_key or generate_key())
        self.admission = admission or AdmissionPolicy(
            frozenset(config.allowed_agents) if config.allowed_agents is not None else None)
        self.stopped: str | None = None  # why the run ended early, if it did
        self._noise = RateLimitedLog(log)  # warnings about what agents send, rate-limited
        self._greeted: dict[str, float] = {}  # unknown device -> when it was last sent our status (see _greet)
        self._expected: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._reconnected = threading.Event()
        endpoint.add_connect_listener(lambda _session_present: self._reconnected.set())

    @staticmethod
    def endpoint_for(host: str, port: int, **kwargs: Any) -> MqttEndpoint:
        offline = encode_message(CoordStatus(state="offline"))
        return MqttEndpoint("coordinator", host, port, will=Will(topics.coord_status(), offline, retain=True),
                            clean_start=True, **kwargs)

    # --- state -------------------------------------------------------------------------------------

    def upload_names(self, backbone: str) -> list[str]:
        return federation_state.upload_names(self.bundles[backbone].manifest, self.scopes, prototypes=self.prototypes,
                                             public_samples=self.public_samples, public_kind=self.public_kind)

    # --- run ---------------------------------------------------------------------------------------

    def run(self) -> list[RoundResult]:
        """Every round; ends cleanly (Finish sent, committed rounds returned, ``stopped`` set) if the run cannot
        go on, so the caller still writes metrics.csv and summary.json."""
        if self.admission.is_open:
            log.warning("admission is open: any client that can reach the broker may join under any agent id; set "
                        "allowed_agents in the run config or a join token, or use the provisioned broker")
        self.endpoint.start()
        results: list[RoundResult] = []
        try:
            for kind in ("join", "report", "request", "status", "heartbeat"):
                self.endpoint.subscribe(topics.agents_filter(kind))
            self.endpoint.subscribe(topics.update_filter())
            self._announce("online")
            first_round = self.store.last_round() + 1
            if first_round == 1:
                self.store.set_meta("run_id", self.run_id)
                self.store.save_state(0, self.state)
                self._wait_for_agents()
            else:
                self._resume_agents()
            for round_id in range(first_round, self.config.rounds + 1):
                result = self._run_round_with_retries(round_id)
                results.append(result)
                if self.on_round:
                    self.on_round(result)
            self.final = self._run_round(self.config.rounds + 1, evaluate_only=True)
            self._finish("completed all rounds", "completed")
            return results
        except RunStopped as exc:
            self.stopped = str(exc)
            log.error("run stopped: %s", exc)
            self._finish(f"stopped: {exc}", "aborted")
            return results
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C / SIGTERM (coordinator/cli.py): tell every agent first
            self._finish("the coordinator was stopped by its operator; continue with --resume", "coordinator_stopped")
            raise
        finally:
            self.endpoint.stop()

    def _run_round_with_retries(self, round_id: int) -> RoundResult:
        for attempt in range(self.config.max_round_attempts):
            result = self._run_round(round_id, attempt)
            if result is not None:
                return result
            self._pump_until(time.monotonic() + RETRY_PAUSE_S)
        raise RunStopped(f"round {round_id} missed its minimum in {self.config.max_round_attempts} attempts; the "
                           f"run stops with rounds 1-{round_id - 1} committed (continue with --resume)")

    @classmethod
    def resume(cls, config: RunConfig, bundles: dict[str, Bundle], endpoint: MqttEndpoint, store: RunStore,
               **kwargs: Any) -> Coordinator:
        """Pick up a run after a crash: same run id, agents, and the last committed round's tensors."""
        coordinator = cls(config, bundles, endpoint, store, **kwargs)
        run_id = store.meta("run_id")
        if run_id is None:
            raise ValueError(f"{store.run_dir} holds no started run to resume")
        coordinator.run_id = run_id
        check_resumed_privacy(privacy_plan(config), store.round_diagnostics())  # refuses an exhausted budget
        coordinator.state = load_state(store.tensors_path(store.last_round()))
        keys = store.meta("agent_keys") or {}
        for agent_id, backbone, n_train, profile in store.joined_agents():
            coordinator.agents[agent_id] = AgentRecord(agent_id, backbone, n_train, profile, key=keys.get(agent_id))
        return coordinator

    def _resume_agents(self) -> None:
        """Serve the bundles again and give retained agent statuses a moment to arrive."""
        for backbone in sorted({a.backbone for a in self.agents.values()}):
            self._serve_bundle(backbone)
        log.info("resuming run %s at round %d with %d agents", self.run_id, self.store.last_round() + 1,
                 len(self.agents))
        self._pump_until(time.monotonic() + 1.0)

    def _republish(self) -> None:
        """The coordinator is the source of truth: after any (re)connect, e.g. a broker restart that lost its
        retained messages, publish the status and every blob still being served again (duplicates are harmless)."""
        self._announce("online")
        for data in list(self.blobs.values()):
            publish_blob(self.endpoint, data, retain=True)

    def _greet(self, agent_id: str) -> None:
        """A device we do not know came online: send it our status, to its inbox. On a broker cluster the retained
        status may not reach it: ejabberd's mod_mqtt keeps its index of retained topics per node (docs/deployment.md).
        One small message per greeting, to that device only, at most once per GREET_INTERVAL_S per device id: a
        client claiming many ids makes the coordinator publish no more than it sent itself."""
        now = time.monotonic()
        if now - self._greeted.get(agent_id, -GREET_INTERVAL_S) < GREET_INTERVAL_S:
            return
        if len(self._greeted) >= GREETED_MAX:
            self._greeted.clear()
        self._greeted[agent_id] = now
        self._send(topics.agent_inbox(agent_id), CoordStatus(state="online", run_id=self.run_id))

    def _announce(self, state: str) -> None:
        self._send(topics.coord_status(), CoordStatus(state=state, run_id=self.run_id), retain=True)

    def _send(self, topic: str, message: _Message, **kwargs: Any) -> int:
        """Publish a message to agents, signed for this topic and run (agents ignore anything unsigned)."""
        return self.endpoint.publish(topic, self.signer.seal(self.run_id, topic, encode_message(message)), **kwargs)

    def _wait_for_agents(self) -> None:
        deadline = time.monotonic() + self.config.join_timeout_s
        while sum(rec.status != "left" for rec in self.agents.values()) < self.config.min_agents:
            if time.monotonic() > deadline:
                if not self.agents:
                    refused = f" ({len(self.refused)} joins refused, see the log)" if self.refused else ""
                    raise RunStopped(f"no agent joined within {self.config.join_timeout_s:.0f} s{refused}; start "
                                     f"agents with: edge-agent join --broker {self.endpoint.address} --id ID "
                                     "--data FILE --coordinator-key RUN_KEY.pub")
                log.warning("only %d of %d agents joined in time; starting with them", len(self.agents),
                            self.config.min_agents)
                return
            self._pump(0.5)
        # Late joiners are welcome between rounds; give simultaneous starters a moment to land.
        self._pump_until(time.monotonic() + 0.5)

    def _pump_until(self, until: float) -> None:
        while time.monotonic() < until:
            self._pump(max(0.0, until - time.monotonic()))

    def _pump(self, timeout: float) -> str | None:
        """Handle at most one inbound message; returns the agent it concerned, if any."""
        if self._reconnected.is_set():
            self._reconnected.clear()
            self._republish()
        item = self.endpoint.get(timeout=timeout)
        return self._dispatch(item) if item is not None else None

    def _catch_up(self, limit: int = 100_000) -> None:
        """Handle every message already received before judging liveness: after a long aggregation or commit the
        queue holds beats that arrived while the coordinator was busy, and an agent is silent only if it sent
        nothing, not if we had not read it yet."""
        for _ in range(limit):
            item = self.endpoint.get(timeout=0)
            if item is None:
                return
            self._dispatch(item)

    def _dispatch(self, item: Inbound) -> str | None:
        try:
            agent_id, kind, extra = topics.parse_agent_topic(item.topic)
        except TopicError:
            return None
        try:
            self._handle(agent_id, kind, extra, item)
        except Exception:  # last line of defence: no message from the network may end the run
            log.exception("message on %s could not be handled; ignored", item.topic)
        return agent_id

    def _handle(self, agent_id: str, kind: str, extra: str | None, item: Inbound) -> None:
        if not item.payload:
            return
        record = self.agents.get(agent_id)
        if record is not None and record.status == "lost" and kind in ("update", "report", "request"):
            record.status, record.lost_since = "online", None  # it is talking to us: its will was premature
        if kind == "update":
            self._on_chunk(agent_id, extra, item.payload)
            return
        if kind == "heartbeat":
            if record is not None:
                self._on_heartbeat(record, item)
            return
        try:
            body = item.payload
            if kind == "report":  # signed by the key the agent joined with, if it joined with one
                body = authentic_body(record.key if record else None, item.topic, item.payload, self.run_id)
            message = decode_message(body)
        except MessageError as exc:
            who = agent_id if agent_id in self.agents else "unknown agents"
            self._noise.warn(f"{kind}:{who}:{str(exc)[:40]}",
                             f"malformed message from {agent_id} on {item.topic}: {exc}")
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
        elif isinstance(message, RoundDeclined):
            self._on_declined(message)
        elif isinstance(message, AgentStatus) and agent_id in self.agents:
            record = self.agents[agent_id]
            if message.state == "left" and record.status != "left":
                # Dropped at once: an open upload of it is closed by the round loop (AgentRecord.gone), it is
                # not invited again, and a resume does not wait for it. It may join again later.
                log.warning("%s left the run: %s", agent_id, message.reason or "no reason given")
                self.store.upsert_agent(agent_id, record.backbone, "left", record.profile,
                                        message.reason or "left", record.n_train)
            record.status = message.state
            record.lost_since = (record.lost_since or time.monotonic()) if message.state == "lost" else None
            if message.state == "online":
                self._reassign(agent_id)
        elif isinstance(message, AgentStatus) and message.state == "online":
            self._greet(agent_id)

    def _on_heartbeat(self, record: AgentRecord, item: Inbound) -> None:
        try:
            record.beat_seq = heartbeat_seq(record.key, item.topic, item.payload, self.run_id, record.beat_seq)
        except MessageError as exc:
            self._noise.warn(f"heartbeat:{record.agent_id}", f"heartbeat from {record.agent_id} ignored: {exc}")
            return
        if record.heard is not None and stalled(record.heard, time.monotonic()):
            log.info("%s is heard again after a stall", record.agent_id)
        record.heard = time.monotonic()
        if record.status == "lost":  # an authentic beat outranks a will (or a forged "lost" status)
            record.status, record.lost_since = "online", None

    def _reassign(self, agent_id: str) -> None:
        """An invited agent came (back) online without having reported: it may never have got its assignment (a
        broker restarted with kill -9 loses the sessions and what was queued in them, e.g. right after a resume),
        so send it again. Agents ignore an assignment whose nonce they already have."""
        upload = self.pending.get(agent_id)
        if upload is not None and upload.report is None and not upload.done and upload.assignment is not None:
            # sealed afresh: a new sequence number, so an agent that saw the first copy still reads this one
            self._send(topics.agent_inbox(agent_id), upload.assignment,
                       expiry_seconds=int(self.config.round_timeout_s))

    # --- joining -----------------------------------------------------------------------------------

    def _on_join(self, request: JoinRequest) -> None:
        known = self.agents.get(request.agent_id)
        if known is not None and known.join_nonce == request.nonce:
            return  # the same join again (a redelivery or a replay): it changes nothing
        refusal = self.admission.refusal(request, self.run_id) or join_refusal(request.n_train,
                                                                               request.profile.memory_budget_mb)
        if refusal is not None:
            log.warning("join from %s refused: %s", request.agent_id, refusal)
            if len(self.refused) < MAX_REFUSED_RECORDED:
                self.refused[request.agent_id] = refusal
            self._send(topics.agent_inbox(request.agent_id),
                       JoinRefused(agent_id=request.agent_id, reason=refusal, nonce=request.nonce))
            return
        profile = request.profile
        budget = DeviceBudget(agent_id=request.agent_id, memory_budget_mb=profile.memory_budget_mb,
                              gflops=max(profile.gflops, 1e-3), max_round_seconds=profile.max_round_seconds,
                              backend=profile.backend)
        pinned = self.config.pinned.get(request.agent_id)
        cards = [c for c in self.cards if c.backbone == pinned] if pinned else self.cards
        extra_steps = self.config.distill_steps + self.config.anchor_steps  # steps on the public set
        decision = assign_backbone(budget, cards, local_steps=self.config.local_steps + extra_steps,
                                   eval_samples=request.n_test + request.n_global_test + request.n_public,
                                   memory_fraction=self.config.memory_fraction,
                                   deadline_seconds=self.config.round_timeout_s)
        inbox = topics.agent_inbox(request.agent_id)
        if decision.backbone is not None and self.public_samples and request.n_public != self.public_samples:
            decision = dataclasses.replace(decision, backbone=None, reason=(
                f"this run exchanges a table over a public set of {self.public_samples} samples and the device "
                f"holds "
                f"{request.n_public}; start it with --public pointing at the run's public file"))
        if decision.backbone is None:
            self.refused[request.agent_id] = decision.reason
            self.store.upsert_agent(request.agent_id, None, "refused", profile.model_dump(), decision.reason)
            log.warning("refused %s: %s", request.agent_id, decision.reason)
            self._send(inbox, JoinRefused(agent_id=request.agent_id, reason=decision.reason, nonce=request.nonce))
            return
        bundle_ref = self._serve_bundle(decision.backbone)
        pending = self.pending.get(request.agent_id)
        if pending is not None and not pending.done and pending.report is None:
            # A device that joins again mid-round restarted (or changed backbone): the round it was assigned is
            # gone with its old process, so stop waiting for it; it is invited again from the next round.
            pending.done = True
            log.warning("%s rejoined mid-round; its round-%d assignment is dropped", request.agent_id,
                        self.current_round)
        self.agents[request.agent_id] = AgentRecord(request.agent_id, decision.backbone, request.n_train,
                                                    profile.model_dump(), key=request.agent_key,
                                                    join_nonce=request.nonce)
        self.store.set_meta("agent_keys", {a: r.key for a, r in self.agents.items() if r.key is not None})
        self.store.upsert_agent(request.agent_id, decision.backbone, "joined", profile.model_dump(),
                                decision.reason, request.n_train)
        log.info("%s joined -> %s (%s)", request.agent_id, decision.backbone, decision.reason)
        self._send(inbox, JoinAccepted(run_id=self.run_id, agent_id=request.agent_id, backbone=decision.backbone,
                                       bundle=BlobRefModel.from_ref(bundle_ref), explanation=decision.reason,
                                       nonce=request.nonce, labels=list(self.config.task.labels)))

    def _serve_bundle(self, backbone: str, part: str | None = None) -> BlobRef:
        """Publish a backbone's bundle tar, or one of its parts (e.g. the torch backbone), once per run."""
        key = backbone if part is None else f"{backbone}/{part}"
        if key not in self.bundle_refs:
            bundle = self.bundles[backbone]
            data = bundle.archive_bytes() if part is None else bundle.part_bytes(part)
            self.bundle_refs[key] = self._serve(data)
        return self.bundle_refs[key]

    def _serve(self, data: bytes) -> BlobRef:
        ref = publish_blob(self.endpoint, data, retain=True)
        self.blobs[ref.sha256] = data
        return ref

    def _on_resend(self, request: ResendRequest) -> None:
        data = self.blobs.get(request.blob)
        if data is not None:
            publish_blob(self.endpoint, data, retain=True, indices=request.indices)
            return
        # A bundle part (the torch backbone) is published on first request only, so an ORT-only fleet never
        # puts it on the broker; the agent asks for it by its hash from the bundle manifest.
        for backbone, bundle in self.bundles.items():
            for name, part in bundle.manifest.parts.items():
                if part.sha256 == request.blob:
                    self._serve_bundle(backbone, part=name)
                    return

    # --- one round ---------------------------------------------------------------------------------

    def _select(self, round_id: int, attempt: int) -> tuple[list[str], int]:
        """Invite over_selection x the target from the live agents, seeded so a resumed run picks the same."""
        self._catch_up()
        now = time.monotonic()
        live = sorted(a for a, rec in self.agents.items() if rec.live(now))
        if not live:
            raise RunStopped("no live agents left to train; restart agents and resume the run")
        target = min(self.config.agents_per_round or len(live), len(live))
        invited = min(len(live), math.ceil(target * self.config.over_selection))
        rng = np.random.default_rng([self.config.seed, round_id, attempt])
        return sorted(str(a) for a in rng.choice(live, size=invited, replace=False)), target

    def _run_round(self, round_id: int, attempt: int = 0, *, evaluate_only: bool = False) -> RoundResult | None:
        """One round; with ``evaluate_only`` (after the last round) every live agent measures the final model and
        reports metrics only: nothing is aggregated or committed, and the result is not None."""
        started = time.time()
        self.current_round, self.attempt = round_id, attempt
        # The final evaluation is no round of the federation: observers (progress, reports) do not see it.
        self._watch = ObserverSet() if evaluate_only else self.observers
        if evaluate_only:
            self._catch_up()
            now = time.monotonic()
            selected = sorted(a for a, rec in self.agents.items() if rec.live(now))
            target = len(selected)
        else:
            selected, target = self._select(round_id, attempt)
        weights = self._publish_weights({self.agents[a].backbone for a in selected})
        deadline = time.time() + self.config.round_timeout_s
        self.pending = {}
        for agent_id in selected:
            self._invite(agent_id, round_id, weights, deadline, evaluate_only)
        needed = math.ceil(self.config.min_fraction * target)
        self._watch.round_started(RoundStarted(round_id, attempt, tuple(selected), target, needed, deadline))
        waiting = time.time()
        accepted: list[Candidate] = []  # on disk until the round's norms are known; then summed one at a time
        rows: list[MetricRow] = []
        self.declined_rows = []
        open_uploads, next_scan = len(self.pending), 0.0
        while time.time() < deadline and len(accepted) < target and open_uploads:
            touched = self._pump(0.2)
            # Look only at the upload a message touched, plus every upload once a second (resend grace, lost
            # agents): scanning all after every message was quadratic in the fleet (docs/performance.md).
            if time.monotonic() >= next_scan:
                self._catch_up()  # liveness is judged on everything received so far
                candidates = list(self.pending.values())
                open_uploads = sum(not p.done for p in candidates)
                next_scan = time.monotonic() + 1.0
            else:
                candidates = [self.pending[touched]] if touched in self.pending else []
            for upload in candidates:
                record = self.agents[upload.agent_id]
                if not upload.done and (record.gone(time.monotonic()) or stalled(record.heard, time.monotonic())):
                    upload.done = True  # its last will arrived, or it fell silent: stop waiting for it
                    open_uploads -= 1
                    why = "lost" if record.gone(time.monotonic()) else \
                        f"stalled (no heartbeat for {time.monotonic() - (record.heard or 0.0):.0f} s)"
                    log.warning("round %d: %s was %s mid-round", round_id, upload.agent_id, why)
                    self._watch.update_handled(UpdateHandled(round_id, attempt, upload.agent_id, "lost", why))
                    if not evaluate_only:
                        open_uploads += self._replace(round_id, weights, deadline, target, len(accepted),
                                                      open_uploads)
                outcome = self._try_finalize(upload)
                if outcome is not None:
                    update, row = outcome
                    rows.append(row)
                    open_uploads -= 1
                    if update is not None:
                        accepted.append(update)
                    self._watch.update_handled(UpdateHandled(
                        round_id, attempt, row.agent_id, "accepted" if row.accepted else "rejected", row.reason))
        for blob_ref in weights.values():
            clear_blob(self.endpoint, blob_ref)
            self.blobs.pop(blob_ref.sha256, None)
        rows += self.declined_rows
        selected = sorted(self.pending)  # with any standby agents invited in place of ones that dropped out
        if evaluate_only:
            self.pending = {}
            return RoundResult(round_id, rows, time.time() - started)
        accepted, rows = self._screen_norms(accepted, rows, attempt)
        if len(accepted) < needed:
            log.warning("round %d (attempt %d): %d of %d invited agents' updates accepted, %d needed; abandoning",
                        round_id, attempt + 1, len(accepted), len(selected), needed)
            self.pending = {}
            self._watch.round_ended(RoundEnded(round_id, attempt, False, len(selected), len(accepted),
                                                  time.time() - started))
            return None
        self.pending = {}  # anything arriving from now on is a straggler and is ignored
        aggregating = time.time()
        result = self.strategy.aggregate(self.state, self._group_updates(accepted), round_id)
        self.state = result.state
        # The round's time split for `coordinator report`: the rest of finished - started is the commit.
        timing = {"publish_s": waiting - started, "wait_s": aggregating - waiting,
                  "aggregate_s": time.time() - aggregating, "attempt": attempt}
        self.store.commit_round(round_id, self.state, started=started, selected=len(selected), metrics=rows,
                                diagnostics={**result.diagnostics, "timing": timing})
        self._watch.round_ended(RoundEnded(round_id, attempt, True, len(selected), len(accepted),
                                              time.time() - started))
        return RoundResult(round_id, rows, time.time() - started, result.diagnostics)

    def _invite(self, agent_id: str, round_id: int, weights: dict[str, BlobRef], deadline: float,
                evaluate_only: bool = False) -> None:
        """Send one agent its assignment for this round (the weights of a new backbone are published first)."""
        record = self.agents[agent_id]
        if record.backbone not in weights:  # a replacement with a backbone nobody else in the round has
            weights.update(self._publish_weights({record.backbone}))
        nonce = secrets.token_hex(8)
        self.pending[agent_id] = PendingUpload(agent_id, nonce, record.backbone, evaluate_only=evaluate_only)
        assignment = Assignment(
            run_id=self.run_id, round=round_id, nonce=nonce, backbone=record.backbone,
            bundle=BlobRefModel.from_ref(self._serve_bundle(record.backbone)),
            weights=BlobRefModel.from_ref(weights[record.backbone]),
            upload_names=[] if evaluate_only else self.upload_names(record.backbone),
            local_steps=self.config.local_steps, evaluate_only=evaluate_only,
            batch_size=self.config.task.batch_size, learning_rate=self.config.learning_rate,
            deadline_unix=deadline, seed=self.config.seed,
            prototype_weight=prototype_weight_for(self.config), distill_steps=self.config.distill_steps,
            distill_local_prior=self.config.distill_local_prior,
            distill_confident_fraction=self.config.distill_confident_fraction,
            anchor_steps=self.config.anchor_steps,
            anchor_weight=anchor_weight_for(self.config), encoding=self.config.exchange.encoding)
        self.pending[agent_id].assignment = assignment
        self._send(topics.agent_inbox(agent_id), assignment, expiry_seconds=max(1, int(deadline - time.time())))

    def _replace(self, round_id: int, weights: dict[str, BlobRef], deadline: float, target: int, accepted: int,
                 open_uploads: int) -> int:
        """Over-selection's second chance: an invited agent dropped out mid-round and the round can no longer
        reach its target, so invite live agents standing by (not invited this round), seeded, while the deadline
        leaves them time. Returns how many were invited."""
        wanted = replacements_wanted(target, accepted, open_uploads)
        if not wanted or not time_allows_replacement(time.time(), deadline, self.config.round_timeout_s):
            return 0
        now = time.monotonic()
        standby = sorted(a for a, rec in self.agents.items() if rec.live(now) and a not in self.pending)
        if not standby:
            return 0
        rng = np.random.default_rng([self.config.seed, round_id, self.attempt, len(self.pending)])
        chosen = sorted(str(a) for a in rng.choice(standby, size=min(wanted, len(standby)), replace=False))
        for agent_id in chosen:
            log.warning("round %d: inviting %s from standby in place of an agent that dropped out", round_id,
                        agent_id)
            self._invite(agent_id, round_id, weights, deadline)
        return len(chosen)

    def _group_updates(self, accepted: list[Candidate]) -> list[ClientUpdate]:
        """One pseudo-update per group from the accepted updates on disk: the streaming weighted mean (one update
        in memory at a time), or the run's robust rule (a whole group at a time)."""
        def load(c: Candidate) -> ClientUpdate:
            return ClientUpdate(c.agent_id, c.group, c.num_samples, load_file(str(c.path)))

        if self.config.robust_rule != "mean":
            return robust_group_updates([load(c) for c in accepted], self.config.robust_rule,
                                        self.config.trim_fraction)
        sums = GroupAccumulator()
        for candidate in accepted:
            sums.add(admit(self.strategy, self.state, load(candidate)))  # clipped first in a private run
        return sums.as_updates()

    def _screen_norms(self, candidates: list[Candidate], rows: list[MetricRow], attempt: int
                      ) -> tuple[list[Candidate], list[MetricRow]]:
        """Reject the updates beyond the relative norm bound (report_checks.relative_norm_refusals): their rows
        say why, their agents are told, and their files leave the audit trail of accepted updates."""
        refused = relative_norm_refusals(candidates, self.config.relative_norm_factor)
        for candidate in candidates:
            reason = refused.get(candidate.agent_id)
            if reason is None:
                continue
            log.warning("round %d: rejected update from %s: %s", self.current_round, candidate.agent_id, reason)
            self._watch.update_handled(UpdateHandled(self.current_round, attempt, candidate.agent_id, "rejected",
                                                        reason))  # replaces the "accepted" it was given on arrival
            candidate.path.unlink(missing_ok=True)
            upload = self.pending.get(candidate.agent_id)
            if upload is not None:
                self._send(topics.agent_inbox(candidate.agent_id),
                           UpdateAck(round=self.current_round, nonce=upload.nonce, accepted=False, reason=reason))
        rows = [dataclasses.replace(r, accepted=False, reason=refused[r.agent_id])
                if r.accepted and r.agent_id in refused else r for r in rows]
        return [c for c in candidates if c.agent_id not in refused], rows

    def _expected_tensors(self, backbone: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """name -> (shape, dtype) of everything an agent on ``backbone`` uploads."""
        if backbone not in self._expected:
            manifest = self.bundles[backbone].manifest
            self._expected[backbone] = {
                n: (federation_state.tensor_shape(manifest, n, public_samples=self.public_samples,
                                                  public_kind=self.public_kind), "float32")
                for n in self.upload_names(backbone)}
        return self._expected[backbone]

    def _blob_refusal(self, backbone: str, size: int, chunks: int) -> str | None:
        limit = max_update_bytes(shape for shape, _ in self._expected_tensors(backbone).values())
        return blob_ref_refusal(size, chunks, limit)

    def _publish_weights(self, backbones: set[str]) -> dict[str, BlobRef]:
        refs = {}
        for backbone in sorted(backbones):
            refs[backbone] = self._serve(encode_blob(federation_state.weights_for(self.state, backbone),
                                                    self.config.exchange.encoding))
        return refs

    def _on_chunk(self, agent_id: str, round_text: str | None, payload: bytes) -> None:
        upload = self.pending.get(agent_id)
        if upload is None or upload.done or round_text != str(self.current_round):
            return  # late or replayed chunk of an earlier round, or a duplicate after the upload was handled
        try:
            chunk = decode_chunk(payload)
            if upload.assembler is None:
                refusal = self._blob_refusal(upload.backbone, chunk.blob_size, chunk.count)
                if refusal is not None:
                    raise ChunkError(refusal)
                upload.assembler = BlobAssembler(BlobRef(chunk.blob_sha, chunk.blob_size, chunk.count))
            upload.assembler.add(chunk)
        except ChunkError as exc:
            log.warning("bad update chunk from %s: %s", agent_id, exc)

    def _on_report(self, report: UpdateReport) -> None:
        upload = self.pending.get(report.agent_id)
        if upload is None or report.round != self.current_round or report.nonce != upload.nonce \
                or report.run_id != self.run_id:
            reason = f"stale or replayed update (round {report.round}); current round is {self.current_round}"
            log.warning("rejected report from %s: %s", report.agent_id, reason)
            if report.agent_id in self.agents:  # tell it, so it stops resending
                ack = UpdateAck(round=report.round, nonce=report.nonce, accepted=False, reason=reason)
                self._send(topics.agent_inbox(report.agent_id), ack)
            return
        refusal = self._blob_refusal(upload.backbone, report.update.size, report.update.chunks)
        if refusal is not None and not upload.done:
            upload.done = True  # an impossible update: the round stops waiting for it
            log.warning("round %d: rejected report from %s: %s", report.round, report.agent_id, refusal)
            self.declined_rows.append(self._empty_row(upload, report.round, f"rejected: {refusal}"))
            self._watch.update_handled(UpdateHandled(report.round, self.attempt, report.agent_id, "rejected",
                                                        refusal))
            self._send(topics.agent_inbox(report.agent_id),
                       UpdateAck(round=report.round, nonce=report.nonce, accepted=False, reason=refusal))
            return
        if refusal is None and upload.report is None:
            upload.report = report
            upload.report_time = time.monotonic()
            if upload.assembler is None or upload.assembler.ref.sha256 != report.update.sha256:
                upload.assembler = BlobAssembler(report.update.to_ref())

    def _on_declined(self, declined: RoundDeclined) -> None:
        upload = self.pending.get(declined.agent_id)
        if upload is None or upload.done or declined.nonce != upload.nonce or declined.round != self.current_round:
            return
        upload.done = True
        log.warning("round %d: %s declined: %s", declined.round, declined.agent_id, declined.reason)
        self._watch.update_handled(UpdateHandled(declined.round, self.attempt, declined.agent_id, "declined",
                                                    declined.reason))
        self.declined_rows.append(self._empty_row(upload, declined.round, f"declined: {declined.reason}"))

    @staticmethod
    def _empty_row(upload: PendingUpload, round_id: int, reason: str) -> MetricRow:
        """The metrics row of an invited agent whose round ended without an update."""
        return MetricRow(
            round=round_id, agent_id=upload.agent_id, backbone=upload.backbone, personal_accuracy=None,
            global_accuracy=None, n_test=0, n_global_test=0, n_train=0, train_loss=None, bytes_up=0, bytes_down=0,
            train_seconds=0.0, eval_seconds=0.0, peak_rss_mb=0.0, backend="", accepted=False, reason=reason)

    def _try_finalize(self, upload: PendingUpload) -> tuple[Candidate | None, MetricRow] | None:
        """Accept or reject a complete upload (once); ask for missing chunks after a grace period."""
        report, assembler = upload.report, upload.assembler
        if upload.done or report is None or assembler is None:
            return None
        if not assembler.complete:
            if not upload.resend_asked and time.monotonic() - upload.report_time > RESEND_GRACE_S:
                upload.resend_asked = True
                request = ResendRequest(blob=report.update.sha256, indices=assembler.missing()[:1000])
                self._send(topics.agent_inbox(upload.agent_id), request)
            return None
        upload.done = True
        upload.assembler = None  # the chunks are freed as soon as the update is decoded (streaming aggregation)
        backbone = upload.backbone
        try:
            refusal = n_train_refusal(report.n_train, self.agents[upload.agent_id].n_train)
            if refusal is not None:
                raise ProtocolError(refusal)
            if report.encoding != self.config.exchange.encoding:
                raise TensorDecodeError(f"update is encoded as {report.encoding!r}; the run's [exchange] encoding "
                                        f"is {self.config.exchange.encoding!r}")
            tensors = decode_blob(assembler.assemble(), report.encoding)  # fp32 from here on
            if upload.evaluate_only:  # the final evaluation: metrics only, nothing to keep
                check_tensors(tensors, {}, max_norm=self.config.max_update_norm)
                update: Candidate | None = None
            else:
                check_tensors(tensors, self._expected_tensors(backbone), max_norm=self.config.max_update_norm)
                path = self.store.save_update(self.current_round, upload.agent_id, tensors)
                update = Candidate(upload.agent_id, backbone, report.n_train, l2_norm(tensors), path)
            ok, reason = True, ""
        except (BlobIntegrityError, TensorDecodeError, ProtocolError) as exc:
            update, ok, reason = None, False, str(exc)
            log.warning("round %d: rejected update from %s: %s", self.current_round, upload.agent_id, reason)
        ack = UpdateAck(round=self.current_round, nonce=upload.nonce, accepted=ok, reason=reason)
        self._send(topics.agent_inbox(upload.agent_id), ack)
        m = report.metrics
        row = MetricRow(
            round=self.current_round, agent_id=upload.agent_id, backbone=backbone,
            personal_accuracy=m.personal_accuracy, global_accuracy=m.global_accuracy, n_test=m.n_test,
            n_global_test=m.n_global_test, n_train=report.n_train, train_loss=m.train_loss,
            bytes_up=report.update.size, bytes_down=m.bytes_down, train_seconds=m.train_seconds,
            eval_seconds=m.eval_seconds, peak_rss_mb=m.peak_rss_mb, backend=m.backend,
            accepted=ok, reason=reason)
        return update, row

    # --- end ---------------------------------------------------------------------------------------

    def _finish(self, reason: str, code: FinishCode) -> None:
        """Tell every agent the run is over and why (its exit code follows ``code``), signed like every order."""
        finish = Finish(run_id=self.run_id, reason=reason[:4000], code=code)
        mids = [self._send(topics.agent_inbox(agent_id), finish) for agent_id in self.agents]
        for ref in self.bundle_refs.values():
            clear_blob(self.endpoint, ref)
        self._announce("offline")
        for mid in mids:  # let the finish messages reach the broker before disconnecting
            self.endpoint.wait_published(mid, timeout=5.0)


def run_dir_for(base: Path, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return base / f"{name}-{stamp}"
