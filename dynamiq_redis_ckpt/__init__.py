"""Redis-backed, distributed checkpoint store for Dynamiq workflows."""

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.errors import (
    AlreadyAnsweredError,
    CheckpointCorruptedError,
    CheckpointEncodeError,
    CheckpointNotFoundError,
    CheckpointStoreError,
    CheckpointTooLargeError,
    ConfigurationError,
    EncryptionKeyError,
    LeaseLostError,
    RunNotWaitingError,
    StoreUnavailableError,
    TLSError,
    UnsupportedFormatError,
    WrongKeyTypeError,
)
from dynamiq_redis_ckpt.guard import as_running_flow
from dynamiq_redis_ckpt.idempotency import idempotency_key

__all__ = [
    "AlreadyAnsweredError",
    "CheckpointCorruptedError",
    "CheckpointEncodeError",
    "CheckpointNotFoundError",
    "CheckpointStoreError",
    "CheckpointTooLargeError",
    "ConfigurationError",
    "EncryptionKeyError",
    "LeaseLostError",
    "RedisCheckpointBackend",
    "RunNotWaitingError",
    "StoreUnavailableError",
    "TLSError",
    "UnsupportedFormatError",
    "WrongKeyTypeError",
    "as_running_flow",
    "idempotency_key",
]
__version__ = "0.1.0"
