"""Routing requests over a Redis Cluster: which primary serves each command, and following its redirections.

The drivers send commands on raw connections (see :meth:`driver.SyncDriver._pipeline`); on a cluster they first ask
:func:`exchange` how to split them. It groups a request's commands by the primary that serves their slot (as the
client's slot map says), one pipeline per primary, and reads the replies: a ``MOVED`` updates the map and sends the
command again, an ``ASK`` (its slot is being migrated) sends it once more to the importing node after ``ASKING``, a
``NOSCRIPT`` loads the script on that node first. Every command names its slot by one key (a script by its first
declared key: the scripts touch one slot each, see :mod:`dynamiq_redis_ckpt.keys`). Commands without a key go to
one primary, except ``SCAN``, which walks every primary in turn behind one cursor (see :func:`scan_cursor`).

Sync and async clients (``redis.cluster.RedisCluster``, ``redis.asyncio.cluster.RedisCluster``) keep the same slot
map (``nodes_manager``); only the I/O differs, so :func:`exchange` is a generator both drivers run.
"""

from __future__ import annotations

from typing import Any, Generator

from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, NoScriptError

from dynamiq_redis_ckpt import scripts

MAX_REDIRECTS = 5  # rounds of MOVED/ASK a request follows before its last error stands (the driver then retries)
_KEYLESS = {b"PING", b"TIME", b"INFO", b"CONFIG", b"SCAN", b"WAIT", b"SCRIPT", b"ECHO", b"ASKING"}
_READS = {b"GET", b"GETRANGE", b"HGET", b"HGETALL", b"HMGET", b"SMEMBERS", b"SSCAN", b"ZRANGE", b"ZREVRANGE",
          b"ZRANGEBYSCORE", b"ZREVRANGEBYSCORE", b"ZCARD", b"ZCOUNT", b"ZSCORE", b"PTTL", b"TYPE", b"EXISTS",
          *_KEYLESS}  # fmt: skip


def writes(sends: list[tuple[Any, list[tuple]]]) -> bool:
    """Whether one of the pipelines writes (a script, a SET, ...): then they go one after another, in order, as a
    save's lookup keys must land before its script (see store.save); reads may go to every primary at once."""
    return any(_bytes(args[0]).upper() not in _READS for _, commands in sends for args in commands)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` is a Redis Cluster client (sync or asyncio)."""
    return hasattr(client, "nodes_manager") and hasattr(client, "get_primaries")


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def slot_of(args: tuple) -> int | None:
    """The slot a wired command addresses (its first key's), or None for a command without keys."""
    name = _bytes(args[0]).upper()
    if name in (b"EVALSHA", b"EVAL"):
        return key_slot(_bytes(args[3])) if int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return key_slot(_bytes(args[1]))


def primaries(client: Any) -> list:
    """The cluster's primaries in a stable order (by name), as the client's map knows them."""
    return sorted(client.get_primaries(), key=lambda node: node.name)


def _node_for(client: Any, args: tuple) -> Any:
    slot = slot_of(args)
    if slot is None:
        return primaries(client)[0]
    return client.nodes_manager.get_node_from_slot(slot)


def _redirected(client: Any, error: AskError) -> Any:
    node = client.nodes_manager.get_node(host=error.host, port=error.port)
    if node is None:  # a node the map does not know yet: follow the slot map once it is updated instead
        client.nodes_manager._moved_exception = error
    return node


def exchange(client: Any, wired: list[tuple], observer: Any = None) -> Generator[list, list[list], list]:
    """Send ``wired`` over the cluster; the reply to each, in order (error replies as exception objects).

    Yields ``[(node, commands), ...]``, one pipeline per primary, and receives their replies (each list as long as its
    commands); returns when no reply is a redirection or ``MAX_REDIRECTS`` rounds are spent. Each redirection
    followed is counted by ``observer.redis_error(kind)`` (moved, ask, noscript) when one is given."""
    replies: list = [None] * len(wired)
    scans = {i: _scan_target(client, args) for i, args in enumerate(wired) if _bytes(args[0]).upper() == b"SCAN"}
    wired = [scans[i][2] if i in scans else args for i, args in enumerate(wired)]
    asking: dict[int, Any] = {}
    load: dict[str, set[str]] = {}  # node name -> scripts it said it lacks
    pending = list(range(len(wired)))
    for _ in range(MAX_REDIRECTS + 1):
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i in pending:
            node = asking.get(i) or (scans[i][1] if i in scans else _node_for(client, wired[i]))
            groups.setdefault(node.name, (node, []))[1].append(i)
        sends, plan = [], []
        for name, (node, indexes) in groups.items():
            commands = [("SCRIPT", "LOAD", scripts.source(script)) for script in sorted(load.pop(name, ()))]
            where = []
            for i in indexes:
                if i in asking:
                    commands.append(("ASKING",))
                where.append(len(commands))
                commands.append(wired[i])
            sends.append((node, commands))
            plan.append((node, indexes, where))
        received = yield sends
        pending, asking = [], {}
        for (node, indexes, where), node_replies in zip(plan, received):
            for i, at in zip(indexes, where):
                reply = replies[i] = node_replies[at]
                if observer is not None and isinstance(reply, (AskError, NoScriptError)):
                    observer.redis_error("moved" if isinstance(reply, MovedError) else
                                         "ask" if isinstance(reply, AskError) else "noscript")  # fmt: skip
                if isinstance(reply, MovedError):
                    client.nodes_manager._moved_exception = reply
                    pending.append(i)
                elif isinstance(reply, AskError):
                    target = _redirected(client, reply)
                    if target is not None:
                        asking[i] = target
                    pending.append(i)
                elif isinstance(reply, NoScriptError):
                    load.setdefault(node.name, set()).add(scripts.name_of(wired[i][1]))
                    pending.append(i)
        if not pending:
            break
    for i, (index, _, _, count) in scans.items():
        if isinstance(replies[i], (list, tuple)):
            replies[i] = [next_scan_cursor(index, replies[i][0], count), replies[i][1]]
    return replies


def each(client: Any, args: tuple) -> Generator[list[tuple[Any, list[tuple]]], list[list], list]:
    """Send one command to every primary; their replies, in :func:`primaries` order."""
    nodes = primaries(client)
    received = yield [(node, [args]) for node in nodes]
    return [node_replies[0] for node_replies in received]


def _scan_target(client: Any, args: tuple) -> tuple[int, Any, tuple, int]:
    nodes = primaries(client)
    index, inner = scan_cursor(args[1], len(nodes))
    return index, nodes[index], (args[0], inner, *args[2:]), len(nodes)


def scan_cursor(cursor: Any, nodes: int) -> tuple[int, bytes]:
    """(index of the primary, that primary's cursor) of a cluster-wide SCAN cursor: ``b"0"`` starts at the first
    primary; the driver hands back ``b"<index>-<cursor>"`` while primaries remain, ``b"0"`` after the last."""
    value = _bytes(cursor)
    if value == b"0":
        return 0, b"0"
    index, _, inner = value.partition(b"-")
    if not inner or not index.isdigit():
        raise ValueError(f"not a cluster SCAN cursor: {value!r}")
    # a primary gone since the walk began (a failover): the walk goes on with the last one (keys may be missed, and
    # clear() says so: run it again)
    return min(int(index), nodes - 1), inner


def next_scan_cursor(index: int, node_cursor: Any, nodes: int) -> bytes:
    """The cluster-wide cursor after primary ``index`` answered ``node_cursor``."""
    if _bytes(node_cursor) != b"0":
        return b"%d-%s" % (index, _bytes(node_cursor))
    return b"0" if index + 1 >= nodes else b"%d-0" % (index + 1)
