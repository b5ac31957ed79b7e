"""A run's history as a tree of snapshots, branches included, for ``dynamiq-redis-ckpt chain``: walked up through
parent links and down through the flow index (by position, never by offset), a cycle of parent links reported as
damage."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamiq_redis_ckpt import history
from dynamiq_redis_ckpt.errors import CheckpointStoreError
from dynamiq_redis_ckpt.history import Op
from dynamiq_redis_ckpt.keys import flow_of
from dynamiq_redis_ckpt.requests import cmd, text
from dynamiq_redis_ckpt.store import StoreCore

_MAX_LINEAGE = 1_000_000  # checkpoints a history tree may hold (a guard against a cycle of parent links)


class ParentCycleError(CheckpointStoreError):
    """The parent links of a flow's checkpoints form a cycle (damaged hashes): a history tree has no root."""


@dataclass
class Snapshot:
    """A node of a history tree: one checkpoint (from its hash) and the checkpoints saved from it."""

    id: str
    fields: dict[str, str]
    children: list["Snapshot"] = field(default_factory=list)

    @property
    def created_at(self) -> float | None:
        created = history.int_field(self.fields.get("ts"), None)
        return None if created is None else created / 1e6

    def as_dict(self, marked: str) -> dict:
        f = self.fields
        return {"id": self.id, "run": history.run_key_of(f), "status": f.get("st"), "created_at": self.created_at,
                "raw_bytes": history.int_field(f.get("raw")), "this": self.id == marked,
                "damaged": history.field_damage(f) or None,
                "children": [child.as_dict(marked) for child in self.children]}  # fmt: skip


@dataclass
class Lineage:
    """The history around a checkpoint: the tree from its oldest stored ancestor, every branch of it included, and
    the id of a parent the root names that is no longer stored ('' when the root has none)."""

    flow: str
    root: Snapshot
    marked: str
    gone_parent: str
    size: int

    def as_dict(self) -> dict:
        return {"flow": self.flow, "checkpoint": self.marked, "gone_parent": self.gone_parent or None,
                "checkpoints": self.size, "tree": self.root.as_dict(self.marked)}  # fmt: skip


_SNAPSHOT_FIELDS = ("par", "run", "wf", "st", "ts", "raw", "kids")


def lineage_op(store: StoreCore, checkpoint_id: str) -> Op:
    """The :class:`Lineage` of ``checkpoint_id`` (None when it is not stored).

    Up: parent links, a run at a time (one read of the run's index and hashes, then its first checkpoint's parent in
    another run, say a fork's); a cycle of them raises :class:`ParentCycleError` naming it. Down: the home's flow
    index from the root's time on, oldest first (paged by position, so a delete meanwhile skips nothing), attaching
    every checkpoint whose parent is in the tree; it stops once the tree holds as many children as its hashes count
    (``kids``, kept by the save and delete scripts), else at the index's end."""
    k = store.keys
    home = yield cmd("GET", k.locator(checkpoint_id))
    if home is None:
        return None
    home = text(home)
    known: dict[str, dict[str, str]] = {}

    def fetch(ids: list[str]) -> Op:
        wanted = [i for i in ids if i not in known]
        replies = yield from history.fields_op(store, [(home, i) for i in wanted], *_SNAPSHOT_FIELDS)
        for i, values in zip(wanted, replies):
            if values[0] is not None or values[4] is not None:
                known[i] = {name: text(v) for name, v in zip(_SNAPSHOT_FIELDS, values)}

    yield from fetch([checkpoint_id])
    if checkpoint_id not in known:
        return None
    read_runs: set[str] = set()
    root, seen, gone = checkpoint_id, {checkpoint_id: None}, ""
    while parent := known[root]["par"]:
        if parent not in known and (run := history.run_key_of(known[root])) not in read_runs:
            read_runs.add(run)
            yield from fetch([text(m) for m in (yield cmd("ZRANGE", k.run_index(home, run), 0, -1))])
        if parent not in known:
            yield from fetch([parent])
        if parent not in known:
            gone = parent
            break
        if parent in seen:
            walked = list(seen)
            loop = " -> ".join(walked[walked.index(parent) :] + [parent])
            raise ParentCycleError(f"checkpoint {checkpoint_id}: its parent links form a cycle ({loop}); "
                                   "their hashes are damaged")  # fmt: skip
        if len(seen) >= _MAX_LINEAGE:
            raise ParentCycleError(f"checkpoint {checkpoint_id}: more than {_MAX_LINEAGE} ancestors (a cycle?)")
        seen[parent] = None
        root = parent
    nodes = {root: Snapshot(root, known[root])}
    pending = history.int_field(known[root]["kids"]) or 0
    waiting: dict[str, list[str]] = {}  # parent id -> children read before it joined the tree
    start, last, read_down = history.int_field(known[root]["ts"]) or 0, None, set()
    while pending > 0 and len(nodes) < _MAX_LINEAGE:
        entries, more = yield from history.ascending_page(k.flow_index(home), start, last, history.CHUNK)
        if entries:
            last = entries[-1]
        members = [m for _, m in entries if m not in read_down]
        read_down.update(members)
        yield from fetch(members)
        for member in members:
            if member in known and member not in nodes:
                pending += _attach(nodes, waiting, member, known)
        if not more:
            break
    for node in nodes.values():
        node.children.sort(key=lambda child: (child.created_at or 0, child.id))
    return Lineage(flow_of(home), nodes[root], checkpoint_id, gone, len(nodes))


def _attach(nodes: dict[str, Snapshot], waiting: dict[str, list[str]], cp_id: str, known: dict) -> int:
    """Put ``cp_id`` into the tree when its parent is there (then the children read before it, down their
    branches), else into ``waiting``; returns how the count of children the tree lacks changes (each node brings
    its ``kids`` and is one of them)."""
    parent = known[cp_id]["par"]
    if parent not in nodes:
        waiting.setdefault(parent, []).append(cp_id)
        return 0
    change, todo = 0, [cp_id]
    while todo:
        child = todo.pop()
        node = nodes[child] = Snapshot(child, known[child])
        nodes[known[child]["par"]].children.append(node)
        change += (history.int_field(known[child]["kids"]) or 0) - 1
        todo += waiting.pop(child, [])
    return change
