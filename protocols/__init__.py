"""The fl/v1 wire protocol shared by the coordinator and the edge agent.

Kept free of torch/transformers/onnx so that a device installs only numpy, paho-mqtt, pydantic and
safetensors. Modules: ``topics`` (topic layout), ``messages`` (JSON control messages), ``chunks``
(content-addressed chunk frames), ``tensors`` (safetensors codec and update checks), ``mqtt``
(paho wrapper and blob transfer), ``errors``.
"""

from protocols.errors import (
    BlobFetchTimeout,
    BlobIntegrityError,
    BrokerUnavailable,
    ChunkError,
    MessageError,
    PayloadTooLarge,
    ProtocolError,
    TensorDecodeError,
    TopicError,
)

__all__ = [
    "BlobFetchTimeout",
    "BlobIntegrityError",
    "BrokerUnavailable",
    "ChunkError",
    "MessageError",
    "PayloadTooLarge",
    "ProtocolError",
    "TensorDecodeError",
    "TopicError",
]
