"""Run leases and the worker's coordination, as store operations: no I/O, no process state.

A run (keyed by its ``wf_run_id``) holds a lease in Redis while a Flow runs it. Every operation here is a generator
that yields :mod:`requests <dynamiq_redis_ckpt.requests>` (mostly one Lua script, atomic in the flow's slot) and
returns a typed value; the backend's drivers run them, sync or async, with their retries and typed errors.

Workers find work through 16 *wake* shards (``P:wake:{n}``): a flow is put there (at score 0, "look now") by every
write that gives it new work — a save that takes a lease or pauses, a hand-back, a person's answer, a retried dead
letter — in the same pipeline, right after the script. A worker that looks at a flow and finds nothing claimable
postpones it to its next due time or forgets it (``settle.lua``), unless new work was announced meanwhile. So an idle
worker's poll costs one call per shard, and ended runs leave nothing behind that it reads.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.codec import micros
from dynamiq_redis_ckpt.errors import WrongKeyTypeError
from dynamiq_redis_ckpt.keys import FLOW_SHARDS, Keys, flow_homes, flow_of
from dynamiq_redis_ckpt.requests import Batch, Command, Script, cmd, pairs, score_pairs, server_ms, text

ACTIVE = CheckpointStatus.ACTIVE.value
TERMINAL = frozenset({CheckpointStatus.COMPLETED.value, CheckpointStatus.FAILED.value, CheckpointStatus.CANCELED.value})
VANISHED = (
    "the run's lease vanished from Redis (restarted without persistence, flushed, or the key was evicted or "
    "deleted); nobody took it over, but this process can no longer prove it holds the run"
)


def status_name(status: CheckpointStatus | str) -> str:
    """A status as stored ('active', 'completed', ...)."""
    return status.value if isinstance(status, CheckpointStatus) else str(status)


def status_of(checkpoint: FlowCheckpoint) -> str:
    """The checkpoint's status as stored."""
    return status_name(checkpoint.status)


def run_key(checkpoint: FlowCheckpoint) -> str:
    """The id a run is known by across resumes: its wf_run_id (a fresh run_id is drawn on every run_sync)."""
    return checkpoint.wf_run_id or checkpoint.run_id


def due_ms(checkpoint: FlowCheckpoint) -> int | None:
    """When a paused run is due, in ms since the epoch, rounded up (a timer resumed 1 ms early pauses again)."""
    due = checkpoint.resume_at
    return None if due is None else -(-micros(due) // 1000)


@dataclass(frozen=True)
class LeaseTicket:
    """What a running flow's save asks of its run's lease: the lease half of the save script's arguments.

    ``take`` acquires the lease or takes it over (bumping the fencing token); ``held`` writes only while the lease is
    still the writer's; ``resume`` re-takes a lease the writer handed back when it saved a pause mid-run, only if its
    token is still the current one.
    """

    mode: str
    owner: str
    token: int
    ttl_ms: int

    def script_args(self) -> tuple:
        """ARGV[24..27] of save.lua."""
        return (self.mode, self.owner, self.token, self.ttl_ms)

    def announces(self, checkpoint: FlowCheckpoint) -> bool:
        """Whether the save gives workers something to look at (a new lease, a pause, an end), so the flow goes on
        a wake shard; a running run's steady saves only move its lease's expiry later and announce nothing."""
        return self.mode != "held" or status_of(checkpoint) != ACTIVE


NO_TICKET_ARGS = ("", "", 0, 0)  # ARGV[24..27] of a plain save: the run's lease is left alone
PAUSED = frozenset({CheckpointStatus.PENDING_INPUT.value, CheckpointStatus.PAUSED.value})


def announce(keys: Keys, flow: str) -> tuple[Command, ...]:
    """Put a flow on its wake shard, due now, with a fresh version (sent after the write that gave it work)."""
    shard = keys.shard_of(flow)
    return (cmd("ZADD", keys.wake(shard), 0, flow), cmd("HSET", keys.wake_versions(shard), flow, os.urandom(8).hex()))


def verdict(reply: list) -> str:
    """The first word of a lease or worker script's reply; a WRONGTYPE answer raises WrongKeyTypeError."""
    word = text(reply[0])
    if word == "WRONGTYPE":
        raise WrongKeyTypeError("a run-lease script found a key of another type; nothing was written", (text(reply[1]),))
    return word


# ---- the holder's side: renew and hand back ----------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRef:
    """One lease a holder renews: which run, and the owner and fencing token it holds it with."""

    flow: str
    run: str
    owner: str
    token: int
    ttl_ms: int


def _renew_script(keys: Keys, lease: LeaseRef) -> Script:
    lease_keys = (keys.lease(lease.flow, lease.run), keys.lease_index(lease.flow))
    return Script("renew", lease_keys, (lease.owner, lease.token, lease.ttl_ms, lease.run))


def renew_op(keys: Keys, lease: LeaseRef):
    """Extend one lease; returns 'OK', 'FENCED', 'EXPIRED' or 'VANISHED'."""
    return verdict((yield _renew_script(keys, lease)))


def renew_many_op(keys: Keys, leases: list[LeaseRef], announce_flows: tuple[str, ...] = ()):
    """Extend several leases of one store in one round trip (a pipeline of renew scripts, each atomic on its own),
    announcing ``announce_flows`` to the workers after them; returns each lease's verdict, or the WrongKeyTypeError
    its script answered."""
    announcements = tuple(c for flow in dict.fromkeys(announce_flows) for c in announce(keys, flow))
    replies = yield Batch((*(_renew_script(keys, lease) for lease in leases), *announcements))
    out: list[str | WrongKeyTypeError] = []
    for reply in replies[: len(leases)]:
        try:
            out.append(verdict(reply))
        except WrongKeyTypeError as e:
            out.append(e)
    return out


def release_op(keys: Keys, flow: str, run: str, owner: str, token: int, *, failed: bool, backoff_ms: int = 0):
    """Hand a lease back: at once for another worker (``failed=False``), or after a back-off (a failed attempt)."""
    lease_keys = (keys.lease(flow, run), keys.lease_index(flow))
    args = (owner, token, run, "failed" if failed else "handback", backoff_ms)
    replies = yield Batch((Script("release", lease_keys, args), *announce(keys, flow)))
    return verdict(replies[0])


# ---- the worker's side: find, claim, answers, dead letters ---------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """A run a worker claimed: it holds the lease with ``token`` and resumes from checkpoint ``head``."""

    flow: str
    run: str
    token: int
    head: str
    attempt: int
    owner: str
    reason: str  # "orphan" | "due"
    waited_ms: int | None = None  # how long it had been claimable when claimed (server clock); None if unknown
    claimed_at: float = 0.0  # time.monotonic() in the claiming process when the claim was confirmed


@dataclass(frozen=True)
class DeadLetter:
    """A run whose recovery kept failing; it waits for a person to retry or drop it."""

    flow: str
    run: str
    since_ms: int


def find_work_op(keys: Keys, limit: int, flows_per_shard: int = 64):
    """Up to ``limit`` runs a worker may claim now, as (flow, run, reason), due runs first. Up to
    ``flows_per_shard`` due flows of each wake shard are looked at; those with nothing claimable are postponed to
    their next due time or forgotten, so a burst of ended runs drains in a poll or two. Costs one script per wake
    shard when nothing is due."""
    wakes = (Script("wakes", (keys.wake(i), keys.wake_versions(i)), (flows_per_shard,)) for i in range(FLOW_SHARDS))
    shards = yield Batch(tuple(wakes))
    flows = [(text(flow), text(version)) for reply in shards for flow, version in pairs(reply).items()]
    if not flows:
        return []
    replies = yield Batch(tuple(Script("due", (keys.lease_index(f), keys.due_index(f)), (limit,)) for f, _ in flows))
    found, settles = [], []
    for (flow, version), reply in zip(flows, replies):
        if text(reply[0]) == "WRONGTYPE":  # a foreign key: nothing to claim there; a later write announces it again
            settles.append(_settle(keys, flow, version, ""))
            continue
        orphans, due = [text(r) for r in reply[1]], [text(r) for r in reply[2]]
        found += [(flow, run, "due") for run in due] + [(flow, run, "orphan") for run in orphans]
        if not orphans and not due:
            settles.append(_settle(keys, flow, version, text(reply[0])))
    if settles:
        yield Batch(tuple(settles))
    found.sort(key=lambda item: item[2] != "due")
    return found[:limit]


def _settle(keys: Keys, flow: str, version: str, when: int | str) -> Script:
    shard = keys.shard_of(flow)
    return Script("settle", (keys.wake(shard), keys.wake_versions(shard)), (flow, version, when))


def claim_op(keys: Keys, flow: str, run: str, owner: str, ttl_ms: int, reason: str, max_attempts: int):
    """Claim a run atomically (of many workers exactly one wins): a :class:`Claim`, ``"DEAD"`` when this claim moved
    it to dead letters, or None when it is not claimable (taken, renewed, not due)."""
    lease_keys = (keys.lease(flow, run), keys.lease_index(flow), keys.due_index(flow), keys.dead_index(flow))
    reply = yield Script("claim", lease_keys, (run, owner, ttl_ms, reason, max_attempts))
    outcome = verdict(reply)
    if outcome == "OK":
        waited = text(reply[4]) if len(reply) > 4 else ""
        return Claim(flow, run, int(text(reply[1])), text(reply[2]), int(text(reply[3])), owner, reason,
                     int(waited) if waited else None, time.monotonic())  # fmt: skip
    if outcome == "DEAD":
        yield cmd("SADD", keys.dead_flows(keys.shard_of(flow)), flow)
        return "DEAD"
    return None


@dataclass(frozen=True)
class Fleet:
    """Runs of a namespace by state, as workers see them: ``leased`` (lease index entries not claimable yet: live
    leases, and failed attempts waiting out their back-off), ``orphaned`` (claimable now), ``scheduled`` (paused until a
    timer), ``due`` (timer came or a person answered: claimable now), ``dead``; the oldest orphan's wait (s)."""

    runs: dict[str, int]
    oldest_orphan_seconds: float
    flows: int
    truncated: bool = False  # a shard held more flows than one read looks at: the counts are lower bounds


def fleet_op(keys: Keys, flows_per_shard: int = 64):
    """A :class:`Fleet` read in two round trips of bounded size (never a scan of the keyspace): the flows of each
    wake shard (the ``flows_per_shard`` due soonest: flows with live leases, orphans or timers) and the first page of
    each dead-letter shard, then counts from their indexes. ``truncated`` says when a shard held more."""
    head = [cmd("TIME")]
    head += [cmd("ZRANGE", keys.wake(i), 0, flows_per_shard - 1) for i in range(FLOW_SHARDS)]
    head += [cmd("SSCAN", keys.dead_flows(i), 0, "COUNT", flows_per_shard) for i in range(FLOW_SHARDS)]
    replies = yield Batch(tuple(head))
    now_ms = server_ms(replies[0])
    wakes, pages = replies[1 : 1 + FLOW_SHARDS], replies[1 + FLOW_SHARDS :]
    live = sorted({text(f) for reply in wakes for f in reply or ()})
    dead = sorted({text(f) for cursor, members in pages for f in members or ()})
    truncated = any(len(reply or ()) >= flows_per_shard for reply in wakes) or any(
        int(cursor) != 0 for cursor, _ in pages)
    counts: list[Command] = []
    for flow in live:
        leased, due = keys.lease_index(flow), keys.due_index(flow)
        # the oldest expiry: a run put back by `dead retry` (score 0, claimable at once) has no age to report
        oldest_expiry = cmd("ZRANGEBYSCORE", leased, "(0", now_ms, "WITHSCORES", "LIMIT", 0, 1)
        counts += [cmd("ZCARD", leased), cmd("ZCOUNT", leased, "-inf", now_ms), oldest_expiry,
                   cmd("ZCARD", due), cmd("ZCOUNT", due, "-inf", now_ms)]  # fmt: skip
    counts += [cmd("ZCARD", keys.dead_index(flow)) for flow in dead]
    replies = (yield Batch(tuple(counts))) if counts else []
    runs = dict.fromkeys(("leased", "orphaned", "scheduled", "due", "dead"), 0)
    oldest = None
    for i in range(len(live)):
        in_index, orphans, first, timers, due_now = replies[5 * i : 5 * i + 5]
        runs["leased"] += int(in_index) - int(orphans)
        runs["orphaned"] += int(orphans)
        runs["scheduled"] += int(timers) - int(due_now)
        runs["due"] += int(due_now)
        if int(orphans) and first:
            at = score_pairs(first)[0][0]
            oldest = at if oldest is None else min(oldest, at)
    runs["dead"] = sum(int(n) for n in replies[5 * len(live) :])
    waited = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
    return Fleet(runs, waited, len({flow_of(home) for home in live}), truncated)


def migrate_registry_op(keys: Keys, batch: int = 1000):
    """Move the flows that older versions registered in ``P:flows:{n}`` onto the wake shards: taken with SPOP (an
    older pod's concurrent SADD stays for the next call), then announced. Returns how many flows were moved."""
    shards = yield Batch(tuple(cmd("SPOP", keys.legacy_flow_registry(i), batch) for i in range(FLOW_SHARDS)))
    flows = sorted({text(f) for shard in shards for f in (shard or ())})
    if flows:
        yield Batch(tuple(c for f in flows for c in announce(keys, f)))
    return len(flows)


def run_homes_op(keys: Keys, run: str, flow: str | None, buckets: int = 1):
    """The homes (keys.flow_homes) holding checkpoints of ``run``, of ``flow`` only when given, in order. A flow
    given whose run no lookup names (its lookup keys expired before its lease or dead letter did) gives every home
    of the flow (``buckets`` per flow), to be tried in turn."""
    homes = sorted(text(h) for h in (yield cmd("SMEMBERS", keys.run_flows(run))))
    if flow is None:
        return homes
    return [h for h in homes if flow_of(h) == flow] or list(flow_homes(flow, buckets))


def lease_head_op(keys: Keys, run: str, flow: str | None, buckets: int = 1):
    """(home, head checkpoint id) for each home holding a lease of ``run`` (of ``flow`` only, when given), in
    order; a home is the flow's id, or one of its buckets (``flow_of`` names the flow)."""
    flows = yield from run_homes_op(keys, run, flow, buckets)
    if not flows:
        return []
    heads = yield Batch(tuple(cmd("HGET", keys.lease(f, run), "head") for f in flows))
    return [(f, text(h)) for f, h in zip(flows, heads) if h is not None]


def deliver_op(keys: Keys, flow: str, run: str, node_id: str, answer_json: str, keep_ms: int):
    """Store a person's answer for a waiting node and make the run due: 'OK', 'ANSWERED' (the node already has an
    answer: the first one stands), 'RUNNING' (the run holds a live lease) or 'UNKNOWN'."""
    lease_keys = (keys.inbox(flow, run), keys.due_index(flow), keys.lease(flow, run))
    replies = yield Batch((Script("deliver", lease_keys, (run, node_id, answer_json, keep_ms)), *announce(keys, flow)))
    return verdict(replies[0])


def inbox_op(keys: Keys, flow: str, run: str):
    """The stored answers of a run: node id -> answer JSON."""
    found = yield cmd("HGETALL", keys.inbox(flow, run))
    return {text(k): text(v) for k, v in (found.items() if isinstance(found, dict) else pairs(found).items())}


def forget_answers_op(keys: Keys, flow: str, run: str, node_ids: list[str]):
    """Drop the answers of nodes that have completed."""
    if node_ids:
        yield cmd("HDEL", keys.inbox(flow, run), *node_ids)


def dead_letters_op(keys: Keys):
    """Every dead-lettered run, per flow in flow order."""
    shards = yield Batch(tuple(cmd("SMEMBERS", keys.dead_flows(i)) for i in range(FLOW_SHARDS)))
    flows = sorted({text(f) for shard in shards for f in shard})
    if not flows:
        return []
    replies = yield Batch(tuple(cmd("ZRANGE", keys.dead_index(f), 0, -1, "WITHSCORES") for f in flows))
    return [DeadLetter(flow_of(home), run, int(score)) for home, rows in zip(flows, replies)
            for score, run in score_pairs(rows)]  # fmt: skip


def retry_dead_op(keys: Keys, flow: str, run: str, buckets: int = 1):
    """Put a dead-lettered run back (atomically): the next worker claims it with a fresh attempt count."""
    for home in (yield from run_homes_op(keys, run, flow, buckets)):
        args = (keys.dead_index(home), keys.lease(home, run), keys.lease_index(home))
        replies = yield Batch((Script("retry_dead", args, (run,)), *announce(keys, home)))
        if replies[0] == 1:
            return True
    return False


def drop_dead_op(keys: Keys, flow: str, run: str, buckets: int = 1):
    """Forget a dead-lettered run (its checkpoints stay for inspection and cleanup)."""
    homes = yield from run_homes_op(keys, run, flow, buckets)
    return any((yield Batch(tuple(cmd("ZREM", keys.dead_index(home), run) for home in homes))))
