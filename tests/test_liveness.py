"""Liveness rules (coordinator/liveness.py) on plain timestamps, and heartbeat authentication with real keys."""

from __future__ import annotations

import pytest

from coordinator.liveness import heartbeat_seq, replacements_wanted, stalled, time_allows_replacement
from protocols import topics
from protocols.errors import MessageError
from protocols.liveness import HEARTBEAT_INTERVAL_S, STALL_AFTER_S
from protocols.messages import Heartbeat, encode_message
from protocols.signing import Signer, generate_key, seal

RUN = "run-1"
TOPIC = topics.agent_heartbeat("a1")
BODY = encode_message(Heartbeat(agent_id="a1"))


def test_silence_longer_than_the_limit_is_a_stall_and_an_agent_never_heard_is_not_judged() -> None:
    assert STALL_AFTER_S >= 4 * HEARTBEAT_INTERVAL_S  # several lost beats or a busy CPU are not a stall
    assert not stalled(100.0, 100.0 + STALL_AFTER_S)  # exactly at the limit: still alive
    assert stalled(100.0, 100.0 + STALL_AFTER_S + 0.01)
    assert not stalled(100.0, 101.0)
    assert not stalled(None, 10_000.0)  # no heartbeat ever (keyless or older agent): the will decides


def test_replacements_cover_only_what_the_round_can_no_longer_reach() -> None:
    assert replacements_wanted(target=3, accepted=1, open_uploads=1) == 1
    assert replacements_wanted(target=3, accepted=0, open_uploads=3) == 0
    assert replacements_wanted(target=3, accepted=3, open_uploads=0) == 0
    assert replacements_wanted(target=4, accepted=0, open_uploads=0) == 4
    assert replacements_wanted(target=2, accepted=2, open_uploads=2) == 0  # never negative


def test_a_replacement_is_invited_only_while_half_the_round_is_left() -> None:
    assert time_allows_replacement(now=0.0, deadline=60.0, round_timeout=120.0)
    assert not time_allows_replacement(now=0.0, deadline=59.0, round_timeout=120.0)


def test_only_a_fresh_beat_signed_by_the_agents_own_key_for_this_topic_and_run_counts() -> None:
    agent = Signer(generate_key())
    beat = agent.seal(RUN, TOPIC, BODY)
    seq = heartbeat_seq(agent.public_hex, TOPIC, beat, RUN, -1)
    assert seq > 0
    with pytest.raises(MessageError, match="replay"):  # the same beat again cannot keep a frozen agent alive
        heartbeat_seq(agent.public_hex, TOPIC, beat, RUN, seq)
    assert heartbeat_seq(agent.public_hex, TOPIC, agent.seal(RUN, TOPIC, BODY), RUN, seq) > seq
    outsider = generate_key()
    with pytest.raises(MessageError):  # signed, but not by the key the agent joined with
        heartbeat_seq(agent.public_hex, TOPIC, seal(outsider, run=RUN, topic=TOPIC, seq=2**62, body=BODY), RUN, seq)
    with pytest.raises(MessageError, match="unsigned"):
        heartbeat_seq(agent.public_hex, TOPIC, BODY, RUN, -1)
    with pytest.raises(MessageError, match="replayed from elsewhere"):  # another agent's topic, another run
        heartbeat_seq(agent.public_hex, TOPIC, agent.seal(RUN, topics.agent_heartbeat("a2"), BODY), RUN, -1)
    with pytest.raises(MessageError, match="replayed from elsewhere"):
        heartbeat_seq(agent.public_hex, TOPIC, agent.seal("run-0", TOPIC, BODY), RUN, -1)
    with pytest.raises(MessageError, match="without a signing key"):  # nothing can prove a keyless agent's beat
        heartbeat_seq(None, TOPIC, beat, RUN, -1)
