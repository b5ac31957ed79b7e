"""Finding work costs what is due, not what ever ran: a worker looks only at flows on the wake shards, and ended
runs leave nothing there. Real Redis; commands counted with INFO commandstats."""

from __future__ import annotations

import time
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.keys import FLOW_SHARDS
from dynamiq_redis_ckpt.leases import LeaseTicket, announce, find_work_op
from dynamiq_redis_ckpt.requests import Script
from dynamiq_redis_ckpt.worker import Recovery
from tests.test_contract import make


@pytest.fixture
def backend(own_redis):
    made = RedisCheckpointBackend(url=own_redis.url, prefix=f"w{uuid.uuid4().hex[:6]}", lease_ttl_seconds=2)
    yield made
    made.clear()


def commands(raw) -> int:
    """Commands the server has run so far (every command, scripts' inner calls included)."""
    return sum(v["calls"] for k, v in raw.info("commandstats").items())


def finished_runs(backend, flows: int) -> None:
    """``flows`` flows of one run each, run to the end as a running Flow saves them (a Flow per request, each with
    a new uuid: Dynamiq's default)."""
    with as_running_flow():
        for i in range(flows):
            flow = f"flow-{uuid.uuid4()}"
            backend.save(make(f"a{i}", flow, f"r{i}", f"wf{i}", S.ACTIVE))
            backend.save(make(f"b{i}", flow, f"r{i}", f"wf{i}", S.COMPLETED, minute=1, parent=f"a{i}"))


def idle_poll_cost(backend, recovery) -> int:
    raw = backend.redis
    before = commands(raw)
    assert recovery.find_work() == []
    return commands(raw) - before - 1  # less the INFO that measured it


def test_an_idle_workers_poll_costs_the_same_after_400_ended_flows(backend):
    recovery = Recovery(backend)
    recovery.find_work()  # the one-time look at the old registry
    empty = idle_poll_cost(backend, recovery)
    finished_runs(backend, 400)
    raw = backend.redis
    waiting = sum(raw.zcard(backend.store.keys.wake(i)) for i in range(FLOW_SHARDS))
    assert waiting == 400, "every run's end was announced to the workers"
    first = idle_poll_cost(backend, recovery)  # looks at each ended flow once and forgets it
    assert sum(raw.zcard(backend.store.keys.wake(i)) for i in range(FLOW_SHARDS)) == 0, "nothing left to read"
    after = idle_poll_cost(backend, recovery)
    print(f"\n[idle worker] commands per poll: {empty} with no history, {first} for the poll that met 400 ended "
          f"flows, {after} after them")
    assert after == empty, "an idle poll costs what is due, not what ever existed"
    assert after <= 3 * FLOW_SHARDS  # per shard: the script, its TIME and its ZRANGEBYSCORE


def test_live_leases_are_looked_at_when_they_could_run_out_not_on_every_poll(backend):
    """A run held by a live process: its flow is looked at once, then postponed to the lease's expiry."""
    recovery = Recovery(backend)
    with as_running_flow():
        backend.save(make("a", "live", "r", "wf", S.ACTIVE))
    assert recovery.find_work() == []
    raw = backend.redis
    (score,) = [s for i in range(FLOW_SHARDS) for _, s in raw.zrange(backend.store.keys.wake(i), 0, -1, withscores=True)]
    lease_exp = int(raw.hget(backend.store.keys.lease("live", "wf"), "exp"))
    assert score == lease_exp, "postponed to when the lease could run out"
    assert idle_poll_cost(backend, recovery) <= 3 * FLOW_SHARDS


def test_an_orphan_is_found_once_its_postponed_time_comes(backend):
    ticket = LeaseTicket("take", "gone:1:x", 0, 600)  # a holder that dies at once: its lease runs out in 0.6 s
    backend.execute(backend.store.save(make("a", "dying", "r", "wf", S.ACTIVE), ticket=ticket))
    recovery = Recovery(backend)
    assert recovery.find_work() == []  # not yet: postponed to the lease's expiry
    time.sleep(0.7)
    assert recovery.find_work() == [("dying", "wf", "orphan")]


def test_new_work_announced_while_a_worker_settles_a_flow_is_not_lost(backend):
    """A worker read a flow's version, found nothing, and settles it; a save announced new work in between: the
    settle is refused, so the flow stays due."""
    keys = backend.store.keys
    backend.execute(_announce(keys, "f"))
    shard = keys.shard_of("f")
    found = backend.execute(_wakes(keys, shard))
    version = found[1].decode()
    backend.execute(_announce(keys, "f"))  # new work for f, after the worker read its version
    assert backend.execute(_settle(keys, shard, "f", version)) == 0
    assert backend.redis.zscore(keys.wake(shard), "f") == 0, "still due now"
    current = backend.execute(_wakes(keys, shard))[1].decode()
    assert backend.execute(_settle(keys, shard, "f", current)) == 1
    assert backend.redis.zscore(keys.wake(shard), "f") is None


def test_flows_registered_by_an_older_version_are_still_found(backend):
    """Versions before the wake shards kept a registry of flows (P:flows:{n}); a worker moves it over once."""
    ticket = LeaseTicket("take", "gone:1:x", 0, 100)
    backend.execute(backend.store.save(make("a", "legacy", "r", "wf", S.ACTIVE), ticket=ticket))
    keys, raw = backend.store.keys, backend.redis
    for i in range(FLOW_SHARDS):  # as an older version left it: no wake entry, a registry entry
        raw.delete(keys.wake(i), keys.wake_versions(i))
    raw.sadd(keys.legacy_flow_registry(keys.shard_of("legacy")), "legacy")
    time.sleep(0.2)
    assert Recovery(backend).find_work() == [("legacy", "wf", "orphan")]
    assert not any(raw.exists(keys.legacy_flow_registry(i)) for i in range(FLOW_SHARDS))


def _announce(keys, flow):
    yield announce(keys, flow)[0]
    yield announce(keys, flow)[1]


def _wakes(keys, shard):
    return (yield Script("wakes", (keys.wake(shard), keys.wake_versions(shard)), (10,)))


def _settle(keys, shard, flow, version):
    return (yield Script("settle", (keys.wake(shard), keys.wake_versions(shard)), (flow, version, "")))


def test_find_work_reads_due_runs_first(backend):
    """Due runs (a timer, an answer) come before orphans."""
    ticket = LeaseTicket("take", "gone:1:x", 0, 50)
    backend.execute(backend.store.save(make("a", "o", "r", "wf-o", S.ACTIVE), ticket=ticket))
    keys = backend.store.keys
    backend.redis.hset(keys.lease("d", "wf-d"), mapping={"owner": "", "exp": 0, "head": "x", "token": 1})
    backend.redis.zadd(keys.due_index("d"), {"wf-d": 0})
    backend.execute(_announce(keys, "d"))
    time.sleep(0.1)
    assert backend.execute(find_work_op(keys, 10)) == [("d", "wf-d", "due"), ("o", "wf-o", "orphan")]
