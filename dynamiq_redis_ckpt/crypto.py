"""Encryption at rest: the keys (from a user's provider or an environment variable) and the AES-256-GCM ciphers.

Off unless a backend is given ``encryption_keys`` or ``$DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS`` is set; then every pack
a save writes is sealed (see :func:`dynamiq_redis_ckpt.codec.wrap` and docs/encryption.md). ``cryptography`` is only
imported when encryption is on.

A provider is a callable returning ``(keys, current)``: ``keys`` maps a key id to its 32-byte key, ``current`` is the
id new packs are sealed with. It is called on every save and on every read of a sealed pack this process has not
decoded yet, so it may change what it returns (rotation) but must be cheap: cache in it, do not call a KMS there.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from typing import Any, Callable, Mapping

from dynamiq_redis_ckpt.errors import CheckpointCorruptedError, ConfigurationError, EncryptionKeyError

ENV = "DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS"
KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # 96 bits, random per blob
TAG_SIZE = 16
_KEY_ID = re.compile(r"[A-Za-z0-9._\-/+=@]{1,64}")  # printable, no ':' or ',' (the env form's separators)

SEALED_TEXT = "s1:"  # a sealed person's answer; answer JSON never starts with 's'
_ANSWER_AAD = b"dynamiq-redis-ckpt/answer/1\0"

Provider = Callable[[], "tuple[Mapping[str, bytes], str]"]


def parse_keys(spec: str, source: str = ENV) -> tuple[dict[str, bytes], str]:
    """``id1:base64key,id2:base64key`` -> ({id: key}, first id). The first key is the current one."""
    keys: dict[str, bytes] = {}
    current = None
    for number, item in enumerate((part.strip() for part in spec.split(",")), 1):
        if not item:
            continue
        key_id, sep, encoded = item.partition(":")
        if not sep:  # never quote the item: it may be a key given without its id
            raise ConfigurationError(f"{source}: item {number} is not key_id:base64key (items are comma separated)")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{source}: the key of id {key_id!r} is not valid base64") from None
        if key_id in keys:
            raise ConfigurationError(f"{source}: key id {key_id!r} appears twice")
        keys[key_id] = key
        current = current or key_id
    if current is None:
        raise ConfigurationError(f"{source} is set but holds no key")
    return check_keys(keys, current, source)


def check_keys(keys: Any, current: Any, source: str = "encryption_keys") -> tuple[dict[str, bytes], str]:
    """Validate what a provider returned; raises ConfigurationError (never printing a key)."""
    if not isinstance(keys, Mapping) or not keys:
        raise ConfigurationError(f"{source}: expected a non-empty mapping of key id to 32-byte key")
    for key_id, key in keys.items():
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise ConfigurationError(
                f"{source}: key id {key_id!r} must be 1 to 64 characters of letters, digits and ._-/+=@"
            )
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_SIZE:
            size = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise ConfigurationError(f"{source}: key {key_id!r} must be {KEY_SIZE} bytes (AES-256), got {size}")
    if current not in keys:
        raise ConfigurationError(f"{source}: the current key id {current!r} is not among the keys")
    return {k: bytes(v) for k, v in keys.items()}, current


class Sealer:
    """The ciphers of a backend's keys, asked of its provider on each use (ciphers are kept per key)."""

    def __init__(self, provider: Provider, source: str = "encryption_keys"):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # only when encryption is on

        self._aesgcm = AESGCM
        self._provider = provider
        self._source = source
        self._ciphers: dict[tuple[str, bytes], Any] = {}
        self._lock = threading.Lock()
        self.current_key_id()  # a provider that fails, or returns nonsense, fails the backend's construction

    def _keys(self) -> tuple[dict[str, bytes], str]:
        try:
            found = self._provider()
        except ConfigurationError:
            raise
        except Exception as e:
            raise ConfigurationError(f"{self._source}: the key provider raised {e!r}") from e
        if not isinstance(found, tuple) or len(found) != 2:
            raise ConfigurationError(f"{self._source}: the key provider must return (keys, current key id)")
        return check_keys(*found, self._source)

    def _cipher(self, key_id: str, key: bytes) -> Any:
        with self._lock:
            cipher = self._ciphers.get((key_id, key))
            if cipher is None:
                if len(self._ciphers) >= 64:  # a provider that rotates often: forget the old ones
                    self._ciphers.clear()
                cipher = self._ciphers[(key_id, key)] = self._aesgcm(key)
            return cipher

    def current_key_id(self) -> str:
        return self._keys()[1]

    def for_writing(self) -> tuple[str, Any]:
        """(current key id, its cipher)."""
        keys, current = self._keys()
        return current, self._cipher(current, keys[current])

    def for_reading(self, key_id: str) -> Any | None:
        """The cipher of ``key_id``, None when the provider does not have it."""
        keys, _ = self._keys()
        key = keys.get(key_id)
        return None if key is None else self._cipher(key_id, key)

    def __repr__(self) -> str:  # never the keys
        return f"Sealer(source={self._source!r})"


def sealer_for(option: Any) -> Sealer | None:
    """The sealer a backend's ``encryption_keys`` option asks for: a provider callable; None (the default) reads
    $DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS once, and is off when it is unset or empty; False is off whatever the
    environment says."""
    if option is False:
        return None
    if option is None:
        spec = os.environ.get(ENV, "").strip()
        if not spec:
            return None
        keys, current = parse_keys(spec)
        return Sealer(lambda: (keys, current), ENV)
    if not callable(option):
        raise ConfigurationError(
            "encryption_keys must be a callable returning ({key id: 32-byte key}, current key id), False or None"
        )
    return Sealer(option)


def seal_text(sealer: Sealer, plain: str, context: tuple[str, ...]) -> str:
    """A person's answer (JSON) sealed for the inbox: ``s1:`` and base64 of key id length, key id, nonce, ciphertext
    and tag, bound to ``context`` (flow, run, node) so an answer moved to another run or node fails."""
    key_id, cipher = sealer.for_writing()
    kid = key_id.encode("ascii")
    head = bytes([len(kid)]) + kid
    nonce = os.urandom(NONCE_SIZE)
    sealed = cipher.encrypt(nonce, plain.encode(), _answer_aad(head, context))
    return SEALED_TEXT + base64.b64encode(head + nonce + sealed).decode("ascii")


def _answer_aad(head: bytes, context: tuple[str, ...]) -> bytes:
    return _ANSWER_AAD + "\0".join(context).encode() + b"\0" + head


def open_text(sealer: Sealer | None, stored: str, context: tuple[str, ...], checkpoint_id: str, key: str) -> str:
    """Undo :func:`seal_text`; a stored answer that is not sealed (written with encryption off) is returned as is.
    Typed errors name ``checkpoint_id`` (the paused run's head): EncryptionKeyError for a key id not provided,
    CheckpointCorruptedError for an answer that fails authentication."""
    if not stored.startswith(SEALED_TEXT):
        return stored
    try:
        blob = base64.b64decode(stored[len(SEALED_TEXT) :], validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointCorruptedError(checkpoint_id, "a sealed answer is not base64", key) from None
    if not blob or len(blob) < 1 + blob[0] + NONCE_SIZE + TAG_SIZE:
        raise CheckpointCorruptedError(checkpoint_id, "a sealed answer is truncated", key)
    end = 1 + blob[0]
    key_id = blob[1:end].decode("ascii", "backslashreplace")
    cipher = sealer.for_reading(key_id) if sealer is not None else None
    if cipher is None:
        raise EncryptionKeyError(checkpoint_id, key_id, key, configured=sealer is not None)
    from cryptography.exceptions import InvalidTag

    try:
        plain = cipher.decrypt(blob[end : end + NONCE_SIZE], blob[end + NONCE_SIZE :], _answer_aad(blob[:end], context))
    except InvalidTag:
        raise CheckpointCorruptedError(
            checkpoint_id, f"a person's answer fails authentication under key id {key_id!r}", key
        ) from None
    return plain.decode()
