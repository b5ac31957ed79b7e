"""Eviction (issue 15, item 8): a Redis whose maxmemory-policy may evict our keys is refused on the backend's first
operation (sync or async) with a typed error naming the policy and the fix, unless allow_eviction=True; the check
costs one command per backend, never one per save; fakeredis needs none. A checkpoint whose content was evicted
loads as CheckpointCorruptedError naming it, never as wrong data, and lists leave it out."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import CheckpointCorruptedError, ConfigurationError, RedisCheckpointBackend
from dynamiq_redis_ckpt.requests import text
from tests.flows import PREFIX_ENV
from tests.test_contract import make
from tests.test_worker import ROOT


def policy(server, value: str) -> None:
    RedisCheckpointBackend(url=server.url).redis.config_set("maxmemory-policy", value)


def fresh(server, **options) -> RedisCheckpointBackend:
    return RedisCheckpointBackend(url=server.url, prefix=f"ev{uuid.uuid4().hex[:6]}", **options)


def test_an_evicting_policy_is_refused_on_first_use_and_a_fix_takes_effect(own_redis):
    policy(own_redis, "allkeys-lru")
    backend = fresh(own_redis)  # built without a round trip: nothing is refused yet
    for call in (backend.ping, lambda: backend.save(make("a", "f", "r")),
                 lambda: asyncio.run(backend.load_async("a"))):  # fmt: skip
        with pytest.raises(ConfigurationError) as refused:
            call()
        assert "'allkeys-lru'" in str(refused.value) and "CONFIG SET maxmemory-policy noeviction" in str(refused.value)
    assert backend.redis.keys(f"{backend.prefix}:*") == [], "nothing was written"
    policy(own_redis, "noeviction")  # fixed at runtime: the same backend works, no restart
    backend.save(make("a", "f", "r"))
    assert backend.load("a").id == "a"
    assert asyncio.run(backend.load_async("a")).id == "a"


def test_volatile_policies_are_refused_only_when_our_keys_have_ttls(own_redis):
    policy(own_redis, "volatile-lru")
    with pytest.raises(ConfigurationError, match="lease tokens"):
        fresh(own_redis).ping()  # leases on (the default): ended runs' lease tokens carry a TTL
    with pytest.raises(ConfigurationError, match="ttl_seconds is set"):
        fresh(own_redis, leases=False, ttl_seconds=60).ping()
    assert fresh(own_redis, leases=False).ping(), "no key of ours has a TTL: volatile-* never evicts them"
    policy(own_redis, "noeviction")


def test_allow_eviction_goes_on_with_one_loud_warning(own_redis, caplog):
    policy(own_redis, "allkeys-lfu")
    backend = fresh(own_redis, allow_eviction=True)
    with caplog.at_level(logging.WARNING, logger="dynamiq_redis_ckpt.eviction"):
        for i in range(3):
            backend.save(make(f"c{i}", "f", "r"))
        asyncio.run(backend.load_async("c0"))
        assert backend.load("c2").id == "c2"
    warnings = [r for r in caplog.records if r.name == "dynamiq_redis_ckpt.eviction"]
    assert len(warnings) == 1 and "allkeys-lfu" in warnings[0].getMessage()
    policy(own_redis, "noeviction")


def test_the_check_is_one_command_per_backend_not_one_per_save(own_redis):
    backend = fresh(own_redis)
    backend.redis.config_resetstat()
    for i in range(20):
        backend.save(make(f"s{i}", "f", "r", minute=i))

    async def on_async():
        for i in range(5):
            await backend.load_async(f"s{i}")

    asyncio.run(on_async())
    stats = backend.redis.info("commandstats")
    assert stats["cmdstat_info"]["calls"] == 1, stats.get("cmdstat_info")  # INFO memory, once
    assert "cmdstat_config|get" not in stats, "CONFIG GET only where INFO is refused"


def test_where_config_is_refused_the_policy_is_read_from_info_else_a_warning(own_redis, caplog):
    admin = RedisCheckpointBackend(url=own_redis.url).redis
    admin.execute_command("ACL", "SETUSER", "noconfig", "on", ">pw", "~*", "&*", "+@all", "-config")
    admin.execute_command("ACL", "SETUSER", "blind", "on", ">pw", "~*", "&*", "+@all", "-config", "-info")
    policy(own_redis, "allkeys-random")
    as_user = lambda user, **o: RedisCheckpointBackend(  # noqa: E731
        url=f"redis://{user}:pw@127.0.0.1:{own_redis.port}/0", prefix=f"ev{uuid.uuid4().hex[:6]}", **o)
    with pytest.raises(ConfigurationError, match="allkeys-random"):
        as_user("noconfig").ping()
    blind = as_user("blind")
    with caplog.at_level(logging.WARNING, logger="dynamiq_redis_ckpt.eviction"):
        assert blind.ping() and blind.ping()
        blind.save(make("b", "f", "r"))
    warnings = [r for r in caplog.records if r.name == "dynamiq_redis_ckpt.eviction"]
    assert len(warnings) == 1 and "could not read" in warnings[0].getMessage()
    policy(own_redis, "noeviction")


def test_fakeredis_backends_are_not_checked(fake_backend):
    """fakeredis evicts nothing: its backends skip the eviction check (their only check is the bucket count)."""
    from dynamiq_redis_ckpt.eviction import EvictionCheck

    for driver in (fake_backend._sync, fake_backend._async):
        assert not any(isinstance(check, EvictionCheck) for check in driver.preflight.checks)
    fake_backend.save(make("a", "f", "r"))
    assert fake_backend.load("a").id == "a" and asyncio.run(fake_backend.load_async("a")).id == "a"


def test_a_checkpoint_whose_content_was_evicted_is_a_typed_error_and_left_out_of_lists(real_backend):
    backend, raw = real_backend, real_backend.redis
    older = make("older", "f", "r1", minute=1, text="first run's words " * 50)
    victim = make("victim", "f", "r2", minute=2, text="second run's other words " * 50)
    for cp in (older, victim):
        backend.save(cp)
    keys = backend.store.keys
    victim_packs = set(text(raw.hget(keys.checkpoint("f", "victim"), "pk")).split(","))
    older_packs = set(text(raw.hget(keys.checkpoint("f", "older"), "pk")).split(","))
    evicted = sorted(victim_packs - older_packs)
    assert evicted, "the two checkpoints share every pack: the test needs one of the victim's own"
    assert raw.delete(keys.pack("f", evicted[0])) == 1  # what an eviction does, behind the backend's back
    fresh_reader = RedisCheckpointBackend(url=backend.url, prefix=backend.prefix)  # no packs cached

    # the writer still holds the pack in its process cache (content-addressed and checksummed): the right data
    assert backend.load("victim").node_states["n"].output_data == victim.node_states["n"].output_data
    # any other process finds the pack gone and says which checkpoint is damaged
    with pytest.raises(CheckpointCorruptedError, match="victim") as caught:
        fresh_reader.load("victim")
    assert caught.value.checkpoint_id == "victim" and "pack" in caught.value.reason
    with pytest.raises(CheckpointCorruptedError, match="victim"):
        asyncio.run(fresh_reader.load_async("victim"))
    assert [c.id for c in fresh_reader.get_list_by_flow("f")] == ["older"], "the damaged one is left out"
    assert fresh_reader.store.damaged_skipped == 1
    assert fresh_reader.load("older").original_input == older.original_input
    with pytest.raises(CheckpointCorruptedError, match="victim"):  # the newest is never silently replaced by older
        fresh_reader.get_latest_by_flow("f")

    # an evicted checkpoint hash is a checkpoint that is gone: None and left out, not an error or a stranger's data
    raw.delete(keys.checkpoint("f", "older"))
    assert fresh_reader.load("older") is None
    assert fresh_reader.get_list_by_flow("f", status=S.COMPLETED) == []


@pytest.mark.slow
def test_the_worker_refuses_an_evicting_redis_with_exit_code_2(own_redis, tmp_path):
    policy(own_redis, "allkeys-lru")
    prefix = f"evw{uuid.uuid4().hex[:6]}"
    env = {"DYNAMIQ_REDIS_CKPT_URL": own_redis.url, PREFIX_ENV: prefix, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", own_redis.url, "--prefix", prefix,
            "--flows", "tests.flows:worker_flows"]  # fmt: skip
    done = subprocess.run(args, cwd=ROOT, env=os.environ | env, capture_output=True, text=True, timeout=90)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-2000:]
    assert "worker cannot start" in output and "'allkeys-lru'" in output and "noeviction" in output
    policy(own_redis, "noeviction")
