"""The Redis requests an operation yields to a driver, and helpers that read replies. Plain data: no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Command:
    """One Redis command; the reply is what redis-py returns for it (bytes, not decoded)."""

    args: tuple[Any, ...]


@dataclass(frozen=True)
class Batch:
    """Several commands sent in one round trip (a non-transactional pipeline); the reply is a list."""

    commands: tuple[Command, ...]


@dataclass(frozen=True)
class Each:
    """One command for every primary of a Redis Cluster (once on a single server); the reply is a list of theirs."""

    command: Command


@dataclass(frozen=True)
class Sleep:
    """A pause inside an operation (a retry's back-off): ``time.sleep`` or ``asyncio.sleep`` by the driver."""

    seconds: float


@dataclass(frozen=True)
class Script:
    """A Lua script from ``dynamiq_redis_ckpt/scripts`` run with EVALSHA (loaded again after NOSCRIPT)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


def cmd(*args: Any) -> Command:
    """Shorthand for :class:`Command`."""
    return Command(args)


def text(value: bytes | str | int | None) -> str:
    """A Redis reply value as str ('' for nil)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def pairs(flat: list) -> dict:
    """A flat [field, value, ...] reply as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def server_ms(reply) -> int:
    """A TIME reply (seconds, microseconds) as the server's clock in ms."""
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def score_pairs(rows: list) -> list[tuple[float, str]]:
    """ZRANGE ... WITHSCORES replies, flat (raw RESP2) or already paired by a client callback."""
    if rows and isinstance(rows[0], (list, tuple)):
        return [(float(score), text(member)) for member, score in rows]
    return [(float(rows[i + 1]), text(rows[i])) for i in range(0, len(rows), 2)]
