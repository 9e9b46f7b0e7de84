"""Broker addresses as given on a command line: ``HOST:PORT`` or a comma-separated list of them.

A list names the nodes of one MQTT cluster (docs/deployment.md). Every client connects to the first node it can
reach and fails over to the next when its node dies (protocols/mqtt.py); all nodes share topics, retained messages
and credentials, so any of them will do. The one parser lives here, used by both the coordinator and the agent.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BROKERS = 16  # a client walks the list on every failure; more nodes than this is a load balancer's job
_HINT = "expected HOST:PORT[,HOST:PORT...], e.g. 127.0.0.1:1883 or node-a.lan:8883,node-b.lan:8883"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_broker_address(address: str) -> BrokerAddress:
    """One ``HOST:PORT`` (IPv6 as ``[::1]:1883``); a ValueError says what is wrong with it."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"invalid broker address {address!r}: {_HINT}")
    host, _, port_text = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host or "," in host:
        raise ValueError(f"invalid broker address {address!r}: missing or bad host; {_HINT}")
    if ":" in host and not address.strip().startswith("["):
        raise ValueError(f"invalid broker address {address!r}: write an IPv6 host in brackets, e.g. [::1]:1883")
    if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"invalid broker address {address!r}: port must be 1-65535; {_HINT}")
    return BrokerAddress(host, int(port_text))


def parse_broker_list(text: str) -> tuple[BrokerAddress, ...]:
    """``HOST:PORT[,HOST:PORT...]`` in the order the client tries them; no empty entry, no node twice."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"no broker address given: {_HINT}")
    entries = text.split(",")
    if len(entries) > MAX_BROKERS:
        raise ValueError(f"{len(entries)} broker addresses given, at most {MAX_BROKERS} are accepted; name a few "
                         "nodes of the cluster (or one load balancer in front of it)")
    out: list[BrokerAddress] = []
    for position, entry in enumerate(entries, start=1):
        if not entry.strip():
            raise ValueError(f"broker list {text!r}: entry {position} is empty (a stray comma?); {_HINT}")
        try:
            address = parse_broker_address(entry)
        except ValueError as exc:
            raise ValueError(f"broker list {text!r}: entry {position}: {exc}") from None
        if address in out:
            raise ValueError(f"broker list {text!r}: {address} is named twice; name each cluster node once")
        out.append(address)
    return tuple(out)


def format_broker_list(addresses: tuple[BrokerAddress, ...] | list[BrokerAddress]) -> str:
    """The inverse of ``parse_broker_list``: what to put in a printed command line."""
    return ",".join(str(a) for a in addresses)
