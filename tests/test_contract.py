"""The same scenarios on Dynamiq's InMemory backend and on RedisCheckpointBackend give identical answers."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import CheckpointNotFoundError

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def make(cp_id, flow, run, wf=None, status=S.COMPLETED, minute=0, parent=None, text=""):
    cp = FlowCheckpoint(
        id=cp_id, flow_id=flow, run_id=run, wf_run_id=wf, status=status, parent_checkpoint_id=parent,
        created_at=T0 + timedelta(minutes=minute), updated_at=T0 + timedelta(minutes=minute),
        original_input={"q": text or cp_id},
    )  # fmt: skip
    cp.node_states["n"] = NodeCheckpointState(node_id="n", node_type="T", status="success", output_data=text * 3)
    return cp


def scenario() -> list[FlowCheckpoint]:
    """Three flows, several runs and workflow runs, every status, APPEND chains; distinct timestamps."""
    rng = random.Random(7)
    statuses = [S.COMPLETED, S.FAILED, S.CANCELED, S.ACTIVE, S.PAUSED, S.PENDING_INPUT]
    cps, minute = [], 0
    for flow in ("fa", "fb", "f{c}"):
        for run_no in range(4):
            run, wf = f"run-{flow}-{run_no}", f"wf-{run_no % 2}"
            parent = None
            for step in range(5):
                minute += rng.randint(1, 3)
                cp_id = f"{flow}-{run_no}-{step}"
                cps.append(make(cp_id, flow, run, wf, rng.choice(statuses), minute, parent, text=f"{flow} {step} " * 40))
                parent = cp_id
    rng.shuffle(cps)
    return cps


def ids(cps):
    return [c.id for c in cps]


def both(backend):
    """InMemory and ours, holding the same scenario. The scenario interleaves saves of several run_ids of one
    wf_run_id from this one process; they are plain API calls (no Flow is running), so leases, on as by default,
    leave them alone and the answers must be InMemory's."""
    ref = InMemory()
    ours = type(backend)(client=backend.redis, prefix=backend.prefix, flow_buckets=backend.flow_buckets)
    assert ours.leases
    for cp in scenario():
        ref.save(cp)
        ours.save(cp)
    return ref, ours


QUERIES = [
    ("flow all", lambda b: b.get_list_by_flow("fa")),
    ("flow limit", lambda b: b.get_list_by_flow("fb", limit=3)),
    ("flow limit 0", lambda b: b.get_list_by_flow("fb", limit=0)),
    ("flow status", lambda b: b.get_list_by_flow("fa", status=S.FAILED)),
    ("flow status limit", lambda b: b.get_list_by_flow("f{c}", status=S.COMPLETED, limit=2)),
    ("flow before", lambda b: b.get_list_by_flow("fa", before=T0 + timedelta(minutes=20))),
    ("flow before exact", lambda b: b.get_list_by_flow("fa", before=b.get_list_by_flow("fa")[3].created_at)),
    ("flow before+status+limit", lambda b: b.get_list_by_flow("fb", status=S.ACTIVE, before=T0 + timedelta(hours=1), limit=2)),
    ("unknown flow", lambda b: b.get_list_by_flow("nope")),
    ("latest", lambda b: [b.get_latest_by_flow("fb")]),
    ("latest status", lambda b: [b.get_latest_by_flow("fa", status=S.PAUSED)]),
    ("run by run_id", lambda b: b.get_list_by_run("run-fa-1")),
    ("run by wf_run_id across flows", lambda b: b.get_list_by_run("wf-0")),
    ("run limit", lambda b: b.get_list_by_run("wf-1", limit=4)),
    ("flow+run", lambda b: b.get_list_by_flow_and_run("fa", "run-fa-2")),
    ("flow+run via wf", lambda b: b.get_list_by_flow_and_run("fb", "wf-1")),
    ("flow+run+wf", lambda b: b.get_list_by_flow_and_run("fa", "run-fa-0", wf_run_id="wf-1")),
    ("flow+run status limit", lambda b: b.get_list_by_flow_and_run("fa", "wf-0", status=S.COMPLETED, limit=2)),
    ("latest flow+run", lambda b: [b.get_latest_by_flow_and_run("f{c}", "run-f{c}-3")]),
    ("latest flow+run status", lambda b: [b.get_latest_by_flow_and_run("fa", "wf-1", status=S.FAILED)]),
    ("chain", lambda b: b.get_chain("fb-2-4")),
    ("chain from middle", lambda b: b.get_chain("fa-1-2")),
    ("chain unknown", lambda b: b.get_chain("nope")),
]


@pytest.mark.parametrize("name, query", QUERIES, ids=[q[0] for q in QUERIES])
def test_queries_match_inmemory(backend, name, query):
    ref, ours = both(backend)
    expected = [c.id if c else None for c in query(ref)]
    got = [c.id if c else None for c in query(ours)]
    assert got == expected
    if expected and expected[0] is not None:
        assert query(ours)[0] == query(ref)[0]


def test_load_update_delete_match_inmemory(backend):
    ref, ours = both(backend)
    assert ours.load("fa-0-0") == ref.load("fa-0-0")
    assert ours.load("missing") is None and ref.load("missing") is None
    changed = ref.load("fa-0-0")
    changed.status = S.FAILED
    changed.metadata = {"k": "v"}
    ref.update(changed)
    ours.update(changed)
    assert ours.load("fa-0-0") == ref.load("fa-0-0")
    assert ids(ours.get_list_by_flow("fa", status=S.FAILED)) == ids(ref.get_list_by_flow("fa", status=S.FAILED))
    ghost = make("ghost", "fa", "r")
    with pytest.raises(FileNotFoundError):
        ref.update(ghost)
    with pytest.raises(CheckpointNotFoundError):
        ours.update(ghost)
    assert ours.load("ghost") is None and ours.get_list_by_flow("fa", limit=None) == ref.get_list_by_flow("fa")
    assert ours.delete("fa-1-1") is True and ref.delete("fa-1-1") is True
    assert ours.delete("fa-1-1") is False and ref.delete("fa-1-1") is False
    assert ids(ours.get_list_by_flow("fa")) == ids(ref.get_list_by_flow("fa"))
    assert ids(ours.get_chain("fa-1-4")) == ids(ref.get_chain("fa-1-4"))


def test_replace_mode_relabels_every_index(backend):
    """REPLACE saves one id again and again while status, run_id and wf_run_id change."""
    ref = InMemory()
    cp = make("same", "flow", "run-1", "wf-1", S.ACTIVE, 1)
    for b in (ref, backend):
        b.save(cp)
    relabeled = cp.model_copy(update={"run_id": "run-2", "wf_run_id": "wf-2", "status": S.PENDING_INPUT})
    for b in (ref, backend):
        b.save(relabeled)
    for b in (ref, backend):
        assert b.get_list_by_run("run-1") == [] and b.get_list_by_run("wf-1") == []
        assert ids(b.get_list_by_run("run-2")) == ["same"] and ids(b.get_list_by_run("wf-2")) == ["same"]
        assert b.get_list_by_flow("flow", status=S.ACTIVE) == []
        assert ids(b.get_list_by_flow("flow", status=S.PENDING_INPUT)) == ["same"]
        assert b.get_list_by_flow_and_run("flow", "run-1", wf_run_id="wf-1") == []
        assert ids(b.get_list_by_flow_and_run("flow", "run-2")) == ["same"]
        assert ids(b.get_list_by_flow("flow")) == ["same"]
    assert backend.load("same") == ref.load("same")


def test_relabel_seen_by_another_backend_object(backend):
    """A second backend object (another pod) relabels a checkpoint the first one wrote: no stale index entries."""
    other = type(backend)(client=backend.redis, prefix=backend.prefix, flow_buckets=backend.flow_buckets)
    cp = make("x", "flow", "run-1", "wf-1", S.ACTIVE, 1)
    backend.save(cp)
    other.save(cp.model_copy(update={"run_id": "run-2", "status": S.FAILED}))
    backend.save(cp.model_copy(update={"run_id": "run-3", "status": S.COMPLETED}))
    assert ids(backend.get_list_by_run("run-3")) == ["x"]
    assert backend.get_list_by_run("run-2") == [] and backend.get_list_by_run("run-1") == []
    assert backend.get_list_by_flow("flow", status=S.FAILED) == []
    assert ids(other.get_list_by_flow("flow", status=S.COMPLETED)) == ["x"]


@pytest.mark.parametrize("keep, ttl", [(0, None), (3, None), (10, None), (100, None), (5, 30), (100, 60)])
def test_cleanup_matches_inmemory_for_finished_runs(backend, keep, ttl):
    ref = InMemory()
    now = datetime.now(timezone.utc)
    for i in range(20):
        cp = make(f"c{i}", "flow", f"r{i % 4}", status=S.COMPLETED if i % 3 else S.FAILED, minute=0)
        cp.created_at = now - timedelta(minutes=5 * (20 - i))
        ref.save(cp)
        backend.save(cp)
    assert backend.cleanup_by_flow("flow", keep_count=keep, max_ttl_minutes=ttl) == ref.cleanup_by_flow(
        "flow", keep_count=keep, max_ttl_minutes=ttl
    )
    assert ids(backend.get_list_by_flow("flow")) == ids(ref.get_list_by_flow("flow"))


def test_async_variants_match_sync(backend):
    ref, ours = both(backend)

    async def run():
        assert ids(await ours.get_list_by_flow_async("fa", limit=4)) == ids(ref.get_list_by_flow("fa", limit=4))
        assert (await ours.get_latest_by_flow_async("fb")).id == ref.get_latest_by_flow("fb").id
        assert ids(await ours.get_list_by_run_async("wf-0")) == ids(ref.get_list_by_run("wf-0"))
        assert ids(await ours.get_list_by_flow_and_run_async("fa", "wf-1", status=S.FAILED)) == ids(
            ref.get_list_by_flow_and_run("fa", "wf-1", status=S.FAILED)
        )
        assert (await ours.get_latest_by_flow_and_run_async("fa", "wf-1")).id == ref.get_latest_by_flow_and_run(
            "fa", "wf-1"
        ).id
        assert ids(await ours.get_chain_async("fb-3-4")) == ids(ref.get_chain("fb-3-4"))
        assert await ours.load_async("fa-0-0") == ref.load("fa-0-0")
        new = make("async-new", "fa", "r", minute=999)
        assert await ours.save_async(new) == "async-new"
        new.status = S.FAILED
        await ours.update_async(new)
        assert (await ours.load_async("async-new")).status == S.FAILED
        with pytest.raises(FileNotFoundError):
            await ours.update_async(make("ghost", "fa", "r"))
        assert await ours.delete_async("async-new") is True
        assert await ours.delete_async("async-new") is False
        assert await ours.cleanup_by_flow_async("fb", keep_count=100) == 0

    asyncio.run(run())
    asyncio.run(run())  # a second event loop: the backend must not be tied to the first


def test_clear_removes_only_its_namespace(backend):
    neighbour = type(backend)(client=backend.redis, prefix=backend.prefix + ":nested")
    neighbour.save(make("keep-me", "flow", "run"))
    backend.save(make("drop-me", "flow", "run"))
    backend.clear()
    assert backend.load("drop-me") is None and backend.get_list_by_flow("flow") == []
    assert neighbour.load("keep-me") is not None
    left = [k for k in backend.redis.scan_iter(match=backend.prefix + ":*")]
    assert left and all(k.startswith(f"{backend.prefix}:nested:".encode()) for k in left)
    neighbour.clear()
    assert not [k for k in backend.redis.scan_iter(match=backend.prefix + ":*")]
