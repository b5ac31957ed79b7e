"""The catalog of flows: which flows a namespace holds checkpoints of, without a scan of the keyspace.

Sixteen sorted sets, ``P:catalog:{0..15}``, by :meth:`Keys.shard_of`; a member is a flow id, its score the last time
(client ms) a process saving a checkpoint of that flow said so; beside each, ``P:catalog:{n}:names`` holds the same
ids at score 0, so a listing pages through flows in id order and a flow saved again meanwhile keeps its place.
Every save of a new checkpoint sends those two ``ZADD`` in the pipeline of its lookup keys, before its script, at
most once per :data:`REGISTER_EVERY` seconds per flow and process (see :class:`Registrations`), so an entry's score
is never older than the flow's last save by more than that.

An entry outlives its flow's checkpoints until ``gc`` removes it (:func:`forget_op`): only when its score is older
than :data:`FORGET_AFTER` and the flow has nothing left, and only if the score is still the one read before that check
(a save in between writes a new score first, so its flow stays). Data saved before the catalog existed is added
once by :func:`rebuild_op`, which scans the keyspace (an explicit, operator-run repair; nothing else here scans).
"""

from __future__ import annotations

import base64
import json
import time

from dynamiq_redis_ckpt.keys import FLOW_SHARDS, HOME_SEP, Keys, glob_escape
from dynamiq_redis_ckpt.requests import Batch, Script, cmd, text

REGISTER_EVERY = 60.0  # seconds between one process's registrations of one flow
FORGET_AFTER = 600.0  # seconds: gc forgets only an entry older than this (a save registers every REGISTER_EVERY)


class Registrations:
    """When this process last registered each flow: a save registers its flow only when it is due."""

    LIMIT = 10_000  # flows remembered; beyond that the memory is dropped and flows are registered again

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def due(self, flow_id: str) -> bool:
        """Whether a save of ``flow_id`` should register it now."""
        at = self._at.get(flow_id)
        return at is None or time.monotonic() - at >= REGISTER_EVERY

    def done(self, flow_id: str) -> None:
        """A save that registered ``flow_id`` landed."""
        if len(self._at) >= self.LIMIT:
            self._at.clear()
        self._at[flow_id] = time.monotonic()


def register(keys: Keys, flow_id: str) -> tuple:
    """The commands that register ``flow_id`` (sent before the save script, in the same pipeline)."""
    shard = Keys.shard_of(flow_id)
    return (cmd("ZADD", keys.catalog(shard), int(time.time() * 1000), flow_id),
            cmd("ZADD", keys.catalog_names(shard), 0, flow_id))  # fmt: skip


def _cursor(flow: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(flow).encode()).decode().rstrip("=")


def _after(cursor: str) -> str | None:
    """The flow id a page ends at (None for the first page). A malformed cursor is a ValueError."""
    if not cursor:
        return None
    try:
        flow = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a cursor this command printed: {cursor!r}") from e
    if not isinstance(flow, str):
        raise ValueError(f"not a cursor this command printed: {cursor!r}")
    return flow


def flows_op(keys: Keys, cursor: str = "", limit: int = 100):
    """One page of the catalog in flow id order (bytewise): ``(flow ids, next cursor)``, the cursor ``""`` after the
    last page. One round trip of 16 bounded reads, whatever the namespace holds; a flow saved again between pages
    keeps its place, so every flow present throughout is listed once."""
    after = _after(cursor)
    low = "-" if after is None else b"(" + after.encode()
    reads = tuple(cmd("ZRANGEBYLEX", keys.catalog_names(shard), low, "+", "LIMIT", 0, limit + 1)
                  for shard in range(FLOW_SHARDS))  # fmt: skip
    replies = yield Batch(reads)
    ordered = sorted({bytes(f) if isinstance(f, (bytes, bytearray)) else str(f).encode()
                      for reply in replies for f in reply})  # fmt: skip
    page = [f.decode() for f in ordered[:limit]]
    return page, (_cursor(page[-1]) if len(ordered) > limit and page else "")


def all_flows_op(keys: Keys, page: int = 1000):
    """Every flow of the catalog, in id order (pages of ``page``)."""
    flows: list[str] = []
    cursor = ""
    while True:
        batch, cursor = yield from flows_op(keys, cursor, page)
        flows += batch
        if not cursor:
            return flows


def scores_op(keys: Keys, flows: list[str]):
    """The catalog's score of each flow (None: not in the catalog), in order."""
    if not flows:
        return []
    replies = yield Batch(tuple(cmd("ZSCORE", keys.catalog(Keys.shard_of(f)), f) for f in flows))
    return [None if r is None else float(r) for r in replies]


def forget_op(keys: Keys, flow: str, score: float):
    """Remove ``flow`` from the catalog if its score is still ``score`` (read before the caller found the flow empty):
    a save registering it since keeps it. True if removed."""
    shard = Keys.shard_of(flow)
    removed = yield Script("forget_flow", (keys.catalog(shard), keys.catalog_names(shard)), (flow, repr(score)))
    return removed == 1


def forgettable(score: float | None, now_ms: float | None = None) -> bool:
    """Whether an entry with ``score`` is old enough for gc to forget (when its flow has nothing left)."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    return score is not None and score < now_ms - FORGET_AFTER * 1000


def rebuild_op(keys: Keys, count: int = 1000):
    """Add every flow that has a flow index to the catalog (data saved before the catalog existed): a SCAN of the
    whole keyspace, cursor by cursor (``count`` keys a step). Returns how many flows were added."""
    pattern = f"{glob_escape(keys.prefix)}:flow:\\{{*}}"  # P:flow:{<home>}: the flow index, nothing after its tag
    cursor, found = 0, set()
    while True:
        cursor, names = yield cmd("SCAN", cursor, "MATCH", pattern, "COUNT", count)
        for name in names:
            flow = _flow_of_index(keys, text(name))
            if flow is not None:
                found.add(flow)
        if int(cursor) == 0:
            break
    if not found:
        return 0
    now = int(time.time() * 1000)
    adds = []
    for f in sorted(found):
        shard = Keys.shard_of(f)
        adds += [cmd("ZADD", keys.catalog(shard), "NX", now, f), cmd("ZADD", keys.catalog_names(shard), 0, f)]
    replies = yield Batch(tuple(adds))
    return sum(int(r) for r in replies[::2])


def _flow_of_index(keys: Keys, key: str) -> str | None:
    """The flow id of a flow index key ``P:flow:{<tag>}`` (a bucket's home names its flow), else None."""
    head = f"{keys.prefix}:flow:{{"
    if not key.startswith(head) or not key.endswith("}") or "}" in key[len(head) : -1]:
        return None
    tag = key[len(head) : -1]
    if tag == "%":
        return ""
    tag = tag.split("%b", 1)[0]  # a bucket's salt follows its escaped flow id (keys.tag)
    flow = tag.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")
    return None if HOME_SEP in flow else flow
