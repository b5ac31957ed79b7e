"""Lua scripts, one ``.lua`` file per operation, read once from package data.

The drivers send EVALSHA (alone or inside a pipeline) and, on NOSCRIPT (server restart, SCRIPT FLUSH), load the
source and send again, so a script travels in full only when the server has lost it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

NAMES = ("save", "load", "delete", "prune", "renew", "release", "claim", "deliver")


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    return files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


@cache
def sha(name: str) -> str:
    """The SHA1 that EVALSHA names script ``name`` by."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()
