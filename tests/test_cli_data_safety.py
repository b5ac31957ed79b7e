"""Data safety of the cleanup, fork and transfer commands, from a hostile review: each test is a problem it found
(all fixed since), written as the behaviour the commands must have:

- import over an id Redis already holds with other content replaces it silently (exit 0, "updated");
- import of an id Redis holds in another flow moves it out of that flow (its run's chain loses a snapshot);
- fork in a namespace whose runs save with a ttl makes the source's packs and the flow's indexes permanent;
- every command refuses a namespace whose flows are spread over buckets, with no option to say so;
- delete takes the head of a dead-lettered run (which `retry` resumes from) without --force;
- import dies with a traceback on a checkpoint the store refuses, and imports nothing after it.
"""

from __future__ import annotations

import json
import uuid

import pytest

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.cli_proc import cli
from tests.flows import chain_flow


def store(url: str, prefix: str) -> list[str]:
    return ["--url", url, "--prefix", prefix]


@pytest.fixture(scope="module")
def live(redis_server):
    """A namespace holding one completed 3-step run of flow 'live': its backend, prefix, snapshots oldest first."""
    prefix = f"rv1{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    assert chain_flow(backend, 3, flow_id="live", words=30).run_sync({"q": "go"}).status.value == "success"
    snapshots = sorted(backend.get_list_by_flow("live", limit=50), key=lambda c: c.created_at)
    yield backend, prefix, snapshots
    backend.clear()


def test_import_does_not_silently_replace_a_stored_checkpoint_that_differs(redis_server, live, tmp_path):
    """An export of another namespace (or an old backup) holding an id this namespace stores with other content:
    the import must not overwrite what Redis holds without being told to (refuse, exit 3, or skip and report). It
    replaces the stored checkpoint, counts it as 'updated', and its verification then passes (exit 0)."""
    backend, prefix, snapshots = live
    head = snapshots[-1]
    stored_before = backend.load(head.id).model_dump(mode="json")
    foreign = head.model_copy(deep=True)
    foreign.node_states["s00"].output_data = {"content": "FOREIGN"}
    path = tmp_path / "foreign.jsonl"
    path.write_text(foreign.model_dump_json() + "\n")
    done = cli("import", str(path), *store(redis_server.url, prefix))
    fresh = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    assert fresh.load(head.id).model_dump(mode="json") == stored_before, (
        f"import (exit {done.returncode}) replaced checkpoint {head.id}: {done.stdout[-400:]}")
    assert done.returncode == 3 and "conflict" in done.stdout, (done.stdout[-600:], done.stderr[-600:])


def test_import_does_not_move_a_checkpoint_out_of_its_flow(redis_server, tmp_path):
    """A source checkpoint whose id Redis holds in another flow: the import saves it under the source's flow, and the
    store's save, seeing the id in another flow, deletes it there, so the run it belonged to loses a snapshot (here
    the first of the run: the rest's parent). The flow Redis had must keep every checkpoint."""
    prefix = f"rv1m{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    try:
        assert chain_flow(backend, 3, flow_id="kept", words=30).run_sync({"q": "go"}).status.value == "success"
        before = {c.id for c in backend.get_list_by_flow("kept", limit=50)}
        first = min(backend.get_list_by_flow("kept", limit=50), key=lambda c: c.created_at)
        intruder = first.model_copy(update={"flow_id": "intruder"}, deep=True)
        path = tmp_path / "intruder.jsonl"
        path.write_text(intruder.model_dump_json() + "\n")
        done = cli("import", str(path), *store(redis_server.url, prefix))
        fresh = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
        after = {c.id for c in fresh.get_list_by_flow("kept", limit=50)}
        assert after == before, f"import (exit {done.returncode}) took {sorted(before - after)} out of flow 'kept'"
        assert fresh.load(first.id).flow_id == "kept"
    finally:
        backend.clear()


def test_fork_in_a_namespace_with_a_ttl_keeps_the_sources_content_expiring(redis_server, tmp_path):
    """Runs save with ttl_seconds: every key of the flow expires. A fork from the command line (whose backend has no
    ttl, and no option for one) is a save that makes every pack it names, down their chains, and the flow's indexes
    permanent: the source run's content then outlives its ttl for ever (until gc, after its checkpoints expired)."""
    prefix = f"rv1t{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, ttl_seconds=3600)
    try:
        assert chain_flow(backend, 3, flow_id="ttl", words=30).run_sync({"q": "go"}).status.value == "success"
        r, keys = backend.redis, backend.store.keys
        expiring = {k for k in r.scan_iter(match=f"{prefix}:*") if r.pttl(k) > 0}
        packs_and_indexes = {k for k in expiring if k.startswith((keys.pack_prefix("ttl").encode(),
                                                                  keys.flow_index("ttl").encode()))}  # fmt: skip
        assert packs_and_indexes
        head = max(backend.get_list_by_flow("ttl", limit=50), key=lambda c: c.created_at)
        stored = len(backend.get_list_by_flow("ttl", limit=50))
        refused = cli("fork", head.id, "--json", *store(redis_server.url, prefix))  # no retention given
        assert refused.returncode == 2 and "--ttl" in refused.stderr, refused.stderr
        assert len(backend.get_list_by_flow("ttl", limit=50)) == stored, "a refused fork stores nothing"
        forked = cli("fork", head.id, "--json", "--ttl", "3600", *store(redis_server.url, prefix))
        assert forked.returncode == 0, forked.stderr
        assert 0 < r.pttl(keys.checkpoint("ttl", json.loads(forked.stdout)["checkpoint"])) <= 3600_000
        made_permanent = sorted(k.decode() for k in packs_and_indexes if r.pttl(k) == -1)
        assert not made_permanent, f"the fork made these keys of the source permanent: {made_permanent}"
    finally:
        backend.clear()


def test_gc_works_on_a_namespace_with_flow_buckets(redis_server):
    """flow_buckets=4 on a single server is allowed, and the namespace records it (P:meta:{buckets}). gc (as every
    command) refuses it: exit 2, 'set flow_buckets=4', which no option of the command line sets (only an environment
    variable the message does not name). It should read the number the namespace recorded."""
    prefix = f"rv1b{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=4)
    try:
        assert chain_flow(backend, 2, flow_id="bk", words=30).run_sync({"q": "go"}).status.value == "success"
        done = cli("gc", "--dry-run", "--json", *store(redis_server.url, prefix))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["homes"] == 5  # the flow's own home and its 4 buckets
    finally:
        backend.clear()


def test_delete_refuses_the_head_of_a_dead_lettered_run(redis_server, live):
    """A dead-lettered run waits for an operator's `retry`, which puts it back for a worker to resume from its head.
    delete refuses the head of a run in flight, yet deletes a dead letter's head without --force (exit 0): a later
    retry then hands the workers a run whose head is gone. (The dead letter here is made by the workers' own claim:
    a fork handed to workers, claimed once with max_attempts 0.)"""
    from dynamiq_redis_ckpt.leases import claim_op, dead_letters_op

    backend, prefix, snapshots = live
    forked = cli("fork", snapshots[1].id, "--json", *store(redis_server.url, prefix))
    assert forked.returncode == 0, forked.stderr
    fork = json.loads(forked.stdout)
    keys = backend.store.keys
    assert backend.execute(claim_op(keys, fork["flow"], fork["run"], "w1", 15_000, "orphan", 0)) == "DEAD"
    dead = backend.execute(dead_letters_op(keys))
    assert fork["run"] in json.dumps(dead, default=str)
    done = cli("delete", fork["checkpoint"], *store(redis_server.url, prefix))
    assert done.returncode == 3, f"exit {done.returncode}: {done.stdout[-300:]}"
    assert backend.load(fork["checkpoint"]) is not None


def test_import_of_a_checkpoint_the_store_cannot_take_reports_it_and_goes_on(redis_server, live, tmp_path):
    """A source line Dynamiq reads but the store refuses (a flow id holding NUL, which a save rejects): the import
    dies with a traceback (exit 1) at that line, and every checkpoint after it is not imported. It should name the
    checkpoint (as it does for unreadable lines), store the rest, and exit 1 without a traceback."""
    backend, _, snapshots = live
    refused = snapshots[0].model_copy(update={"id": str(uuid.uuid4()), "flow_id": "a\x00b"}, deep=True)
    fine = snapshots[0].model_copy(update={"id": str(uuid.uuid4()), "flow_id": "fine"}, deep=True)
    path = tmp_path / "nul.jsonl"
    path.write_text(refused.model_dump_json() + "\n" + fine.model_dump_json() + "\n")
    prefix = f"rv1n{uuid.uuid4().hex[:8]}"
    target = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    try:
        done = cli("import", str(path), *store(redis_server.url, prefix))
        assert "Traceback" not in done.stderr, done.stderr[-600:]
        assert done.returncode == 1 and refused.id in done.stdout + done.stderr
        assert target.load(fine.id) is not None
    finally:
        target.clear()
