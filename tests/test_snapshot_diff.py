"""snapshot_diff: the structural diff of two FlowCheckpoints (pure; the CLI's diff of a real run is in
tests/test_cli_fork.py)."""

from __future__ import annotations

from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.snapshot_diff import diff_snapshots, shorten


def node(node_id: str, output, *, status: str = "success", state: dict | None = None) -> NodeCheckpointState:
    return NodeCheckpointState(node_id=node_id, node_type="Step", status=status, input_data={"q": "hi"},
                               output_data=output, internal_state=state or {})  # fmt: skip


def snapshot(states: dict, done: list[str], status=CheckpointStatus.ACTIVE) -> FlowCheckpoint:
    return FlowCheckpoint(flow_id="f", run_id="r", node_states=states, completed_node_ids=done, status=status)


def test_nodes_completed_and_leaf_changes_by_path():
    a = snapshot({"llm": node("llm", {"content": "old", "tags": ["x", "y"], "gone": 1}, state={"turn": 1})}, ["llm"])
    b = snapshot(
        {"llm": node("llm", {"content": "new", "tags": ["x", "z", "w"], "extra": True}, state={"turn": 2}),
         "tool": node("tool", {"result": 42})},
        ["llm", "tool"], CheckpointStatus.COMPLETED,
    )  # fmt: skip
    diff = diff_snapshots(a, b)
    assert diff.differ and diff.completed == ["tool"] and diff.went_back == []
    rows = {c.path: (c.kind, c.old, c.new) for c in diff.changes}
    assert rows["status"] == ("changed", "active", "completed")
    assert rows["nodes.llm.output.content"] == ("changed", "old", "new")
    assert rows["nodes.llm.output.tags.1"] == ("changed", "y", "z")
    assert rows["nodes.llm.output.tags.2"] == ("added", None, "w")
    assert rows["nodes.llm.output.gone"] == ("removed", 1, None)
    assert rows["nodes.llm.output.extra"] == ("added", None, True)
    assert rows["nodes.llm.internal_state.turn"] == ("changed", 1, 2)
    assert rows["nodes.tool.output"] == ("added", None, {"result": 42})
    assert "nodes.tool.error" not in rows  # a node on one side only: its empty fields say nothing
    assert "nodes.llm.input" not in rows and "nodes.llm.input.q" not in rows  # unchanged
    assert {c.field for c in diff.changes if c.node == "llm"} == {"output", "internal_state"}
    assert set(diff.as_dict()["changes"][0]) == {"node", "field", "path", "kind", "old", "new"}


def test_going_back_and_no_difference():
    later = snapshot({"a": node("a", 1), "b": node("b", 2)}, ["a", "b"])
    earlier = snapshot({"a": node("a", 1)}, ["a"])
    back = diff_snapshots(later, earlier)
    assert back.went_back == ["b"] and back.completed == []
    assert [(c.path, c.kind) for c in back.changes if c.node == "b"][0] == ("nodes.b.status", "removed")
    same = diff_snapshots(earlier, earlier.model_copy(update={"id": "other", "run_id": "r2"}))
    assert not same.differ and same.changes == []
    assert diff_snapshots(snapshot({"a": node("a", 1)}, ["a"]), snapshot({"a": node("a", 1.5)}, ["a"])).differ


def test_long_values_are_shortened_for_people():
    text = shorten("word " * 100)
    assert text.endswith("(500 chars)") and len(text) < 90
    assert shorten({"k": "v"}) == '{"k": "v"}'
    assert shorten(list(range(200))).endswith("chars)")
