"""Tenant isolation: namespaces (prefixes) on one server, one nested in another, some holding glob characters, never
see or touch each other's checkpoints, leases, timers, answers or dead letters; a worker's Recovery claims only its
own; clear() of one leaves every other key byte for byte as it was."""

from __future__ import annotations

import time

import fakeredis
import pytest
import redis
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.keys import KINDS, Keys
from dynamiq_redis_ckpt.registry import REGISTRY
from dynamiq_redis_ckpt.worker import Recovery
from tests import test_contract as contract
from tests.flows import ask_flow, chain_flow, timer_flow
from tests.test_acl import orphan
from tests.test_human_input import make_first_checkpoint

# Nested (app / app:eu), and pairs where an unescaped glob would match the other: t* ~ t, tx; t?x ~ tax;
# t[1] ~ t1; a trailing backslash.
PREFIXES = ("app", "app:eu", "t", "t*", "tx", "t?x", "tax", "t[1]", "t1", "t\\")
WORK = {("chain-2", "wf-orphan", "orphan"), ("timer-1", "wf-timer", "due"), ("ask-1", "wf-ask", "due")}


def owner(key: str) -> list[str]:
    """The namespaces whose key layout ``key`` fits (exactly one, for every key the package writes)."""
    return [p for p in PREFIXES if any(key.startswith(f"{p}:{kind}:{{") for kind in KINDS)]


def snapshot(raw: redis.Redis, keep) -> dict[bytes, tuple]:
    """Every key ``keep(key)`` accepts -> (its DUMP, whether it has a ttl)."""
    keys = [k for k in raw.scan_iter(count=1000) if keep(k.decode())]
    return {k: (raw.dump(k), raw.pttl(k) > 0) for k in keys}


def fill(backend: RedisCheckpointBackend, short: RedisCheckpointBackend) -> None:
    """The same ids in every namespace, tenant-specific content: checkpoints of three flows, a timer, a person's
    answer, an orphan and a dead letter."""
    tenant = backend.prefix
    for cp in contract.scenario()[:15]:
        cp.metadata = {"tenant": tenant}
        backend.save(cp)
    timer_flow(backend, "timer-1", seconds=0.3).run_sync({"t": tenant}, config=RunnableConfig(run_id="wf-timer"))
    ask_flow(backend, "ask-1").run_sync({"input": tenant}, config=RunnableConfig(run_id="wf-ask"))
    Recovery(backend).deliver_input("wf-ask", {"choice": tenant})
    flow = chain_flow(backend, 2, flow_id="chain-2")
    orphan(short, flow, "wf-orphan")
    orphan(short, flow, "wf-dead")


def factory(backend):
    def make(flow_id: str):
        if flow_id.startswith("timer"):
            return timer_flow(backend, flow_id, seconds=0.3)
        if flow_id.startswith("ask"):
            return ask_flow(backend, flow_id)
        return chain_flow(backend, 2, flow_id=flow_id)

    return make


def check_isolation(raw: redis.Redis, make_backend) -> None:
    raw.flushall()
    backends = {p: make_backend(p, 15.0) for p in PREFIXES}
    for p in PREFIXES:
        fill(backends[p], make_backend(p, 0.5))
    time.sleep(0.7)  # the orphans' leases ran out, the timers fell due
    for p in PREFIXES:  # wf-dead goes to dead letters (max_attempts=0), in its own namespace only
        assert Recovery(backends[p], max_attempts=0).claim("chain-2", "wf-dead") is None

    # Every key belongs to exactly one namespace, and each namespace sees only its own.
    keys = [k.decode() for k in raw.scan_iter(count=1000)]
    assert keys and all(len(owner(k)) == 1 for k in keys), [k for k in keys if len(owner(k)) != 1]
    expected_ids = {cp.id for cp in contract.scenario()[:15]}
    for p, b in backends.items():
        listed = [cp for flow in ("fa", "fb", "f{c}") for cp in b.get_list_by_flow(flow, limit=None)]
        assert {cp.id for cp in listed} == expected_ids and all(cp.metadata == {"tenant": p} for cp in listed)
        assert all(b.load(i).metadata == {"tenant": p} for i in expected_ids)
        assert all(cp.metadata == {"tenant": p} for cp in b.get_list_by_run("wf-0"))
        assert set(Recovery(b).find_work()) == WORK, p
        assert [(d.flow, d.run) for d in Recovery(b).dead_letters()] == [("chain-2", "wf-dead")], p
        assert raw.hgetall(Keys(p).inbox("ask-1", "wf-ask")) != {}

    # A worker's Recovery on "app" claims and resumes all its work; "app:eu" and the rest stay as they were.
    app, eu = backends["app"], backends["app:eu"]
    others = snapshot(raw, lambda k: owner(k) != ["app"])
    recovery = Recovery(app)
    for flow, run, reason in recovery.find_work():
        claim = recovery.claim(flow, run, reason)
        assert claim is not None and recovery.resume(claim, factory(app)).status.value == "success"
    assert recovery.find_work() == []
    answered = app.get_latest_by_flow_and_run("ask-1", "wf-ask")
    assert answered.status.value == "completed"
    assert snapshot(raw, lambda k: owner(k) != ["app"]) == others
    assert set(Recovery(eu).find_work()) == WORK, "app's worker left app:eu's orphan, timer and answer alone"
    assert eu.get_latest_by_flow_and_run("ask-1", "wf-ask").status.value == "pending_input"

    # clear() of each namespace in turn leaves every other key byte for byte.
    for p in ("app", "t", "t*", "t\\", "t[1]", "app:eu", "tx", "t?x", "tax", "t1"):
        others = snapshot(raw, lambda k: owner(k) != [p])
        backends[p].clear()
        assert snapshot(raw, lambda k: owner(k) != [p]) == others, p
        assert [k for k in raw.scan_iter(count=1000) if owner(k.decode()) == [p]] == [], p
        assert backends[p].load(next(iter(expected_ids))) is None
    assert raw.dbsize() == 0


def test_tenants_are_isolated_on_redis(own_redis):
    raw = redis.Redis(port=own_redis.port)
    check_isolation(raw, lambda p, ttl: RedisCheckpointBackend(url=own_redis.url, prefix=p, lease_ttl_seconds=ttl))


def test_tenants_are_isolated_on_fakeredis():
    raw = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    check_isolation(raw, lambda p, ttl: RedisCheckpointBackend(client=raw, prefix=p, lease_ttl_seconds=ttl))


@pytest.mark.parametrize("server", ["redis", "fakeredis"])
def test_clear_patterns_match_only_their_namespace(redis_server, server):
    """clear()'s SCAN patterns, as the server matches them, against a key of every kind of every namespace."""
    if not hasattr(redis_server, "port"):
        pytest.skip("writes keys of its own into database 9 of a single redis-server (CKPT_TEST_SERVER=cluster)")
    raw = redis.Redis(port=redis_server.port, db=9) if server == "redis" else fakeredis.FakeRedis()
    raw.flushdb()
    for p in PREFIXES:
        for kind in KINDS:
            raw.set(f"{p}:{kind}:{{x}}:y", p)
    for prefix in PREFIXES:
        matched = {k.decode() for pattern in Keys(prefix).namespace_patterns() for k in raw.scan_iter(match=pattern)}
        assert matched == {f"{prefix}:{kind}:{{x}}:y" for kind in KINDS}, prefix
    raw.flushdb()


def test_clear_leaves_no_lease_index_entry_of_a_lease_it_deleted(redis_server):
    """clear() kept every flow's lease index whole: an orphan's index entry outlived its lease and checkpoints, so
    the namespace was never empty and workers kept finding a run that no longer existed. Only live runs' entries
    stay."""
    backend = RedisCheckpointBackend(url=redis_server.url, prefix="lease-ix", lease_ttl_seconds=15.0)
    short = RedisCheckpointBackend(url=redis_server.url, prefix="lease-ix", lease_ttl_seconds=0.3)
    keys = backend.store.keys
    try:
        orphan(short, chain_flow(short, 2, flow_id="gone"), "wf-orphan")
        orphan(short, chain_flow(short, 2, flow_id="busy"), "wf-orphan")
        with as_running_flow():  # a live run (this process renews its lease) beside the orphan of its flow
            backend.save(make_first_checkpoint(chain_flow(backend, 2, flow_id="busy"), "wf-live"))
        time.sleep(0.4)
        assert set(Recovery(backend).find_orphans()) == {("gone", "wf-orphan"), ("busy", "wf-orphan")}
        backend.clear()
        left = sorted(k.decode() for k in backend.redis.scan_iter(match="lease-ix:*"))
        shard = keys.shard_of("busy")  # the live run's flow is announced to workers again
        assert left == sorted([keys.lease("busy", "wf-live"), keys.lease_index("busy"), keys.wake(shard),
                               keys.wake_versions(shard)]), left  # fmt: skip
        assert backend.redis.zrange(keys.lease_index("busy"), 0, -1) == [b"wf-live"]
        assert Recovery(backend).find_orphans() == []
    finally:
        held = REGISTRY.get((backend.namespace, "busy", "wf-live"))
        if held is not None:
            REGISTRY.fence(backend.namespace, "busy", "wf-live", held.token, "test over")
        backend.clear()
