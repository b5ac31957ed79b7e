"""What an operator watches: the runs workers look after (live leases, orphans, timers, dead letters), page by page,
and the snapshot the live view (``dynamiq-redis-ckpt top``) draws; plus the workers' latencies, scraped from their
Prometheus endpoints.

The Redis reads are store operations (generators of :mod:`dynamiq_redis_ckpt.requests`, run by a backend's
``execute``), read only, and never scan the keyspace: the flows come from the wake shards (``P:wake:{n}``: every
flow home with a lease, an orphan or a timer), the dead-flow shards (``P:deadflows:{n}``) and, for the live view,
the catalog's most recently saved flows; then each home's own indexes are read. Times are the server's (``TIME``),
in ms since the epoch.
"""

from __future__ import annotations

import base64
import bisect
import json
import math
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Iterable

from dynamiq_redis_ckpt import catalog
from dynamiq_redis_ckpt.keys import FLOW_SHARDS, Keys, flow_homes, flow_of
from dynamiq_redis_ckpt.requests import Batch, Command, cmd, score_pairs, server_ms, text

HOMES_PER_BATCH = 64  # index reads per round trip while a page fills


@dataclass(frozen=True)
class LeaseRow:
    """A run in a flow's lease index: held by ``owner`` until ``expires_ms`` (a live lease), or claimable since then
    (an orphan: its holder vanished, or handed it back). ``owner`` is '' while a failed attempt waits out its back-off
    and after a hand-back."""

    flow: str
    run: str
    owner: str
    token: int | None
    expires_ms: int | None
    head: str
    attempts: int | None


@dataclass(frozen=True)
class TimerRow:
    """A paused run in a flow's due index: due at ``due_ms`` (its timer, or when a person answered: ``answered``),
    to resume from ``checkpoint``."""

    flow: str
    run: str
    due_ms: int | None
    checkpoint: str
    answered: bool


@dataclass(frozen=True)
class DeadRow:
    """A dead-lettered run: since ``since_ms``, after ``attempts`` failed recoveries, last checkpoint ``head``."""

    flow: str
    run: str
    since_ms: int | None
    attempts: int | None
    head: str


@dataclass(frozen=True)
class Page:
    """One page of a listing: its rows, the cursor of the next page ('' at the end), and the server's time."""

    items: list
    next_cursor: str
    now_ms: int


# ---- cursors ---------------------------------------------------------------------------------------------------


def encode_cursor(home: str, score: float, member: str) -> str:
    """Where a listing goes on: the last entry shown (its flow home, score and run; opaque to users). By entry, not
    by position: entries that come or go before it between two pages shift no one after it."""
    return base64.urlsafe_b64encode(json.dumps([home, _bound(score), member]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, float, str]:
    """The (home, score, run) of a cursor (("", -inf, "") for none); ValueError if it is not one of ours."""
    if not cursor:
        return "", float("-inf"), ""
    bad = ValueError(f"not a cursor this command printed: {cursor!r}")
    try:
        home, score, member = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except Exception:
        raise bad from None
    if not (isinstance(home, str) and isinstance(score, str) and isinstance(member, str)):
        raise bad
    try:
        value = float(score)
    except ValueError:
        raise bad from None
    if math.isnan(value):
        raise bad
    return home, value, member


def _bound(score: float) -> str:
    """A score as Redis reads it in ZRANGEBYSCORE (and JSON can hold): '1764460000000', '0.5', 'inf', '-inf'."""
    if math.isfinite(score) and score == int(score):
        return str(int(score))
    return repr(score)


def _number(value, kind=int):
    """A hash field or score as a number; None when it is not one (damaged data: shown as such, not a crash)."""
    try:
        number = kind(text(value)) if isinstance(value, (bytes, str)) else kind(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if kind is not float or math.isfinite(number) else None


def _ms(score: float) -> int | None:
    """An index score (ms since the epoch) as an int; None for a non-finite one (damaged)."""
    return int(score) if math.isfinite(score) else None


# ---- where to look ---------------------------------------------------------------------------------------------


def _homes_op(keys: Keys, dead: bool, homes: Iterable[str] | None):
    """(server ms, sorted homes): ``homes`` when given, else every home of the wake (or dead-flow) shards."""
    if homes is not None:
        return server_ms((yield cmd("TIME"))), sorted(set(homes))
    if dead:
        shards = tuple(cmd("SMEMBERS", keys.dead_flows(i)) for i in range(FLOW_SHARDS))
    else:
        shards = tuple(cmd("ZRANGE", keys.wake(i), 0, -1) for i in range(FLOW_SHARDS))
    replies = yield Batch((cmd("TIME"), *shards))
    return server_ms(replies[0]), sorted({text(h) for reply in replies[1:] for h in reply or ()})


Read = Callable[[str, "float | None", int, int], Command]


def _page_op(keys: Keys, homes: list[str], read: Read, cursor: str, limit: int):
    """Walk ``homes`` in order from ``cursor``, reading entries with ``read(home, start, offset, count)`` (a
    ZRANGEBYSCORE ... WITHSCORES LIMIT from score ``start`` inclusive, or the listing's own low end for None),
    until ``limit`` entries: [(home, score, member)], and the cursor of the last one shown when more follow ('' when
    none does: a page never ends on a cursor to nothing). The cursor's home resumes after its entry: from its score,
    past the members at that score up to its run (a score's members come in byte order)."""
    start_home, start_score, start_run = decode_cursor(cursor)
    i = bisect.bisect_left(homes, start_home) if start_home else 0
    found: list[tuple[str, float, str]] = []
    if start_home and i < len(homes) and homes[i] == start_home:
        offset = 0
        while True:  # the cursor's home: skip what was shown at the cursor's score, however many share it
            rows = score_pairs((yield read(start_home, start_score, offset, limit + 1)) or [])
            kept = [(s, m) for s, m in rows if not (s == start_score and m <= start_run)]
            found += [(start_home, s, m) for s, m in kept]
            if kept or len(rows) < limit + 1:
                break
            offset += len(rows)
        i += 1
    while i < len(homes) and len(found) <= limit:
        batch = homes[i : i + HOMES_PER_BATCH]
        need = limit + 1 - len(found)  # one more than shown: whether a next page exists
        replies = yield Batch(tuple(read(h, None, 0, need) for h in batch))
        for home, rows in zip(batch, replies):
            found += [(home, score, member) for score, member in score_pairs(rows or [])]
            if len(found) > limit:
                break
        i += len(batch)
    shown = found[:limit]
    if len(found) > limit:
        return shown, encode_cursor(*shown[-1])
    return shown, ""


def _from(start: float | None, low: str) -> str:
    """The low end of a read: the listing's own, or a cursor's score (inclusive)."""
    return low if start is None else _bound(start)


# ---- listings --------------------------------------------------------------------------------------------------


def leases_op(keys: Keys, *, orphaned: bool, homes: Iterable[str] | None = None, cursor: str = "", limit: int = 50):
    """A :class:`Page` of :class:`LeaseRow`: the runs holding a live lease (or, ``orphaned``, those claimable now:
    their lease ran out or was handed back), by expiry, flow home by flow home. ``homes`` limits it to those homes
    (a flow's, keys.flow_homes). A field that is not a number (damaged data) is None."""
    now_ms, homes = yield from _homes_op(keys, False, homes)
    low, high = ("-inf", now_ms) if orphaned else (f"({now_ms}", "+inf")

    def read(home, start, offset, count):
        if not orphaned and start is not None and start <= now_ms:
            start = None  # the cursor's entry has expired since: live leases start after now
        return cmd("ZRANGEBYSCORE", keys.lease_index(home), _from(start, low), high, "WITHSCORES",
                   "LIMIT", offset, count)  # fmt: skip

    found, next_cursor = yield from _page_op(keys, homes, read, cursor, limit)
    fields = ("owner", "token", "head", "attempts")
    details = (yield Batch(tuple(cmd("HMGET", keys.lease(h, run), *fields) for h, _, run in found))) if found else []
    rows = [LeaseRow(flow_of(h), run, text(owner), _number(token or 0), _ms(score), text(head), _number(tries or 0))
            for (h, score, run), (owner, token, head, tries) in zip(found, details)]  # fmt: skip
    return Page(rows, next_cursor, now_ms)


def timers_op(keys: Keys, *, homes: Iterable[str] | None = None, cursor: str = "", limit: int = 50):
    """A :class:`Page` of :class:`TimerRow`: paused runs with a due time (a timer's resume_at, or the moment a
    person answered), soonest first, flow home by flow home."""
    now_ms, homes = yield from _homes_op(keys, False, homes)

    def read(home, start, offset, count):
        return cmd("ZRANGEBYSCORE", keys.due_index(home), _from(start, "-inf"), "+inf", "WITHSCORES",
                   "LIMIT", offset, count)  # fmt: skip

    found, next_cursor = yield from _page_op(keys, homes, read, cursor, limit)
    asks = tuple(c for h, _, run in found for c in (cmd("HGET", keys.lease(h, run), "head"),
                                                    cmd("EXISTS", keys.inbox(h, run))))  # fmt: skip
    details = (yield Batch(asks)) if asks else []
    rows = [TimerRow(flow_of(h), run, _ms(score), text(details[2 * k]), bool(details[2 * k + 1]))
            for k, (h, score, run) in enumerate(found)]  # fmt: skip
    return Page(rows, next_cursor, now_ms)


def dead_op(keys: Keys, *, homes: Iterable[str] | None = None, cursor: str = "", limit: int = 50):
    """A :class:`Page` of :class:`DeadRow`: dead-lettered runs, oldest first, flow home by flow home."""
    now_ms, homes = yield from _homes_op(keys, True, homes)

    def read(home, start, offset, count):
        return cmd("ZRANGEBYSCORE", keys.dead_index(home), _from(start, "-inf"), "+inf", "WITHSCORES",
                   "LIMIT", offset, count)  # fmt: skip

    found, next_cursor = yield from _page_op(keys, homes, read, cursor, limit)
    details = (yield Batch(tuple(cmd("HMGET", keys.lease(h, run), "attempts", "head") for h, _, run in found))) \
        if found else []  # fmt: skip
    rows = [DeadRow(flow_of(h), run, _ms(score), _number(tries or 0), text(head))
            for (h, score, run), (tries, head) in zip(found, details)]  # fmt: skip
    return Page(rows, next_cursor, now_ms)


# ---- the live view's snapshot -----------------------------------------------------------------------------------


@dataclass
class FlowState:
    """One flow's runs by state (its homes added up), the oldest orphan's wait and its newest save's age (s)."""

    flow: str
    leased: int = 0
    orphaned: int = 0
    scheduled: int = 0
    due: int = 0
    dead: int = 0
    oldest_orphan_seconds: float | None = None
    newest_save_seconds: float | None = None


@dataclass
class Snapshot:
    """What ``top`` draws: totals by state (as :class:`dynamiq_redis_ckpt.leases.Fleet` counts them), per flow
    rows, the server's time, and whether a shard held more flows than one read looks at (then counts are lower
    bounds)."""

    now_ms: int
    totals: dict[str, int]
    flows: list[FlowState] = field(default_factory=list)
    oldest_orphan_seconds: float = 0.0
    truncated: bool = False


STATES = ("leased", "orphaned", "scheduled", "due", "dead")


def snapshot_op(keys: Keys, buckets: int = 1, flows_per_shard: int = 256, recent_flows: int = 20):
    """A :class:`Snapshot` in three round trips of bounded size: the first ``flows_per_shard`` homes of each wake
    shard (due soonest) and of each dead-flow shard, and the ``recent_flows`` flows saved most recently (the
    catalog); then each home's counts, oldest orphan and newest save (only the newest save of a recent flow's
    other homes, ``buckets`` per flow: they have nothing queued)."""
    head = [cmd("TIME")]
    head += [cmd("ZRANGE", keys.wake(i), 0, flows_per_shard - 1) for i in range(FLOW_SHARDS)]
    head += [cmd("SSCAN", keys.dead_flows(i), 0, "COUNT", flows_per_shard) for i in range(FLOW_SHARDS)]
    replies = yield Batch(tuple(head))
    recent: list[str] = []
    if recent_flows:
        recent, _ = yield from catalog.flows_op(keys, "", recent_flows)
    now_ms = server_ms(replies[0])
    wakes, pages = replies[1 : 1 + FLOW_SHARDS], replies[1 + FLOW_SHARDS :]
    homes = sorted({text(h) for reply in wakes for h in reply or ()} | {text(h) for _, ms in pages for h in ms or ()})
    quiet = sorted({h for flow in recent for h in flow_homes(flow, buckets)} - set(homes))
    truncated = any(len(r or ()) >= flows_per_shard for r in wakes) or any(int(c) != 0 for c, _ in pages)
    reads: list[Command] = []
    for home in homes:
        leased, due = keys.lease_index(home), keys.due_index(home)
        reads += [cmd("ZCARD", leased), cmd("ZCOUNT", leased, "-inf", now_ms),
                  cmd("ZRANGEBYSCORE", leased, "(0", "+inf", "WITHSCORES", "LIMIT", 0, 1),  # 0: retried, no age
                  cmd("ZCARD", due), cmd("ZCOUNT", due, "-inf", now_ms), cmd("ZCARD", keys.dead_index(home)),
                  cmd("ZRANGE", keys.flow_index(home), -1, -1, "WITHSCORES")]  # fmt: skip
    reads += [cmd("ZRANGE", keys.flow_index(home), -1, -1, "WITHSCORES") for home in quiet]
    replies = (yield Batch(tuple(reads))) if reads else []
    flows: dict[str, FlowState] = {}
    for i, home in enumerate(homes):
        in_index, orphans, first, timers, due_now, dead, newest = replies[7 * i : 7 * i + 7]
        row = flows.setdefault(flow_of(home), FlowState(flow_of(home)))
        row.leased += int(in_index) - int(orphans)
        row.orphaned += int(orphans)
        row.scheduled += int(timers) - int(due_now)
        row.due += int(due_now)
        row.dead += int(dead)
        if int(orphans) and first and score_pairs(first)[0][0] <= now_ms:
            waited = (now_ms - score_pairs(first)[0][0]) / 1000
            row.oldest_orphan_seconds = max(row.oldest_orphan_seconds or 0.0, waited)
        _saved(row, newest, now_ms)
    for home, newest in zip(quiet, replies[7 * len(homes) :]):
        _saved(flows.setdefault(flow_of(home), FlowState(flow_of(home))), newest, now_ms)
    shown = set(recent)
    rows = [r for r in flows.values() if r.flow in shown or any(getattr(r, s) for s in STATES)]
    totals = {s: sum(getattr(r, s) for r in rows) for s in STATES}
    oldest = max((r.oldest_orphan_seconds or 0.0 for r in rows), default=0.0)
    return Snapshot(now_ms, totals, rows, oldest, truncated)


def _saved(row: FlowState, newest: list, now_ms: int) -> None:
    """Take a home's newest checkpoint (ZRANGE ... -1 -1 WITHSCORES of its flow index) into its flow's row."""
    if newest:
        age = max(0.0, now_ms / 1000 - score_pairs(newest)[0][0] / 1e6)  # scores are created_at in µs
        row.newest_save_seconds = age if row.newest_save_seconds is None else min(row.newest_save_seconds, age)


# ---- the workers' latencies (Prometheus) ------------------------------------------------------------------------

RECOVERY = "dynamiq_ckpt_recovery_latency_seconds"
SAVE = "dynamiq_ckpt_operation_duration_seconds"


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """``q`` estimated from cumulative histogram buckets [(upper bound, count)], as Prometheus's
    histogram_quantile does (linear within a bucket; the highest finite bound when it falls in +Inf)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Latency:
    """One latency from the workers' histograms: p50 and p99 (s) over the observations of the last ``window``
    seconds (all since the workers started when none came in it: ``window`` None), how many in all, and how many
    per second came in the window (None on the first scrape)."""

    p50: float | None
    p99: float | None
    count: float
    per_second: float | None
    window: float | None


@dataclass(frozen=True)
class Scrape:
    """What the workers' endpoints said: ``recovery`` and ``save`` latencies, how many of ``endpoints`` answered,
    and the first error."""

    recovery: Latency | None
    save: Latency | None
    answered: int
    endpoints: int
    error: str = ""


Buckets = dict[float, float]  # upper bound -> cumulative count, the endpoints' histograms added up


class LatencyScraper:
    """Scrapes the workers' /metrics endpoints (their histograms added up) and keeps the scrapes of the last
    ``window_seconds``, so each :meth:`scrape` gives the quantiles and rates of that window, as Prometheus's
    ``histogram_quantile(rate(...[1m]))`` would."""

    def __init__(self, urls: list[str], timeout: float = 2.0, window_seconds: float = 60.0):
        self.urls = urls
        self.timeout = timeout
        self.window_seconds = window_seconds
        self._history: list[tuple[float, dict[str, Buckets]]] = []

    def _fetch(self, url: str) -> str:
        with urllib.request.urlopen(url, timeout=self.timeout) as reply:
            return reply.read().decode()

    def scrape(self) -> Scrape:
        """One scrape of every endpoint."""
        from prometheus_client.parser import text_string_to_metric_families

        buckets: dict[str, Buckets] = {RECOVERY: {}, SAVE: {}}
        answered, error = 0, ""
        for url in self.urls:
            found: dict[str, Buckets] = {RECOVERY: {}, SAVE: {}}
            try:  # parsing is lazy: a bad line fails while the samples are read, so all of it is in here
                for family in text_string_to_metric_families(self._fetch(url)):
                    if family.name in found:
                        for bound, value in _bucket_samples(family):
                            found[family.name][bound] = found[family.name].get(bound, 0.0) + value
            except Exception as e:  # a worker restarting or gone, or not a Prometheus endpoint: the others count
                error = error or f"{url}: {e}"
                continue
            answered += 1
            for name, counts in found.items():
                for bound, value in counts.items():
                    buckets[name][bound] = buckets[name].get(bound, 0.0) + value
        if not answered:
            return Scrape(None, None, 0, len(self.urls), error)
        at = time.monotonic()
        self._history = [(t, b) for t, b in self._history if at - t <= self.window_seconds]
        baseline = self._history[0] if self._history else None
        self._history.append((at, buckets))
        latencies = [_latency(buckets[name], baseline and (at - baseline[0], baseline[1].get(name, {})))
                     for name in (RECOVERY, SAVE)]  # fmt: skip
        return Scrape(latencies[0], latencies[1], answered, len(self.urls), error)


def _bucket_samples(family) -> Iterable[tuple[float, float]]:
    """A histogram family's (upper bound, cumulative count) samples (of the save operation only, for SAVE); a sample
    without a numeric ``le`` or with a count that is not a finite number is skipped (a broken exporter)."""
    for sample in family.samples:
        if not sample.name.endswith("_bucket"):
            continue
        if family.name == SAVE and sample.labels.get("operation") != "save":
            continue
        try:
            bound, value = float(sample.labels["le"]), float(sample.value)
        except (KeyError, TypeError, ValueError):
            continue
        if math.isnan(bound) or not math.isfinite(value) or value < 0:
            continue
        yield bound, value


def _latency(now: Buckets, baseline: tuple[float, Buckets] | None) -> Latency:
    total = now.get(float("inf"), 0.0)
    everything = list(now.items())
    if baseline is None:
        return Latency(quantile(0.5, everything), quantile(0.99, everything), total, None, None)
    seconds, before = baseline
    window = {bound: count - before.get(bound, 0.0) for bound, count in now.items()}
    if any(v < 0 for v in window.values()):  # a worker restarted: its counters began again
        window = dict(now)
    came = window.get(float("inf"), 0.0)
    per_second = came / seconds if seconds > 0 else None
    if came <= 0:
        return Latency(quantile(0.5, everything), quantile(0.99, everything), total, per_second, None)
    shown = list(window.items())
    return Latency(quantile(0.5, shown), quantile(0.99, shown), total, per_second, seconds)
