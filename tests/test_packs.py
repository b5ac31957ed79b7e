"""Based packs: a run's new content is compressed against the pack its previous version added, and stays exact."""

from __future__ import annotations

import pytest

from dynamiq_redis_ckpt import CheckpointCorruptedError, codec
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain
from dynamiq_redis_ckpt.store import _MAX_EXTRA_PACKS
from tests.test_faults import fresh


def pack_keys(backend) -> list[bytes]:
    return sorted(backend.redis.scan_iter(match=f"{backend.prefix}:pack:*"))


def stored_pack_bytes(backend) -> int:
    return sum(backend.redis.strlen(k) for k in pack_keys(backend))


def packs_of(backend, cp) -> list[str]:
    key = backend._core.keys.checkpoint(cp.flow_id, cp.id)
    return [p for p in backend.redis.hget(key, "pk").decode().split(",") if p]


def alone_bytes(snapshots) -> int:
    """What the same new content takes when every pack is compressed on its own (format 2)."""
    total, seen = 0, set()
    for cp in snapshots:
        new = {ref: chunk for ref, chunk in codec.encode_checkpoint(cp).chunks.items() if ref not in seen}
        seen.update(new)
        if new:
            total += len(codec.build_pack(new)[1])
    return total


def test_a_growing_agent_history_stores_each_iteration_as_what_it_adds(backend):
    loop = list(agent_loop(11, 30))
    for cp in loop:
        backend.save(cp)
    based, alone = stored_pack_bytes(backend), alone_bytes(loop)
    print(f"\n[packs] agent loop, 30 iterations: {based:,} B in based packs, {alone:,} B compressed alone")
    assert based * 4 < alone
    reader = fresh(backend)
    for cp in loop:
        assert reader.load(cp.id) == cp
    assert max(len(packs_of(backend, cp)) for cp in loop) <= _MAX_EXTRA_PACKS + 1, "dictionary chains are bounded"


def test_an_append_run_keeps_one_pack_per_node_and_loads_every_snapshot(backend):
    chain = list(append_chain(12, 12, flow_id="ap"))
    for cp in chain:
        backend.save(cp)
    assert len(pack_keys(backend)) == 12  # one per node (the small original input stays inline in the root)
    assert stored_pack_bytes(backend) * 2 < alone_bytes(chain)
    assert len(packs_of(backend, chain[-1])) == 12
    reader = fresh(backend)
    for cp in reversed(chain):
        assert reader.load(cp.id) == cp


def test_deleting_older_snapshots_keeps_the_packs_newer_ones_decode_against(backend):
    loop = list(agent_loop(13, 12))
    for cp in loop:
        backend.save(cp)
    for cp in loop[:-1]:
        assert backend.delete(cp.id)
    assert fresh(backend).load(loop[-1].id) == loop[-1]
    assert set(pack_keys(backend)) == {backend._core.keys.pack(loop[-1].flow_id, p).encode()
                                       for p in packs_of(backend, loop[-1])}  # fmt: skip
    assert backend.delete(loop[-1].id)
    assert pack_keys(backend) == []


def test_a_missing_base_pack_is_corruption_named_on_the_checkpoint(backend):
    loop = list(agent_loop(14, 3))
    for cp in loop:
        backend.save(cp)
    newest, *older = packs_of(backend, loop[-1])
    assert older, "the newest iteration was compressed against an earlier pack"
    backend.redis.delete(backend._core.keys.pack(loop[-1].flow_id, older[0]))
    with pytest.raises(CheckpointCorruptedError) as caught:
        fresh(backend).load(loop[-1].id)
    assert caught.value.checkpoint_id == loop[-1].id


def test_a_save_after_a_cold_load_extends_the_chain_it_read(backend):
    """Another pod resumes the run: what it loaded is the dictionary of what it saves next."""
    loop = list(agent_loop(15, 6))
    for cp in loop[:-1]:
        backend.save(cp)
    other = fresh(backend)
    assert other.load(loop[-2].id) == loop[-2]
    before = stored_pack_bytes(other)
    other.save(loop[-1])
    added = stored_pack_bytes(other) - before
    assert packs_of(other, loop[-1])[1:2] == packs_of(other, loop[-2])[:1]
    assert added * 4 < alone_bytes(loop[-1:])
    assert fresh(backend).load(loop[-1].id) == loop[-1]


def test_a_format_2_record_still_loads(backend):
    """Format 2 had no based packs; a record it wrote is a format-3 record without them."""
    cp = list(agent_loop(16, 1))[-1]
    backend.save(cp)
    backend.redis.hset(backend._core.keys.checkpoint(cp.flow_id, cp.id), "fmt", "2")
    assert fresh(backend).load(cp.id) == cp


def test_a_load_finds_the_right_flow_whatever_flow_it_tried_first(backend):
    """A load runs the load script for the flow last used alongside the locator read; the locator decides."""
    a, b = list(agent_loop(17, 2, flow_id="fa"))[-1], list(agent_loop(18, 2, flow_id="fb"))[-1]
    moved_v1 = list(append_chain(19, 2, flow_id="fa"))[-1]
    moved_v2 = moved_v1.model_copy(update={"flow_id": "fb", "metadata": {"moved": True}})
    for cp in (a, b, moved_v1, moved_v2):  # the same id saved in fa, then in fb: the locator names fb
        backend.save(cp)
    reader = fresh(backend)
    assert reader.load(a.id) == a
    assert reader.load(b.id) == b  # tried fa first
    assert reader.load(a.id) == a  # tried fb first
    assert reader.load(moved_v2.id) == moved_v2  # tried fa first, where an older copy of the id also lives
    assert reader.load("no-such-id") is None


def test_a_load_fetches_packs_it_said_it_held_but_lost_meanwhile(backend):
    """The server skips packs the reader claims to hold; if the reader's cache dropped them since, it asks again."""
    chain = list(append_chain(20, 4, flow_id="fl"))
    for cp in chain:
        backend.save(cp)
    reader = fresh(backend)
    assert reader.load(chain[-2].id) == chain[-2]
    core = reader._core
    op = core.load(chain[-1].id)
    request = next(op)  # the locator read and the load script, naming the packs held now
    assert request.commands[1].args[1:], "the reader held packs of the flow"
    reply = reader._sync._execute(request)
    core.cache.clear()
    try:
        request = op.send(reply)
        while True:
            request = op.send(reader._sync._execute(request))
    except StopIteration as done:
        assert done.value == chain[-1]
