"""Lua scripts, one ``.lua`` file per operation, read once from package data.

The drivers send EVALSHA (alone or inside a pipeline) and, on NOSCRIPT (server restart, SCRIPT FLUSH), load the
source and send again, so a script travels in full only when the server has lost it. The scripts that read or count
content packs start with the shared ``_packs.lua``.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.resources import files

NAMES = (
    "save", "load", "packs", "delete", "prune", "renew", "release", "claim", "deliver", "wakes", "due", "settle",
    "retry_dead", "clear_lease", "expire", "forget_flow",
)
_WITH_PACKS = ("save", "load", "packs", "delete")


@cache
def source(name: str) -> str:
    """The Lua source of script ``name``."""
    if name not in NAMES:
        raise KeyError(name)
    text = files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _WITH_PACKS:
        text = files(__name__).joinpath("_packs.lua").read_text(encoding="utf-8") + "\n" + text
    return text


@cache
def sha(name: str) -> str:
    """The SHA1 that EVALSHA names script ``name`` by."""
    return hashlib.sha1(source(name).encode("utf-8")).hexdigest()


def name_of(sha_or_bytes: str | bytes) -> str:
    """The name of the script whose SHA1 is given (a NOSCRIPT reply names only the SHA1 that was sent)."""
    wanted = sha_or_bytes.decode() if isinstance(sha_or_bytes, bytes) else sha_or_bytes
    for name in NAMES:
        if sha(name) == wanted:
            return name
    raise KeyError(wanted)
