"""Reading a namespace's history for people: pages of runs and checkpoints, a run's history as a tree, per-flow
figures. Store operations (generators of :mod:`requests <dynamiq_redis_ckpt.requests>`, run by
``backend.execute``), written for the command line (:mod:`dynamiq_redis_ckpt.cli.browse`); nothing here prints.

Every read starts from a key it can name: a flow's indexes (``keys.flow_homes``), a run's index, a checkpoint's
locator, never a scan of the keyspace. A listing pages by position in a flow's index: the score (created_at, µs),
then the home and id, so equal scores neither repeat nor drop an entry; its cursor is that position, encoded. (Never
by offset: a delete between two pages would shift the later entries down and one would be skipped.)

Damaged data is reported as such, never as data and never as a traceback: a row whose hash fields are missing or
not numbers, or whose content cannot be decoded, carries ``damaged`` (the reason); a lease key of another type is a
damaged lease, not a refusal of the checkpoints it decorates.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Generator

from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt import codec
from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError, CheckpointStoreError, EncryptionKeyError, StoreUnavailableError, UnsupportedFormatError,
    WrongKeyTypeError)  # fmt: skip
from dynamiq_redis_ckpt.keys import flow_homes, flow_of
from dynamiq_redis_ckpt.requests import Batch, cmd, pairs, score_pairs, text
from dynamiq_redis_ckpt.store import Record, StoreCore

Op = Generator[Any, Any, Any]
_CHUNK = 200  # index entries (and hashes) read per round trip
_PACK_COUNT = 8  # a pack string starts with its reference count, 8 ASCII digits (see save.lua)
_MAX_LINEAGE = 1_000_000  # checkpoints a history tree may hold (a guard against a cycle of parent links)
_LEASE_FIELDS = ("owner", "token", "exp", "head")
_NUMERIC_FIELDS = ("ts", "size", "raw", "kids", "fmt")  # hash fields that hold integers


class ParentCycleError(CheckpointStoreError):
    """The parent links of a flow's checkpoints form a cycle (damaged hashes): a history tree has no root."""


def _int(value: str | None, default: int | None = 0) -> int | None:
    """A hash field as an int: ``default`` when absent or empty, None when it is not a number (damaged)."""
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        return None


def field_damage(fields: dict[str, str]) -> str:
    """Why a checkpoint hash's fields are damaged ('' when they are whole): its status or time missing, a numeric
    field that is not a number."""
    problems = [f"no {name!r}" for name in ("st", "ts") if not fields.get(name)]
    problems += [f"{name}={fields[name]!r}" for name in _NUMERIC_FIELDS
                 if fields.get(name) and _int(fields[name]) is None]  # fmt: skip
    return f"hash fields damaged: {', '.join(problems)}" if problems else ""


def _ascending_page(key: str, low: int | str, after: tuple[int, str] | None, count: int) -> Op:
    """Up to about ``count`` entries (score, member) of the sorted set ``key`` from score ``low`` up, oldest first,
    that follow ``after`` (an entry already read), and whether more may follow. Paged by position (score, then
    member), not by offset, so an entry deleted between pages does not make the next page skip one."""
    if after is None:
        reply = yield cmd("ZRANGEBYSCORE", key, low, "+inf", "WITHSCORES", "LIMIT", 0, count)
        entries = [(int(score), member) for score, member in score_pairs(reply)]
        return entries, len(entries) == count
    score, member = after
    same, higher = yield Batch((cmd("ZRANGEBYSCORE", key, score, score, "WITHSCORES"),
                                cmd("ZRANGEBYSCORE", key, f"({score}", "+inf", "WITHSCORES", "LIMIT", 0, count)))
    entries = [(score, m) for _, m in score_pairs(same) if m.encode() > member.encode()]  # ZRANGE's order of ties
    following = [(int(s), m) for s, m in score_pairs(higher)]
    return entries + following, len(following) == count


# ---- positions and cursors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Position:
    """Where an entry sits in a listing (``key`` orders them): newest first, then by home, then by id in reverse, as
    ZREVRANGEBYSCORE orders the members of one score (byte by byte)."""

    score: int
    home: str
    member: str

    @property
    def key(self) -> tuple:
        return (-self.score, self.home, tuple(-b for b in self.member.encode()) + (1,))


def encode_cursor(position: Position) -> str:
    """The cursor a page prints: its last entry's position, as url-safe base64 of JSON."""
    raw = json.dumps([position.score, position.home, position.member]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position | None:
    """The position a cursor names (None for ``""``, the first page); a ValueError for one no page printed."""
    if not cursor:
        return None
    try:
        score, home, member = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(score, int) or not isinstance(home, str) or not isinstance(member, str):
            raise TypeError("wrong field types")
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a cursor this command printed: {cursor!r}") from e
    return Position(score, home, member)


def _index_page(sources: list[tuple[str, str]], after: Position | None, count: int) -> Op:
    """Up to ``count`` entries of the merged indexes ``sources`` ((home, index key) pairs) that follow ``after``, in
    listing order, and whether more follow. One round trip: from each index the ``count + 1`` entries below the
    position's score and those at its score (rarely more than one), so the merge is exact."""
    top = "+inf" if after is None else f"({after.score}"
    reads = []
    for _, key in sources:
        reads.append(cmd("ZREVRANGEBYSCORE", key, top, "-inf", "WITHSCORES", "LIMIT", 0, count + 1))
        if after is not None:
            reads.append(cmd("ZRANGEBYSCORE", key, after.score, after.score, "WITHSCORES"))
    replies = yield Batch(tuple(reads))
    per_source = 2 if after is not None else 1
    found: set[Position] = set()
    for i, (home, _) in enumerate(sources):
        for reply in replies[i * per_source : (i + 1) * per_source]:
            found.update(Position(int(score), home, member) for score, member in score_pairs(reply))
    if after is not None:
        found = {p for p in found if p.key > after.key}
    ordered = sorted(found, key=lambda p: p.key)
    return ordered[:count], len(ordered) > count


# ---- what the listings show ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """A run's lease as stored: who holds it (``owner`` '' when handed back), its token, when it runs out (server ms),
    whether it is live now, and the run's newest checkpoint in the server's order (``head``)."""

    owner: str
    token: int
    expires_ms: int
    live: bool
    head: str
    damaged: str = ""  # why the lease cannot be read ('' when it can): the run's checkpoints are still shown

    def as_dict(self) -> dict:
        return {"owner": self.owner or None, "token": self.token, "expires_at": self.expires_ms / 1000 or None,
                "live": self.live, "head": self.head or None, "damaged": self.damaged or None}  # fmt: skip


def _lease(reply: list, now_ms: int) -> Lease | None:
    owner, token, exp, head = (text(v) for v in reply)
    if not token and not head:
        return None
    expires, number = _int(exp), _int(token)
    if expires is None or number is None:
        return Lease(owner, 0, 0, False, head, f"lease fields damaged: token={token!r}, exp={exp!r}")
    return Lease(owner, number, expires, bool(owner) and expires > now_ms, head)


def leases_op(store: StoreCore, runs: list[tuple[str, str]]) -> Op:
    """The lease of each (home, run key), in order (None for a run without one). The lease only decorates a listing:
    a lease key of another type is a damaged :class:`Lease`, not a refusal of the listing."""
    if not runs:
        return []
    now_ms = yield from _now_ms()
    reads = tuple(cmd("HMGET", store.keys.lease(h, r), *_LEASE_FIELDS) for h, r in runs)
    try:
        return [_lease(reply, now_ms) for reply in (yield Batch(reads))]
    except WrongKeyTypeError:  # rare: find which, and read the others
        types = [text(t) for t in (yield Batch(tuple(cmd("TYPE", store.keys.lease(h, r)) for h, r in runs)))]
        readable = [i for i, kind in enumerate(types) if kind in ("hash", "none")]
        replies = dict(zip(readable, (yield Batch(tuple(reads[i] for i in readable))) if readable else []))
        return [_lease(replies[i], now_ms) if i in replies
                else Lease("", 0, 0, False, "", f"lease key {store.keys.lease(h, r)} holds a {types[i]}, not a hash")
                for i, (h, r) in enumerate(runs)]  # fmt: skip


def _now_ms() -> Op:
    seconds, micros = yield cmd("TIME")
    return int(seconds) * 1000 + int(micros) // 1000


def _run_key(fields: dict[str, str]) -> str:
    return fields.get("wf") or fields.get("run", "")


def _decoded(fields: dict) -> dict[str, str]:
    return {text(k): text(v) for k, v in fields.items()}


@dataclass
class FlowSummary:
    """One flow at a glance: checkpoints in its indexes, runs holding a live lease, its newest checkpoint's time."""

    flow: str
    checkpoints: int
    live_runs: int
    newest_at: float | None  # epoch seconds

    def as_dict(self) -> dict:
        return {"flow": self.flow, "checkpoints": self.checkpoints, "live_runs": self.live_runs,
                "newest_at": self.newest_at}  # fmt: skip


def flow_summaries_op(store: StoreCore, flows: list[str]) -> Op:
    """A :class:`FlowSummary` of each flow, in order: two round trips whatever their number."""
    now_ms = yield from _now_ms()
    k, homes = store.keys, [flow_homes(flow, store.buckets) for flow in flows]
    reads = []
    for home in (h for hs in homes for h in hs):
        reads += [cmd("ZCARD", k.flow_index(home)), cmd("ZCOUNT", k.lease_index(home), f"({now_ms}", "+inf"),
                  cmd("ZREVRANGE", k.flow_index(home), 0, 0, "WITHSCORES")]  # fmt: skip
    replies = (yield Batch(tuple(reads))) if reads else []
    out, i = [], 0
    for flow, hs in zip(flows, homes):
        count = live = 0
        newest = None
        for _ in hs:
            count, live = count + int(replies[i]), live + int(replies[i + 1])
            for score, _member in score_pairs(replies[i + 2]):
                newest = max(newest or 0.0, score / 1e6)
            i += 3
        out.append(FlowSummary(flow, count, live, newest))
    return out


def flow_exists_op(store: StoreCore, flow: str) -> Op:
    """Whether any home of ``flow`` has a flow index (a checkpoint, or an entry not pruned yet)."""
    homes = flow_homes(flow, store.buckets)
    if not homes:
        return False
    found = yield Batch(tuple(cmd("EXISTS", store.keys.flow_index(h)) for h in homes))
    return any(int(n) for n in found)


@dataclass
class RunRow:
    """One run of a flow: its key (wf_run_id), when it started (its oldest checkpoint still stored), its newest
    checkpoint's id, status and time, how many checkpoints it has and the bytes their saves stored (new content,
    compressed), its lease, and why its data is damaged ('' when it is whole)."""

    flow: str
    run: str
    home: str
    status: str
    newest: str
    created_at: float | None
    started_at: float
    checkpoints: int = 0
    stored_bytes: int = 0
    lease: Lease | None = None
    damaged: str = ""

    def as_dict(self) -> dict:
        return {"run": self.run, "flow": self.flow, "status": self.status or None, "checkpoints": self.checkpoints,
                "stored_bytes": self.stored_bytes, "started_at": self.started_at, "created_at": self.created_at,
                "newest_checkpoint": self.newest, "lease": self.lease.as_dict() if self.lease else None,
                "damaged": self.damaged or None}  # fmt: skip


def runs_page_op(store: StoreCore, flow: str, *, cursor: str = "", limit: int = 50, status: str | None = None) -> Op:
    """A page of ``flow``'s runs, the latest started first, and the next page's cursor ('' after the last).

    A run is listed at its oldest checkpoint still stored (the tail of its run index), which a save does not move:
    a run that saves between two pages keeps its place and appears on exactly one page. (A run whose oldest
    checkpoint is deleted between pages moves to its next one, newer: it may land on a page already printed.) With
    ``status`` only runs whose newest checkpoint has that status; each run's newest is read, so the whole flow
    index is walked."""
    k, after = store.keys, decode_cursor(cursor)
    homes = flow_homes(flow, store.buckets)
    sources = [(h, k.flow_index(h)) for h in homes]
    rows: list[RunRow] = []
    next_cursor = ""
    while len(rows) < limit:
        entries, more = yield from _index_page(sources, after, _CHUNK)
        if not entries:
            break
        hashes = yield Batch(tuple(cmd("HMGET", k.checkpoint(p.home, p.member), "run", "wf") for p in entries))
        keys = [text(wf) or text(run) for run, wf in hashes]  # '' for a hash expired meanwhile
        labelled = [(p, key) for p, key in zip(entries, keys) if key]
        run_indexes = [k.run_index(p.home, key) for p, key in labelled]
        ends_of = [c for index in run_indexes for c in (cmd("ZRANGE", index, 0, 0), cmd("ZREVRANGE", index, 0, 0))]
        ends = (yield Batch(tuple(ends_of))) if ends_of else []  # each run's oldest and newest checkpoint
        firsts: dict[Position, tuple[str, str]] = {}  # a run's oldest checkpoint -> (run key, its newest checkpoint)
        for i, (p, key) in enumerate(labelled):
            oldest, newest = ends[2 * i], ends[2 * i + 1]
            if oldest and newest and text(oldest[0]) == p.member:
                firsts[p] = (key, text(newest[0]))
        heads = yield from _fields_of(store, [(p.home, newest) for p, (_, newest) in firsts.items()], "st", "ts")
        newest_fields = {p: (text(st), text(ts)) for p, (st, ts) in zip(firsts, heads)}
        stopped = False
        for p in entries:
            after = p
            if p not in firsts:
                continue  # expired meanwhile, or not its run's oldest: the run is listed at its oldest
            (key, newest), (st, ts) = firsts[p], newest_fields[p]
            if status is not None and st != status:
                continue
            created = _int(ts, None)
            damage = "" if st and created is not None else f"newest checkpoint {newest}: no status or time"
            rows.append(RunRow(flow, key, p.home, st, newest, created and created / 1e6, p.score / 1e6,
                               damaged=damage))  # fmt: skip
            if len(rows) == limit:
                stopped = True
                break
        if stopped:
            rest = entries[entries.index(after) + 1 :]
            next_cursor = encode_cursor(after) if rest or more else ""
            break
        if not more:
            break
    if rows:
        yield from _fill_runs(store, rows)
    return rows, next_cursor


def _fill_runs(store: StoreCore, rows: list[RunRow]) -> Op:
    """Each run's checkpoint count, stored bytes (the sum of its checkpoints' ``size``) and lease; a checkpoint
    whose size is not a number marks its run damaged."""
    k = store.keys
    replies = yield Batch(tuple(cmd("ZRANGE", k.run_index(row.home, row.run), 0, -1) for row in rows))
    members = [[text(m) for m in reply] for reply in replies]
    for row, lease in zip(rows, (yield from leases_op(store, [(row.home, row.run) for row in rows]))):
        row.lease = lease
    sizes = yield from _fields_of(store, [(row.home, m) for row, ms in zip(rows, members) for m in ms], "size")
    i = 0
    for row, ms in zip(rows, members):
        found = [(m, text(s)) for m, (s,) in zip(ms, sizes[i : i + len(ms)]) if s is not None]
        bad = [m for m, s in found if _int(s) is None]
        row.checkpoints, row.stored_bytes = len(found), sum(_int(s) or 0 for _, s in found)
        if bad and not row.damaged:
            row.damaged = f"checkpoint {bad[0]}: hash field size is not a number"
        i += len(ms)


def _fields_of(store: StoreCore, checkpoints: list[tuple[str, str]], *names: str) -> Op:
    """HMGET ``names`` of each (home, id), in round trips of ``_CHUNK``."""
    out: list = []
    for start in range(0, len(checkpoints), _CHUNK):
        page = checkpoints[start : start + _CHUNK]
        out += yield Batch(tuple(cmd("HMGET", store.keys.checkpoint(h, m), *names) for h, m in page))
    return out


@dataclass
class CheckpointRow:
    """One checkpoint of a listing: its hash's fields, its decoded node counts (None when it could not be decoded),
    its run's lease, and why it is damaged ('' when it is whole: its fields are, and it decodes, or it is sealed
    with a key this process lacks)."""

    flow: str
    home: str
    id: str
    fields: dict[str, str]
    nodes_completed: int | None = None
    nodes_total: int | None = None
    lease: Lease | None = None
    damaged: str = ""

    @property
    def run(self) -> str:
        return _run_key(self.fields)

    def as_dict(self) -> dict:
        f = self.fields
        created = _int(f.get("ts"), None)
        return {"id": self.id, "flow": self.flow, "run": self.run, "run_id": f.get("run"), "status": f.get("st"),
                "parent": f.get("par") or None, "nodes_completed": self.nodes_completed,
                "nodes_total": self.nodes_total, "stored_bytes": _int(f.get("size")),
                "raw_bytes": _int(f.get("raw")), "created_at": None if created is None else created / 1e6,
                "lease": self.lease.as_dict() if self.lease else None, "damaged": self.damaged or None}  # fmt: skip


def checkpoints_page_op(store: StoreCore, flow: str, *, run: str | None = None, status: str | None = None,
                        cursor: str = "", limit: int = 50) -> Op:  # fmt: skip
    """A page of ``flow``'s checkpoints, newest first (of one run, one status, or both), and the next cursor. A
    damaged checkpoint is listed with ``damaged`` set, never as healthy data."""
    k, after = store.keys, decode_cursor(cursor)
    homes = flow_homes(flow, store.buckets)
    if run is not None:
        sources = [(h, k.run_index(h, run)) for h in homes]
    else:
        sources = [(h, k.status_index(h, status) if status else k.flow_index(h)) for h in homes]
    rows: list[CheckpointRow] = []
    next_cursor = ""
    while len(rows) < limit:
        entries, more = yield from _index_page(sources, after, min(_CHUNK, limit - len(rows)))
        if not entries:
            break
        hashes = yield Batch(tuple(cmd("HGETALL", k.checkpoint(p.home, p.member)) for p in entries))
        for p, fields in zip(entries, hashes):
            fields = _decoded(pairs(fields) if isinstance(fields, list) else fields)
            if fields and (run is None or status is None or fields.get("st") == status):
                rows.append(CheckpointRow(flow, p.home, p.member, fields, damaged=field_damage(fields)))
        after = entries[-1]
        if not more:
            break
        if len(rows) >= limit:
            next_cursor = encode_cursor(after)
    yield from _fill_checkpoints(store, rows)
    return rows, next_cursor


def _fill_checkpoints(store: StoreCore, rows: list[CheckpointRow]) -> Op:
    """Node counts (the checkpoints decoded, a page at a time; one by one when the page fails, so one damaged
    checkpoint does not blank the others) and the leases of their runs."""
    if not rows:
        return
    records = [Record(row.home, row.id, {name: value.encode() for name, value in row.fields.items()}) for row in rows]
    decoded, damaged = yield from _decode_each(store, records)
    for row in rows:
        cp = decoded.get(row.id)
        if cp is not None:
            row.nodes_completed, row.nodes_total = len(cp.completed_node_ids), node_count(cp)
        elif row.id in damaged:
            row.damaged = "; ".join(filter(None, (row.damaged, damaged[row.id])))
    runs = list(dict.fromkeys((row.home, row.run) for row in rows))
    leases = dict(zip(runs, (yield from leases_op(store, runs))))
    for row in rows:
        row.lease = leases[(row.home, row.run)]


def _decode_each(store: StoreCore, records: list[Record]) -> Op:
    """The checkpoints of ``records`` that decode, by id, and why each damaged one does not. The page is decoded at
    once; when that fails (a pack key of another type fails the whole read) each record is decoded alone. A sealed
    checkpoint without its key is neither: its content is unknown here, not damaged."""
    damaged: list[tuple[Record, Exception]] = []
    try:
        found = yield from store._decode(records, damaged=damaged)
        return {cp.id: cp for cp in found}, {rec.id: str(e) for rec, e in damaged}
    except StoreUnavailableError:
        raise
    except CheckpointStoreError:
        pass
    decoded, reasons = {}, {}
    for rec in records:
        damaged = []
        try:
            decoded |= {cp.id: cp for cp in (yield from store._decode([rec], damaged=damaged))}
        except (CheckpointCorruptedError, UnsupportedFormatError, WrongKeyTypeError) as e:
            damaged.append((rec, e))
        except EncryptionKeyError:
            pass
        reasons |= {r.id: str(e) for r, e in damaged}
    return decoded, reasons


def node_count(checkpoint: FlowCheckpoint) -> int:
    """The nodes a checkpoint knows of: those with a state (run, or running) and those still pending."""
    return len({*checkpoint.node_states, *checkpoint.completed_node_ids, *checkpoint.pending_node_ids})


# ---- one checkpoint --------------------------------------------------------------------------------------------


@dataclass
class CheckpointInfo:
    """One checkpoint, decoded, with what its hash says about it (sizes, children), its run's lease, and why its
    hash fields are damaged ('' when they are whole; its content decoded)."""

    checkpoint: FlowCheckpoint
    home: str
    fields: dict[str, str]
    pack_bytes: int  # the packs it names, as stored
    lease: Lease | None

    @property
    def damaged(self) -> str:
        return field_damage(self.fields)

    def as_dict(self) -> dict:
        cp, f = self.checkpoint, self.fields
        return {
            "id": cp.id, "flow": cp.flow_id, "run_id": cp.run_id, "wf_run_id": cp.wf_run_id,
            "status": cp.status.value, "parent": cp.parent_checkpoint_id, "children": _int(f.get("kids")),
            "created_at": cp.created_at.timestamp(), "updated_at": cp.updated_at.timestamp(),
            "nodes_completed": len(cp.completed_node_ids), "nodes_total": node_count(cp),
            "nodes": [{"id": node_id, "status": state.status, "completed": node_id in cp.completed_node_ids}
                      for node_id, state in cp.node_states.items()]
            + [{"id": node_id, "status": "pending", "completed": False}
               for node_id in cp.pending_node_ids if node_id not in cp.node_states],
            "raw_bytes": _int(f.get("raw")),
            "stored_bytes": _int(f.get("size")), "pack_bytes": self.pack_bytes, "format": _int(f.get("fmt")),
            "lease": self.lease.as_dict() if self.lease else None, "damaged": self.damaged or None,
        }  # fmt: skip


def checkpoint_op(store: StoreCore, checkpoint_id: str) -> Op:
    """The :class:`CheckpointInfo` of ``checkpoint_id``, or None when there is no such checkpoint."""
    k = store.keys
    home = yield cmd("GET", k.locator(checkpoint_id))
    if home is None:
        return None
    home = text(home)
    checkpoint = yield from store.load(checkpoint_id)
    if checkpoint is None:
        return None
    fields = _decoded((yield cmd("HGETALL", k.checkpoint(home, checkpoint_id))) or {})
    named = [p for p in (fields.get("pk") or "").split(",") if p]
    (lease,) = yield from leases_op(store, [(home, checkpoint.wf_run_id or checkpoint.run_id)])
    lengths = (yield Batch(tuple(cmd("STRLEN", k.pack(home, p)) for p in named))) if named else []
    return CheckpointInfo(checkpoint, home, fields, sum(int(n) for n in lengths), lease)


# ---- a run's history as a tree ---------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A node of a history tree: one checkpoint (from its hash) and the checkpoints saved from it."""

    id: str
    fields: dict[str, str]
    children: list["Snapshot"] = field(default_factory=list)

    @property
    def created_at(self) -> float | None:
        created = _int(self.fields.get("ts"), None)
        return None if created is None else created / 1e6

    def as_dict(self, marked: str) -> dict:
        f = self.fields
        return {"id": self.id, "run": _run_key(f), "status": f.get("st"), "created_at": self.created_at,
                "raw_bytes": _int(f.get("raw")), "this": self.id == marked, "damaged": field_damage(f) or None,
                "children": [child.as_dict(marked) for child in self.children]}  # fmt: skip


@dataclass
class Lineage:
    """The history around a checkpoint: the tree from its oldest stored ancestor, every branch of it included, and
    the id of a parent the root names that is no longer stored ('' when the root has none)."""

    flow: str
    root: Snapshot
    marked: str
    gone_parent: str
    size: int

    def as_dict(self) -> dict:
        return {"flow": self.flow, "checkpoint": self.marked, "gone_parent": self.gone_parent or None,
                "checkpoints": self.size, "tree": self.root.as_dict(self.marked)}  # fmt: skip


_SNAPSHOT_FIELDS = ("par", "run", "wf", "st", "ts", "raw", "kids")


def lineage_op(store: StoreCore, checkpoint_id: str) -> Op:
    """The :class:`Lineage` of ``checkpoint_id`` (None when it is not stored).

    Up: parent links, a run at a time (one read of the run's index and hashes, then its first checkpoint's parent in
    another run, say a fork's); a cycle of them raises :class:`ParentCycleError` naming it. Down: the home's flow
    index from the root's time on, oldest first (paged by position, so a delete meanwhile skips nothing), attaching
    every checkpoint whose parent is in the tree; it stops once the tree holds as many children as its hashes count
    (``kids``, kept by the save and delete scripts), else at the index's end."""
    k = store.keys
    home = yield cmd("GET", k.locator(checkpoint_id))
    if home is None:
        return None
    home = text(home)
    known: dict[str, dict[str, str]] = {}

    def fetch(ids: list[str]) -> Op:
        wanted = [i for i in ids if i not in known]
        replies = yield from _fields_of(store, [(home, i) for i in wanted], *_SNAPSHOT_FIELDS)
        for i, values in zip(wanted, replies):
            if values[0] is not None or values[4] is not None:
                known[i] = {name: text(v) for name, v in zip(_SNAPSHOT_FIELDS, values)}

    yield from fetch([checkpoint_id])
    if checkpoint_id not in known:
        return None
    read_runs: set[str] = set()
    root, seen, gone = checkpoint_id, {checkpoint_id: None}, ""
    while parent := known[root]["par"]:
        if parent not in known and (run := _run_key(known[root])) not in read_runs:
            read_runs.add(run)
            yield from fetch([text(m) for m in (yield cmd("ZRANGE", k.run_index(home, run), 0, -1))])
        if parent not in known:
            yield from fetch([parent])
        if parent not in known:
            gone = parent
            break
        if parent in seen:
            walked = list(seen)
            loop = " -> ".join(walked[walked.index(parent) :] + [parent])
            raise ParentCycleError(f"checkpoint {checkpoint_id}: its parent links form a cycle ({loop}); "
                                   "their hashes are damaged")  # fmt: skip
        if len(seen) >= _MAX_LINEAGE:
            raise ParentCycleError(f"checkpoint {checkpoint_id}: more than {_MAX_LINEAGE} ancestors (a cycle?)")
        seen[parent] = None
        root = parent
    nodes = {root: Snapshot(root, known[root])}
    pending = _int(known[root]["kids"]) or 0
    waiting: dict[str, list[str]] = {}  # parent id -> children read before it joined the tree
    start, last, read_down = _int(known[root]["ts"]) or 0, None, set()
    while pending > 0 and len(nodes) < _MAX_LINEAGE:
        entries, more = yield from _ascending_page(k.flow_index(home), start, last, _CHUNK)
        if entries:
            last = entries[-1]
        members = [m for _, m in entries if m not in read_down]
        read_down.update(members)
        yield from fetch(members)
        for member in members:
            if member in known and member not in nodes:
                pending += _attach(nodes, waiting, member, known)
        if not more:
            break
    for node in nodes.values():
        node.children.sort(key=lambda child: (child.created_at or 0, child.id))
    return Lineage(flow_of(home), nodes[root], checkpoint_id, gone, len(nodes))


def _attach(nodes: dict[str, Snapshot], waiting: dict[str, list[str]], cp_id: str, known: dict) -> int:
    """Put ``cp_id`` into the tree when its parent is there (then the children read before it, down their
    branches), else into ``waiting``; returns how the count of children the tree lacks changes (each node brings
    its ``kids`` and is one of them)."""
    parent = known[cp_id]["par"]
    if parent not in nodes:
        waiting.setdefault(parent, []).append(cp_id)
        return 0
    change, todo = 0, [cp_id]
    while todo:
        child = todo.pop()
        node = nodes[child] = Snapshot(child, known[child])
        nodes[known[child]["par"]].children.append(node)
        change += (_int(known[child]["kids"]) or 0) - 1
        todo += waiting.pop(child, [])
    return change


# ---- figures per flow ------------------------------------------------------------------------------------------


@dataclass
class FlowStats:
    """A flow's figures. ``logical_bytes``: the sum of each checkpoint's raw size (what Dynamiq's own backends would
    store, uncompressed); ``raw_bytes``: the content the packs hold before compression (each pack's chunks: what is
    left after deduplication), None when a pack is sealed and this process lacks its key, or is damaged (then
    ``damaged`` says why); ``pack_bytes`` and ``hash_bytes``: what Redis holds (pack strings, and the checkpoint
    hashes' fields and values)."""

    flow: str
    checkpoints: int = 0
    runs: int = 0
    packs: int = 0
    pack_bytes: int = 0
    hash_bytes: int = 0
    logical_bytes: int = 0
    raw_bytes: int | None = 0
    damaged: str = ""

    @property
    def stored_bytes(self) -> int:
        return self.pack_bytes + self.hash_bytes

    @property
    def compression(self) -> float | None:
        """raw / pack bytes: what zstd (against base packs) saved."""
        return _ratio(self.raw_bytes, self.pack_bytes)

    @property
    def dedup(self) -> float | None:
        """logical / raw: what sharing unchanged content between checkpoints saved."""
        return _ratio(self.logical_bytes, self.raw_bytes)

    def as_dict(self) -> dict:
        return {"flow": self.flow, "checkpoints": self.checkpoints, "runs": self.runs, "packs": self.packs,
                "stored_bytes": self.stored_bytes, "pack_bytes": self.pack_bytes, "hash_bytes": self.hash_bytes,
                "raw_bytes": self.raw_bytes, "logical_bytes": self.logical_bytes, "compression": self.compression,
                "dedup": self.dedup, "damaged": self.damaged or None}  # fmt: skip


def _ratio(over: int | None, under: int | None) -> float | None:
    return round(over / under, 3) if over is not None and under else None


def flow_stats_op(store: StoreCore, flow: str) -> Op:
    """The :class:`FlowStats` of ``flow``: every checkpoint hash of its homes (their indexes, a page at a time), the
    packs they name and the bases below them (read whole, and decoded to measure their content). The index is paged
    by position, so a checkpoint deleted meanwhile does not make another one be skipped."""
    stats, runs = FlowStats(flow), set()
    for home in flow_homes(flow, store.buckets):
        named: set[str] = set()
        last = None
        while True:
            entries, more = yield from _ascending_page(store.keys.flow_index(home), "-inf", last, _CHUNK)
            members = [m for _, m in entries]
            if entries:
                last = entries[-1]
                hashes = yield Batch(tuple(cmd("HGETALL", store.keys.checkpoint(home, m)) for m in members))
                for member, raw in zip(members, hashes):
                    raw = pairs(raw) if isinstance(raw, list) else raw
                    if not raw:
                        continue  # expired, its index entry not pruned yet
                    fields = _decoded(raw)
                    stats.checkpoints += 1
                    stats.hash_bytes += sum(len(k) + len(v) for k, v in raw.items())
                    stats.logical_bytes += _int(fields.get("raw")) or 0
                    if (damage := field_damage(fields)) and not stats.damaged:
                        stats.damaged = f"checkpoint {text(member)}: {damage}"
                    runs.add((home, _run_key(fields)))
                    named.update(p for p in (fields.get("pk") or "").split(",") if p)
            if not more:
                break
        yield from _measure_packs(store, home, named, stats)
    stats.runs = len(runs)
    return stats


def _measure_packs(store: StoreCore, home: str, named: set[str], stats: FlowStats) -> Op:
    """Add the packs ``named`` and their bases (down the chains) to ``stats``: their stored size, and their content
    before compression (decoded bases first; a base's body is dropped once every pack built on it is decoded)."""
    blobs: dict[str, bytes] = {}
    frontier = sorted(named)
    while frontier:
        page, frontier = frontier[:_CHUNK], frontier[_CHUNK:]
        for pack_id, blob in zip(page, (yield Batch(tuple(cmd("GET", store.keys.pack(home, p)) for p in page)))):
            if blob is None:
                continue  # deleted meanwhile
            blobs[pack_id] = blob[_PACK_COUNT:]
            base = codec.pack_base(blobs[pack_id])
            if base and base not in blobs and base not in frontier:
                frontier.append(base)
    stats.packs += len(blobs)
    stats.pack_bytes += sum(len(b) + _PACK_COUNT for b in blobs.values())
    if stats.raw_bytes is None:
        return
    bases = {p: codec.pack_base(b) for p, b in blobs.items()}
    users: dict[str, int] = {}
    for base in bases.values():
        if base:
            users[base] = users.get(base, 0) + 1
    decoded: dict[str, codec.Pack] = {}
    try:
        for pack_id in list(blobs):
            chain = [pack_id]  # the pack, then its bases not decoded yet, decoded oldest first
            while (base := bases.get(chain[-1])) and base not in decoded and base in blobs:
                chain.append(base)
            for p in reversed(chain):
                if p in decoded or p not in blobs:
                    continue
                base = decoded.get(bases[p]) if bases[p] else None
                pack = codec.read_pack(p, blobs.pop(p), "-", store.keys.pack(home, p), base, sealer=store.sealer,
                                       flow=home)  # fmt: skip
                stats.raw_bytes += sum(len(chunk) for chunk in pack.chunks.values())
                decoded[p] = pack
                if base is not None:
                    users[base.id] -= 1
                    if not users[base.id]:
                        del decoded[base.id]
                if not users.get(p):
                    del decoded[p]
    except EncryptionKeyError:  # a sealed pack and no key: the content cannot be measured here
        stats.raw_bytes = None
    except CheckpointStoreError as e:  # a pack truncated, or its base gone: damaged
        stats.raw_bytes = None
        reason = f"{e.reason} (key {e.key})" if isinstance(e, CheckpointCorruptedError) and e.key else str(e)
        stats.damaged = "; ".join(filter(None, (stats.damaged, f"a pack is damaged: {reason}")))
