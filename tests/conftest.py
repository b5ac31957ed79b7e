"""Fixtures: a real redis-server per session (plus one per test that needs to kill it) and fakeredis with Lua."""

from __future__ import annotations

import os
import tempfile
import uuid
from types import SimpleNamespace

import fakeredis
import pytest
import redis

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.cluster_proc import ClusterSetup
from tests.redis_proc import CLUSTER, SERVER_ENV, RedisProcess, server_binary


def pytest_configure(config):
    """CKPT_TEST_SERVER=valkey|redis62: the whole session runs on that server, and so do the tests that start
    ``redis-server`` by name (the TLS tests, the demo): a ``redis-server`` link to it goes first on PATH.
    CKPT_TEST_SERVER=cluster: the session's server (``redis_server``) is a Redis Cluster of redis-servers, 3 masters
    and 3 replicas (tests/cluster_proc.py), reached with a ``redis+cluster://`` url."""
    name = os.environ.get(SERVER_ENV)
    if name and name not in ("redis", CLUSTER):
        shim = tempfile.mkdtemp(prefix="ckpt-server-")
        os.symlink(server_binary(name), os.path.join(shim, "redis-server"))
        os.environ["PATH"] = shim + os.pathsep + os.environ["PATH"]


def pytest_report_header(config):
    return f"server: {os.environ.get(SERVER_ENV) or 'redis'} ({server_binary()})"


_TESTED_ON: set[str] = set()  # the session server's name and version, once a test started it


def pytest_terminal_summary(terminalreporter):
    if _TESTED_ON:  # printed with -q too: tests/test_other_servers.py checks which server its run was on
        terminalreporter.write_line(f"server under test: {', '.join(sorted(_TESTED_ON))}")


@pytest.fixture(scope="session")
def redis_server():
    """The session's server: a redis-server (``.url``), or under CKPT_TEST_SERVER=cluster a whole cluster whose
    ``.url`` is its ``redis+cluster://`` url."""
    if os.environ.get(SERVER_ENV) == CLUSTER:
        cluster = ClusterSetup().start()
        _TESTED_ON.add(cluster.version)
        yield SimpleNamespace(url=cluster.ckpt_url, version=cluster.version, cluster=cluster)
        cluster.stop()
        return
    server = RedisProcess().start()
    _TESTED_ON.add(server.version)
    yield server
    server.kill()


@pytest.fixture
def own_redis():
    """A redis-server this test may kill and restart."""
    server = RedisProcess().start()
    yield server
    server.kill()


@pytest.fixture
def real_backend(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    yield backend
    backend.clear()


@pytest.fixture
def fake_backend():
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return RedisCheckpointBackend(client=client, prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(params=["redis", "fakeredis"])
def backend(request, redis_server):
    """The backend under test: on a real redis-server, and on fakeredis with Lua."""
    if request.param == "redis":
        made = RedisCheckpointBackend(url=redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
        yield made
        made.clear()
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield RedisCheckpointBackend(client=client, prefix=f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture
def raw(backend) -> redis.Redis:
    """The client the backend under test uses, for inspecting and damaging keys."""
    return backend.redis


@pytest.fixture
def persistent_redis():
    """A redis-server with an fsync-always append-only file: a restart keeps every acknowledged write."""
    server = RedisProcess(persist=True).start()
    yield server
    server.kill()
