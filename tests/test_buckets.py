"""Buckets (``flow_buckets``, docs/cluster.md): one flow's runs spread over several homes, each a hash slot of its own.

The contract suite runs again here with 16 buckets (its tests are imported below and take this module's ``backend``
fixture), on a real redis-server and on fakeredis: lists, cleanup and relabelling merge the homes exactly as
InMemory answers. Then what buckets add: where runs go, how a resumed or forked run stays in the home of the
checkpoint it came from (so its save can take the old run over atomically), how a cold process finds that home, the
worker's find/claim/dead letters by flow id, and the check that every backend of a namespace uses one bucket count.
The spread over a real cluster's masters is measured in tests/test_cluster.py.
"""

from __future__ import annotations

import time
import uuid
import zlib

import fakeredis
import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S
from redis.crc import key_slot

from dynamiq_redis_ckpt import ConfigurationError, RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.keys import SLOTS, flow_homes, flow_of, new_run_home, tag
from dynamiq_redis_ckpt.leases import run_homes_op
from dynamiq_redis_ckpt.worker import Recovery
from tests.test_contract import (  # noqa: F401  (collected again here, with 16 buckets)
    make,
    test_async_variants_match_sync,
    test_cleanup_matches_inmemory_for_finished_runs,
    test_clear_removes_only_its_namespace,
    test_load_update_delete_match_inmemory,
    test_queries_match_inmemory,
    test_relabel_seen_by_another_backend_object,
    test_replace_mode_relabels_every_index,
)
from tests.test_leases import orphan

BUCKETS = 16


@pytest.fixture(params=["redis", "fakeredis"])
def backend(request, redis_server):
    """A backend spreading each flow over 16 buckets: on a real redis-server, and on fakeredis with Lua."""
    prefix = f"b{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        made = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=BUCKETS)
        yield made
        made.clear()
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        yield RedisCheckpointBackend(client=client, prefix=prefix, flow_buckets=BUCKETS)


def home_of(backend, flow: str, run: str) -> str:
    return backend.execute(run_homes_op(backend.store.keys, run, flow))[0]


def test_bucket_homes_cover_the_slot_space_evenly():
    homes = flow_homes("orders", BUCKETS)
    assert homes[0] == "orders" and len(set(homes)) == BUCKETS + 1, "the flow's own home first, then 16 buckets"
    slots = [key_slot(tag(h).encode()) for h in homes[1:]]
    assert [slot * BUCKETS // SLOTS for slot in slots] == list(range(BUCKETS)), "bucket b in the b-th slot range"
    assert flow_homes("orders", 1) == ("orders",) and new_run_home("orders", "r", 1) == "orders"
    assert all(flow_of(h) == "orders" for h in homes)
    # a flow id that looks like a bucket's tag is escaped: it cannot land in another flow's bucket
    assert tag("orders%b3") != tag(homes[1]) and "%b" not in tag("orders%b3").replace("%25b", "")


def test_runs_spread_over_the_buckets_and_stay_in_theirs(backend):
    flow = "hot"
    for run in range(64):
        parent = None
        for step in range(3):
            cp = make(f"r{run}-{step}", flow, f"run-{run}", f"wf-{run}", S.COMPLETED, run * 3 + step, parent)
            backend.save(cp)
            parent = cp.id
    homes = {home_of(backend, flow, f"wf-{run}") for run in range(64)}
    assert len(homes) >= 12, f"64 runs should reach most of 16 buckets, reached {len(homes)}"
    for run in range(64):  # a run's checkpoints share one home: the one its id picks
        expected = flow_homes(flow, BUCKETS)[1 + zlib.crc32(f"wf-{run}".encode()) % BUCKETS]
        assert backend.execute(run_homes_op(backend.store.keys, f"run-{run}", flow)) == [expected]
    newest = backend.get_list_by_flow(flow, limit=10)
    assert [c.id for c in newest] == [f"r{run}-{step}" for run in (63, 62, 61, 60) for step in (2, 1, 0)][:10]
    assert backend.get_latest_by_flow(flow).id == "r63-2"


def test_a_resumed_or_forked_run_stays_in_the_home_of_its_checkpoint(backend):
    """Under a new wf_run_id (Dynamiq draws one when resume_from is given without a run id) the run goes on in the
    home of the checkpoint it resumed, where the save takes the old run's lease over atomically."""
    with as_running_flow():
        orphan(backend, flow="f", run="wf")  # the old run, its holder gone; its head is "wf-head"
        old_home = home_of(backend, "f", "wf")
        new = next(f"wf-new-{i}" for i in range(100) if new_run_home("f", f"wf-new-{i}", BUCKETS) != old_home)
        backend.save(make("n1", "f", "resumed", new, S.ACTIVE, minute=1, parent="wf-head"))
        assert home_of(backend, "f", new) == old_home, "not the bucket its own id would pick: its parent's"
        lease = backend.redis.hgetall(backend.store.keys.lease(old_home, "wf"))
        assert lease[b"superseded_by"] == new.encode(), "the old run was taken over, so no worker resumes it again"
        assert Recovery(backend).find_work() == []
        # a process that never saw the parent finds its home from the parent's locator
        cold = RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix, flow_buckets=BUCKETS)
        cold.save(make("fork", "f", "forked", "wf-fork", S.COMPLETED, minute=2, parent="n1"))
        assert home_of(backend, "f", "wf-fork") == old_home
    assert [c.id for c in backend.get_chain("fork")] == ["fork", "n1", "wf-head"]


def test_the_worker_finds_claims_and_dead_letters_runs_by_their_flow_id(backend):
    flows = [f"flow-{i}" for i in range(3)]
    for flow in flows:
        for run in range(3):
            orphan(backend, flow=flow, run=f"{flow}-run-{run}")
    recovery = Recovery(backend, max_attempts=1)
    expected = sorted((flow, f"{flow}-run-{run}") for flow in flows for run in range(3))
    assert sorted(recovery.find_orphans()) == expected, "flow ids, never a bucket's home"
    claim = recovery.claim("flow-1", "flow-1-run-2")
    assert claim is not None and flow_of(claim.flow) == "flow-1"
    assert recovery.hand_back(claim, failed=True)
    time.sleep(2.2)
    assert recovery.claim("flow-1", "flow-1-run-2") is None, "the second failure dead-letters it"
    assert [(d.flow, d.run) for d in recovery.dead_letters()] == [("flow-1", "flow-1-run-2")]
    assert recovery.retry_dead("flow-1", "flow-1-run-2") and recovery.dead_letters() == []
    assert ("flow-1", "flow-1-run-2") in recovery.find_orphans()


def test_every_backend_of_a_namespace_uses_one_bucket_count(backend):
    backend.save(make("a", "f", "r", "wf", S.COMPLETED))  # the first operation records 16
    for other in (4, 1, None):
        mismatched = RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix, flow_buckets=other)
        with pytest.raises(ConfigurationError, match="spreads each flow over 16 buckets"):
            mismatched.load("a")
    assert RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix, flow_buckets=16).load("a").id == "a"
    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(client=backend.redis, prefix="x", flow_buckets=0)


def test_a_flow_id_holding_the_reserved_character_is_refused(backend):
    from dynamiq_redis_ckpt import CheckpointEncodeError

    with pytest.raises(CheckpointEncodeError, match="NUL"):
        backend.save(make("a", "bad\x00flow", "r", "wf", S.COMPLETED))
    assert backend.load("a") is None
