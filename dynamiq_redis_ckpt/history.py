"""Reading a namespace's history for people: pages of runs and checkpoints, one checkpoint (a run's history as a
tree is :mod:`dynamiq_redis_ckpt.lineage`, per-flow figures :mod:`dynamiq_redis_ckpt.flow_stats`). Store
operations (generators of :mod:`requests <dynamiq_redis_ckpt.requests>`, run by ``backend.execute``), written for
the command line (:mod:`dynamiq_redis_ckpt.cli.browse`); nothing here prints.

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
from dataclasses import dataclass
from typing import Any, Generator

from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError, CheckpointStoreError, EncryptionKeyError, StoreUnavailableError, UnsupportedFormatError,
    WrongKeyTypeError)  # fmt: skip
from dynamiq_redis_ckpt.keys import flow_homes
from dynamiq_redis_ckpt.requests import Batch, cmd, pairs, score_pairs, server_ms, text
from dynamiq_redis_ckpt.store import Record, StoreCore

Op = Generator[Any, Any, Any]
CHUNK = 200  # index entries (and hashes) read per round trip
_LEASE_FIELDS = ("owner", "token", "exp", "head")
_NUMERIC_FIELDS = ("ts", "size", "raw", "kids", "fmt")  # hash fields that hold integers


def int_field(value: str | None, default: int | None = 0) -> int | None:
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
                 if fields.get(name) and int_field(fields[name]) is None]  # fmt: skip
    return f"hash fields damaged: {', '.join(problems)}" if problems else ""


def ascending_page(key: str, low: int | str, after: tuple[int, str] | None, count: int) -> Op:
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
    expires, number = int_field(exp), int_field(token)
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
    return server_ms((yield cmd("TIME")))


def run_key_of(fields: dict[str, str]) -> str:
    """The run a checkpoint hash belongs to: its wf_run_id, else its run_id (as leases key runs)."""
    return fields.get("wf") or fields.get("run", "")


def decoded_fields(fields: dict) -> dict[str, str]:
    """A hash as redis-py returns it (bytes) as text."""
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
        entries, more = yield from _index_page(sources, after, CHUNK)
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
        heads = yield from fields_op(store, [(p.home, newest) for p, (_, newest) in firsts.items()], "st", "ts")
        newest_fields = {p: (text(st), text(ts)) for p, (st, ts) in zip(firsts, heads)}
        stopped = False
        for p in entries:
            after = p
            if p not in firsts:
                continue  # expired meanwhile, or not its run's oldest: the run is listed at its oldest
            (key, newest), (st, ts) = firsts[p], newest_fields[p]
            if status is not None and st != status:
                continue
            created = int_field(ts, None)
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
    sizes = yield from fields_op(store, [(row.home, m) for row, ms in zip(rows, members) for m in ms], "size")
    i = 0
    for row, ms in zip(rows, members):
        found = [(m, text(s)) for m, (s,) in zip(ms, sizes[i : i + len(ms)]) if s is not None]
        bad = [m for m, s in found if int_field(s) is None]
        row.checkpoints, row.stored_bytes = len(found), sum(int_field(s) or 0 for _, s in found)
        if bad and not row.damaged:
            row.damaged = f"checkpoint {bad[0]}: hash field size is not a number"
        i += len(ms)


def fields_op(store: StoreCore, checkpoints: list[tuple[str, str]], *names: str) -> Op:
    """HMGET ``names`` of each (home, id), in round trips of ``CHUNK``."""
    out: list = []
    for start in range(0, len(checkpoints), CHUNK):
        page = checkpoints[start : start + CHUNK]
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
        return run_key_of(self.fields)

    def as_dict(self) -> dict:
        f = self.fields
        created = int_field(f.get("ts"), None)
        return {"id": self.id, "flow": self.flow, "run": self.run, "run_id": f.get("run"), "status": f.get("st"),
                "parent": f.get("par") or None, "nodes_completed": self.nodes_completed,
                "nodes_total": self.nodes_total, "stored_bytes": int_field(f.get("size")),
                "raw_bytes": int_field(f.get("raw")), "created_at": None if created is None else created / 1e6,
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
        entries, more = yield from _index_page(sources, after, min(CHUNK, limit - len(rows)))
        if not entries:
            break
        hashes = yield Batch(tuple(cmd("HGETALL", k.checkpoint(p.home, p.member)) for p in entries))
        for p, fields in zip(entries, hashes):
            fields = decoded_fields(pairs(fields) if isinstance(fields, list) else fields)
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
            "status": cp.status.value, "parent": cp.parent_checkpoint_id, "children": int_field(f.get("kids")),
            "created_at": cp.created_at.timestamp(), "updated_at": cp.updated_at.timestamp(),
            "nodes_completed": len(cp.completed_node_ids), "nodes_total": node_count(cp),
            "nodes": [{"id": node_id, "status": state.status, "completed": node_id in cp.completed_node_ids}
                      for node_id, state in cp.node_states.items()]
            + [{"id": node_id, "status": "pending", "completed": False}
               for node_id in cp.pending_node_ids if node_id not in cp.node_states],
            "raw_bytes": int_field(f.get("raw")),
            "stored_bytes": int_field(f.get("size")), "pack_bytes": self.pack_bytes, "format": int_field(f.get("fmt")),
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
    fields = decoded_fields((yield cmd("HGETALL", k.checkpoint(home, checkpoint_id))) or {})
    named = [p for p in (fields.get("pk") or "").split(",") if p]
    (lease,) = yield from leases_op(store, [(home, checkpoint.wf_run_id or checkpoint.run_id)])
    lengths = (yield Batch(tuple(cmd("STRLEN", k.pack(home, p)) for p in named))) if named else []
    return CheckpointInfo(checkpoint, home, fields, sum(int(n) for n in lengths), lease)
