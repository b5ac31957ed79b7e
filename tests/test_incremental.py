"""A save costs what changed (format 5: unchanged chunks keep their address unhashed, changed large ones are stored
as deltas over their previous version), and no change is ever missed: Dynamiq reassigns node states and may change
them in place, between two saves of the same objects. Every kind of change is saved, then loaded by a process that
holds nothing (and by the writer), and must come back exactly."""

from __future__ import annotations

import copy
import random
from datetime import timedelta

import pytest
from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState

from dynamiq_redis_ckpt import codec, delta
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain, prose
from tests.test_faults import fresh
from tests.test_packs import chain_of


def _next(cp: FlowCheckpoint, index: int) -> FlowCheckpoint:
    """The next APPEND snapshot as Dynamiq builds it: a shallow copy sharing the node-state objects."""
    moment = cp.created_at + timedelta(seconds=1)
    return cp.model_copy(update={"id": f"{cp.run_id}-{index:03d}", "parent_checkpoint_id": cp.id,
                                 "created_at": moment, "updated_at": moment})  # fmt: skip


def _big_state(rng: random.Random) -> NodeCheckpointState:
    messages = [{"role": "user", "content": prose(rng, 60), "meta": {"n": i, "tags": ["a", "b"]}} for i in range(40)]
    return NodeCheckpointState(
        node_id="agent", node_type="Agent", status="running", input_data={"input": prose(rng, 30)},
        output_data={"content": prose(rng, 80), "deep": {"a": {"b": {"c": 1, "d": [1, 2, 3]}}}},
        internal_state={"iteration": {"completed_iterations": 1, "iteration_data": {"prompt_messages": messages}}},
    )  # fmt: skip


def _start(seed: int) -> FlowCheckpoint:
    rng = random.Random(seed)
    return FlowCheckpoint(
        id=f"inc-{seed}-000", flow_id="inc", run_id=f"inc-{seed}", wf_run_id=f"inc-{seed}",
        original_input={"input": prose(rng, 900), "files": [prose(rng, 20)]},
        node_states={"agent": _big_state(rng), "other": _big_state(rng)},
    )  # fmt: skip


def _append(state: NodeCheckpointState, text: str) -> None:
    state.internal_state["iteration"]["iteration_data"]["prompt_messages"].append({"role": "tool", "content": text})


CHANGES = {
    "a reassigned field": lambda cp: setattr(cp.node_states["agent"], "output_data", {"content": "replaced"}),
    "a nested list appended in place": lambda cp: _append(cp.node_states["agent"], "observation " * 30),
    "a dict key changed deep inside": lambda cp: cp.node_states["agent"].output_data["deep"]["a"]["b"].update(c=2),
    "a deep list element changed in place": lambda cp: cp.node_states["agent"].output_data["deep"]["a"]["b"]["d"]
    .__setitem__(1, 20),
    "a counter ticked (same length)": lambda cp: cp.node_states["agent"].internal_state["iteration"]
    .update(completed_iterations=2),
    "one byte of a long string": lambda cp: cp.node_states["agent"].internal_state["iteration"]["iteration_data"][
        "prompt_messages"][20].update(content=cp.node_states["agent"].internal_state["iteration"]["iteration_data"][
            "prompt_messages"][20]["content"].replace("e", "E", 1)),
    "a message removed from the middle": lambda cp: cp.node_states["agent"].internal_state["iteration"][
        "iteration_data"]["prompt_messages"].pop(17),
    "messages reordered": lambda cp: cp.node_states["agent"].internal_state["iteration"]["iteration_data"][
        "prompt_messages"].reverse(),
    "the history cleared": lambda cp: cp.node_states["agent"].internal_state["iteration"]["iteration_data"][
        "prompt_messages"].clear(),
    "a key removed": lambda cp: cp.node_states["agent"].output_data.pop("deep"),
    "a key added at the front": lambda cp: setattr(cp.node_states["agent"], "output_data",
                                                   {"first": prose(random.Random(3), 40),
                                                    **cp.node_states["agent"].output_data}),
    "the status field": lambda cp: setattr(cp.node_states["agent"], "status", "success"),
    "a datetime set": lambda cp: setattr(cp.node_states["agent"], "completed_at", cp.created_at),
    "a pydantic extra field": lambda cp: cp.node_states["agent"].__pydantic_extra__.update(note="x" * 600)
    if cp.node_states["agent"].__pydantic_extra__ is not None
    else setattr(cp.node_states["agent"], "output_data", {"extra-less": True}),
    "an older node changed in place": lambda cp: cp.node_states["other"].output_data["deep"]["a"].update(z=[1]),
    "the original input changed in place": lambda cp: cp.original_input["files"].append("new file"),
    "a node state object replaced by an equal copy": lambda cp: cp.node_states.update(
        agent=copy.deepcopy(cp.node_states["agent"])),
    "a new node": lambda cp: cp.node_states.update(third=_big_state(random.Random(9))),
    "a node removed": lambda cp: cp.node_states.pop("other"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_between_two_saves_is_stored(backend, change):
    first = _start(1)
    backend.save(first)
    second = _next(first, 1)
    CHANGES[change](second)  # the node-state objects are shared: ``first``'s are changed too, as in a real Flow
    expected = second.model_copy(deep=True)
    backend.save(second)
    assert fresh(backend).load(second.id) == expected
    assert backend.load(second.id) == expected
    third = _next(second, 2)
    _append(third.node_states.get("agent") or third.node_states["other"], "and once more " * 50)
    expected_third = third.model_copy(deep=True)
    backend.save(third)
    assert fresh(backend).load(third.id) == expected_third


def test_random_changes_over_a_long_run_come_back_exactly(backend):
    """Two hundred saves of the same objects, each after a few random in-place changes somewhere in the state."""
    rng = random.Random(7)
    cp = _start(2)
    backend.save(cp)
    expected = {cp.id: cp.model_copy(deep=True)}
    for index in range(1, 120):
        cp = _next(cp, index)
        for _ in range(rng.randint(0, 3)):
            state = cp.node_states[rng.choice(sorted(cp.node_states))]
            history = state.internal_state["iteration"]["iteration_data"]["prompt_messages"]
            roll = rng.random()
            if roll < 0.4 or not history:
                history.append({"role": "assistant", "content": prose(rng, rng.randint(1, 90))})
            elif roll < 0.6:
                history[rng.randrange(len(history))]["content"] = prose(rng, rng.randint(1, 40))
            elif roll < 0.7:
                del history[rng.randrange(len(history))]
            elif roll < 0.8:
                history.insert(rng.randrange(len(history)), {"role": "user", "content": prose(rng, 12)})
            else:
                state.output_data["deep"]["a"]["b"]["c"] = rng.random()
        backend.save(cp)
        expected[cp.id] = cp.model_copy(deep=True)
    other = fresh(backend)
    for cp_id, want in expected.items():
        assert other.load(cp_id) == want, cp_id


def test_an_agent_loop_stores_deltas_and_a_pod_that_loaded_it_goes_on_with_them(backend):
    loop = list(agent_loop(31, 12))
    for cp in loop[:-1]:
        backend.save(cp)
    newest = chain_of(backend, loop[-2])[0]
    blob = backend.redis.get(backend._core.keys.pack(loop[-2].flow_id, newest))[8:]
    assert blob[0] & codec.LAYER_DELTA, "the newest iteration's pack holds a delta"
    other = fresh(backend)
    assert other.load(loop[-2].id) == loop[-2]
    saved = other._core.cache.state(loop[-2].id)
    assert saved.slots, "a load remembers where each node state is, for the next save's delta"
    other.save(loop[-1])
    assert fresh(backend).load(loop[-1].id) == loop[-1]


def test_a_chain_of_unchanged_nodes_reuses_their_chunks(backend):
    chain = list(append_chain(32, 8))
    for cp in chain:
        backend.save(cp)
    other = fresh(backend)
    for cp in chain:
        assert other.load(cp.id) == cp


def test_a_delta_pack_whose_source_chunk_is_damaged_is_corruption_not_data(backend):
    loop = list(agent_loop(33, 4))
    for cp in loop:
        backend.save(cp)
    newest, base, *_ = chain_of(backend, loop[-1])
    key = backend._core.keys.pack(loop[-1].flow_id, newest)
    raw = backend.redis.get(key)
    pack = codec.read_pack(newest, raw[8:], "x", base=fresh(backend)._core.cache.pack("x", "x") or _pack(backend,
                                                                                            loop[-1], base))
    assert pack.chunks
    from dynamiq_redis_ckpt import CheckpointCorruptedError

    wrong_base = codec.Pack(base, {}, pack.body, "")
    with pytest.raises(CheckpointCorruptedError):
        codec.read_pack(newest, raw[8:], "x", base=wrong_base)


def _pack(backend, cp, pack_id):
    """A pack decoded with its whole chain, through the store (loading the checkpoint fills the cache)."""
    other = fresh(backend)
    other.load(cp.id)
    return other._core.cache.pack(cp.flow_id, pack_id)


def test_delta_ops_rebuild_random_edits_exactly():
    rng = random.Random(5)
    for trial in range(1500):
        old = prose(rng, rng.randint(0, 900)).encode() + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 50)))
        new = bytearray(old)
        for _ in range(rng.randint(0, 6)):
            pos, roll = rng.randint(0, len(new)), rng.random()
            if roll < 0.4:
                new[pos:pos] = prose(rng, rng.randint(1, 60)).encode()
            elif roll < 0.7:
                del new[pos : pos + rng.randint(1, 400)]
            elif new:
                new[min(pos, len(new) - 1)] ^= 0x5A
        ops = delta.diff(old, bytes(new))
        if ops is not None:
            assert delta.apply(old, ops) == bytes(new)


@pytest.mark.parametrize("ops", [[0, 10**9], [5, -1], ["x"], [1], [0, 3, 7], [b"ok", 2.5, 1]])
def test_malformed_delta_ops_are_refused(ops):
    with pytest.raises(ValueError):
        delta.apply(b"0123456789", ops)


def test_loading_the_next_iteration_reads_only_what_the_process_lacks(own_redis):
    """A pod that holds iteration k of an agent loop and loads k+1 is sent the new pack and the hash, not the run's
    history again: the bytes Redis sends for it are a small part of what a process that holds nothing reads."""
    import redis as redis_py

    from dynamiq_redis_ckpt import RedisCheckpointBackend

    writer = RedisCheckpointBackend(url=own_redis.url, prefix="next")
    loop = list(agent_loop(41, 60))
    for cp in loop:
        writer.save(cp)
    raw = redis_py.Redis.from_url(own_redis.url)

    def sent_for(load) -> int:
        before = raw.info("stats")["total_net_output_bytes"]
        load()
        return raw.info("stats")["total_net_output_bytes"] - before

    reader = RedisCheckpointBackend(url=own_redis.url, prefix="next")
    cold = sent_for(lambda: reader.load(loop[-2].id))
    warm = sent_for(lambda: reader.load(loop[-1].id))
    newest = chain_of(writer, loop[-1])[0]
    new_pack = raw.strlen(writer._core.keys.pack(loop[-1].flow_id, newest))
    assert reader.load(loop[-1].id) == loop[-1]
    assert warm < new_pack + 2_000, (warm, new_pack)
    assert warm * 5 < cold, (warm, cold)
