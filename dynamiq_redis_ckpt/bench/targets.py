"""The backends the benchmark compares, each behind one small interface.

A target hands out backends on *spaces*: one isolated namespace per benchmark phase (a Redis key prefix, a
directory, a PostgreSQL table, an InMemory instance), so phases never see each other's checkpoints.
:meth:`Target.make` may be called twice for one space (a second instance reads what the first wrote), and in a
forked child (throughput workers build their own backend there).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterable

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.config import mask_url
from dynamiq_redis_ckpt.keys import Keys, glob_escape

ORDER = ("redis", "inmemory", "filesystem", "postgresql")


def close_backend(backend: Any) -> None:
    """Close a backend's connections, when it has any."""
    close = getattr(backend, "close", None)
    if callable(close):
        close()


class Target:
    """One column of the results: how to build, measure and clean up a backend.

    Attributes:
        name: column name.
        parallel: how throughput clients run: ``"processes"`` (one backend per forked process) or ``"threads"``.
        list_max: largest checkpoint count this target's flow is filled to for the listing benchmark.
    """

    name = ""
    parallel = "processes"
    list_max: int | None = None

    def make(self, space: str) -> Any:
        """A backend on ``space`` (created empty on first use)."""
        raise NotImplementedError

    def teardown(self, space: str) -> None:
        """Remove everything stored in ``space``."""

    def storage(self, space: str) -> dict[str, int] | None:
        """What ``space`` occupies, in bytes (keys vary per target); None when it cannot be measured."""
        return None

    def fill(self, space: str, checkpoints: list[FlowCheckpoint], backend: Any) -> None:
        """Store ``checkpoints`` (setup, not timed); by default through ``backend.save``."""
        for cp in checkpoints:
            backend.save(cp)

    def fill_method(self) -> str:
        """How :meth:`fill` stores checkpoints (printed with the listing results)."""
        return "backend.save, one by one"

    def version(self) -> str | None:
        """Server version, for the machine info."""
        return None

    def close(self) -> None:
        """Release everything this target started or created."""


class RedisTarget(Target):
    """:class:`RedisCheckpointBackend` (leases on, the default) on a redis-server this process starts, or on a url."""

    name = "redis"
    fill_processes = 3

    def __init__(self, url: str | None, tag: str) -> None:
        import redis

        self._server = None
        if url is None:
            from dynamiq_redis_ckpt.embedded import start_embedded_redis

            self._server = start_embedded_redis()
            if self._server.url is None:
                self._server.close()
                raise RuntimeError("the benchmark needs a redis-server binary on PATH, or --redis-url")
            url = self._server.url
        self.url = url
        self.tag = tag
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30)
        self.client.ping()
        self._spaces: set[str] = set()

    def prefix(self, space: str) -> str:
        """The key prefix of a space."""
        return f"bench-{self.tag}-{space}"

    def make(self, space: str, *, leases: bool = True) -> Any:
        from dynamiq_redis_ckpt.backend import RedisCheckpointBackend

        self._spaces.add(space)
        return RedisCheckpointBackend(url=self.url, prefix=self.prefix(space), leases=leases, socket_timeout=30)

    def _keys(self, space: str) -> Iterable[bytes]:
        pattern = glob_escape(self.prefix(space)) + ":*"
        return self.client.scan_iter(match=pattern, count=1000)

    def teardown(self, space: str) -> None:
        keys = list(self._keys(space))  # every key of the space starts with its prefix (raw SET keys too)
        for start in range(0, len(keys), 1000):
            self.client.unlink(*keys[start : start + 1000])
        self._spaces.discard(space)

    def storage(self, space: str) -> dict[str, int]:
        """Sum of ``MEMORY USAGE key SAMPLES 0`` over every key under the space's prefix, and the key count."""
        keys = list(self._keys(space))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = pipe.execute() if keys else []
        return {"memory_usage": sum(s or 0 for s in sizes), "keys": len(keys)}

    def fill(self, space: str, checkpoints: list[FlowCheckpoint], backend: Any) -> None:
        """Save through the backend (leases off: filler runs are not live) from forked processes, in parallel."""
        ctx = multiprocessing.get_context("fork")
        n = max(1, min(self.fill_processes, len(checkpoints) // 500))
        errors = ctx.Queue()
        procs = [ctx.Process(target=self._fill_child, args=(space, checkpoints[i::n], errors)) for i in range(n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            message = errors.get() if not errors.empty() else "a filler process failed"
            raise RuntimeError(f"redis fill: {message}")

    def _fill_child(self, space: str, checkpoints: list[FlowCheckpoint], errors: Any) -> None:
        try:
            backend = self.make(space, leases=False)
            for cp in checkpoints:
                backend.save(cp)
            backend.close()
        except BaseException as e:
            errors.put(f"{type(e).__name__}: {e}")
            raise

    def fill_method(self) -> str:
        return f"backend.save (leases off) from {self.fill_processes} forked processes"

    def stored_blobs(self, space: str, checkpoint: FlowCheckpoint) -> tuple[bytes, dict[str, list[str]]]:
        """The bytes the backend stored for ``checkpoint``'s own save, read back from Redis.

        That is every pack (a string: reference count, then blob) it names that its parent does not (an APPEND
        snapshot writes one new pack, holding its root document and the node states its parent lacks), and a
        format-3 hash's ``doc`` field. Returns the concatenated bytes and where they came from.
        """
        from dynamiq_redis_ckpt.store import Record

        keys, flow = Keys(self.prefix(space)), checkpoint.flow_id

        def record(cp_id: str) -> Record | None:
            fields = self.client.hgetall(keys.checkpoint(flow, cp_id))
            return Record(flow, cp_id, {k.decode(): v for k, v in fields.items()}) if fields else None

        own = record(checkpoint.id)
        if own is None:
            raise RuntimeError(f"checkpoint {checkpoint.id} is not stored under {keys.checkpoint(flow, checkpoint.id)}")
        parent = record(checkpoint.parent_checkpoint_id) if checkpoint.parent_checkpoint_id else None
        inherited = set(parent.packs) if parent is not None else set()
        packs = [keys.pack(flow, p) for p in own.packs if p not in inherited]
        pipe = self.client.pipeline(transaction=False)
        for key in packs:
            pipe.get(key)
        stored_packs = [blob for blob in (pipe.execute() if packs else []) if blob is not None]
        doc = own.fields.get("doc", b"")
        return doc + b"".join(stored_packs), {"checkpoint": ["doc"] if doc else [], "packs": [str(len(stored_packs))]}

    def loaded_bytes(self, space: str, checkpoint: FlowCheckpoint) -> bytes:
        """Every byte a load of ``checkpoint`` by a process that holds nothing reads: its hash's field values and
        the packs it names, with the bases down their chains."""
        from dynamiq_redis_ckpt.codec import pack_base
        from dynamiq_redis_ckpt.store import Record

        keys, flow = Keys(self.prefix(space)), checkpoint.flow_id
        fields = self.client.hgetall(keys.checkpoint(flow, checkpoint.id))
        record = Record(flow, checkpoint.id, {k.decode(): v for k, v in fields.items()})
        out, seen = [b"".join(fields.values())], set()
        for pack in record.packs:
            while pack and pack not in seen:
                seen.add(pack)
                blob = self.client.get(keys.pack(flow, pack)) or b""
                out.append(blob)
                pack = pack_base(blob[8:])
        return b"".join(out)

    def version(self) -> str:
        return str(self.client.info("server").get("redis_version"))

    def close(self) -> None:
        for space in list(self._spaces):
            try:
                self.teardown(space)
            except Exception:
                pass
        self.client.close()
        if self._server is not None:
            self._server.close()


class InMemoryTarget(Target):
    """Dynamiq's InMemory backend: one instance per space (a second ``make`` returns the same instance)."""

    name = "inmemory"
    parallel = "threads"

    def __init__(self) -> None:
        self._instances: dict[str, Any] = {}

    def make(self, space: str) -> Any:
        from dynamiq.checkpoints.backends.in_memory import InMemory

        return self._instances.setdefault(space, InMemory())

    def teardown(self, space: str) -> None:
        backend = self._instances.pop(space, None)
        if backend is not None:
            backend.clear()

    def close(self) -> None:
        for space in list(self._instances):
            self.teardown(space)


class FileSystemTarget(Target):
    """Dynamiq's FileSystem backend in a temporary directory (one subdirectory per space)."""

    name = "filesystem"
    list_max = 10_000  # its save globs every run directory of the flow: filling is O(N^2)

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="dynamiq-ckpt-bench-fs-")

    def path(self, space: str) -> str:
        """The base_path of a space."""
        return os.path.join(self.root, space)

    def make(self, space: str) -> Any:
        from dynamiq.checkpoints.backends.filesystem import FileSystem

        return FileSystem(base_path=self.path(space))

    def teardown(self, space: str) -> None:
        shutil.rmtree(self.path(space), ignore_errors=True)

    def storage(self, space: str) -> dict[str, int]:
        """Sum of file sizes (``files``) and of allocated disk blocks (``blocks``, st_blocks * 512)."""
        files = blocks = count = 0
        for folder, _, names in os.walk(self.path(space)):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                files += st.st_size
                blocks += st.st_blocks * 512
                count += 1
        return {"files": files, "blocks": blocks, "file_count": count}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresTarget(Target):
    """Dynamiq's PostgreSQL backend, one fresh table per space (dropped at teardown)."""

    name = "postgresql"

    def __init__(self, dsn: str, tag: str, connect_timeout: float = 2.0) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self.dsn = dsn
        self.tag = tag
        parts = conninfo_to_dict(dsn)
        self.fields = {
            "host": parts.get("host") or "localhost",
            "port": int(parts.get("port") or 5432),
            "database": parts.get("dbname") or "postgres",
            "user": parts.get("user") or "postgres",
            "password": parts.get("password") or "",
        }
        self.admin = psycopg.connect(dsn, connect_timeout=int(max(1, connect_timeout)), autocommit=True)
        self._tables: set[str] = set()

    def table(self, space: str) -> str:
        """The table of a space."""
        return re.sub(r"[^a-z0-9_]", "_", f"bench_{self.tag}_{space}".lower())

    def make(self, space: str) -> Any:
        from dynamiq.checkpoints.backends.postgresql import PostgreSQL
        from dynamiq.connections import PostgreSQL as PostgreSQLConnection

        self._tables.add(self.table(space))
        return PostgreSQL(connection=PostgreSQLConnection(**self.fields), table_name=self.table(space))

    def teardown(self, space: str) -> None:
        from psycopg import sql

        self.admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.table(space))))
        self._tables.discard(self.table(space))

    def storage(self, space: str) -> dict[str, int]:
        """``pg_total_relation_size`` of the space's table (heap, TOAST and indexes)."""
        row = self.admin.execute("SELECT pg_total_relation_size(%s::regclass)", (self.table(space),)).fetchone()
        return {"total_relation_size": int(row[0])}

    def fill(self, space: str, checkpoints: list[FlowCheckpoint], backend: Any) -> None:
        """One ``executemany`` of exactly the rows ``PostgreSQL.save`` writes (same columns, same JSON)."""
        from dynamiq.utils import encode_reversible
        from psycopg import sql

        query = sql.SQL(
            "INSERT INTO {} (id, flow_id, run_id, wf_run_id, status, parent_checkpoint_id, created_at, updated_at, "
            "data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(self.table(space)))
        rows = [
            (cp.id, cp.flow_id, cp.run_id, cp.wf_run_id,
             cp.status.value if isinstance(cp.status, CheckpointStatus) else str(cp.status),
             cp.parent_checkpoint_id, cp.created_at, cp.updated_at,
             json.dumps(cp.to_dict(), default=encode_reversible))
            for cp in checkpoints
        ]  # fmt: skip
        with self.admin.transaction(), self.admin.cursor() as cur:
            cur.executemany(query, rows)

    def fill_method(self) -> str:
        return "executemany of exactly the rows PostgreSQL.save writes, one transaction"

    def version(self) -> str:
        return str(self.admin.execute("SHOW server_version").fetchone()[0])

    def close(self) -> None:
        from psycopg import sql

        for table in list(self._tables):
            try:
                self.admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            except Exception:
                pass
        self._tables.clear()
        self.admin.close()


def build_targets(names: Iterable[str], *, redis_url: str | None, pg_dsn: str, tag: str,
                  say: Callable[[str], None]) -> dict[str, Target]:
    """The requested targets that could be set up, in column order; unreachable PostgreSQL is left out."""
    wanted = set(names)
    targets: dict[str, Target] = {}
    for name in ORDER:
        if name not in wanted:
            continue
        if name == "redis":
            targets[name] = RedisTarget(redis_url, tag)
            say(f"Redis: {targets[name].url} (redis-server {targets[name].version()})")
        elif name == "inmemory":
            targets[name] = InMemoryTarget()
        elif name == "filesystem":
            targets[name] = FileSystemTarget()
            say(f"FileSystem: {targets[name].root}")
        elif name == "postgresql":
            try:
                targets[name] = PostgresTarget(pg_dsn, tag)
            except Exception as e:  # psycopg.OperationalError, bad DSN, ...
                reason = " ".join(str(e).split()) or type(e).__name__
                say(f"PostgreSQL: not reachable at {mask_url(pg_dsn)} ({reason}); its column is left out")
                continue
            say(f"PostgreSQL: {mask_url(pg_dsn)} (server {targets[name].version()})")
    return targets
