"""The least-privilege Redis ACL user for one namespace (prefix); docs/security.md explains each part.

Key patterns: one per kind of key (:data:`keys.KINDS`), each ending in ``:{*`` like every key of that kind. A bare
``~app:*`` would also grant the keys of a namespace nested under it (``app:eu:cp:{...}``); ``~app:cp:{*`` cannot,
because a prefix holds no braces. Glob characters of the prefix are escaped, so ``t*`` grants ``t*`` only.

Commands: exactly what the package sends (every ``cmd("...")``, the ``redis.call`` of every Lua script, which
Redis checks against the same user) plus what the drivers and the worker's /metrics send themselves.
"""

from __future__ import annotations

from dynamiq_redis_ckpt.keys import KINDS, glob_escape

# Sent by the store and lease operations and inside the Lua scripts, by data type.
DATA_COMMANDS = (
    "del", "exists", "get", "getrange", "set", "setrange", "strlen", "pexpire", "persist", "pttl", "type", "unlink",
    "object|idletime",  # keys, strings (gc's lookups: how long a key went untouched)
    "hdel", "hexists", "hget", "hgetall", "hincrby", "hmget", "hset",  # hashes
    "sadd", "smembers", "spop", "srem", "sscan",  # sets
    "zadd", "zcard", "zcount", "zrange", "zrangebylex", "zrangebyscore", "zrem", "zrevrange", "zrevrangebyscore",
    "zscore",  # zsets
)  # fmt: skip
# Not tied to a key: the scripts' transport, the server clock, health, clear()'s walk, the worker's build info, the
# eviction check (maxmemory-policy, read from INFO memory: CONFIG GET could read requirepass).
SERVER_COMMANDS = ("evalsha", "script|load", "time", "ping", "scan", "info|server", "info|memory")
COMMANDS = DATA_COMMANDS + SERVER_COMMANDS
# What redis-py's cluster clients send besides: the slot map (CLUSTER SLOTS, at start and after a MOVED) and the
# command table (COMMAND, read once to find the keys of commands).
CLUSTER_COMMANDS = ("cluster|slots", "command")


def key_patterns(prefix: str) -> tuple[str, ...]:
    """The ACL key patterns granting every key of namespace ``prefix`` and no other key."""
    escaped = glob_escape(prefix)
    return tuple(f"~{escaped}:{kind}:{{*" for kind in KINDS)


def acl_args(prefix: str, password: str, cluster: bool = False) -> list[str]:
    """The ``ACL SETUSER <user>`` arguments after the user name (send them as separate arguments); ``cluster``
    adds what a Redis Cluster client needs (set the user on every node)."""
    commands = COMMANDS + (CLUSTER_COMMANDS if cluster else ())
    return ["on", f">{password}", "resetkeys", *key_patterns(prefix), "resetchannels", "-@all",
            *(f"+{c}" for c in commands)]  # fmt: skip


def acl_rule(prefix: str, password: str, user: str = "ckpt", cluster: bool = False) -> str:
    """The whole rule as one line for ``redis-cli`` or an ACL file (a prefix or password with spaces or quotes
    needs quoting there; :func:`acl_args` needs none)."""
    return " ".join(["ACL", "SETUSER", user, *acl_args(prefix, password, cluster)])
