"""Time travel: a new run started from any stored snapshot, optionally with some nodes' outputs replaced.

A fork is a new checkpoint: a copy of the snapshot with a fresh id, a fresh run (``run_id`` = ``wf_run_id``, as
Dynamiq gives a run started without one), status active, ``parent_checkpoint_id`` naming the snapshot (so a run's
history shows it as a branch) and ``metadata["forked_from"]``. Dynamiq resumes it like any checkpoint: it takes the
completed nodes' stored results as they are (``Flow._restore_from_checkpoint``) and runs the rest, so a replaced
output is what the downstream nodes read. The snapshot and its run are not changed (their store bookkeeping aside:
the snapshot's count of children, which keeps it from being pruned under them).

:func:`fork_op` stores the fork and, with ``hand_to_workers``, gives the new run a lease no one holds, claimable at
once, and announces it on its flow's wake shard: a ``dynamiq-redis-ckpt worker`` claims and resumes it (see
``scripts/fork.lua``). Otherwise the caller runs it (``Flow.run_sync`` with ``resume_from`` the fork's id and
``run_id`` the new run), whose first save takes the lease as any running flow's does.
"""

from __future__ import annotations

import copy
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.leases import announce, verdict
from dynamiq_redis_ckpt.requests import Batch, Script
from dynamiq_redis_ckpt.store import Saved, StoreCore

_TARGET = re.compile(r"^(?P<node>.+?)\.output(?:\.(?P<keys>.+))?$")


class ForkError(ValueError):
    """A fork that cannot be made as asked: an override naming no completed node, or a key of a non-object."""


@dataclass(frozen=True)
class Override:
    """Replace node ``node``'s output (``keys`` empty), or one key of it (``keys``: the path of keys to it)."""

    node: str
    keys: tuple[str, ...]
    value: Any

    @classmethod
    def parse(cls, target: str, value: Any) -> "Override":
        """From ``NODE.output`` or ``NODE.output.key[.key...]`` and the value; ForkError for any other target."""
        found = _TARGET.match(target)
        if not found:
            raise ForkError(f"{target!r}: expected NODE.output or NODE.output.KEY")
        keys = tuple(found["keys"].split(".")) if found["keys"] else ()
        if any(not k for k in keys):
            raise ForkError(f"{target!r}: an empty key")
        return cls(found["node"], keys, value)

    @property
    def target(self) -> str:
        """As it was written: ``NODE.output[.key...]``."""
        return ".".join((self.node, "output", *self.keys))


@dataclass(frozen=True)
class Fork:
    """A fork made: the snapshot it came from, the new run and its first checkpoint, where it was stored."""

    source: str
    flow: str
    run: str
    checkpoint: str
    home: str
    handed_to_workers: bool
    stale: tuple[str, ...] = ()  # nodes completed after a replaced one in the snapshot: they keep their outputs


def forked_checkpoint(source: FlowCheckpoint, overrides: list[Override] = (), run: str | None = None
                      ) -> tuple[FlowCheckpoint, tuple[str, ...]]:  # fmt: skip
    """The fork of ``source`` (see the module's docstring) with ``overrides`` applied, and the nodes the snapshot
    completed after the earliest replaced node (they depend on it or not; they are not run again either way).
    ``source`` is not changed. Raises ForkError for an override naming a node the snapshot has not completed (its
    output would be computed again) or a key inside an output that is not an object."""
    run = run or str(uuid.uuid4())
    now = datetime.now(timezone.utc)
    states = {node: state.model_copy(deep=True) for node, state in source.node_states.items()}
    done = list(source.completed_node_ids)
    for override in overrides:
        state = states.get(override.node)
        if state is None or override.node not in done:
            known = ", ".join(done) or "none"
            raise ForkError(f"node {override.node!r} has not completed in snapshot {source.id} (completed: {known})")
        state.output_data = _replaced(state.output_data, override)
    positions = [done.index(o.node) for o in overrides]
    stale = tuple(done[min(positions) + 1 :]) if positions else ()
    forked = source.model_copy(
        update={
            "id": str(uuid.uuid4()),
            "run_id": run,
            "wf_run_id": run,
            "status": CheckpointStatus.ACTIVE,
            "node_states": states,
            "parent_checkpoint_id": source.id,
            "created_at": now,
            "updated_at": now,
            "metadata": {**copy.deepcopy(source.metadata), "forked_from": source.id},
        },
        deep=True,
    )
    return forked, stale


def _replaced(output: Any, override: Override) -> Any:
    if not override.keys:
        return copy.deepcopy(override.value)
    root = copy.deepcopy(output) if output is not None else {}
    if not isinstance(root, dict):
        raise ForkError(f"{override.target}: the output of {override.node!r} is not an object")
    here = root
    for key in override.keys[:-1]:
        here = here.setdefault(key, {})
        if not isinstance(here, dict):
            raise ForkError(f"{override.target}: {key!r} is not an object")
    here[override.keys[-1]] = copy.deepcopy(override.value)
    return root


def fork_op(store: StoreCore, forked: FlowCheckpoint, *, hand_to_workers: bool):
    """Store the fork (a plain save: it takes no lease) and, with ``hand_to_workers``, make its run claimable and
    announce it. Returns the :class:`~dynamiq_redis_ckpt.store.Saved`. The two steps are two round trips: a crash
    between them leaves a stored fork no worker knows of (fork it again)."""
    saved: Saved = yield from store.save(forked)
    if hand_to_workers:
        home, run, keys = saved.home or forked.flow_id, forked.wf_run_id, store.keys
        lease_keys = (keys.lease(home, run), keys.lease_index(home))
        args = (run, forked.id, home, len(forked.completed_node_ids))
        replies = yield Batch((Script("fork", lease_keys, args), *announce(keys, home)))
        if verdict(replies[0]) == "EXISTS":
            raise ForkError(f"run {run} exists already in flow {forked.flow_id}")
    return saved
