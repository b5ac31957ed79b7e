"""Fixtures: a real redis-server per session (plus one per test that needs to kill it) and fakeredis with Lua."""

from __future__ import annotations

import uuid

import fakeredis
import pytest
import redis

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.redis_proc import RedisProcess


@pytest.fixture(scope="session")
def redis_server():
    server = RedisProcess().start()
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
