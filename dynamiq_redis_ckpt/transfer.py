"""Moving checkpoints in and out of Redis: sources, the JSON lines format, the import and the export.

A *source* yields Dynamiq checkpoints, parents before children, and says how many it holds per flow:

- :class:`JsonLinesSource`: a file of JSON lines, one checkpoint per line as Dynamiq serializes it
  (``FlowCheckpoint.to_json()``: ``model_dump()`` with Dynamiq's reversible markers for the values plain JSON cannot
  hold, so ``FlowCheckpoint.from_json`` gives back exactly the checkpoint). The whole file is checked before anything
  is written: a malformed line is a :class:`SourceError` naming it.
- :class:`FileSystemSource`: a directory written by Dynamiq's ``FileSystem`` checkpoint backend, read file by file
  with that backend's own reader.
- :class:`PostgresSource`: a table written by Dynamiq's ``PostgreSQL`` checkpoint backend, read with that backend
  (which never creates or changes the table here).

:class:`Importer` stores a source's checkpoints with the store's plain save: no run lease is taken, so no worker
resumes an imported run (unless :meth:`Importer.hand_to_workers` is asked to). A checkpoint already stored identical
is skipped, which makes a second run after an interruption finish the job without duplicating anything; then every
checkpoint is loaded back and compared with the source's (:meth:`Importer.verify`).

:class:`Exporter` reads a namespace's checkpoints flow by flow (from the flows' indexes, a page at a time), oldest
first and parents first, for :func:`write_line` to write as JSON lines.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.utils import encode_reversible

from dynamiq_redis_ckpt.errors import CheckpointCorruptedError, CheckpointStoreError, UnsupportedFormatError
from dynamiq_redis_ckpt.keys import flow_homes, flow_of
from dynamiq_redis_ckpt.leases import PAUSED, LeaseTicket, lease_head_op, run_key, status_of
from dynamiq_redis_ckpt.requests import Batch, cmd, score_pairs, text

T = TypeVar("T")
RESUMABLE = PAUSED | {"active"}  # a run whose newest checkpoint has one of these statuses has not ended
HANDOVER_OWNER = "import"  # the owner of the lease a hand-over writes; it has run out before anyone reads it
_BATCH = 64  # checkpoints whose presence one round trip checks
_PAGE = 500  # index entries one read brings


class SourceError(Exception):
    """The source is malformed or cannot be used as given (a bad line, a missing directory, a malformed DSN)."""


class SourceUnavailable(Exception):
    """The source's server could not be reached (PostgreSQL refused, timed out, or turned the login away)."""


class SourceNotFound(Exception):
    """The source names something that is not there (a PostgreSQL table)."""


def same(a: FlowCheckpoint, b: FlowCheckpoint) -> bool:
    """Whether two checkpoints are equal: their ``model_dump()``\\ s, or (for values that never equal themselves, such
    as NaN) Dynamiq's serialization of both."""
    return a.model_dump() == b.model_dump() or canonical(a) == canonical(b)


def canonical(checkpoint: FlowCheckpoint) -> str:
    """Dynamiq's serialization of a checkpoint (``to_dict`` with its reversible markers) with sorted keys."""
    try:
        return json.dumps(checkpoint.to_dict(), sort_keys=True, default=encode_reversible, ensure_ascii=False)
    except TypeError:  # keys of mixed types cannot be sorted: keep their order
        return json.dumps(checkpoint.to_dict(), default=encode_reversible, ensure_ascii=False)


def parents_first(items: Iterable[T], id_of: Callable[[T], str], parent_of: Callable[[T], str | None],
                  known: Container[str]) -> Iterator[T]:  # fmt: skip
    """``items`` in their order, except that one whose parent is among ``known`` (ids that will come) waits until its
    parent has come. Those whose parent never comes (a cycle) come at the end, in their order."""
    done: set[str] = set()
    waiting: dict[str, list[T]] = defaultdict(list)

    def release(item: T) -> Iterator[T]:
        stack = [item]
        while stack:
            current = stack.pop()
            yield current
            done.add(id_of(current))
            stack.extend(reversed(waiting.pop(id_of(current), [])))

    for item in items:
        parent = parent_of(item)
        if parent and parent != id_of(item) and parent in known and parent not in done:
            waiting[parent].append(item)
        else:
            yield from release(item)
    while waiting:
        for item in waiting.pop(next(iter(waiting))):
            yield from release(item)


def in_time_order(checkpoints: list[FlowCheckpoint]) -> Iterator[FlowCheckpoint]:
    """A flow's checkpoints oldest first, each after its parent."""
    ordered = sorted(checkpoints, key=lambda c: (c.created_at, c.id))
    known = {c.id for c in ordered}
    return parents_first(ordered, lambda c: c.id, lambda c: c.parent_checkpoint_id, known)


# ---- sources -------------------------------------------------------------------------------------------------------


class Source:
    """Checkpoints to import. ``counts`` holds how many each flow has (known up front, for the progress bar);
    ``unreadable`` the entries the source could not decode (found while reading)."""

    name = "source"

    def __init__(self, flows: Iterable[str] = ()):
        self.wanted = set(flows)
        self.counts: dict[str, int] = {}
        self.unreadable: list[str] = []

    def wants(self, flow_id: str) -> bool:
        return not self.wanted or flow_id in self.wanted

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def missing_flows(self) -> list[str]:
        """The flows asked for that the source holds no checkpoint of."""
        return sorted(f for f in self.wanted if not self.counts.get(f))

    def checkpoints(self) -> Iterator[FlowCheckpoint]:
        """Every checkpoint, each after its parent (when the source holds it); may be called again (to verify)."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of files and connections."""


@dataclass
class _Line:
    number: int
    offset: int
    id: str
    parent: str | None


class JsonLinesSource(Source):
    """A JSON lines file (``-``: standard input, kept in a temporary file): every line is checked first."""

    def __init__(self, path: str, flows: Iterable[str] = ()):
        super().__init__(flows)
        self.name = "standard input" if path == "-" else path
        if path == "-":
            self._file: IO[bytes] = tempfile.TemporaryFile()
            for chunk in iter(lambda: os.read(0, 1 << 20), b""):
                self._file.write(chunk)
        else:
            try:
                self._file = open(path, "rb")
            except OSError as e:
                raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
        try:
            self._lines = self._check()
        except BaseException:
            self._file.close()
            raise

    def _check(self) -> list[_Line]:
        lines: list[_Line] = []
        seen: dict[str, int] = {}
        self._file.seek(0)
        offset = 0
        for number, raw in enumerate(self._file, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            checkpoint = self._parse(raw, number)
            if checkpoint.id in seen:
                raise SourceError(f"{self.name}: line {number}: checkpoint {checkpoint.id} is already on line "
                                  f"{seen[checkpoint.id]}")  # fmt: skip
            seen[checkpoint.id] = number
            if self.wants(checkpoint.flow_id):
                self.counts[checkpoint.flow_id] = self.counts.get(checkpoint.flow_id, 0) + 1
                lines.append(_Line(number, start, checkpoint.id, checkpoint.parent_checkpoint_id))
        return lines

    def _parse(self, raw: bytes, number: int) -> FlowCheckpoint:
        try:
            return FlowCheckpoint.from_json(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise SourceError(f"{self.name}: line {number}: not UTF-8 ({e.reason})") from e
        except ValueError as e:  # orjson's JSONDecodeError and pydantic's ValidationError are ValueErrors
            reason = " ".join(str(e).split())
            raise SourceError(f"{self.name}: line {number}: not a checkpoint: {reason[:300]}") from e
        except TypeError as e:  # valid JSON, but not an object
            raise SourceError(f"{self.name}: line {number}: not a checkpoint object: {e}") from e

    def checkpoints(self) -> Iterator[FlowCheckpoint]:
        known = {line.id for line in self._lines}
        for line in parents_first(self._lines, lambda x: x.id, lambda x: x.parent, known):
            self._file.seek(line.offset)
            yield self._parse(self._file.readline(), line.number)

    def close(self) -> None:
        self._file.close()


class FileSystemSource(Source):
    """A directory of Dynamiq's ``FileSystem`` backend (``<flow>/<run>/<checkpoint>.json``), read with its reader."""

    def __init__(self, path: str, flows: Iterable[str] = ()):
        super().__init__(flows)
        from dynamiq.checkpoints.backends.filesystem import FileSystem

        self.name = path
        if not os.path.isdir(path):  # checked first: the backend would create it
            raise SourceError(f"{path}: no such directory")
        self.backend = FileSystem(base_path=path)
        wanted_dirs = {self.backend._safe_id(f) for f in self.wanted}
        self._dirs = sorted(d for d in Path(path).iterdir()
                            if d.is_dir() and (not wanted_dirs or d.name in wanted_dirs))  # fmt: skip
        # counted by file, per directory (a flow's directory name is its id made safe for file names)
        self.counts = {d.name: len(self._files(d)) for d in self._dirs}
        self.counts = {k: v for k, v in self.counts.items() if v}

    def missing_flows(self) -> list[str]:
        return sorted(f for f in self.wanted if not self.counts.get(self.backend._safe_id(f)))

    @staticmethod
    def _files(flow_dir: Path) -> list[Path]:
        return sorted(f for run in flow_dir.iterdir() if run.is_dir() for f in run.glob("*.json"))

    def checkpoints(self) -> Iterator[FlowCheckpoint]:
        self.unreadable = []
        for flow_dir in self._dirs:
            found = []
            for path in self._files(flow_dir):
                checkpoint = self.backend._load_file(path)  # Dynamiq's reader (None: it could not decode the file)
                if checkpoint is None:
                    self.unreadable.append(f"{path}: Dynamiq's FileSystem backend cannot read it")
                elif self.wants(checkpoint.flow_id):
                    found.append(checkpoint)
            yield from in_time_order(found)


def postgres_conninfo(dsn: str) -> dict[str, str]:
    """A PostgreSQL DSN (``postgresql://...`` or ``key=value ...``) as its parts; SourceError when malformed."""
    import psycopg.conninfo

    try:
        return psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise SourceError(f"malformed PostgreSQL DSN: {e}") from e


class PostgresSource(Source):
    """A table of Dynamiq's ``PostgreSQL`` backend, read with that backend, a flow at a time."""

    def __init__(self, dsn: str, table: str = "flow_checkpoints", flows: Iterable[str] = (),
                 connect_timeout: float = 5.0):  # fmt: skip
        super().__init__(flows)
        from dynamiq.checkpoints.backends.postgresql import PostgreSQL, PostgresCheckpointError

        parts = postgres_conninfo(dsn)
        parts.setdefault("connect_timeout", str(max(1, int(connect_timeout))))
        where = f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
        self.name = f"PostgreSQL {where} table {table}"
        self._error = PostgresCheckpointError
        try:
            self.backend = PostgreSQL(connection=_dsn_connection(parts), table_name=table,
                                      create_if_not_exist=False)  # fmt: skip
        except PostgresCheckpointError as e:
            cause = e.__cause__.__cause__ if isinstance(e.__cause__, ConnectionError) else e.__cause__
            raise SourceUnavailable(f"PostgreSQL {where}: {_first_line(cause or e)}") from e
        try:
            rows = self._query("SELECT flow_id, count(*) AS n FROM {t} GROUP BY flow_id")
        except BaseException:
            self.backend.close()
            raise
        self.counts = {flow: n for flow, n in rows if self.wants(flow)}

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of ``sql`` ({t}: the table), run by the Dynamiq backend on its connection."""
        import psycopg
        from dynamiq.checkpoints.backends.postgresql import FetchMode
        from psycopg.sql import SQL, Identifier

        try:
            rows = self.backend._execute_sql(SQL(sql).format(t=Identifier(self.backend.table_name)), params,
                                             fetch=FetchMode.ALL)  # fmt: skip
        except self._error as e:
            if isinstance(e.__cause__, psycopg.errors.UndefinedTable):
                raise SourceNotFound(f"{self.name}: no such table") from e
            if isinstance(e.__cause__, psycopg.OperationalError):
                raise SourceUnavailable(f"{self.name}: {_first_line(e.__cause__)}") from e
            raise
        return [tuple(row.values()) for row in rows or ()]

    def checkpoints(self) -> Iterator[FlowCheckpoint]:
        self.unreadable = []
        for flow in sorted(self.counts):
            try:
                found = self.backend.get_list_by_flow(flow)  # Dynamiq's reader; it leaves out rows it cannot decode
            except self._error as e:
                raise SourceUnavailable(f"{self.name}: {_first_line(e.__cause__ or e)}") from e
            if len(found) != self.counts[flow]:
                read = {c.id for c in found}
                rows = self._query("SELECT id FROM {t} WHERE flow_id = %s ORDER BY id", (flow,))
                self.unreadable += [f"{self.name}: row {row[0]}: Dynamiq's PostgreSQL backend cannot decode it"
                                    for row in rows if row[0] not in read]  # fmt: skip
            yield from in_time_order(found)

    def close(self) -> None:
        self.backend.close()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@functools.lru_cache(maxsize=1)
def _dsn_connection_class():
    from dynamiq.connections import PostgreSQL as PostgreSQLConnection

    class DsnConnection(PostgreSQLConnection):
        """Dynamiq's PostgreSQL connection, made from every part of a DSN (sslmode and the like included)."""

        conninfo: dict = {}

        def connect(self):
            import psycopg
            from psycopg.rows import dict_row

            try:
                return psycopg.connect(**self.conninfo, row_factory=dict_row, autocommit=True)
            except psycopg.Error as e:
                raise ConnectionError(f"Failed to connect to PostgreSQL: {e}") from e

    return DsnConnection


def _dsn_connection(conninfo: dict[str, str]):
    return _dsn_connection_class()(conninfo=conninfo)


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
