"""Exception types for everything that crosses the wire.

All of them derive from ``ProtocolError`` (itself a ``ValueError``) so a receive loop can reject any
malformed input from the network with a single ``except ProtocolError`` and keep running, while
programming errors (``TypeError``, ``AttributeError`` ...) still surface loudly.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """Base class: input from a peer (or for a peer) violates the fl/v1 protocol."""


class MessageError(ProtocolError):
    """A JSON control message is not valid JSON, not fl/v1, or fails field validation."""


class ChunkError(ProtocolError):
    """A chunk frame is malformed, inconsistent, or its per-chunk sha256 does not match.

    ``index`` and ``blob_sha`` are filled in whenever the frame header could be read (or the caller
    knows them from the topic), so the receiver can ask for exactly that chunk again.
    """

    def __init__(self, message: str, *, index: int | None = None, blob_sha: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.blob_sha = blob_sha


class BlobIntegrityError(ProtocolError):
    """All chunks arrived but the reassembled blob has the wrong size or sha256."""


class TensorDecodeError(ProtocolError):
    """A tensor blob is not safetensors, or its tensors fail the expected names/shapes/dtypes/bounds."""


class PayloadTooLarge(ProtocolError):
    """A payload exceeds the configured limit; raised before anything is sent."""

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class TopicError(ProtocolError):
    """A topic, agent id or blob hash does not fit the fl/v1 topic layout."""


class BrokerUnavailable(ProtocolError):
    """The MQTT broker could not be reached or refused the connection."""


class BlobFetchTimeout(TimeoutError):
    """A blob could not be completed in time; ``missing`` lists the chunk indices never received.

    A ``TimeoutError`` rather than a ``ProtocolError``: nothing malformed arrived, the peer was
    simply too slow or gone.
    """

    def __init__(self, message: str, *, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing
