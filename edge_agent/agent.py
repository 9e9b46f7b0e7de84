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

from edge_agent.bundle_store import BundleStore, default_cache_dir
from edge_agent.data import Sample, load_examples
from edge_agent.data_check import DataFiles, check_before_join, check_labels
from edge_agent.device_state import default_state_dir
from edge_agent.heartbeat import HeartbeatThread
from edge_agent.limits import DeviceLimits, MemoryCapExceeded, slowed_profile
from edge_agent.local_round import LocalLearner, RoundPlan
from edge_agent.profile import profile_device
from edge_agent.round_state import resume_learner, save_round
from edge_agent.trainers.base import TrainerBackend
from edge_agent.trust import ControlGate
from edge_agent.upload_guard import refused_upload_names
from protocols import topics
from protocols.brokers import BrokerAddress
from protocols.bundle_manifest import BundleManifest
from protocols.chunk_spool import ChunkSpool
from protocols.errors import BlobFetchTimeout, ProtocolError, TensorDecodeError
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
    RoundDeclined,
    RoundMetrics,
    UpdateAck,
    UpdateReport,
    encode_message,
)
from protocols.mqtt import MqttEndpoint, Will, fetch_blob, publish_blob
from protocols.signing import Signer, generate_key, join_proof, load_public_key
from protocols.tensor_codec import decode_blob, encode_blob

log = logging.getLogger("edge_agent")

# Exit codes of `edge-agent join` (documented in its --help and docs/reliability.md): 0 every round done; 2 bad
# input (data, key, options); 3 refused by the coordinator; 4 broker unreachable or a download it never completed;
# 5 no word from any coordinator for --max-idle; 6 stopped by its owner (SIGTERM/Ctrl-C); 7 the run ended early
# (the coordinator aborted it or was stopped; its reason is logged).
EXIT_FINISHED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_BROKER, EXIT_IDLE, EXIT_STOPPED = 0, 2, 3, 4, 5, 6
EXIT_RUN_ABORTED = 7
ACK_TIMEOUT_S = 15.0  # upload again when the coordinator has not acknowledged an update for this long
LEAVE_PUBLISH_TIMEOUT_S = 5.0  # how long a leaving agent waits for the broker to take its "left" status


class AgentStopped(Exception):
    """The device's owner stopped the agent (SIGTERM, Ctrl-C): it tells the coordinator it leaves, then exits."""


@dataclass
class AgentConfig:
    agent_id: str
    host: str
    port: int
    data: Path
    global_test: Path | None = None
    public: Path | None = None  # the run's public set (consensus distillation)
    max_memory_mb: float | None = None
    max_round_seconds: float | None = None
    threads: int = 0
    backend: str = "auto"
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_idle_seconds: float = 900.0
    keepalive: int = 30
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None  # client certificate + key (brokers provisioned with client certificates)
    tls_key: Path | None = None
    # Emulated devices (edge_agent/limits.py): abort a round whose RSS crosses max_memory_mb, and run
    # `slowdown` times slower than this machine (sleeps after each step, GFLOP/s reported divided by it).
    enforce_memory: bool = True
    slowdown: float = 1.0
    state_dir: Path | None = None  # the device's trained model, saved after every round (None: beside --data)
    # The coordinator's public run key: only messages signed with it are acted on (edge_agent/trust.py). Without
    # one the agent refuses to start unless insecure_no_verify is set (then signatures are not checked).
    coordinator_key: Path | None = None
    insecure_no_verify: bool = False
    join_token: bytes | None = None  # the run's join secret, if it uses one (coordinator/admission.py)
    failover: tuple[BrokerAddress, ...] = ()  # further cluster nodes after host:port (protocols/brokers.py)


BACKENDS = ("auto", "ort", "torch")


def resolve_backend(requested: str) -> str:
    """The trainer backend this device will use: the forced one, or for 'auto' ORT where it loads, else torch.

    Resolved before the bundle is fetched, because the backend decides which bundle parts to download.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown trainer backend '{requested}'; choose one of {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    from edge_agent.profile import available_backends

    found = available_backends()
    if not found:
        raise ImportError("no trainer backend is installed: pip install --no-deps onnxruntime-training-cpu==1.19.2 "
                          "(x86_64, macOS arm64) or pip install torch (any platform, e.g. Linux aarch64)")
    return found[0]


def make_trainer(backend: str, bundle_dir: Path, threads: int) -> TrainerBackend:
    """The requested backend; 'auto' prefers ONNX Runtime and falls back to PyTorch where ORT is missing.

    Both modules are imported here, not at the top: an aarch64 device has no ORT, an x86_64 one needs no torch.
    """
    if resolve_backend(backend) == "ort":
        from edge_agent.trainers.ort import OrtTrainer

        return OrtTrainer(bundle_dir, threads=threads)
    from edge_agent.trainers.torch_backend import TorchTrainer

    return TorchTrainer(bundle_dir, threads=threads)


class EdgeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = BundleStore(config.cache_dir / "bundles")
        self.run_id: str | None = None
        self.learner: LocalLearner | None = None
        self.bundle_sha: str | None = None
        self.state_dir = config.state_dir or default_state_dir(config.data, config.agent_id)
        # round -> (update blob, report) kept until the coordinator acknowledges it, for resends
        self.pending_uploads: dict[int, tuple[bytes, bytes]] = {}
        self._assignment_nonce: str | None = None  # the last assignment handled: a resent copy is not trained twice
        self._last_upload = 0.0
        self.bytes_down = 0
        self._join_wanted = threading.Event()
        self._join_sent_for: str | None = None
        self._profile: DeviceProfile | None = None
        if config.coordinator_key is None and not config.insecure_no_verify:
            raise ValueError("no coordinator key: give the run's public key with --coordinator-key FILE (written by "
                             "`coordinator provision` or into the run directory's keys/), or --insecure-no-verify "
                             "to act on unsigned control messages (anyone on the broker can then stop or steer "
                             "this device)")
        self.gate = ControlGate(load_public_key(config.coordinator_key) if config.coordinator_key else None)
        self.signer = Signer(generate_key())  # this process's identity: it signs our reports
        self._join_nonce: str | None = None
        self._files: DataFiles | None = None
        self.endpoint = MqttEndpoint(
            config.agent_id, config.host, config.port,
            username=config.username, password=config.password,
            tls_ca=str(config.tls_ca) if config.tls_ca else None,
            tls_cert=str(config.tls_cert) if config.tls_cert else None,
            tls_key=str(config.tls_key) if config.tls_key else None,
            keepalive=config.keepalive, session_expiry=3600,
            will=Will(topics.agent_status(config.agent_id),
                      encode_message(AgentStatus(agent_id=config.agent_id, state="lost")),
                      retain=True, delay_seconds=10),
            on_connect=lambda _session_present: self._announce_online(), failover=config.failover,
        )
        self.heartbeat = HeartbeatThread(self.endpoint, self.signer, config.agent_id, lambda: self.run_id)

    # --- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        # A bad data file never joins: checked before the broker is even contacted (edge_agent/data_check.py).
        self._files = check_before_join(self.config.data, self.config.global_test, self.config.public)
        # The backend goes in the profile: the coordinator assigns with that backend's cost card (torch peaks higher).
        measured = profile_device(max_memory_mb=self.config.max_memory_mb,
                                  max_round_seconds=self.config.max_round_seconds, disk_path=self.config.cache_dir,
                                  backend=resolve_backend(self.config.backend))
        self._profile = DeviceProfile(**slowed_profile(measured, self.config.slowdown))
        # Subscribed before connecting: the SUBSCRIBE then precedes our "online" status on the wire, so the status a
        # coordinator announces in reply to it (on a cluster node without the retained copy) cannot be missed.
        self.endpoint.subscribe(topics.agent_inbox(self.config.agent_id))
        self.endpoint.subscribe(topics.coord_status())
        self.endpoint.start()
        try:
            code = self._loop()
            if code == EXIT_IDLE:
                self._leave("no word from the coordinator; the agent gave up waiting")
            return code
        except KeyboardInterrupt:
            self._leave("stopped by its owner (Ctrl-C)")
            raise AgentStopped("stopped by its owner (Ctrl-C)") from None
        except BaseException as exc:  # anything this agent knows it leaves for: tell the coordinator first
            self._leave(str(exc) or type(exc).__name__)
            raise
        finally:
            self.heartbeat.stop()
            self.endpoint.stop()

    def _leave(self, reason: str) -> None:
        """Tell the coordinator this device leaves the run and why, so it is dropped at once (never raises)."""
        try:
            status = AgentStatus(agent_id=self.config.agent_id, state="left", reason=reason[:4000])
            mid = self.endpoint.publish(topics.agent_status(self.config.agent_id), encode_message(status),
                                        retain=True)
            self.endpoint.wait_published(mid, timeout=LEAVE_PUBLISH_TIMEOUT_S)
            log.info("left the run: %s", reason)
        except Exception as exc:  # the broker may be the reason we leave; the will covers us then
            log.warning("could not tell the coordinator that this agent leaves: %s", exc)

    def _loop(self) -> int:
        last_activity = time.monotonic()
        while True:
            if self._join_wanted.is_set():
                self._join_wanted.clear()
                self._send_join()
            item = self.endpoint.get(timeout=0.5)
            if self.pending_uploads and time.monotonic() - self._last_upload > ACK_TIMEOUT_S:
                self._upload_again()  # no ack: the report or chunks may have been lost in a broker restart
            if item is None:
                if time.monotonic() - last_activity > self.config.max_idle_seconds:
                    log.error("no word from the coordinator for %.0f s; giving up", self.config.max_idle_seconds)
                    return EXIT_IDLE
                continue
            last_activity = time.monotonic()
            if not item.payload:
                continue
            message = self.gate.admit(item.topic, item.payload, joined_run=self.run_id,
                                      joining_run=self._join_sent_for, join_nonce=self._join_nonce)
            if message is None:
                continue
            outcome = self._handle(message)
            if outcome is not None:
                return outcome

    def _handle(self, message: Message) -> int | None:
        if isinstance(message, CoordStatus):
            if message.state == "online" and message.run_id != self.run_id \
                    and message.run_id != self._join_sent_for:
                # A coordinator run we have not joined: introduce ourselves, once per run. The status is retained,
                # so this fires right after subscribing if the coordinator is up, or when it starts later.
                self._join_sent_for = message.run_id
                self._join_wanted.set()
            elif message.state == "online" and self.pending_uploads:
                self._upload_again()  # the same run's coordinator came back (resumed): it may lack our update
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
        elif isinstance(message, Finish) and message.run_id == self.run_id:
            if message.code == "completed":
                log.info("run %s finished: %s; this device's model is kept in %s", message.run_id, message.reason,
                         self.state_dir)
            else:
                log.warning("run %s ended early (%s): %s; this device's model is kept in %s", message.run_id,
                            message.code, message.reason, self.state_dir)
            self._status("left")
            return EXIT_FINISHED if message.code == "completed" else EXIT_RUN_ABORTED
        return None

    # --- joining -----------------------------------------------------------------------------------

    def _send_join(self) -> None:
        assert self._profile is not None and self._files is not None
        n = self._files.n_examples
        self._join_nonce = secrets.token_hex(8)
        request = JoinRequest(agent_id=self.config.agent_id, nonce=self._join_nonce, profile=self._profile,
                              n_train=n - n // 4, n_test=n // 4, n_global_test=self._files.n_global_test,
                              n_public=self._files.n_public, agent_key=self.signer.public_hex)
        if self.config.join_token is not None and self._join_sent_for is not None:
            request = request.model_copy(update={"proof": join_proof(self.config.join_token, self._join_sent_for,
                                                                     request)})
        self.endpoint.publish(topics.agent_join(self.config.agent_id), encode_message(request))
        self._status("online")

    def _on_accepted(self, message: JoinAccepted) -> None:
        self.run_id = message.run_id
        self.heartbeat.start()  # from now on the coordinator can tell a frozen device from a busy one
        log.info("joined run %s with backbone %s: %s", message.run_id, message.backbone, message.explanation)
        if message.labels is not None and self._files is not None:  # before the download, not after
            check_labels(self._files, self.config.data, self.config.global_test, message.labels)
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
        self._ensure_parts(ref.sha256, manifest)
        self.learner = self._make_learner(bundle_dir, manifest)
        resume_learner(self.learner, self.state_dir, self.run_id, ref.sha256)
        self.bundle_sha = ref.sha256
        return self.learner

    def _ensure_parts(self, bundle_sha: str, manifest: BundleManifest) -> None:
        """Fetch the bundle parts this device's backend needs (the torch backbone; the ORT checkpoint and graphs).

        The coordinator publishes a part only once some agent asks for it, so a resend request for chunk 0
        goes out first; a part no agent's backend needs never goes on the broker.
        """
        for name, part in manifest.parts_for(resolve_backend(self.config.backend)).items():
            if self.store.has_part(bundle_sha, part):
                continue
            started = time.monotonic()
            request = ResendRequest(blob=part.sha256, indices=[0])
            self.endpoint.publish(topics.agent_request(self.config.agent_id), encode_message(request))
            data = self._fetch(BlobRefModel(sha256=part.sha256, size=part.size, chunks=part.chunks))
            self.store.install_part(bundle_sha, part, data)
            log.info("bundle part %s fetched: %.1f MB in %.1f s", name, part.size / 1e6, time.monotonic() - started)

    def _make_learner(self, bundle_dir: Path, manifest: BundleManifest) -> LocalLearner:
        labels = manifest.task.labels
        examples: list[Sample] = load_examples(self.config.data, labels)
        global_test = load_examples(self.config.global_test, labels) if self.config.global_test else []
        public = load_examples(self.config.public, labels) if self.config.public else []
        trainer = make_trainer(self.config.backend, bundle_dir, self.config.threads)
        return LocalLearner(self.config.agent_id, bundle_dir, manifest, trainer, examples, global_test,
                            public=public)

    def _fetch(self, ref: BlobRefModel, timeout: float = 300.0) -> bytes:
        def ask(indices: list[int]) -> None:
            request = ResendRequest(blob=ref.sha256, indices=indices)
            self.endpoint.publish(topics.agent_request(self.config.agent_id), encode_message(request))

        large = ref.size > 4 * 1024 * 1024  # bundles and parts: progress lines, chunks kept for a resume
        shown = [-1]

        def progress(received: int, total: int) -> None:
            tenth = received * 10 // max(total, 1)
            if large and tenth > shown[0]:  # one line per 10 %
                shown[0] = tenth
                log.info("fetching %s: %d %% (%.1f of %.1f MB)", ref.sha256[:12], tenth * 10, received / 1e6,
                         total / 1e6)

        data = fetch_blob(self.endpoint, ref.to_ref(), request_resend=ask, timeout=timeout, on_progress=progress,
                          spool=ChunkSpool(self.config.cache_dir / "partial") if large else None)
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
        if a.nonce == self._assignment_nonce:
            log.info("round %d: assignment received again (coordinator resent it); already handled", a.round)
            return
        self.pending_uploads = {}  # a new assignment supersedes anything not yet acknowledged
        learner = self._ensure_bundle(a.bundle)
        refused = refused_upload_names(learner.manifest, a.upload_names)
        if refused:
            reason = "; ".join(list(refused.values())[:3])
            log.error("round %d: the assignment asks for tensors this device never sends: %s", a.round, reason)
            self._report(RoundDeclined(run_id=a.run_id, agent_id=self.config.agent_id, round=a.round,
                                       nonce=a.nonce, reason=f"refused upload names: {reason}"))
            return
        try:
            received = decode_blob(self._fetch(a.weights, timeout=max(1.0, a.deadline_unix - time.time())),
                                   a.encoding)
        except BlobFetchTimeout as exc:  # the round closed (or the coordinator vanished) before we got the weights
            log.warning("round %d skipped: %s", a.round, exc)
            return
        except TensorDecodeError as exc:  # e.g. non-finite decoded weights: decline with the reason, keep running
            log.error("round %d: the weights blob is unusable: %s", a.round, exc)
            self._report(RoundDeclined(run_id=a.run_id, agent_id=self.config.agent_id, round=a.round,
                                       nonce=a.nonce, reason=f"weights blob rejected: {exc}"[:4000]))
            return
        self._assignment_nonce = a.nonce  # from here on this assignment is handled (trained, declined or aborted)
        self._status("training")
        plan = RoundPlan(a.round, a.local_steps, a.batch_size, a.learning_rate, a.seed, tuple(a.upload_names),
                         a.prototype_weight, a.distill_steps, a.distill_local_prior,
                         a.distill_confident_fraction, a.anchor_steps, a.anchor_weight)
        learner.guard = DeviceLimits(self.config.max_memory_mb if self.config.enforce_memory else None,
                                     self.config.slowdown)
        try:
            outcome = learner.evaluate(received) if a.evaluate_only else learner.run_round(plan, received)
        except MemoryCapExceeded as exc:
            # Nothing is uploaded: the coordinator closes the round without us (min_fraction permitting) and
            # assigns the next one as usual; the next round reloads the model from scratch.
            log.error("round %d aborted: %s", a.round, exc)
            self._report(RoundDeclined(run_id=a.run_id, agent_id=self.config.agent_id, round=a.round, nonce=a.nonce,
                                       reason=str(exc)))
            self._status("idle")
            return
        self._status("uploading")
        blob = encode_blob(outcome.upload, a.encoding)
        ref = publish_blob(self.endpoint, blob, retain=False,
                           topic=topics.agent_update_chunk(self.config.agent_id, a.round))
        metrics = RoundMetrics(
            personal_accuracy=outcome.personal.accuracy,
            global_accuracy=outcome.global_.accuracy if outcome.global_ else None,
            n_test=outcome.personal.total, n_global_test=outcome.global_.total if outcome.global_ else 0,
            train_loss=outcome.train_loss, train_seconds=outcome.train_seconds,
            eval_seconds=outcome.eval_seconds, peak_rss_mb=outcome.peak_rss_mb, bytes_down=self.bytes_down,
            backend=learner.trainer.name,
        )
        report = UpdateReport(run_id=a.run_id, agent_id=self.config.agent_id, round=a.round, nonce=a.nonce,
                              update=BlobRefModel.from_ref(ref), n_train=outcome.n_train, metrics=metrics,
                              encoding=a.encoding)
        report_bytes = self.signer.seal(a.run_id, topics.agent_report(self.config.agent_id), encode_message(report))
        self.pending_uploads = {a.round: (blob, report_bytes)}
        self._last_upload = time.monotonic()
        report_mid = self.endpoint.publish(topics.agent_report(self.config.agent_id), report_bytes)
        self.bytes_down = 0  # the next round counts from here (round 1 includes the bundle download)
        save_round(self.state_dir, learner=learner, run_id=a.run_id, round_id=a.round, bundle_sha=a.bundle.sha256,
                   bundle_dir=self.store.path(a.bundle.sha256), received=received, outcome=outcome,
                   final=a.evaluate_only)
        self._status("idle")
        # Load the next round's session now, while there is nothing else to do, but only once the broker has the
        # report: loading holds the GIL, and paho's network thread would otherwise sit on the upload meanwhile.
        self.endpoint.wait_published(report_mid, timeout=10.0)
        learner.trainer.prepare()
        log.info("round %d: personal %.3f, global %s, loss %.3f, %.1f s train", a.round,
                 outcome.personal.accuracy, f"{outcome.global_.accuracy:.3f}" if outcome.global_ else "-",
                 outcome.train_loss, outcome.train_seconds)

    def _report(self, message: RoundDeclined) -> None:
        topic = topics.agent_report(self.config.agent_id)
        self.endpoint.publish(topic, self.signer.seal(message.run_id, topic, encode_message(message)))

    def _upload_again(self) -> None:
        """Send every unacknowledged update again, chunks then report; the coordinator dedupes both."""
        self._last_upload = time.monotonic()
        for round_id, (blob, report) in self.pending_uploads.items():
            log.info("round %d: no acknowledgement yet; uploading again", round_id)
            publish_blob(self.endpoint, blob, retain=False,
                         topic=topics.agent_update_chunk(self.config.agent_id, round_id))
            self.endpoint.publish(topics.agent_report(self.config.agent_id), report)

    def _resend_update(self, request: ResendRequest) -> None:
        for round_id, (blob, _report) in self.pending_uploads.items():
            try:
                publish_blob(self.endpoint, blob, retain=False, indices=request.indices,
                             topic=topics.agent_update_chunk(self.config.agent_id, round_id))
            except ProtocolError as exc:
                log.warning("could not resend update chunks: %s", exc)

    def _announce_online(self) -> None:
        """On every (re)connect, from paho's thread (publish only queues): after a drop the broker may have
        published our will ("lost"), and the main thread can be busy training for a while."""
        self._status("online")

    def _status(self, state: str) -> None:
        status = AgentStatus(agent_id=self.config.agent_id, state=state)
        self.endpoint.publish(topics.agent_status(self.config.agent_id), encode_message(status), retain=True)


