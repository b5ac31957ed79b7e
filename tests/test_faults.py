"""Faults: Redis killed, restarted, frozen or flushed; damaged data; oversize and wrong-type keys.

Each gives a clear, typed error and loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import (
    CheckpointCorruptedError,
    CheckpointStoreError,
    CheckpointTooLargeError,
    RedisCheckpointBackend,
    StoreUnavailableError,
    UnsupportedFormatError,
    WrongKeyTypeError,
)
from tests.flows import chain_flow, final_output
from tests.test_contract import make


def fresh(backend) -> RedisCheckpointBackend:
    """Another backend object on the same store, with nothing cached (like another pod)."""
    return RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix)


def namespace_keys(backend) -> list[bytes]:
    return sorted(backend.redis.scan_iter(match=f"{backend.prefix}:*"))


def test_unreachable_redis_fails_fast_with_a_typed_error(redis_server):
    from tests.redis_proc import free_port

    backend = RedisCheckpointBackend(url=f"redis://127.0.0.1:{free_port()}/0", retries=2, retry_backoff_seconds=0.01)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        backend.save(make("c", "f", "r"))
    assert isinstance(caught.value, ConnectionError) and isinstance(caught.value, CheckpointStoreError)
    assert time.monotonic() - started < 5, "bounded retries, not a hang"
    with pytest.raises(StoreUnavailableError):
        backend.load("c")


def test_frozen_redis_times_out_then_recovers(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, socket_timeout=0.3, retries=1, retry_backoff_seconds=0.01)
    backend.save(make("before", "f", "r", minute=0))
    own_redis.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            backend.save(make("during", "f", "r", minute=1))
        assert time.monotonic() - started < 5
    finally:
        own_redis.resume()
    backend.save(make("after", "f", "r", minute=2))
    listed = [c.id for c in backend.get_list_by_flow("f")]
    # A request that timed out may still run when the server wakes (it sat in the socket buffer): the save was
    # reported as failed, and if it lands it is the complete checkpoint, never a part of one.
    assert listed in (["after", "before"], ["after", "during", "before"])
    if "during" in listed:
        assert fresh(backend).load("during") == make("during", "f", "r", minute=1)


def test_frozen_redis_times_out_async_and_no_stale_reply_is_read(own_redis):
    """The async driver bounds a whole request with socket_timeout (its clients have none of their own), and a
    connection whose reply never came is closed: the late reply must not answer the next request."""
    backend = RedisCheckpointBackend(url=own_redis.url, socket_timeout=0.3, retries=0)
    first = make("before", "f", "r", minute=0)

    async def scenario():
        await backend.save_async(first)
        own_redis.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                await backend.load_async("before")
            assert time.monotonic() - started < 2, "one deadline per request, not a hang"
        finally:
            own_redis.resume()
        # The frozen load's reply arrives now; on a reused connection it would be read as the answer to these.
        assert await backend.load_async("missing") is None
        assert await backend.load_async("before") == first
        await backend.save_async(make("after", "f", "r", minute=1))
        return [c.id for c in await backend.get_list_by_flow_async("f")]

    assert asyncio.run(scenario()) == ["after", "before"]


def test_async_connections_the_server_closed_while_idle_are_reopened(own_redis):
    """With no retries, a request must not fail on a pooled connection the server dropped (CLIENT KILL, an idle
    timeout, a restart): the driver takes connections without redis-py's checkout read, so it checks for EOF."""
    backend = RedisCheckpointBackend(url=own_redis.url, retries=0)
    first = make("c", "f", "r", minute=0)

    async def scenario():
        await asyncio.gather(*(backend.save_async(make(f"c{i}", "f", f"r{i}", minute=i)) for i in range(4)))
        await backend.save_async(first)
        killed = backend.redis.client_kill_filter(_type="normal", skipme=True)
        await asyncio.sleep(0.1)  # the event loop sees the closed sockets
        found = [await backend.load_async("c") for _ in range(6)]
        return killed, found

    killed, found = asyncio.run(scenario())
    assert killed >= 1
    assert found == [first] * 6


def test_script_flush_reloads_scripts_async(backend):
    async def scenario():
        await backend.save_async(make("a", "f", "r"))
        backend.redis.script_flush()
        await backend.save_async(make("b", "f", "r", minute=1))
        backend.redis.script_flush()
        return await backend.delete_async("a"), [c.id for c in await backend.get_list_by_flow_async("f")]

    assert asyncio.run(scenario()) == (True, ["b"])


def test_script_flush_reloads_scripts(backend):
    backend.save(make("a", "f", "r"))
    backend.redis.script_flush()
    backend.save(make("b", "f", "r", minute=1))
    backend.redis.script_flush()
    assert backend.delete("a") is True
    backend.redis.script_flush()
    assert backend.cleanup_by_flow("f", keep_count=0) == 1
    assert backend.get_list_by_flow("f") == []


def test_redis_restart_without_persistence_mid_run(own_redis):
    """The server restarts empty mid-run: saves meanwhile fail loudly, later saves re-send everything needed."""
    backend = RedisCheckpointBackend(url=own_redis.url, retries=1, retry_backoff_seconds=0.01)
    first = make("a", "f", "r", minute=0, text="shared content " * 100)
    backend.save(first)
    own_redis.kill()
    with pytest.raises(StoreUnavailableError):
        backend.save(make("b", "f", "r", minute=1, parent="a", text="shared content " * 100))
    own_redis.start()
    child = make("c", "f", "r", minute=2, parent="a", text="shared content " * 100)
    backend.save(child)  # its cached parent's packs are gone: the save script says MISSING, the content is resent
    assert fresh(backend).load("c") == child
    first.status = S.FAILED
    backend.save(first)  # cached state says stored, server says absent: RETRY path
    assert fresh(backend).load("a") == first


def test_flow_survives_redis_restart_with_persistence(persistent_redis, tmp_path):
    """Redis killed and restarted mid-run (data on disk): the run completes and every acknowledged save is there."""
    backend = RedisCheckpointBackend(url=persistent_redis.url, retries=0)
    flow = chain_flow(backend, 6, flow_id="restart", words=60)
    flow.nodes[2].effects_path = None
    restarted = threading.Event()

    original = type(flow.nodes[3]).execute

    def execute_with_restart(self, input_data, config=None, **kwargs):
        if self.id == "s03" and not restarted.is_set():
            persistent_redis.kill()
            persistent_redis.start()
            restarted.set()
        return original(self, input_data, config, **kwargs)

    type(flow.nodes[3]).execute = execute_with_restart
    try:
        result = flow.run_sync({"q": "x"})
    finally:
        type(flow.nodes[3]).execute = original
    assert restarted.is_set()
    assert result.status.value == "success"
    chain = fresh(backend).get_chain(fresh(backend).get_latest_by_flow("restart").id)
    assert chain[0].status == S.COMPLETED
    assert [c.completed_node_ids for c in chain][::-1] == [[f"s{i:02d}" for i in range(k)] for k in range(7)] + [
        [f"s{i:02d}" for i in range(6)]
    ]
    assert chain[0].node_states["s05"].output_data == final_output(result)


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda r, k: r.hset(k, "root", "00" * 16), CheckpointCorruptedError),  # names no chunk of its packs
        (lambda r, k: r.hset(k, "root", "not hex"), CheckpointCorruptedError),
        (lambda r, k: r.hset(k, "pk", ""), CheckpointCorruptedError),
        (lambda r, k: r.hset(k, "pk", "ab" * 12), CheckpointCorruptedError),  # a pack that is not there
        (lambda r, k: r.hset(k, "fmt", "99"), UnsupportedFormatError),
        (lambda r, k: r.hset(k, "fmt", "x"), CheckpointCorruptedError),
        (lambda r, k: r.hset(k, "fmt", "3"), CheckpointCorruptedError),  # format 3 kept the root in 'doc'
        (lambda r, k: r.hdel(k, "root"), CheckpointCorruptedError),
    ],
)
def test_damaged_root_document_gives_typed_error_and_spares_others(backend, damage, error):
    victim, other = make("victim", "f", "r", text="v " * 300), make("other", "f", "r", minute=1, text="o " * 300)
    backend.save(victim)
    backend.save(other)
    damage(backend.redis, backend._core.keys.checkpoint("f", "victim"))
    with pytest.raises(error) as caught:
        fresh(backend).load("victim")
    assert caught.value.checkpoint_id == "victim"
    assert fresh(backend).load("other") == other


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "layer"])
def test_damaged_content_pack_gives_typed_error(backend, how):
    cp = make("victim", "f", "r", text="content that lands in a pack " * 40)
    backend.save(cp)
    raw = backend.redis
    (pack,) = raw.scan_iter(match=f"{backend.prefix}:pack:*")
    blob = raw.get(pack)
    if how == "flip":
        raw.set(pack, blob[:-20] + bytes(b ^ 0x55 for b in blob[-20:]))
    elif how == "truncate":
        raw.set(pack, blob[: len(blob) // 2])
    elif how == "layer":  # a layer this reader does not know (after the 8-digit count): a newer writer's
        raw.set(pack, blob[:8] + bytes([blob[8] | 0x80]) + blob[9:])
    else:
        raw.delete(pack)
    with pytest.raises(UnsupportedFormatError if how == "layer" else CheckpointCorruptedError) as caught:
        fresh(backend).load("victim")
    assert caught.value.checkpoint_id == "victim"


def test_oversize_checkpoint_is_rejected_before_any_write(backend):
    small = RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix, max_checkpoint_bytes=10_000)
    small.save(make("fits", "f", "r", text="a"))
    before = namespace_keys(backend)
    huge = make("huge", "f", "r", minute=1, text="".join(chr(65 + i % 50) for i in range(20_000)))
    with pytest.raises(CheckpointTooLargeError) as caught:
        small.save(huge)
    assert caught.value.size > 10_000 and caught.value.limit == 10_000
    assert namespace_keys(backend) == before
    assert small.load("huge") is None


@pytest.mark.parametrize("key_of", [
    lambda k: k.flow_index("f"),
    lambda k: k.status_index("f", "completed"),
    lambda k: k.run_index("f", "r"),
    lambda k: k.checkpoint("f", "c"),
])  # fmt: skip
def test_wrong_key_type_is_a_typed_error_and_writes_nothing(backend, key_of):
    backend.save(make("earlier", "f", "r", text="e " * 200))
    key = key_of(backend._core.keys)
    backend.redis.delete(key)
    backend.redis.set(key, "not mine")
    before = {k: backend.redis.type(k) for k in namespace_keys(backend) if b":id:" not in k and b":runflows:" not in k}
    with pytest.raises(WrongKeyTypeError) as caught:
        backend.save(make("c", "f", "r", minute=1, text="new content " * 100))
    assert key in caught.value.keys[0] if caught.value.keys else True
    after = {k: backend.redis.type(k) for k in namespace_keys(backend) if b":id:" not in k and b":runflows:" not in k}
    assert after == before, "no pack, index or hash was written"


def test_wrong_key_type_on_read_is_typed(backend):
    backend.redis.set(backend._core.keys.flow_index("f"), "not a zset")
    with pytest.raises(WrongKeyTypeError):
        backend.get_list_by_flow("f")


def test_decode_responses_client_is_refused():
    from dynamiq_redis_ckpt import ConfigurationError

    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(client=redis.Redis(decode_responses=True))


def test_password_never_shown():
    backend = RedisCheckpointBackend(url="redis://app:s3cret@redis.internal:6380/2")
    shown = str(backend.to_dict()) + backend.model_dump_json()
    assert "s3cret" not in str(backend.to_dict())
    assert backend.to_dict()["url"] == "redis://app:***@redis.internal:6380/2"
    assert "s3cret" not in str(backend.to_dict(include_secure_params=True))
    del shown


@pytest.mark.parametrize("options", [{"prefix": "a{b"}, {"ttl_seconds": 0}, {"retries": -1}, {"url": "http://x"}])
def test_bad_options_raise_configuration_error(options):
    from dynamiq_redis_ckpt import ConfigurationError

    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(**options)


def test_password_not_in_repr():
    backend = RedisCheckpointBackend(url="redis://app:s3cret@redis.internal:6380/2")
    assert "s3cret" not in repr(backend) and "s3cret" not in str(backend)


def test_ping_and_close(redis_server):
    from tests.redis_proc import free_port

    backend = RedisCheckpointBackend(url=redis_server.url, prefix="ping")
    assert backend.ping() is True
    backend.save(make("c", "f", "r"))
    backend.close()
    backend.close()
    assert backend.load("c") is not None, "a closed pool reconnects on next use"
    backend.clear()
    with pytest.raises(StoreUnavailableError):
        RedisCheckpointBackend(url=f"redis://127.0.0.1:{free_port()}/0", retries=0).ping()
