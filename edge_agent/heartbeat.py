"""The agent's heartbeat: a daemon thread that publishes a signed "still here" every HEARTBEAT_INTERVAL_S.

It runs beside training and downloads (never in a paho callback), so a busy device still beats; a frozen one
(SIGSTOP) or one cut off from the broker falls silent and the coordinator stops waiting for it
(protocols/liveness.py). Each beat is sealed with the agent's report key for its heartbeat topic and the run it
joined, with a strictly increasing sequence number.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from protocols import topics
from protocols.liveness import HEARTBEAT_INTERVAL_S
from protocols.messages import Heartbeat, encode_message
from protocols.mqtt import MqttEndpoint
from protocols.signing import Signer

log = logging.getLogger("edge_agent")


class HeartbeatThread:
    def __init__(self, endpoint: MqttEndpoint, signer: Signer, agent_id: str, run_id: Callable[[], str | None],
                 interval: float = HEARTBEAT_INTERVAL_S) -> None:
        # A signer of its own (same key, own sequence counter): the main thread's reports never race it.
        self._endpoint, self._signer = endpoint, Signer(signer.key)
        self._agent_id, self._run_id, self._interval = agent_id, run_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        topic = topics.agent_heartbeat(self._agent_id)
        body = encode_message(Heartbeat(agent_id=self._agent_id))
        while not self._stop.is_set():
            run_id = self._run_id()
            if run_id is not None:
                try:
                    self._endpoint.publish(topic, self._signer.seal(run_id, topic, body), qos=0)
                except Exception as exc:  # a broker away for a moment: the next beat tries again
                    log.debug("heartbeat not sent: %s", exc)
            self._stop.wait(self._interval)
