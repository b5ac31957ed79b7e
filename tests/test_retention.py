"""Retention: cleanup keeps in-flight chain heads, TTL expiry, pruned indexes, shared content that outlives nothing."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from tests.test_contract import ids, make


def chain(backend, run, statuses, start_minute, flow="flow"):
    """An APPEND chain of one run: each snapshot names the previous one as parent."""
    parent, made = None, []
    now = datetime.now(timezone.utc)
    for i, status in enumerate(statuses):
        cp = make(f"{run}-{i}", flow, run, f"wf-{run}", status, 0, parent, text=f"{run} content " * 50)
        cp.created_at = now - timedelta(minutes=100 - start_minute - i)
        backend.save(cp)
        made.append(cp)
        parent = cp.id
    return made


@pytest.mark.parametrize("head_status", [S.ACTIVE, S.PAUSED, S.PENDING_INPUT])
def test_cleanup_keeps_heads_of_runs_in_flight_on_other_pods(backend, head_status):
    """Dynamiq runs cleanup_by_flow(keep_count=50) when any run completes; it must not delete a run in flight."""
    waiting = chain(backend, "waiting", [S.ACTIVE, S.ACTIVE, head_status], 0)
    chain(backend, "done", [S.ACTIVE] * 5 + [S.COMPLETED], 10)
    ref = InMemory()
    for cp in backend.get_list_by_flow("flow"):
        ref.save(cp)
    deleted = backend.cleanup_by_flow("flow", keep_count=2)
    kept = ids(backend.get_list_by_flow("flow"))
    assert waiting[-1].id in kept, "the head of the paused/active run survives"
    assert waiting[0].id not in kept and waiting[1].id not in kept, "its history follows Dynamiq's rule"
    assert kept == ["done-5", "done-4", waiting[-1].id]
    assert deleted == 6
    ref.cleanup_by_flow("flow", keep_count=2)
    assert waiting[-1].id not in ids(ref.get_list_by_flow("flow")), "Dynamiq's own backend would have deleted it"
    assert backend.load(waiting[-1].id) == waiting[-1]


def test_cleanup_deletes_finished_heads_and_non_heads(backend):
    chain(backend, "failed", [S.ACTIVE, S.FAILED], 0)
    chain(backend, "canceled", [S.ACTIVE, S.CANCELED], 5)
    chain(backend, "active", [S.ACTIVE, S.ACTIVE], 10)
    assert backend.cleanup_by_flow("flow", keep_count=0) == 5
    assert ids(backend.get_list_by_flow("flow")) == ["active-1"]


def test_cleanup_by_age_keeps_in_flight_head(backend):
    chain(backend, "old", [S.ACTIVE, S.PENDING_INPUT], 0)
    chain(backend, "new", [S.COMPLETED], 99)
    assert backend.cleanup_by_flow("flow", keep_count=50, max_ttl_minutes=10) == 1
    assert set(ids(backend.get_list_by_flow("flow"))) == {"old-1", "new-0"}


def test_deleting_a_snapshot_never_damages_another(backend, raw):
    """Snapshots share content packs; deleting any of them leaves every other one loading whole."""
    with as_running_flow():  # saved as a running Flow saves: the run holds a lease until its COMPLETED save
        snaps = chain(backend, "r", [S.ACTIVE] * 6 + [S.COMPLETED], 0)
    for victim in (snaps[0], snaps[3], snaps[6]):
        assert backend.delete(victim.id)
        for other in snaps:
            if backend.load(other.id) is not None:
                fresh = RedisCheckpointBackend(client=raw, prefix=backend.prefix)  # no cached packs
                assert fresh.load(other.id) == other
    for snap in snaps:
        backend.delete(snap.id)
    bookkeeping = (b":runflows:", b":lease:", b":wake:", b":catalog:")  # the catalog keeps a flow until gc
    leftovers = [k for k in raw.scan_iter(match=f"{backend.prefix}:*") if not any(b in k for b in bookkeeping)]
    assert leftovers == [], "every pack and index is gone with the last snapshot that used it"
    (lease,) = raw.scan_iter(match=f"{backend.prefix}:lease:*")
    assert raw.pttl(lease) > 0, "an ended run's lease (its fencing token) expires in time"


def test_ttl_expires_checkpoints_and_prunes_indexes(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="ttl", ttl_seconds=1)
    keeper = RedisCheckpointBackend(url=own_redis.url, prefix="ttl")
    first = chain(backend, "short", [S.ACTIVE, S.COMPLETED], 0)
    kept = chain(keeper, "long", [S.ACTIVE, S.COMPLETED], 10)
    raw = backend.redis
    assert 0 < raw.pttl(backend._core.keys.checkpoint("flow", first[0].id)) <= 1000
    time.sleep(1.3)
    assert backend.load(first[0].id) is None
    assert ids(backend.get_list_by_flow("flow")) == ["long-1", "long-0"]
    assert ids(backend.get_list_by_run("short")) == []
    assert backend.get_list_by_flow_and_run("flow", "short") == []
    members = {m.decode() for m in raw.zrange(backend._core.keys.flow_index("flow"), 0, -1)}
    assert members == {"long-0", "long-1"}, "expired entries were pruned from the index"
    assert keeper.load(kept[1].id) == kept[1]


def test_overwriting_the_only_checkpoint_of_its_indexes_keeps_their_ttl(own_redis):
    """REPLACE mode saves one id per run again and again: the overwrite takes the id out of its status and run
    indexes (a one-member zset is then deleted) and puts it back; the index it creates anew takes the ttl, or it
    would outlive every checkpoint (found by the 1,000,000-snapshot benchmark: every run left its run index)."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="replace", ttl_seconds=60)
    cp = make("only", "flow", "run-1", "wf-1", S.ACTIVE, 0, None, text="replaced " * 80)
    backend.save(cp)
    backend.save(cp.model_copy(update={"status": S.COMPLETED}))
    backend.save(cp.model_copy(update={"status": S.COMPLETED}))
    keys, raw = backend._core.keys, backend.redis
    indexes = [keys.flow_index("flow"), keys.status_index("flow", "completed"), keys.run_index("flow", "run-1")]
    assert all(raw.exists(k) for k in indexes)
    assert all(0 < raw.pttl(k) <= 60_000 for k in indexes), {k: raw.pttl(k) for k in indexes}
    assert not raw.exists(keys.status_index("flow", "active")), "the emptied index of the old status is gone"


def test_shared_content_lives_as_long_as_its_last_user(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="ttl", ttl_seconds=2)
    raw = backend.redis
    first = chain(backend, "r", [S.ACTIVE], 0)[0]
    time.sleep(1.2)
    second = make("r-1", "flow", "r", "wf-r", S.COMPLETED, 0, first.id, text="r content " * 50)
    second.original_input = first.original_input
    backend.save(second)
    packs = [k for k in raw.scan_iter(match="ttl:pack:*")]
    assert packs and min(raw.pttl(k) for k in packs) > 1500, "a pack's expiry follows its newest user"
    time.sleep(1.0)
    assert backend.load(first.id) is None
    assert RedisCheckpointBackend(client=raw, prefix="ttl").load(second.id) == second
    time.sleep(1.2)
    left = [k for k in raw.scan_iter(match="ttl:*")]
    kept = (b":lease:", b":wake:", b":catalog:")  # the catalog keeps a flow until gc forgets it
    assert [k for k in left if not any(b in k for b in kept)] == [], "content and indexes expired"


def test_saving_without_ttl_makes_shared_content_permanent(own_redis):
    short = RedisCheckpointBackend(url=own_redis.url, prefix="mix", ttl_seconds=1)
    forever = RedisCheckpointBackend(url=own_redis.url, prefix="mix")
    first = chain(short, "r", [S.ACTIVE], 0)[0]
    second = first.model_copy(update={"id": "r-keep", "parent_checkpoint_id": first.id})
    forever.save(second)
    time.sleep(1.3)
    assert RedisCheckpointBackend(url=own_redis.url, prefix="mix").load("r-keep") == second
