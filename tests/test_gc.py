"""gc (dynamiq_redis_ckpt.garbage) on real garbage, and beside runs that save, overwrite and delete concurrently."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from dynamiq.checkpoints.config import CheckpointBehavior
from pydantic import PrivateAttr

from dynamiq_redis_ckpt import RedisCheckpointBackend, catalog
from dynamiq_redis_ckpt.garbage import gc_op
from dynamiq_redis_ckpt.keys import Keys
from tests.flows import chain_flow

GRACE = 2.0  # the smallest the op takes (the command line asks for 3 at least)


class Recording(RedisCheckpointBackend):
    """A backend that remembers the last version of each checkpoint it saved (after the save returned)."""

    _saved: dict = PrivateAttr(default_factory=dict)

    def save(self, checkpoint):
        cp_id = super().save(checkpoint)
        self._saved[checkpoint.id] = checkpoint.model_dump()
        return cp_id

    def update(self, checkpoint):
        super().update(checkpoint)
        self._saved[checkpoint.id] = checkpoint.model_dump()


def backend(redis_server, prefix: str, cls=RedisCheckpointBackend):
    return cls(url=redis_server.url, prefix=prefix, leases=False)


def run_chain(store, flow_id: str, words: int, n: int = 3, behavior=CheckpointBehavior.APPEND, keep: int = 10_000):
    """One run of a chain of ``n`` nodes; Dynamiq's retention (after the run) keeps the flow's newest ``keep``."""
    flow = chain_flow(store, n, flow_id=flow_id, words=words, behavior=behavior)
    flow.checkpoint.max_checkpoints = keep
    flow.run_sync(input_data={})


def raw_keys(r, prefix: str) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=f"{prefix}:*", count=1000)}


@pytest.mark.slow
def test_gc_dry_run_reports_garbage_then_gc_removes_it_and_everything_left_loads_identical(redis_server):
    prefix = f"gc{uuid.uuid4().hex[:8]}"
    store = backend(redis_server, prefix)
    r, keys = store.redis, store.store.keys
    for words in (150, 150, 90):  # the first two runs share their packs; the third's content is its own
        run_chain(store, "g", words)
    listed = store.get_list_by_flow("g", limit=None)
    doomed_run = listed[0].wf_run_id  # newest first: the 90-word run
    doomed = [c.id for c in listed if c.wf_run_id == doomed_run]
    kept = {c.id: c.model_dump() for c in listed if c.wf_run_id != doomed_run}
    # expiry mimicked: the doomed run's hashes go, leaving index entries, locators, run lookups and packs whose
    # counts still include them; and runs in the worker indexes whose lease is gone
    r.delete(*(keys.checkpoint("g", i) for i in doomed))
    r.zadd(keys.lease_index("g"), {"ghost": 1})
    r.zadd(keys.due_index("g"), {"ghost": 1})
    r.zadd(keys.dead_index("g"), {"ghost-2": 1})
    old = (time.time() - catalog.FORGET_AFTER - 60) * 1000  # catalog entries old enough to be forgotten
    r.zadd(keys.catalog(Keys.shard_of("gone")), {"gone": old})  # a flow with nothing left
    r.zadd(keys.catalog(Keys.shard_of("g")), {"g": old})  # one with checkpoints: kept
    before = raw_keys(r, prefix)
    packs_before = {k: r.get(k) for k in before if k.startswith(keys.pack_prefix("g"))}

    dry = store.execute(gc_op(keys, ["g", "gone"], dry_run=True, grace_seconds=GRACE)).to_dict(verbose=True)["kinds"]
    assert raw_keys(r, prefix) == before, "a dry run removed something"
    assert {k: r.get(k) for k in packs_before} == packs_before
    assert dry["index"]["count"] >= 3 * len(doomed)  # the flow index, a status index and the run index each
    assert all(any(i in item for item in dry["index"]["items"]) for i in doomed)
    assert dry["lease_index"]["count"] == 3
    assert dry["locator"]["count"] == len(doomed)
    assert sorted(item.split(" ")[0] for item in dry["locator"]["items"]) == sorted(doomed)
    assert any(item.startswith(f"{doomed_run} -> ") for item in dry["run_lookup"]["items"])
    assert dry["pack"]["count"] >= 1 and dry["pack"]["bytes"] > 0
    assert dry["catalog"]["items"] == ["gone"]

    done = store.execute(gc_op(keys, ["g", "gone"], grace_seconds=GRACE)).to_dict(verbose=True)["kinds"]
    assert {k: (v["count"], sorted(v["items"])) for k, v in done.items()} == \
        {k: (v["count"], sorted(v["items"])) for k, v in dry.items()}  # fmt: skip
    after = raw_keys(r, prefix)
    assert not any(r.exists(keys.locator(i)) for i in doomed)
    assert not r.exists(keys.run_flows(doomed_run))
    for item in done["pack"]["items"]:
        assert keys.pack("g", item.split(" ")[1]) not in after
    assert r.zcard(keys.lease_index("g")) == r.zcard(keys.due_index("g")) == r.zcard(keys.dead_index("g")) == 0
    assert r.zcard(keys.flow_index("g")) == len(kept)
    assert store.execute(catalog.scores_op(keys, ["g", "gone"])) == [old, None]

    fresh = backend(redis_server, prefix)  # a cold process: every pack read from Redis
    assert {c.id: c.model_dump() for c in fresh.get_list_by_flow("g", limit=None)} == kept
    for cp_id, dumped in kept.items():
        assert fresh.load(cp_id).model_dump() == dumped
    again = fresh.execute(gc_op(keys, ["g"], dry_run=True, grace_seconds=GRACE)).to_dict()["kinds"]
    assert all(v["count"] == 0 for v in again.values()), again
    store.clear()


@pytest.mark.slow
def test_gc_in_a_loop_beside_saving_overwriting_and_deleting_runs_keeps_every_checkpoint_whole(redis_server):
    """Savers run tiny chains (content shared across runs and threads, so packs are deduplicated; REPLACE flows
    overwrite one id per run), a deleter deletes finished runs' checkpoints, leaks some (raw DEL, like an expiry)
    and applies retention, while two gc loops run (one without the lookups' wait). Afterwards every checkpoint
    still indexed loads, in a cold process, equal to what its saver last saved, and none that was kept is gone."""
    prefix = f"gcrace{uuid.uuid4().hex[:8]}"
    flows = {"race-a": CheckpointBehavior.APPEND, "race-r": CheckpointBehavior.REPLACE,
             "race-c": CheckpointBehavior.APPEND}  # fmt: skip
    stop = threading.Event()
    errors: list[BaseException] = []
    finished: list[str] = []  # ids of finished runs, for the deleter
    deleted: set[str] = set()
    savers = [backend(redis_server, prefix, Recording) for _ in range(3)]
    removed = {"pack": 0, "index": 0, "locator": 0}
    lock = threading.Lock()

    def guarded(body):
        def loop():
            try:
                while not stop.is_set():
                    body()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                stop.set()
        return threading.Thread(target=loop, daemon=True)

    def saver(store, rng):
        def body():
            flow = rng.choice(sorted(flows))
            before = set(store._saved)
            run_chain(store, flow, rng.choice((40, 60, 150)), n=rng.choice((2, 3)), behavior=flows[flow],
                      keep=8 if flow == "race-c" else 10_000)
            with lock:
                finished.extend(set(store._saved) - before)
        return body

    cleaner = backend(redis_server, prefix)
    rng = random.Random(7)

    def deleter():
        with lock:
            picked = [finished.pop(rng.randrange(len(finished))) for _ in range(min(3, len(finished)))]
        for cp_id in picked:
            home = cleaner.redis.get(cleaner.store.keys.locator(cp_id))
            if home is None or home.decode() == "race-c":
                continue
            if rng.random() < 0.5:
                cleaner.delete(cp_id)
            else:  # a leak: the hash goes, its index entries, locator, lookups and pack counts stay
                cleaner.redis.delete(cleaner.store.keys.checkpoint(home.decode(), cp_id))
            deleted.add(cp_id)
        cleaner.cleanup_by_flow("race-c", keep_count=3)
        time.sleep(0.02)

    def collector(lookups: bool):
        gc_store = backend(redis_server, prefix)

        def body():
            report = gc_store.execute(gc_op(gc_store.store.keys, sorted(flows), grace_seconds=GRACE, lookups=lookups))
            with lock:
                for kind in removed:
                    removed[kind] += report.kinds[kind].count
        return body

    run_chain(backend(redis_server, prefix + "-warm"), "warm", 40)  # Dynamiq's first run in a process is slow
    threads = [guarded(saver(s, random.Random(i))) for i, s in enumerate(savers)]
    threads += [guarded(deleter), guarded(collector(False)), guarded(collector(True))]
    for t in threads:
        t.start()
    started = time.monotonic()  # at least 6 s and 80 saves (a loaded machine saves slower), not forever
    while not stop.is_set() and (time.monotonic() - started < 6 or sum(len(s._saved) for s in savers) < 80):
        if time.monotonic() - started > 90:
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    saved = {cp_id: dumped for s in savers for cp_id, dumped in s._saved.items()}
    assert len(saved) >= 80, "too few saves to mean anything"
    assert removed["pack"] > 0 and removed["index"] > 0, removed

    def verify():
        fresh = backend(redis_server, prefix)
        keys, r = fresh.store.keys, fresh.redis
        indexed = 0
        for flow in flows:
            for member in r.zrange(keys.flow_index(flow), 0, -1):
                cp_id = member.decode()
                if not r.exists(keys.checkpoint(flow, cp_id)):
                    continue
                indexed += 1
                loaded = fresh.load(cp_id)
                assert loaded is not None, f"{cp_id} is indexed but does not load"
                assert loaded.model_dump() == saved[cp_id], f"{cp_id} came back different"
        for cp_id, dumped in saved.items():
            if cp_id in deleted or dumped["flow_id"] == "race-c":
                continue
            loaded = fresh.load(cp_id)
            assert loaded is not None and loaded.model_dump() == dumped, f"{cp_id} was kept but is gone or changed"
        listed = {c.id for flow in flows for c in fresh.get_list_by_flow(flow, limit=None)}
        assert listed and all(cp_id in saved for cp_id in listed)
        return indexed

    assert verify() > 20
    quiet = backend(redis_server, prefix)
    quiet.execute(gc_op(quiet.store.keys, sorted(flows), grace_seconds=GRACE, lookups=False))
    verify()
    quiet.clear()
