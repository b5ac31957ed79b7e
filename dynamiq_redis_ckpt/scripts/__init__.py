"""Lua scripts, one ``.lua`` file per operation, read once from package data.

redis-py's ``Script`` objects run them: EVALSHA first, and on NOSCRIPT (server restart, SCRIPT FLUSH) they load
the source and retry, so a script is sent in full only when the server has lost it.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

NAMES = ("save", "delete", "prune", "renew", "release", "claim", "deliver")


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
