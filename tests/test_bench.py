"""The benchmark's workloads: deterministic, shaped like a Flow's APPEND snapshots, and sized as documented."""

from __future__ import annotations

import json

from dynamiq.utils import encode_reversible

from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain


def test_same_seed_same_snapshots_other_seed_other_content():
    first, again, other = list(append_chain(3, 10)), list(append_chain(3, 10)), list(append_chain(4, 10))
    assert [c.model_dump() for c in first] == [c.model_dump() for c in again]
    assert first[-1].original_input != other[-1].original_input


def test_append_chain_links_snapshots_like_a_flow():
    chain = list(append_chain(5, 10))
    assert len(chain) == 11
    assert [c.parent_checkpoint_id for c in chain[1:]] == [c.id for c in chain[:-1]]
    assert [len(c.completed_node_ids) for c in chain] == list(range(11))
    # unchanged node states are the same objects in every later snapshot, as in Dynamiq's shallow copies
    assert chain[-1].node_states["agent-00"] is chain[1].node_states["agent-00"]
    # each node's input carries its upstream's output
    assert chain[-1].node_states["agent-03"].input_data["agent-02"]["output"] == chain[-1].node_states[
        "agent-02"
    ].output_data
    size = len(json.dumps(chain[-1].to_dict(), default=encode_reversible))
    assert 50_000 < size < 80_000, size


def test_agent_loop_history_grows_two_messages_per_iteration():
    loop = list(agent_loop(2, 5))
    lengths = [
        len(c.node_states["agent"].internal_state["iteration"]["iteration_data"]["prompt_messages"]) for c in loop[1:]
    ]
    assert lengths == [4, 6, 8, 10, 12]


def test_interleaved_targets_take_turns_forth_and_back_and_a_follower_keeps_its_place():
    from dynamiq_redis_ckpt.bench.measure import interleaved

    log: list[str] = []

    def calls(name: str, n: int) -> list:
        return [lambda i=i: (log.append(f"{name}{i}"), [float(i)])[1] for i in range(n)]

    runs = {"a": calls("a", 4), "floor": calls("f", 4), "b": calls("b", 4)}
    failed: list[str] = []
    got = interleaved(runs, 2, None, lambda name, e: failed.append(name), warm_first=True, follows={"floor": "a"})
    assert log == ["a0", "a1", "f0", "f1", "b0", "b1", "b2", "b3", "a2", "a3", "f2", "f3"]
    assert got == {"a": [1.0, 3.0], "floor": [1.0, 3.0], "b": [1.0, 3.0]}  # each block's first call not counted
    assert failed == []


def test_interleaved_drops_a_target_whose_call_raises_and_keeps_the_others():
    from dynamiq_redis_ckpt.bench.measure import interleaved

    def boom() -> list:
        raise RuntimeError("backend down")

    runs = {"ok": [lambda: [1.0]] * 4, "bad": [lambda: [2.0], boom, lambda: [3.0], lambda: [4.0]]}
    failed: dict[str, Exception] = {}
    got = interleaved(runs, 2, None, failed.setdefault)
    assert got == {"ok": [1.0] * 4}
    assert list(failed) == ["bad"] and "backend down" in str(failed["bad"])


def test_interleaved_follower_makes_no_more_calls_than_its_leader_and_a_slow_target_keeps_a_sample():
    import time as clock

    from dynamiq_redis_ckpt.bench.measure import interleaved

    made: list[str] = []

    def leader_call(i: int) -> list:
        made.append(f"a{i}")
        if i == 1:
            raise RuntimeError("leader down")
        return [0.001]

    def slow() -> list:
        clock.sleep(0.06)  # more than half the budget below
        return [0.06]

    runs = {
        "a": [lambda i=i: leader_call(i) for i in range(4)],
        "floor": [lambda i=i: (made.append(f"f{i}"), [0.001])[1] for i in range(4)],
        "slow": [slow] * 4,
    }
    failed: dict[str, Exception] = {}
    got = interleaved(runs, 2, 0.1, failed.setdefault, warm_first=True, follows={"floor": "a"})
    assert made == ["a0", "a1", "f0"], "the follower makes only the calls its leader completed; a failed leader is dropped"
    assert list(failed) == ["a"]
    assert len(got["slow"]) >= 1, "the first call of a block is not counted, yet a slow target keeps a sample"
