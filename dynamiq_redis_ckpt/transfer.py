"""Moving checkpoints in and out of Redis: sources, the JSON lines format, the import and the export.

A source (:mod:`dynamiq_redis_ckpt.sources`: JSON lines, Dynamiq's FileSystem directory and PostgreSQL table) yields
Dynamiq checkpoints, parents before children, and says how many it holds per flow.

:class:`Importer` stores a source's checkpoints with the store's plain save: no run lease is taken, so no worker
resumes an imported run (unless :meth:`Importer.hand_to_workers` is asked to). A checkpoint already stored identical
is skipped, which makes a second run after an interruption finish the job without duplicating anything; then every
checkpoint is loaded back and compared with the source's (:meth:`Importer.verify`).

:class:`Exporter` reads a namespace's checkpoints flow by flow (from the flows' indexes, a page at a time), oldest
first and parents first, for :func:`write_line` to write as JSON lines.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt.errors import CheckpointCorruptedError, CheckpointStoreError, UnsupportedFormatError
from dynamiq_redis_ckpt.keys import flow_homes, flow_of
from dynamiq_redis_ckpt.leases import PAUSED, LeaseTicket, lease_head_op, run_key, status_of
from dynamiq_redis_ckpt.requests import Batch, cmd, score_pairs, text
from dynamiq_redis_ckpt.sources import Source, parents_first, same

RESUMABLE = PAUSED | {"active"}  # a run whose newest checkpoint has one of these statuses has not ended
HANDOVER_OWNER = "import"  # the owner of the lease a hand-over writes; it has run out before anyone reads it
_BATCH = 64  # checkpoints whose presence one round trip checks
_PAGE = 500  # index entries one read brings


# ---- import --------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One flow's checkpoints in an import: in the source, newly stored, stored again (Redis held a damaged version,
    or another one and the import was told to overwrite), already stored identical (skipped), left alone because
    Redis holds another version (conflicts); then found equal in Redis by the verification."""

    source: int = 0
    saved: int = 0
    updated: int = 0
    skipped: int = 0
    conflicts: int = 0
    verified: int = 0
    in_redis: int | None = None


@dataclass
class ImportReport:
    """What an import did, per flow, and what its verification found."""

    flows: dict[str, Tally] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)  # stored versions that differ, left as they are
    refused: list[str] = field(default_factory=list)  # checkpoints the store would not take (a typed error each)
    verified: bool = False
    handed_over: list[str] = field(default_factory=list)

    def tally(self, flow: str) -> Tally:
        return self.flows.setdefault(flow, Tally())

    @property
    def totals(self) -> Tally:
        out = Tally()
        for t in self.flows.values():
            out.source, out.saved, out.updated = out.source + t.source, out.saved + t.saved, out.updated + t.updated
            out.skipped, out.verified = out.skipped + t.skipped, out.verified + t.verified
            out.conflicts += t.conflicts
        return out


@dataclass
class _Head:
    created_at: Any
    id: str
    status: str
    flow: str


class Importer:
    """Stores a source's checkpoints in a backend's namespace with plain saves (no lease)."""

    def __init__(self, backend, *, progress: Callable[[int], None] | None = None, pause: float = 0.0,
                 overwrite: bool = False):  # fmt: skip
        self.backend = backend
        self.overwrite = overwrite  # replace a stored version that differs (else it is kept and reported)
        self.left_alone: set[str] = set()  # ids whose stored version differs and was kept, or that were refused
        self.keys = backend.store.keys
        self.progress = progress or (lambda n: None)
        self.pause = pause  # seconds after each stored checkpoint (tests slow an import down to interrupt it)
        self.heads: dict[str, _Head] = {}  # run key -> its newest checkpoint in the source

    def run(self, source: Source, report: ImportReport | None = None) -> ImportReport:
        """Store every checkpoint of ``source`` that Redis does not already hold identical."""
        report = report or ImportReport()
        batch: list[FlowCheckpoint] = []
        for checkpoint in source.checkpoints():
            batch.append(checkpoint)
            if len(batch) >= _BATCH:
                self._store(batch, report)
                batch = []
        self._store(batch, report)
        report.unreadable = list(source.unreadable)
        return report

    def _store(self, batch: list[FlowCheckpoint], report: ImportReport) -> None:
        if not batch:
            return
        present = self.backend.execute(_exists_op(self.keys, [c.id for c in batch]))
        for checkpoint, there in zip(batch, present):
            tally = report.tally(checkpoint.flow_id)
            tally.source += 1
            self._remember_head(checkpoint)
            stored = self._stored(checkpoint.id) if there else None
            if isinstance(stored, FlowCheckpoint) and same(stored, checkpoint):
                tally.skipped += 1
            elif isinstance(stored, FlowCheckpoint) and not self.overwrite:
                # Another version (an older backup, another namespace's export): never replaced silently, and
                # never moved out of the flow that holds it (a save under another flow id would delete it there).
                where = f" in flow {stored.flow_id}" if stored.flow_id != checkpoint.flow_id else ""
                report.conflicts.append(f"checkpoint {checkpoint.id} of flow {checkpoint.flow_id}: Redis holds another "
                                        f"version{where} ({_difference(stored, checkpoint)}); kept")  # fmt: skip
                tally.conflicts += 1
                self.left_alone.add(checkpoint.id)
            else:
                try:
                    self.backend.execute(self.backend.store.save(checkpoint))  # plain: no lease taken or touched
                except CheckpointStoreError as e:  # a checkpoint the store refuses (a NUL in its flow id, too large)
                    report.refused.append(f"checkpoint {checkpoint.id} of flow {checkpoint.flow_id!r}: {e}")
                    self.left_alone.add(checkpoint.id)
                else:
                    if stored is None:
                        tally.saved += 1
                    else:
                        tally.updated += 1
                if self.pause:
                    time.sleep(self.pause)
            self.progress(1)

    def _stored(self, checkpoint_id: str) -> FlowCheckpoint | str | None:
        """The stored version of a checkpoint (None: not stored); a damaged one as the reason it cannot be read."""
        try:
            return self.backend.load(checkpoint_id)
        except (CheckpointCorruptedError, UnsupportedFormatError) as e:
            return f"damaged in Redis: {e}"

    def _remember_head(self, checkpoint: FlowCheckpoint) -> None:
        key = run_key(checkpoint)
        head = self.heads.get(key)
        if head is None or (checkpoint.created_at, checkpoint.id) > (head.created_at, head.id):
            self.heads[key] = _Head(checkpoint.created_at, checkpoint.id, status_of(checkpoint), checkpoint.flow_id)

    def verify(self, source: Source, report: ImportReport) -> ImportReport:
        """Load every checkpoint of ``source`` back from Redis and compare; count each flow's checkpoints in Redis."""
        for tally in report.flows.values():
            tally.verified = 0
        seen: dict[str, int] = defaultdict(int)
        for checkpoint in source.checkpoints():
            seen[checkpoint.flow_id] += 1
            if checkpoint.id in self.left_alone:  # reported already, as a conflict or a refusal
                self.progress(1)
                continue
            stored = self._stored(checkpoint.id)
            if stored is None or isinstance(stored, str):
                report.mismatches.append(f"checkpoint {checkpoint.id} of flow {checkpoint.flow_id}: "
                                         f"{stored or 'not in Redis'}")  # fmt: skip
            elif not same(stored, checkpoint):
                report.mismatches.append(f"checkpoint {checkpoint.id} of flow {checkpoint.flow_id}: differs from "
                                         f"the source ({_difference(stored, checkpoint)})")  # fmt: skip
            else:
                report.tally(checkpoint.flow_id).verified += 1
            self.progress(1)
        for flow, count in seen.items():
            if count != report.tally(flow).source:
                report.mismatches.append(f"flow {flow}: the source holds {count} checkpoints now, "
                                         f"{report.tally(flow).source} when they were imported")  # fmt: skip
        counts = self.backend.execute(flow_counts_op(self.keys, sorted(report.flows), self.backend.store.buckets))
        for flow, count in counts.items():
            tally = report.tally(flow)
            tally.in_redis = count
            if count < tally.source:
                report.mismatches.append(f"flow {flow}: {tally.source} checkpoints in the source, {count} in Redis")
        report.unreadable = list(source.unreadable)
        report.verified = True
        return report

    def hand_to_workers(self, report: ImportReport) -> list[str]:
        """Make each imported run whose newest checkpoint is active or paused a run the workers take up: an active
        one becomes an orphan (a lease that has already run out), a paused one waits for its timer or a person as a
        paused run does. Runs that hold a lease in Redis already (handed over before, or running) are left alone."""
        handed = []
        buckets = self.backend.store.buckets
        for run, head in sorted(self.heads.items()):
            if head.status not in RESUMABLE:
                continue
            if self.backend.execute(lease_head_op(self.keys, run, head.flow, buckets)):
                continue
            checkpoint = self.backend.load(head.id)
            if checkpoint is None:
                continue
            ticket = LeaseTicket("take", HANDOVER_OWNER, 0, 1)  # a lease running out 1 ms after it was written
            self.backend.execute(self.backend.store.save(checkpoint, ticket=ticket))
            handed.append(run)
        report.handed_over = handed
        return handed


def _difference(a: FlowCheckpoint, b: FlowCheckpoint) -> str:
    left, right = a.model_dump(), b.model_dump()
    fields = [name for name in left if left.get(name) != right.get(name)]
    return "fields " + ", ".join(fields) if fields else "serialized differently"


def _exists_op(keys, ids: list[str]):
    """Whether each id has a locator (is stored, or was being stored when a process died)."""
    replies = yield Batch(tuple(cmd("EXISTS", keys.locator(i)) for i in ids))
    return [bool(int(r)) for r in replies]


def flow_counts_op(keys, flows: list[str], buckets: int):
    """How many checkpoints each flow's indexes list (over its homes)."""
    if not flows:
        return {}
    homes = [(flow, home) for flow in flows for home in flow_homes(flow, buckets)]
    replies = yield Batch(tuple(cmd("ZCARD", keys.flow_index(home)) for _, home in homes))
    counts: dict[str, int] = defaultdict(int)
    for (flow, _), n in zip(homes, replies):
        counts[flow] += int(n)
    return dict(counts)


# ---- export --------------------------------------------------------------------------------------------------------


class Exporter:
    """A namespace's checkpoints, flow by flow, oldest first and each after its parent."""

    def __init__(self, backend):
        self.backend = backend
        self.keys = backend.store.keys
        self.missing = 0  # listed, but gone before they were read (deleted or expired meanwhile)

    def entries(self, flows: list[str] | None, run: str | None) -> dict[str, list[tuple[float, str]]]:
        """For each flow: its checkpoints' (created_at µs, id), oldest first (a flow without any is left out).
        ``flows`` None: the flows holding ``run`` (needs ``run``)."""
        return self.backend.execute(_entries_op(self.keys, flows, run, self.backend.store.buckets))

    def checkpoints(self, entries: list[tuple[float, str]]) -> Iterator[FlowCheckpoint]:
        """The checkpoints of one flow's entries, loaded one by one, parents first."""
        known = {cp_id for _, cp_id in entries}

        def loaded() -> Iterator[FlowCheckpoint]:
            for _, cp_id in entries:
                checkpoint = self.backend.load(cp_id)
                if checkpoint is None:
                    self.missing += 1
                else:
                    yield checkpoint

        return parents_first(loaded(), lambda c: c.id, lambda c: c.parent_checkpoint_id, known)


def _entries_op(keys, flows: list[str] | None, run: str | None, buckets: int):
    if flows is None:
        homes = sorted(text(h) for h in (yield cmd("SMEMBERS", keys.run_flows(run))))
        sources = [(flow_of(h), keys.run_index(h, run)) for h in homes]
    else:
        sources = [(flow, keys.run_index(h, run) if run else keys.flow_index(h))
                   for flow in flows for h in flow_homes(flow, buckets)]  # fmt: skip
    # Paged by score, not offset: a checkpoint deleted between two pages (retention) must not shift a later one past
    # the next page's start. Each page starts at the last score read (inclusive: entries may share a score) and asks
    # for as many more as it had seen at that score.
    found: dict[str, dict[str, float]] = defaultdict(dict)
    last: list[float | None] = [None] * len(sources)
    at_last = [0] * len(sources)
    pending = list(range(len(sources)))
    while pending:
        wants = [_PAGE + at_last[i] for i in pending]
        pages = yield Batch(tuple(cmd("ZRANGEBYSCORE", sources[i][1], "-inf" if last[i] is None else repr(last[i]),
                                      "+inf", "WITHSCORES", "LIMIT", 0, want)
                                  for i, want in zip(pending, wants)))  # fmt: skip
        still = []
        for i, want, rows in zip(pending, wants, pages):
            pairs = score_pairs(rows)
            for score, member in pairs:
                found[sources[i][0]].setdefault(member, score)
            if pairs:
                last[i] = pairs[-1][0]
                at_last[i] = sum(1 for score, _ in pairs if score == last[i])
            if len(pairs) == want:
                still.append(i)
        pending = still
    return {flow: sorted(((s, m) for m, s in members.items())) for flow, members in found.items() if members}


def write_line(out: IO[str], checkpoint: FlowCheckpoint) -> None:
    """One checkpoint as one JSON line (Dynamiq's ``to_json``: what ``FlowCheckpoint.from_json`` reads back)."""
    out.write(checkpoint.to_json())
    out.write("\n")
