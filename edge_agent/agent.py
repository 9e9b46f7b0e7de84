"""The edge agent's join loop: join, fetch the bundle, train each assigned round, upload, repeat.

All MQTT callbacks only enqueue; every piece of work (fetching, training, uploading) runs on the main thread,
so a long training round never starves paho's keepalive (reference/mqtt.md §9.3).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.bundle_store import BundleStore
from edge_agent.data import Example, load_examples
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.profile import profile_device
from edge_agent.trainers.base import TrainerBackend
from protocols import topics
from protocols.bundle_manifest import BundleManifest
from protocols.errors import MessageError, ProtocolError
from protocols.messages import (
    AgentStatus,
    Assignment,
    BlobRefModel,
    CoordStatus,
    DeviceProfile,
    Finish,
    JoinAccepted,
    JoinRefused,
    JoinRequest,
    Message,
    ResendRequest,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    decode_message,
    encode_message,
)
from protocols.mqtt import MqttEndpoint, Will, fetch_blob, publish_blob
from protocols.tensors import decode_tensors, encode_tensors

log = logging.getLogger("edge_agent")

EXIT_FINISHED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_BROKER, EXIT_IDLE = 0, 2, 3, 4, 5


@dataclass
class AgentConfig:
    agent_id: str
    host: str
    port: int
    data: Path
    global_test: Path | None = None
    max_memory_mb: float | None = None
    max_round_seconds: float | None = None
    threads: int = 0
    backend: str = "auto"
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "heterotune-agent")
    max_idle_seconds: float = 900.0
    keepalive: int = 30
    username: str | None = None
    password: str | None = None


def make_trainer(backend: str, bundle_dir: Path, threads: int) -> TrainerBackend:
    """The requested backend; 'auto' prefers ONNX Runtime and falls back to PyTorch where ORT is missing."""
    if backend in ("auto", "ort"):
        try:
            from edge_agent.trainers.ort import OrtTrainer

            return OrtTrainer(bundle_dir, threads=threads)
        except ImportError:
            if backend == "ort":
                raise
    raise ImportError(f"trainer backend '{backend}' is not available on this device; "
                      "install onnxruntime-training-cpu==1.19.2 (x86_64) or use --backend auto")


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = BundleStore(config.cache_dir / "bundles")
        self.run_id: str | None = None
        self.learner: LocalLearner | None = None
        self.bundle_sha: str | None = None
        self.pending_uploads: dict[int, bytes] = {}
        self.bytes_down = 0
        self._join_wanted = threading.Event()
        self._profile: DeviceProfile | None = None
        self.endpoint = MqttEndpoint(
            config.agent_id, config.host, config.port,
            username=config.username, password=config.password,
            keepalive=config.keepalive, session_expiry=3600,
            will=Will(topics.agent_status(config.agent_id),
                      encode_message(AgentStatus(agent_id=config.agent_id, state="lost")),
                      retain=True, delay_seconds=10),
            on_connect=lambda _session_present: self._join_wanted.set(),
        )

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        self._profile = DeviceProfile(**profile_device(max_memory_mb=self.config.max_memory_mb,
                                                       max_round_seconds=self.config.max_round_seconds,
                                                       disk_path=self.config.cache_dir))
        self.endpoint.start()
        try:
            self.endpoint.subscribe(topics.agent_inbox(self.config.agent_id))
            self.endpoint.subscribe(topics.coord_status())
            return self._loop()
        finally:
            self.endpoint.stop()

    def _loop(self) -> int:
        last_activity = time.monotonic()
        while True:
            if self._join_wanted.is_set():
                self._join_wanted.clear()
                self._send_join()
            item = self.endpoint.get(timeout=0.5)
            if item is None:
                if time.monotonic() - last_activity > self.config.max_idle_seconds:
                    log.error("no word from the coordinator for %.0f s; giving up", self.config.max_idle_seconds)
                    return EXIT_IDLE
                continue
            last_activity = time.monotonic()
            if not item.payload:
                continue
            try:
                message = decode_message(item.payload)
            except MessageError as exc:
                log.warning("ignoring malformed message on %s: %s", item.topic, exc)
                continue
            outcome = self._handle(message)
            if outcome is not None:
                return outcome

    def _handle(self, message: Message) -> int | None:
        if isinstance(message, CoordStatus):
            if message.state == "online" and self.run_id is not None and message.run_id != self.run_id:
                self._join_wanted.set()  # a new coordinator run: introduce ourselves again
        elif isinstance(message, JoinAccepted):
            self._on_accepted(message)
        elif isinstance(message, JoinRefused):
            log.error("coordinator refused this device: %s", message.reason)
            return EXIT_REFUSED
        elif isinstance(message, Assignment):
            self._on_assignment(message)
        elif isinstance(message, UpdateAck):
            self.pending_uploads.pop(message.round, None)
            if not message.accepted:
                log.error("round %d update rejected: %s", message.round, message.reason)
        elif isinstance(message, ResendRequest):
            self._resend_update(message)
        elif isinstance(message, Finish):
            log.info("run %s finished: %s", message.run_id, message.reason)
            self._status("left")
            return EXIT_FINISHED
        return None

    # --- joining -----------------------------------------------------------------------------------

    def _send_join(self) -> None:
        assert self._profile is not None
        n = _count_records(self.config.data)
        request = JoinRequest(agent_id=self.config.agent_id, nonce=secrets.token_hex(8), profile=self._profile,
                              n_train=n - n // 4, n_test=n // 4,
                              n_global_test=_count_records(self.config.global_test) if self.config.global_test
                              else 0)
        self.endpoint.publish(topics.agent_join(self.config.agent_id), encode_message(request))
        self._status("online")

    def _on_accepted(self, message: JoinAccepted) -> None:
        self.run_id = message.run_id
        log.info("joined run %s with backbone %s: %s", message.run_id, message.backbone, message.explanation)
        self._ensure_bundle(message.bundle)

    def _ensure_bundle(self, ref: BlobRefModel) -> LocalLearner:
        if self.learner is not None and self.bundle_sha == ref.sha256:
            return self.learner
        if not self.store.has(ref.sha256):
            started = time.monotonic()
            archive = self._fetch(ref)
            self.store.install(ref.sha256, archive)
            log.info("bundle %s fetched: %.1f MB in %.1f s", ref.sha256[:12], ref.size / 1e6,
                     time.monotonic() - started)
        bundle_dir = self.store.path(ref.sha256)
        manifest = self.store.manifest(ref.sha256)
        self.learner = self._make_learner(bundle_dir, manifest)
        self.bundle_sha = ref.sha256
        return self.learner

    def _make_learner(self, bundle_dir: Path, manifest: BundleManifest) -> LocalLearner:
        labels = manifest.task.labels
        examples: list[Example] = load_examples(self.config.data, labels)
        global_test = load_examples(self.config.global_test, labels) if self.config.global_test else []
        trainer = make_trainer(self.config.backend, bundle_dir, self.config.threads)
        return LocalLearner(self.config.agent_id, bundle_dir, manifest, trainer, examples, global_test)

    def _fetch(self, ref: BlobRefModel) -> bytes:
        def ask(indices: list[int]) -> None:
            request = ResendRequest(blob=ref.sha256, indices=indices)
            self.endpoint.publish(topics.agent_request(self.config.agent_id), encode_message(request))

        data = fetch_blob(self.endpoint, ref.to_ref(), request_resend=ask, timeout=300.0)
        self.bytes_down += len(data)
        return data

    # --- rounds ------------------------------------------------------------------------------------

    def _on_assignment(self, a: Assignment) -> None:
        if a.run_id != self.run_id:
            log.warning("ignoring assignment for run %s (joined %s)", a.run_id, self.run_id)
            return
        if time.time() > a.deadline_unix:
            log.warning("round %d arrived after its deadline; skipping it", a.round)
            return
        learner = self._ensure_bundle(a.bundle)
        received = decode_tensors(self._fetch(a.weights))
        self._status("training")
        plan = RoundPlan(a.round, a.local_steps, a.batch_size, a.learning_rate, a.seed, tuple(a.upload_names))
        outcome = learner.run_round(plan, received)
        self._status("uploading")
        blob = encode_tensors(outcome.upload)
        ref = publish_blob(self.endpoint, blob, retain=False,
                           topic=topics.agent_update_chunk(self.config.agent_id, a.round))
        self.pending_uploads = {a.round: blob}
        metrics = RoundMetrics(
            personal_accuracy=outcome.personal.accuracy,
            global_accuracy=outcome.global_.accuracy if outcome.global_ else None,
            n_test=outcome.personal.total, n_global_test=outcome.global_.total if outcome.global_ else 0,
            train_loss=outcome.train_loss, train_seconds=outcome.train_seconds,
            eval_seconds=outcome.eval_seconds, peak_rss_mb=outcome.peak_rss_mb, bytes_down=self.bytes_down,
            backend=learner.trainer.name,
        )
        report = UpdateReport(run_id=a.run_id, agent_id=self.config.agent_id, round=a.round, nonce=a.nonce,
                              update=BlobRefModel.from_ref(ref), n_train=outcome.n_train, metrics=metrics)
        self.endpoint.publish(topics.agent_report(self.config.agent_id), encode_message(report))
        self.bytes_down = 0  # the next round counts from here (round 1 includes the bundle download)
        self._status("idle")
        log.info("round %d: personal %.3f, global %s, loss %.3f, %.1f s train", a.round,
                 outcome.personal.accuracy, f"{outcome.global_.accuracy:.3f}" if outcome.global_ else "-",
                 outcome.train_loss, outcome.train_seconds)

    def _resend_update(self, request: ResendRequest) -> None:
        for round_id, blob in self.pending_uploads.items():
            try:
                publish_blob(self.endpoint, blob, retain=False, indices=request.indices,
                             topic=topics.agent_update_chunk(self.config.agent_id, round_id))
            except ProtocolError as exc:
                log.warning("could not resend update chunks: %s", exc)

    def _status(self, state: str) -> None:
        status = AgentStatus(agent_id=self.config.agent_id, state=state)
        self.endpoint.publish(topics.agent_status(self.config.agent_id), encode_message(status), retain=True)


def _count_records(path: Path | None) -> int:
    """Rows in a JSONL/CSV data file, without parsing (labels are known only once the bundle is)."""
    if path is None:
        return 0
    with open(path, "rb") as handle:
        rows = sum(1 for line in handle if line.strip())
    return rows - 1 if path.suffix.lower() == ".csv" else rows
