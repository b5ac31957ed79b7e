"""Redis-backed, distributed checkpoint store for Dynamiq workflows."""

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointEncodeError,
    CheckpointNotFoundError,
    CheckpointStoreError,
    CheckpointTooLargeError,
    ConfigurationError,
    LeaseLostError,
    StoreUnavailableError,
    UnsupportedFormatError,
    WrongKeyTypeError,
)

from dynamiq_redis_ckpt.leases import idempotency_key

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointEncodeError",
    "CheckpointNotFoundError",
    "CheckpointStoreError",
    "CheckpointTooLargeError",
    "ConfigurationError",
    "LeaseLostError",
    "RedisCheckpointBackend",
    "StoreUnavailableError",
    "UnsupportedFormatError",
    "WrongKeyTypeError",
    "idempotency_key",
]
__version__ = "0.1.0"
