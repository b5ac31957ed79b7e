"""The store under races, expiry and damage: each test here failed on the code a hostile review found wanting
(issue 13), on a real redis-server (and on fakeredis where marked)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.checkpoint import NodeCheckpointState
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import (
    CheckpointCorruptedError,
    CheckpointEncodeError,
    CheckpointNotFoundError,
    RedisCheckpointBackend,
    UnsupportedFormatError,
)
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import ask_flow, timer_flow
from tests.test_contract import make


@pytest.fixture
def real(redis_server):
    made = RedisCheckpointBackend(url=redis_server.url, prefix=f"d{uuid.uuid4().hex[:8]}")
    yield made
    made.clear()


def fresh(backend) -> RedisCheckpointBackend:
    """Another process's view: same Redis and prefix, nothing cached."""
    return RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix)


def namespace_keys(backend) -> list[bytes]:
    return sorted(backend.redis.scan_iter(match=f"{backend.prefix}:*"))


# ---- 1. a timer, or a person, outlives the ttl -------------------------------------------------------------------


@pytest.mark.slow
def test_a_timer_due_after_the_ttl_still_finds_its_run(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"tm{uuid.uuid4().hex[:6]}", ttl_seconds=2)
    first = timer_flow(backend, "timer-ttl", seconds=4).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-t"))
    assert first.status.value == "failure"  # Dynamiq reports a pause as a failure carrying RunPausedException
    paused = backend.get_latest_by_flow("timer-ttl")
    assert paused.status == S.PENDING_INPUT
    time.sleep(4.3)  # past the ttl and the timer
    assert fresh(backend).load(paused.id) == paused, "the paused run's checkpoint outlived the ttl"
    recovery = Recovery(backend)
    assert recovery.find_due() == [("timer-ttl", "wf-t")]
    claim = recovery.claim("timer-ttl", "wf-t", "due")
    result = recovery.resume(claim, lambda f: timer_flow(fresh(backend), f, seconds=4))
    assert result.status.value == "success"
    assert 0 < backend.redis.pttl(backend.store.keys.checkpoint("timer-ttl", paused.id)) <= 2000, (
        "once the run went on, the paused checkpoint expires with the ttl again"
    )
    backend.clear()


def test_a_run_waiting_for_a_person_does_not_expire_while_it_waits(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"hu{uuid.uuid4().hex[:6]}", ttl_seconds=1)
    ask_flow(backend, "ask-ttl").run_sync({"input": "Ship it?"}, config=RunnableConfig(run_id="wf-a"))
    paused = backend.get_latest_by_flow("ask-ttl")
    keys, raw = backend.store.keys, backend.redis
    time.sleep(1.3)
    assert fresh(backend).load(paused.id) == paused
    assert raw.pttl(keys.checkpoint("ask-ttl", paused.id)) == -1 and raw.pttl(keys.lease("ask-ttl", "wf-a")) == -1
    recovery = Recovery(backend)
    assert recovery.deliver_input("wf-a", {"choice": "go"}) == "ask"
    claim = recovery.claim("ask-ttl", "wf-a", "due")
    assert recovery.resume(claim, lambda f: ask_flow(fresh(backend), f)).status.value == "success"
    assert 0 < raw.pttl(keys.checkpoint("ask-ttl", paused.id)) <= 1000, "handed back to the ttl once answered"
    assert 0 < raw.pttl(keys.locator(paused.id)) <= 1000
    time.sleep(1.2)
    held_forever = [k for k in raw.scan_iter(match=f"{backend.prefix}:*") if raw.pttl(k) == -1]
    # indexes (emptied by their own pruning), wake shards, and the catalog's one entry per flow (forgotten by gc)
    assert all(b":flow:" in k or b":wake:" in k or b":catalog:" in k for k in held_forever), held_forever
    backend.clear()


# ---- 2. lists beside overwrites ------------------------------------------------------------------------------------


def test_lists_racing_an_overwriting_writer_never_report_corruption(real):
    """One process re-saves one id in a loop (REPLACE mode, a growing history); another lists the flow."""
    writer, reader = real, fresh(real)
    stop, errors, versions = threading.Event(), [], []

    def overwrite():
        n = 0
        while not stop.is_set():
            n += 1
            cp = make("same", "race", "r", "wf", S.ACTIVE, text=f"version {n} " * (40 + n % 50))
            cp.metadata = {"v": n}
            writer.save(cp)

    thread = threading.Thread(target=overwrite)
    thread.start()
    try:
        for i in range(600):
            call = (lambda: reader.get_list_by_flow("race"), lambda: reader.get_list_by_run("wf"),
                    lambda: [reader.get_latest_by_flow("race")])[i % 3]  # fmt: skip
            try:
                for cp in call():
                    if cp is not None:
                        versions.append(cp.metadata["v"])
                        n = cp.metadata["v"]
                        assert cp.original_input["q"] == f"version {n} " * (40 + n % 50), "one consistent version"
            except CheckpointCorruptedError as e:
                errors.append(e)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and len(set(versions)) > 10


# ---- 3. one damaged checkpoint ------------------------------------------------------------------------------------

def first_pack(k, cp) -> str:
    return k.pack("dmg", cp["pk"].split(",")[0])


DAMAGE = {
    "pack truncated": lambda raw, k, cp: raw.set(first_pack(k, cp), raw.get(first_pack(k, cp))[:30]),
    "pack byte flipped": lambda raw, k, cp: raw.setrange(first_pack(k, cp), 40, b"\xff\x00\xff"),
    "pack deleted": lambda raw, k, cp: raw.delete(first_pack(k, cp)),
    "fmt unknown": lambda raw, k, cp: raw.hset(k.checkpoint("dmg", "c2"), "fmt", "99"),
    "root missing": lambda raw, k, cp: raw.hdel(k.checkpoint("dmg", "c2"), "root"),
    "pk missing": lambda raw, k, cp: raw.hdel(k.checkpoint("dmg", "c2"), "pk"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_one_damaged_checkpoint_leaves_the_rest_of_its_flow_listed(backend, damage):
    for i in range(3):  # separate runs, so no pack is shared
        backend.save(make(f"c{i}", "dmg", f"r{i}", "wf", S.COMPLETED, minute=i, text=f"run {i} " * 60))
    raw, keys = backend.redis, backend.store.keys
    stored = {k.decode(): v.decode() for k, v in raw.hgetall(keys.checkpoint("dmg", "c2")).items()}
    DAMAGE[damage](raw, keys, stored)
    reader = fresh(backend)
    with pytest.raises((CheckpointCorruptedError, UnsupportedFormatError)):
        reader.load("c2")
    assert [c.id for c in reader.get_list_by_flow("dmg")] == ["c1", "c0"]
    assert [c.id for c in reader.get_list_by_flow("dmg", limit=2)] == ["c1", "c0"], "older ones fill its place"
    assert [c.id for c in reader.get_list_by_run("wf")] == ["c1", "c0"]
    assert reader.store.damaged_skipped >= 3
    with pytest.raises((CheckpointCorruptedError, UnsupportedFormatError)):
        reader.get_latest_by_flow("dmg")  # the newest is damaged: say so rather than resume from an older one
    with pytest.raises((CheckpointCorruptedError, UnsupportedFormatError)):
        reader.get_latest_by_flow_and_run("dmg", "wf")
    assert reader.delete("c2") and [c.id for c in reader.get_list_by_flow("dmg")] == ["c1", "c0"]


# ---- 4. a hash missing a field ------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["st", "run", "ts"])
def test_a_hash_missing_a_field_is_corrupted_and_can_be_deleted(backend, field):
    backend.save(make("old", "hf", "r", "wf", S.COMPLETED, minute=0))
    backend.save(make("new", "hf", "r", "wf", S.COMPLETED, minute=1, parent="old"))
    key = backend.store.keys.checkpoint("hf", "old")
    backend.redis.hdel(key, field)
    with pytest.raises(CheckpointCorruptedError) as corrupted:
        fresh(backend).load("old")
    assert corrupted.value.key == key
    assert backend.delete("old") is True
    assert backend.load("new") is not None and [c.id for c in backend.get_list_by_flow("hf")] == ["new"]
    backend.redis.hdel(backend.store.keys.checkpoint("hf", "new"), field)
    backend.save(make("newest", "hf", "r2", "wf2", S.COMPLETED, minute=2))
    assert backend.cleanup_by_flow("hf", keep_count=1) == 1, "cleanup deletes a damaged old one too"
    assert backend.redis.exists(backend.store.keys.checkpoint("hf", "new")) == 0


# ---- 5. update keeps every key of a checkpoint alive together -----------------------------------------------------


def test_update_renews_the_lookup_with_the_hash(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"u{uuid.uuid4().hex[:6]}", ttl_seconds=2)
    cp = make("c", "f", "r", "wf", S.ACTIVE)
    backend.save(cp)
    time.sleep(1.2)
    cp.metadata = {"updated": True}
    backend.update(cp)
    time.sleep(1.2)  # past the first save's ttl, within the update's
    assert fresh(backend).load("c").metadata == {"updated": True}
    assert [c.id for c in fresh(backend).get_list_by_run("r")] == ["c"]
    assert fresh(backend).delete("c") is True
    backend.clear()


# ---- 6. one id, two flows ------------------------------------------------------------------------------------------


def test_saving_an_id_in_another_flow_replaces_it_everywhere(backend):
    backend.save(make("c1", "F", "r", "wf", S.COMPLETED, text="in F " * 50))
    backend.save(make("c1", "G", "r", "wf", S.COMPLETED, text="in G " * 50))
    assert backend.load("c1").flow_id == "G"
    assert backend.get_list_by_flow("F") == [] and [c.id for c in backend.get_list_by_flow("G")] == ["c1"]
    assert [c.flow_id for c in backend.get_list_by_run("wf")] == ["G"]
    assert backend.delete("c1") is True
    assert backend.get_list_by_flow("G") == [] and backend.load("c1") is None
    assert [k for k in namespace_keys(backend) if b":pack:" in k or b":cp:" in k] == []


# ---- 9. deep values -----------------------------------------------------------------------------------------------


def test_a_value_nested_too_deeply_is_an_encode_error_naming_node_and_field(backend):
    deep: list = []
    cur = deep
    for _ in range(10_000):
        cur.append([])
        cur = cur[0]
    cp = make("deep", "f", "r", "wf", S.ACTIVE)
    cp.node_states["n1"] = NodeCheckpointState(node_id="n1", node_type="t", status="success", output_data={"x": deep})
    with pytest.raises(CheckpointEncodeError) as refused:
        backend.save(cp)
    assert refused.value.node_id == "n1" and refused.value.field == "output_data"
    assert "nested deeper" in str(refused.value) and backend.load("deep") is None


# ---- 10. a refused update writes nothing ---------------------------------------------------------------------------


def test_update_of_a_missing_id_writes_nothing(backend):
    before = namespace_keys(backend)
    with pytest.raises(CheckpointNotFoundError):
        backend.update(make("ghost", "f", "r", "wf", S.ACTIVE))
    assert namespace_keys(backend) == before


# ---- 11. contract edges against InMemory ---------------------------------------------------------------------------


def test_an_empty_run_id_is_found_as_in_memory_finds_it(backend):
    ref = InMemory()
    for store in (ref, backend):
        store.save(make("e", "f", "", None, S.ACTIVE))
        store.save(make("o", "f", "other", None, S.ACTIVE, minute=1))
    for query in (lambda b: b.get_list_by_run(""), lambda b: b.get_list_by_flow_and_run("f", "")):
        assert [c.id for c in query(backend)] == [c.id for c in query(ref)] == ["e"]


def test_equal_created_at_orders_by_id_newest_first(backend):
    """Documented: Dynamiq's InMemory keeps insertion order for equal created_at (a side effect of a stable sort;
    FileSystem and PostgreSQL promise nothing); ours orders them by id, descending, the same in every process."""
    for cp_id in ("b", "a", "c"):
        backend.save(make(cp_id, "tie", "r", "wf", S.ACTIVE, minute=0))
    assert [c.id for c in backend.get_list_by_flow("tie")] == ["c", "b", "a"]


# ---- 7. retention reaches past runs waiting for people -------------------------------------------------------------


def test_cleanup_reaches_past_a_thousand_waiting_heads(real):
    raw = real.redis
    for i in range(500):
        real.save(make(f"old-{i:04d}", "busy", f"done-{i}", None, S.COMPLETED, minute=i))
    for i in range(1100):  # newer: each the head of its own run, waiting for a person
        real.save(make(f"wait-{i:04d}", "busy", f"wait-{i}", None, S.PENDING_INPUT, minute=1000 + i))
    assert real.cleanup_by_flow("busy", keep_count=50) == 500, "every old completed checkpoint goes"
    assert raw.zcard(real.store.keys.flow_index("busy")) == 1100, "every waiting head stays"
    assert real.cleanup_by_flow("busy", keep_count=50) == 0


# ---- 8. two people answer one question ---------------------------------------------------------------------------


def test_the_first_answer_stands_and_a_second_is_refused_with_exit_code_3(real):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ask_flow(real, "ask-twice").run_sync({"input": "Approve?"}, config=RunnableConfig(run_id="wf-q"))
    base = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "resume", "wf-q", "--url", real.url, "--prefix", real.prefix]
    alice = subprocess.run(base + ["--input", '"alice: APPROVE"'], cwd=root, capture_output=True, text=True, timeout=120)
    bob = subprocess.run(base + ["--input", '"bob: REJECT"'], cwd=root, capture_output=True, text=True, timeout=120)
    assert alice.returncode == 0 and "answer stored" in alice.stdout, alice.stderr[-2000:]
    assert bob.returncode == 3 and "first answer stands" in bob.stderr, (bob.stdout, bob.stderr[-2000:])
    stored = real.redis.hget(real.store.keys.inbox("ask-twice", "wf-q"), "ask")
    assert stored == b'"alice: APPROVE"'
    from dynamiq_redis_ckpt import AlreadyAnsweredError

    with pytest.raises(AlreadyAnsweredError):
        Recovery(real).deliver_input("wf-q", "carol: APPROVE")
