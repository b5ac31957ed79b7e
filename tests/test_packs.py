"""Based packs: a run's new content (its root document too) is compressed against the pack its previous version
added and linked to it, so a checkpoint names only its newest pack; every snapshot stays exact."""

from __future__ import annotations

import random

import fakeredis
import msgpack
import pytest
from dynamiq.checkpoints.checkpoint import NodeCheckpointState

from dynamiq_redis_ckpt import CheckpointCorruptedError, codec
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain, prose
from dynamiq_redis_ckpt.store import _MAX_EXTRA_PACKS, micros
from tests.test_faults import fresh


def pack_keys(backend) -> list[bytes]:
    return sorted(backend.redis.scan_iter(match=f"{backend.prefix}:pack:*"))


def stored_pack_bytes(backend) -> int:
    return sum(backend.redis.strlen(k) for k in pack_keys(backend))


def packs_of(backend, cp) -> list[str]:
    """The packs a checkpoint's hash names."""
    key = backend._core.keys.checkpoint(cp.flow_id, cp.id)
    return [p for p in backend.redis.hget(key, "pk").decode().split(",") if p]


def chain_of(backend, cp) -> list[str]:
    """The packs loading ``cp`` needs: those it names and the bases they hold, read from the stored blobs."""
    found: list[str] = []
    for pack in packs_of(backend, cp):
        while pack and pack not in found:
            found.append(pack)
            pack = codec.pack_base(backend.redis.get(backend._core.keys.pack(cp.flow_id, pack))[8:])
    return found


def store_format_3(backend, cp) -> str:
    """Write ``cp`` as format 3 wrote it (root in the hash, a 16-byte pack id named in 'pk'); returns the pack id."""
    r, keys, flow = backend.redis, backend._core.keys, cp.flow_id
    encoded = codec.encode_checkpoint(cp)
    flat = [x for ref in sorted(encoded.chunks) for x in (ref, encoded.chunks[ref])]
    assert encoded.chunks, "a checkpoint with content outside its root"
    pack = codec.pack_id(encoded.chunks, "", codec.DIGEST_SIZE)
    r.set(keys.pack(flow, pack), b"00000001" + codec.wrap(msgpack.packb(flat)))
    ts = micros(cp.created_at)
    r.hset(keys.checkpoint(flow, cp.id), mapping={
        "id": cp.id, "flow": flow, "st": cp.status.value, "run": cp.run_id, "wf": cp.wf_run_id or "",
        "par": cp.parent_checkpoint_id or "", "ts": ts, "sv": ts, "doc": codec.wrap(encoded.root),
        "sum": codec.short_sum(encoded.root), "fmt": 3, "pk": pack, "raw": encoded.raw_size, "size": 0,
    })  # fmt: skip
    r.set(keys.locator(cp.id), flow)
    for index in (keys.flow_index(flow), keys.status_index(flow, cp.status.value), keys.run_index(flow, cp.run_id)):
        r.zadd(index, {cp.id: ts})
    return pack


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
    assert max(len(chain_of(backend, cp)) for cp in loop) <= _MAX_EXTRA_PACKS + 2, "dictionary chains are bounded"
    assert len(pack_keys(backend)) > _MAX_EXTRA_PACKS + 2, "a bounded chain starts again from a pack of its own"


def test_an_append_run_keeps_one_pack_per_save_and_names_only_the_newest(backend):
    chain = list(append_chain(12, 12, flow_id="ap"))
    for cp in chain:
        backend.save(cp)
    assert len(pack_keys(backend)) == 13  # one per save: its new node state and its root document
    assert stored_pack_bytes(backend) * 2 < alone_bytes(chain)
    assert [len(packs_of(backend, cp)) for cp in chain] == [1] * 13
    assert len(chain_of(backend, chain[-1])) == 13
    reader = fresh(backend)
    for cp in reversed(chain):
        assert reader.load(cp.id) == cp
    assert fresh(backend).get_list_by_flow("ap", limit=20) == chain[::-1]  # lists fetch chains in one script too


def test_an_agent_loop_whose_chain_starts_afresh_still_names_one_pack(backend):
    """A restarted chain takes along the content it reuses from older chains, so 'pk' does not grow."""
    rng, tools, saved = random.Random(23), {}, []
    for i, cp in enumerate(agent_loop(23, 40)):
        if i and i % 10 == 0:  # a tool's result joins the state now and then and stays unchanged
            tools[f"tool-{i}"] = NodeCheckpointState(node_id=f"tool-{i}", node_type="Tool", status="success",
                                                     output_data={"content": prose(rng, 300)})  # fmt: skip
        cp = cp.model_copy(update={"node_states": {**cp.node_states, **tools}})
        backend.save(cp)
        saved.append(cp)
    assert max(len(packs_of(backend, cp)) for cp in saved) == 1
    reader = fresh(backend)
    for cp in saved[::7]:
        assert reader.load(cp.id) == cp


def test_an_append_run_keeps_every_checkpoint_hash_compact(backend):
    """No field over 64 bytes, so Redis stores each hash as a listpack (a hashtable costs about 2 KB more)."""
    chain = list(append_chain(21, 20, flow_id="compact"))
    for cp in chain:
        backend.save(cp)
    keys = [backend._core.keys.checkpoint("compact", cp.id) for cp in chain]
    assert all(len(v) <= 64 for key in keys for v in backend.redis.hgetall(key).values())
    if not isinstance(backend.redis, fakeredis.FakeRedis):  # fakeredis has no encodings to report
        major = int(backend.redis.info("server")["redis_version"].split(".")[0])
        compact = b"listpack" if major >= 7 else b"ziplist"  # Redis 6.2's compact hash encoding
        assert {backend.redis.object("encoding", key) for key in keys} == {compact}


def test_deleting_older_snapshots_keeps_the_packs_newer_ones_decode_against(backend):
    loop = list(agent_loop(13, 12))
    for cp in loop:
        backend.save(cp)
    for cp in loop[:-1]:
        assert backend.delete(cp.id)
    assert fresh(backend).load(loop[-1].id) == loop[-1]
    assert set(pack_keys(backend)) == {backend._core.keys.pack(loop[-1].flow_id, p).encode()
                                       for p in chain_of(backend, loop[-1])}  # fmt: skip
    assert backend.delete(loop[-1].id)
    assert pack_keys(backend) == []


def test_a_missing_base_pack_is_corruption_named_on_the_checkpoint(backend):
    loop = list(agent_loop(14, 3))
    for cp in loop:
        backend.save(cp)
    newest, *older = chain_of(backend, loop[-1])
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
    assert chain_of(other, loop[-1])[1:2] == packs_of(other, loop[-2])
    assert added * 4 < alone_bytes(loop[-1:])
    assert fresh(backend).load(loop[-1].id) == loop[-1]


@pytest.mark.parametrize("version", [2, 3])
def test_a_format_3_record_loads_and_a_run_goes_on_from_it(backend, version):
    """Format 3 kept the root in the hash and named every pack; format 2 was format 3 without based packs."""
    _, old, new, newer = list(append_chain(16, 3))
    legacy_pack = store_format_3(backend, old)
    backend.redis.hset(backend._core.keys.checkpoint(old.flow_id, old.id), "fmt", version)
    reader = fresh(backend)
    assert reader.load(old.id) == old
    reader.save(new)  # a format-3 pack cannot be a linked base: the new pack starts afresh, with every chunk
    assert [len(p) for p in packs_of(reader, new)] == [24]
    assert reader.delete(old.id)
    assert backend._core.keys.pack(old.flow_id, legacy_pack).encode() not in pack_keys(backend)
    assert fresh(backend).load(new.id) == new
    reader.save(newer)
    assert fresh(backend).load(newer.id) == newer
    for cp in (new, newer):
        assert reader.delete(cp.id)
    assert pack_keys(backend) == []


def test_overwriting_a_format_3_record_leaves_no_format_3_field(backend):
    cp = list(append_chain(22, 2))[-1]
    store_format_3(backend, cp)
    key = backend._core.keys.checkpoint(cp.flow_id, cp.id)
    changed = cp.model_copy(update={"metadata": {"moved": True}})
    fresh(backend).save(changed)
    assert not {b"doc", b"sum", b"id", b"flow"} & set(backend.redis.hkeys(key))
    assert fresh(backend).load(cp.id) == changed
    assert fresh(backend).delete(cp.id)
    assert pack_keys(backend) == []


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
    """The server skips packs the reader claims to hold; the request keeps them, so the cache dropping them before
    the reply arrives changes nothing."""
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
