"""A throwaway Redis for demos and local tries: a private ``redis-server``, else an in-process fakeredis.

Example::

    with start_embedded_redis() as server:
        backend = RedisCheckpointBackend(**server.backend_kwargs(), prefix="demo")
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

import redis

__all__ = ["EmbeddedRedis", "start_embedded_redis"]

_START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A Redis owned by this process, stopped on :meth:`close` (or when its ``with`` block ends).

    Attributes:
        kind: ``"redis-server"`` or ``"fakeredis (in-process)"``.
        url: ``redis://127.0.0.1:<port>/0`` for a redis-server, None for fakeredis (other processes cannot reach it).
    """

    def __init__(self) -> None:
        self.kind: str
        self.url: str | None = None
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._fake_server: Any = None
        binary = shutil.which("redis-server")
        if binary is not None:
            self._start_server(binary)
        else:
            import fakeredis

            self.kind = "fakeredis (in-process)"
            self._fake_server = fakeredis.FakeServer()

    def _start_server(self, binary: str) -> None:
        port = _free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="dynamiq-redis-ckpt-")
        self._proc = subprocess.Popen(
            [binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", str(port),
             "--dir", self._dir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.kind = "redis-server"
        self.url = f"redis://127.0.0.1:{port}/0"
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.5)
        deadline = time.monotonic() + _START_TIMEOUT
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with code {self._proc.returncode} before answering")
                try:
                    if probe.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING on {self.url} within {_START_TIMEOUT:g} s")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        finally:
            probe.close()

    def client(self) -> Any:
        """A new client of this Redis: ``redis.Redis`` (bytes replies), or ``fakeredis.FakeRedis`` on the fallback."""
        if self._fake_server is not None:
            import fakeredis

            return fakeredis.FakeRedis(server=self._fake_server)
        return redis.Redis.from_url(self.url)

    def backend_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that point ``RedisCheckpointBackend(**kwargs)`` at this Redis (``url`` or ``client``)."""
        if self.url is not None:
            return {"url": self.url}
        return {"client": self.client()}

    def close(self) -> None:
        """Stop the redis-server (if one was started) and remove its directory. Safe to call twice."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_embedded_redis() -> EmbeddedRedis:
    """Start a private Redis: ``redis-server`` on a free loopback port if it is on PATH, else in-process fakeredis."""
    return EmbeddedRedis()
