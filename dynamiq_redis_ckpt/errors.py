"""Exceptions raised by dynamiq-redis-ckpt.

Every exception derives from :class:`CheckpointStoreError`. Where Dynamiq's own backends raise a builtin type
(``FileNotFoundError`` for an update of a missing checkpoint), ours subclasses that type too, so code written
against Dynamiq's backends keeps catching what it caught.
"""

from __future__ import annotations


class CheckpointStoreError(Exception):
    """Root of every error this package raises."""


class ConfigurationError(CheckpointStoreError):
    """An option given to the backend is invalid (bad url, prefix with braces, negative ttl, ...).

    Raised as itself, not wrapped in pydantic's ValidationError (which only wraps ValueError).
    """


class CheckpointNotFoundError(CheckpointStoreError, FileNotFoundError):
    """``update`` was called for a checkpoint id that is not stored."""

    def __init__(self, checkpoint_id: str):
        super().__init__(f"Checkpoint {checkpoint_id} not found")
        self.checkpoint_id = checkpoint_id


class CheckpointTooLargeError(CheckpointStoreError, ValueError):
    """The encoded checkpoint exceeds ``max_checkpoint_bytes``; nothing was written."""

    def __init__(self, checkpoint_id: str, size: int, limit: int):
        super().__init__(f"Checkpoint {checkpoint_id} encodes to {size} bytes, above max_checkpoint_bytes={limit}")
        self.checkpoint_id = checkpoint_id
        self.size = size
        self.limit = limit


class CheckpointEncodeError(CheckpointStoreError, TypeError):
    """A value in the checkpoint cannot be represented; names the node and field that hold it."""

    def __init__(self, checkpoint_id: str, path: tuple, value: object, problem: str | None = None):
        self.checkpoint_id = checkpoint_id
        self.path = tuple(path)
        self.node_id = path[1] if len(path) > 1 and path[0] == "node_states" else None
        self.field = path[2] if self.node_id is not None and len(path) > 2 else (path[0] if path else None)
        where = f"node {self.node_id!r} field {self.field!r}" if self.node_id is not None else f"field {self.field!r}"
        dotted = ".".join(str(p) for p in path)
        problem = problem or f"holds a value of type {type(value).__qualname__} that cannot be stored"
        super().__init__(f"Checkpoint {checkpoint_id}: {where} {problem} (at {dotted})")


class CheckpointCorruptedError(CheckpointStoreError):
    """A stored checkpoint cannot be decoded: truncated or corrupted data, or a checksum mismatch."""

    def __init__(self, checkpoint_id: str, reason: str, key: str | None = None):
        super().__init__(f"Checkpoint {checkpoint_id} is corrupted: {reason}" + (f" (key {key})" if key else ""))
        self.checkpoint_id = checkpoint_id
        self.reason = reason
        self.key = key


class UnsupportedFormatError(CheckpointStoreError):
    """The checkpoint was written in a storage format this reader does not understand (newer, or pre-release)."""

    def __init__(self, checkpoint_id: str, version: str, supported: int):
        super().__init__(
            f"Checkpoint {checkpoint_id} uses storage format {version}; this version of dynamiq-redis-ckpt reads "
            f"format {supported}. A newer format needs a newer dynamiq-redis-ckpt."
        )
        self.checkpoint_id = checkpoint_id
        self.version = version


class EncryptionKeyError(CheckpointStoreError):
    """A checkpoint's content was encrypted (see docs/encryption.md) with a key this backend is not given: the key id
    its pack names is not among the provider's keys, or the backend has no encryption keys at all. Nothing is
    decoded; give the backend that key (keep retired keys in the provider until no checkpoint needs them)."""

    def __init__(self, checkpoint_id: str, key_id: str, key: str | None = None, configured: bool = True):
        why = (
            f"the encryption key provider has no key with id {key_id!r}"
            if configured
            else f"this backend has no encryption keys (pass encryption_keys or set "
            f"DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS; the pack names key id {key_id!r})"
        )
        where = f" (key {key})" if key else ""
        super().__init__(f"Checkpoint {checkpoint_id} is encrypted and cannot be read: {why}{where}")
        self.checkpoint_id = checkpoint_id
        self.key_id = key_id
        self.key = key


class WrongKeyTypeError(CheckpointStoreError):
    """A key in this backend's namespace holds a value of the wrong Redis type (written by something else)."""

    def __init__(self, detail: str, keys: tuple[str, ...] = ()):
        super().__init__(f"A key in the checkpoint namespace holds the wrong Redis type: {detail}; keys: {keys}")
        self.keys = keys


class StoreUnavailableError(CheckpointStoreError, ConnectionError):
    """Redis could not be reached, or timed out, after the configured retries."""


class TLSError(StoreUnavailableError):
    """The TLS handshake with Redis failed on a certificate: the server's is not signed by the trusted CA, or is not
    valid for the host in the url. Raised at once, not retried: waiting does not fix a certificate. A
    StoreUnavailableError too, so code that handles an unreachable Redis handles this."""


class AlreadyAnsweredError(CheckpointStoreError):
    """A person's answer for a node that has one already: the first answer stands, a later one is refused."""

    def __init__(self, run_id: str, node_id: str):
        super().__init__(f"Node {node_id} of run {run_id} has an answer already; the first answer stands")
        self.run_id = run_id
        self.node_id = node_id


class RunNotWaitingError(ConfigurationError):
    """An answer for a run that is not paused waiting for a person: no such run waits (``running`` False), or it is
    running now under a live lease (``running`` True). A ConfigurationError too, as versions before it raised."""

    def __init__(self, message: str, run_id: str, running: bool = False):
        super().__init__(message)
        self.run_id = run_id
        self.running = running


class LeaseLostError(BaseException):
    """This process no longer holds the run's lease: another worker or process took the run over.

    A ``BaseException`` on purpose (as ``asyncio.CancelledError`` is): Dynamiq logs and swallows any ``Exception`` a
    save raises, and a run that lost its lease must stop at its next checkpoint, not carry on writing nothing.
    ``flow.run_sync`` ends by raising it. None of the run's later writes land.
    """

    def __init__(self, run_id: str, reason: str, kind: str = "taken_over"):
        super().__init__(f"Lease of run {run_id} lost: {reason}")
        self.run_id = run_id
        self.reason = reason
        self.kind = kind  # how, in one word: taken_over, vanished, unconfirmed, claimed, retired (a metric label)
