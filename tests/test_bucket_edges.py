"""Buckets at their edges (flow_buckets=16 on one redis-server), found by a hostile review: a run resumed from another
run's checkpoint keeps its home once that checkpoint is gone and the process forgot it (cache churn, cleanup, ttl);
updates from a cold process; flow ids that look like buckets or hold NUL; dead letters and paused checkpoints whose
lookup keys expired; cleanup against InMemory over many runs; encryption with buckets."""
from __future__ import annotations

import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.keys import new_run_home
from dynamiq_redis_ckpt.leases import run_homes_op
from tests.test_contract import make

B = 16


@pytest.fixture
def bk(redis_server):
    prefix = f"rv{uuid.uuid4().hex[:8]}"
    made = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=B)
    yield made
    made.clear()


def cold(bk):
    """Another backend object on the same namespace: an empty cache, as in another process."""
    return RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)


def other_run(flow, not_home):
    return next(f"wf2-{i}" for i in range(200) if new_run_home(flow, f"wf2-{i}", B) != not_home)


def _resumed(bk):
    """P in run wf1's bucket; C (run wf2, parent P) saved in P's home (not wf2's own bucket)."""
    p = make("P", "f", "r1", "wf1", S.FAILED, 1)
    bk.save(p)
    h0 = new_run_home("f", "wf1", B)
    wf2 = other_run("f", h0)
    c = make("C", "f", "r2", wf2, S.PENDING_INPUT, 2, parent="P")
    bk.save(c)
    assert bk.execute(run_homes_op(bk.store.keys, wf2, "f")) == [h0]
    return c, wf2, h0


def test_cold_update_of_resumed_checkpoint_after_parent_deleted(bk):
    c, wf2, h0 = _resumed(bk)
    assert bk.delete("P")
    other = RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)
    c.status = S.COMPLETED
    other.update(c)  # an existing checkpoint: update must succeed
    assert other.load("C").status == S.COMPLETED


def test_cold_save_of_resumed_checkpoint_after_parent_deleted_keeps_one_home(bk):
    c, wf2, h0 = _resumed(bk)
    assert bk.delete("P")
    other = RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)
    c.status = S.COMPLETED
    other.save(c)
    assert other.load("C").status == S.COMPLETED
    assert bk.execute(run_homes_op(bk.store.keys, wf2, "f")) == [h0], "the run moved out of its home"


def test_a_flow_id_with_nul_cannot_read_or_delete_another_flows_bucket(bk):
    from dynamiq_redis_ckpt.keys import flow_homes

    for i in range(8):
        bk.save(make(f"v{i}", "victim", f"r{i}", f"wf{i}", S.COMPLETED, i))
    home = new_run_home("victim", "wf0", B)
    assert home in flow_homes("victim", B)
    hostile = home  # "victim\x00<salt>": a flow id a caller may pass to any read
    removed = bk.cleanup_by_flow(hostile, keep_count=0)
    assert removed == 0 and bk.load("v0") is not None, "cleanup of another flow id deleted victim's checkpoints"


def test_a_flow_id_with_nul_cannot_list_another_flows_bucket(bk):
    for i in range(8):
        bk.save(make(f"v{i}", "victim", f"r{i}", f"wf{i}", S.COMPLETED, i))
    hostile = new_run_home("victim", "wf0", B)
    listed = [c.id for c in bk.get_list_by_flow(hostile)]
    assert listed == [], f"flow {hostile!r} listed another flow's checkpoints {listed}"


def test_dead_letter_outliving_its_lookup_keys_can_still_be_dropped(redis_server):
    """ttl'd namespace with buckets: once a dead run's checkpoints (and P:runflows:{run}) expire, dead_letters()
    still lists it; drop_dead/retry_dead must still reach it (with one bucket they do: the flow is the home)."""
    import time
    from dynamiq_redis_ckpt.worker import Recovery
    from tests.test_leases import orphan

    prefix = f"rv{uuid.uuid4().hex[:8]}"
    bk = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=B, ttl_seconds=4)
    try:
        with as_running_flow():
            orphan(bk, flow="f", run="wf")
        recovery = Recovery(bk, max_attempts=1)
        claim = recovery.claim("f", "wf")
        assert claim is not None and recovery.hand_back(claim, failed=True)
        time.sleep(2.3)
        assert recovery.claim("f", "wf") is None
        assert [(d.flow, d.run) for d in recovery.dead_letters()] == [("f", "wf")]
        time.sleep(2.0)
        assert bk.redis.exists(bk.store.keys.run_flows("wf")) == 0, "lookup key expired"
        listed = [(d.flow, d.run) for d in recovery.dead_letters()]
        assert listed == [("f", "wf")], listed
        assert recovery.drop_dead("f", "wf"), "a listed dead letter cannot be dropped"
        assert recovery.dead_letters() == []
    finally:
        bk.clear()


@pytest.mark.parametrize("buckets", [1, B])
def test_paused_checkpoint_still_listed_by_run_after_sibling_ttl(redis_server, buckets):
    """Two workflow runs under one run_id: wf1 waits for a person (held without expiry), wf2 saves a finished
    checkpoint with the ttl. Once the ttl passes, the paused checkpoint (still stored) must still be listed by
    get_list_by_flow_and_run(flow, run_id), as with one bucket."""
    import time

    prefix = f"rv{uuid.uuid4().hex[:8]}"
    bk = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=buckets, ttl_seconds=2)
    try:
        bk.save(make("paused", "f", "R", "wf1", S.PENDING_INPUT, 1))
        bk.save(make("done", "f", "R", "wf2", S.COMPLETED, 2))
        time.sleep(2.5)
        assert bk.load("paused") is not None, "held while a person is awaited"
        assert [c.id for c in bk.get_list_by_flow_and_run("f", "R")] == ["paused"]
    finally:
        bk.clear()


@pytest.mark.parametrize("fetch", [120, 1000])
def test_cleanup_many_runs_matches_inmemory(bk, fetch):
    import random
    from dynamiq.checkpoints.backends.in_memory import InMemory

    rng = random.Random(3)
    mem = InMemory(max_cleanup_results=fetch)
    bk.max_cleanup_results = fetch
    minutes = rng.sample(range(100000), 260)
    for i, m in enumerate(minutes):
        cp = make(f"k{i}", "f", f"r{i % 40}", f"wf{i % 40}", rng.choice([S.COMPLETED, S.FAILED]), m)
        bk.save(cp)
        mem.save(make(f"k{i}", "f", f"r{i % 40}", f"wf{i % 40}", cp.status, m))
    assert bk.cleanup_by_flow("f", keep_count=7) == mem.cleanup_by_flow("f", keep_count=7)
    assert sorted(c.id for c in bk.get_list_by_flow("f", limit=None)) == sorted(
        c.id for c in mem.get_list_by_flow("f", limit=None))


def test_cold_plain_save_does_not_break_live_resumed_run(bk):
    c, wf2, h0 = _resumed(bk)
    with as_running_flow():
        c.status = S.ACTIVE
        bk.save(c)  # the live run holds wf2's lease in h0
    assert bk.delete("P")
    other = RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)
    c2 = make("C", "f", "r2", wf2, S.ACTIVE, 3, parent="P")
    c2.metadata = {"note": "operator"} if hasattr(c2, "metadata") else None
    other.save(c2)  # a plain call from an operator's process
    with as_running_flow():
        c.status = S.ACTIVE
        bk.save(c)
        bk.save(make("C2", "f", "r2", wf2, S.COMPLETED, 4, parent="C"))
    assert [x.id for x in bk.get_list_by_flow_and_run("f", wf2)] == ["C2", "C"]
    fresh = RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)
    assert [x.id for x in fresh.get_chain("C2")] == ["C2", "C"]


def test_odd_flow_ids_stay_apart_with_buckets(bk):
    flows = ["a", "a%b1", "a%b", "{a}", "%", "", "a}", "{", "%25", "a%7Db"]
    for n, flow in enumerate(flows):
        for i in range(6):
            bk.save(make(f"{n}-{i}", flow, f"r{n}-{i}", f"wf{n}-{i}", S.COMPLETED, n * 10 + i))
    fresh = RedisCheckpointBackend(client=bk.redis, prefix=bk.prefix, flow_buckets=B)
    for n, flow in enumerate(flows):
        assert sorted(c.id for c in fresh.get_list_by_flow(flow)) == [f"{n}-{i}" for i in range(6)], flow
        assert [c.id for c in fresh.get_list_by_flow_and_run(flow, f"r{n}-2")] == [f"{n}-2"]
        assert fresh.load(f"{n}-3").flow_id == flow
    assert fresh.cleanup_by_flow("", keep_count=2) == 4
    assert fresh.cleanup_by_flow("a%b1", keep_count=0) == 6
    for n, flow in enumerate(flows):
        want = {"": 2, "a%b1": 0}.get(flow, 6)
        assert len(fresh.get_list_by_flow(flow)) == want, flow


def test_live_resumed_run_survives_cleanup_of_its_parent_and_cache_churn(bk):
    """A run resumed from P (a new wf_run_id) lives in P's home, under a lease held there. A plain
    cleanup_by_flow deletes P (an old run's finished checkpoint). Once this process's state cache has moved on
    (LRU: other runs' checkpoints), the live run's next save of its own head must still land under its lease."""
    from dynamiq_redis_ckpt import LeaseLostError

    p = make("P", "f", "r1", "wf1", S.FAILED, 1)
    bk.save(p)
    h0 = new_run_home("f", "wf1", B)
    wf2 = other_run("f", h0)
    c = make("C", "f", "r2", wf2, S.ACTIVE, 2, parent="P")
    with as_running_flow():
        bk.save(c)  # takes wf2's lease, in h0
    assert bk.cleanup_by_flow("f", keep_count=0) == 1  # P goes; C, an in-flight head, is spared
    assert bk.load("P") is None and bk.load("C") is not None
    bk.store.cache._max_states = 8  # a smaller LRU, so a few other saves move it on
    for i in range(20):
        bk.save(make(f"o{i}", "other", f"o{i}", f"o{i}", S.COMPLETED, 3 + i))
    c.node_states["n"].output_data = "progress"
    try:
        with as_running_flow():
            bk.save(c)
            bk.save(make("C2", "f", "r2", wf2, S.COMPLETED, 40, parent="C"))
    except LeaseLostError as e:
        pytest.fail(f"live run broken: {e!r}")
    assert [x.id for x in bk.get_list_by_flow_and_run("f", wf2)] == ["C2", "C"]


def test_live_resumed_run_survives_its_parents_ttl_and_cache_churn(redis_server):
    """As above without any API call: the parent simply expires (ttl_seconds) while the resumed run goes on."""
    import time
    from dynamiq_redis_ckpt import LeaseLostError

    prefix = f"rv{uuid.uuid4().hex[:8]}"
    bk = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=B, ttl_seconds=3,
                                lease_ttl_seconds=2)
    try:
        bk.save(make("P", "f", "r1", "wf1", S.FAILED, 1))
        wf2 = other_run("f", new_run_home("f", "wf1", B))
        c = make("C", "f", "r2", wf2, S.ACTIVE, 2, parent="P")
        with as_running_flow():
            for _ in range(4):  # the run goes on, saving its head every second
                bk.save(c)
                time.sleep(1)
        assert bk.load("P") is None, "the parent expired"
        bk.store.cache._max_states = 8
        for i in range(20):
            bk.save(make(f"o{i}", "other", f"o{i}", f"o{i}", S.COMPLETED, 3 + i))
        try:
            with as_running_flow():
                bk.save(c)
        except LeaseLostError as e:
            pytest.fail(f"live run broken: {e!r}")
    finally:
        bk.clear()


def test_encryption_with_buckets_cold_reads(redis_server):
    keys = lambda: ({"k1": b"\x01" * 32}, "k1")  # noqa: E731
    prefix = f"rv{uuid.uuid4().hex[:8]}"
    bk = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=B, encryption_keys=keys)
    try:
        bk.save(make("P", "f", "r1", "wf1", S.FAILED, 1, text="secret " * 30))
        wf2 = other_run("f", new_run_home("f", "wf1", B))
        bk.save(make("C", "f", "r2", wf2, S.COMPLETED, 2, parent="P", text="secret more " * 30))
        bk.save(make("C", "f", "r3", "wf3", S.COMPLETED, 3, parent=None, text="moved " * 30))  # relabel + move
        cold = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=B, encryption_keys=keys)
        assert cold.load("C").original_input["q"].startswith("moved")
        assert [c.id for c in cold.get_list_by_flow("f")] == ["C", "P"]
        assert [c.id for c in cold.get_list_by_flow_and_run("f", "wf3")] == ["C"]
        assert cold.get_list_by_flow_and_run("f", wf2) == []
    finally:
        bk.clear()
