"""Where an import reads checkpoints from: a *source* yields Dynamiq checkpoints, parents before children, and says
how many it holds per flow.

- :class:`JsonLinesSource`: a file of JSON lines, one checkpoint per line as Dynamiq serializes it
  (``FlowCheckpoint.to_json()``: ``model_dump()`` with Dynamiq's reversible markers for the values plain JSON cannot
  hold, so ``FlowCheckpoint.from_json`` gives back exactly the checkpoint). The whole file is checked before anything
  is written: a malformed line is a :class:`SourceError` naming it.
- :class:`FileSystemSource`: a directory written by Dynamiq's ``FileSystem`` checkpoint backend, read file by file
  with that backend's own reader.
- :class:`PostgresSource`: a table written by Dynamiq's ``PostgreSQL`` checkpoint backend, read with that backend
  (which never creates or changes the table here).
"""


from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.utils import encode_reversible

T = TypeVar("T")


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
