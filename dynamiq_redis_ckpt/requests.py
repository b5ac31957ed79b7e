"""The Redis requests an operation yields to a driver. Plain data: no I/O, no redis import."""

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
class Script:
    """A Lua script from ``dynamiq_redis_ckpt/scripts`` run with EVALSHA (loaded again after NOSCRIPT)."""

    name: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


def cmd(*args: Any) -> Command:
    """Shorthand for :class:`Command`."""
    return Command(args)
