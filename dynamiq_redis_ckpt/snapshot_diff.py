"""What changed between two snapshots of a run: a structural diff of two FlowCheckpoints. Pure: no I/O.

:func:`diff_snapshots` answers which nodes completed between snapshot A and snapshot B (and which went back: complete
in A, not in B, as when B is an older snapshot or a fork of one), and, node by node, which of ``input``, ``output``,
``internal_state``, ``status`` and ``error`` changed, down to the leaves: paths like ``nodes.llm.output.content``,
lists by index (``nodes.s01.output.transcript.2``), dict keys added or removed.

Hand-written rather than deepdiff: the values are JSON documents (a node state dumped in JSON mode), which need none
of deepdiff's object, set or ordering machinery, while its paths (``root['node_states']['llm']['output_data']``) and
its report layout would have to be rewritten into this shape anyway; this is some sixty lines and no new dependency.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState

# A node state's fields as the diff names them, in the order it reports them.
NODE_FIELDS = (("status", "status"), ("input", "input_data"), ("output", "output_data"),
               ("internal_state", "internal_state"), ("error", "error"))  # fmt: skip
ADDED, REMOVED, CHANGED = "added", "removed", "changed"
_ABSENT = object()
_EMPTY = (None, {}, [])


@dataclass(frozen=True)
class Change:
    """One difference at one path: ``kind`` is added, removed or changed; ``old``/``new`` are JSON values (None for
    the side where the value is absent)."""

    node: str | None
    field: str
    path: str
    kind: str
    old: Any = None
    new: Any = None

    def as_dict(self) -> dict:
        """The change as a plain dict (the ``--json`` row)."""
        return asdict(self)


@dataclass
class SnapshotDiff:
    """Differences from snapshot ``a`` to snapshot ``b``."""

    a: str
    b: str
    completed: list[str] = field(default_factory=list)  # complete in b, not in a (in b's order)
    went_back: list[str] = field(default_factory=list)  # complete in a, not in b
    changes: list[Change] = field(default_factory=list)  # run-level ones (node None) first, then node by node

    @property
    def differ(self) -> bool:
        """Whether the two snapshots differ at all (ids, times and run ids aside)."""
        return bool(self.completed or self.went_back or self.changes)

    def as_dict(self) -> dict:
        """The whole diff as a JSON-ready dict."""
        return {"a": self.a, "b": self.b, "completed": self.completed, "went_back": self.went_back,
                "changes": [c.as_dict() for c in self.changes]}  # fmt: skip


def diff_snapshots(a: FlowCheckpoint, b: FlowCheckpoint) -> SnapshotDiff:
    """The structural diff from ``a`` to ``b`` (see the module's docstring). Ids, run ids and times are not compared:
    they differ between any two snapshots."""
    out = SnapshotDiff(a.id, b.id)
    done_a, done_b = set(a.completed_node_ids), set(b.completed_node_ids)
    out.completed = [n for n in b.completed_node_ids if n not in done_a]
    out.went_back = [n for n in a.completed_node_ids if n not in done_b]
    run_fields = (("status", _status(a), _status(b)), ("waiting", sorted(a.pending_inputs), sorted(b.pending_inputs)))
    for name, old, new in run_fields:
        if old != new:
            out.changes.append(Change(None, name, name, CHANGED, old, new))
    for node in _node_order(a, b):
        old_state, new_state = _dumped(a.node_states.get(node)), _dumped(b.node_states.get(node))
        for name, attr in NODE_FIELDS:
            old, new = old_state.get(attr, _ABSENT), new_state.get(attr, _ABSENT)
            if (old is _ABSENT and new in _EMPTY) or (new is _ABSENT and old in _EMPTY):
                continue  # a node state on one side only: its empty fields say nothing
            for path, kind, before, after in _walk(old, new, f"nodes.{node}.{name}"):
                out.changes.append(Change(node, name, path, kind, before, after))
    return out


def _status(checkpoint: FlowCheckpoint) -> str:
    status = checkpoint.status
    return getattr(status, "value", str(status))


def _node_order(a: FlowCheckpoint, b: FlowCheckpoint) -> list[str]:
    """Nodes in the order the run completed them (b's, then a's), then the others by id."""
    ordered = dict.fromkeys([*b.completed_node_ids, *a.completed_node_ids])
    rest = sorted((set(a.node_states) | set(b.node_states)) - set(ordered))
    return [n for n in ordered if n in a.node_states or n in b.node_states] + rest


def _dumped(state: NodeCheckpointState | None) -> dict:
    if state is None:
        return {}
    return state.model_dump(mode="json")


def _walk(old: Any, new: Any, path: str):
    """(path, kind, old, new) for every difference between two JSON values, depth first."""
    if old is _ABSENT and new is _ABSENT:
        return
    if old is _ABSENT:
        yield path, ADDED, None, new
        return
    if new is _ABSENT:
        yield path, REMOVED, old, None
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _walk(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}")
        return
    if isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            yield from _walk(old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT, f"{path}.{i}")
        return
    if old != new or type(old) is not type(new):
        yield path, CHANGED, old, new


def shorten(value: Any, limit: int = 60) -> str:
    """A value for people, on one line: JSON, long strings and documents cut to about ``limit`` characters with
    their full length said."""
    if isinstance(value, str) and len(value) > limit:
        return json.dumps(value[: limit - 1] + "…", ensure_ascii=False) + f" ({len(value)} chars)"
    text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > limit + 20:
        return text[: limit - 1] + "…" + f" ({len(text)} chars)"
    return text
