"""Shared fixtures: a real mosquitto per test session (reference/mqtt.md §8) and MQTT endpoints.

Tests talk to a real broker over loopback because the interesting failures (retained redelivery,
duplicates, session loss on restart, size limits) are broker behaviour that a fake would hide.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.broker import MosquittoBroker, MosquittoNotFound
from protocols.mqtt import MqttEndpoint


def _started_broker(workdir: Path, **kwargs: Any) -> MosquittoBroker:
    broker = MosquittoBroker(workdir, **kwargs)
    try:
        broker.start()
    except MosquittoNotFound as exc:
        pytest.fail(f"{exc}. The MQTT tests need a real broker; CI installs it in .ci/run.", pytrace=False)
    return broker


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker for the whole session; tests must use unique topics/blobs and not restart it."""
    broker = _started_broker(tmp_path_factory.mktemp("mosquitto"))
    yield broker
    broker.stop()


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A private broker with persistence, for tests that stop, kill or restart it."""
    broker = _started_broker(tmp_path / "mosquitto", persistence=True)
    yield broker
    broker.stop()


EndpointFactory = Callable[..., MqttEndpoint]


@pytest.fixture
def make_endpoint(mosquitto: MosquittoBroker, request: pytest.FixtureRequest) -> Iterator[EndpointFactory]:
    """Factory for started endpoints on the session broker (or ``broker=``); all stopped at teardown."""
    created: list[MqttEndpoint] = []
    counter = itertools.count()
    test_name = request.node.name.replace("[", "-").replace("]", "")[:40]

    def make(
        client_id: str | None = None,
        *,
        broker: MosquittoBroker | None = None,
        start: bool = True,
        **kwargs: Any,
    ) -> MqttEndpoint:
        target = broker or mosquitto
        cid = client_id or f"t-{os.getpid()}-{test_name}-{next(counter)}"
        kwargs.setdefault("keepalive", 10)
        endpoint = MqttEndpoint(cid, target.host, target.port, **kwargs)
        created.append(endpoint)
        if start:
            endpoint.start()
        return endpoint

    yield make
    for endpoint in created:
        endpoint.stop()
