"""Process-local knowledge that saves round trips and bytes; never needed for correctness (a request that relies on
it keeps what it relied on).

* :class:`StoredState` remembers, per checkpoint id, what this process last wrote or read: the fields the save
  script checks before it overwrites (so the common save needs no read first) and which pack holds each content
  chunk (so an APPEND snapshot sends only the chunks its parent does not already have).
* Packs are immutable (their id is a digest of their content), so decoded packs are kept by id; their bodies are
  the dictionaries later packs of a run are compressed against.
* For the same reason a pack's base never changes: the links pack -> base seen are kept (bounded), so a request can
  declare the keys of the whole chains its script walks (Redis Cluster: a script touches only declared keys).

The save script verifies every assumption taken from here and answers RETRY or MISSING when one is stale.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

from dynamiq_redis_ckpt.codec import Pack, linked


def pack_list(field_value: str) -> list[str]:
    """The pack ids of a checkpoint's ``pk`` field (comma separated, its newest pack first)."""
    return [p for p in field_value.split(",") if p]


@dataclass(frozen=True)
class StoredState:
    """A checkpoint as stored, as far as the save and delete scripts compare it."""

    flow: str
    status: str
    run: str
    wf: str
    parent: str
    packs: str
    chunk_packs: dict[bytes, str] = field(default_factory=dict, compare=False)
    bases: dict[str, str] = field(default_factory=dict, compare=False)  # pack id -> its base's id, for ``packs``
    slots: dict[str, bytes] = field(default_factory=dict, compare=False)  # node id (codec.INPUT_SLOT) -> its chunk

    @property
    def pack_ids(self) -> list[str]:
        """The packs it references, its newest first."""
        return pack_list(self.packs)


class Cache:
    """Thread-safe, bounded LRU maps of stored states and decoded packs."""

    def __init__(self, max_states: int = 4096, max_pack_bytes: int = 64 << 20, max_links: int = 1 << 16):
        self._lock = threading.Lock()
        self._links: OrderedDict[tuple[str, str], str] = OrderedDict()  # (flow, pack) -> its base ('' = none)
        self._max_links = max_links
        self._states: OrderedDict[str, StoredState] = OrderedDict()
        self._packs: OrderedDict[tuple[str, str], tuple[Pack, int]] = OrderedDict()
        self._flow_packs: dict[str, OrderedDict[str, None]] = {}
        self._pack_bytes = 0
        self._max_states = max_states
        self._max_pack_bytes = max_pack_bytes

    def state(self, checkpoint_id: str | None) -> StoredState | None:
        """What this process last knew of a checkpoint, if anything."""
        if checkpoint_id is None:
            return None
        with self._lock:
            found = self._states.get(checkpoint_id)
            if found is not None:
                self._states.move_to_end(checkpoint_id)
            return found

    def remember(self, checkpoint_id: str, state: StoredState) -> None:
        """Record the stored state of a checkpoint."""
        with self._lock:
            self._states[checkpoint_id] = state
            self._states.move_to_end(checkpoint_id)
            while len(self._states) > self._max_states:
                self._states.popitem(last=False)

    def forget(self, checkpoint_id: str) -> None:
        """Drop what is known of a checkpoint (after a delete, or when it proved stale)."""
        with self._lock:
            self._states.pop(checkpoint_id, None)

    def pack(self, flow: str, pack_id: str) -> Pack | None:
        """A decoded pack, if this process holds it."""
        with self._lock:
            found = self._packs.get((flow, pack_id))
            if found is None:
                return None
            self._packs.move_to_end((flow, pack_id))
            self._flow_packs[flow].move_to_end(pack_id)
            return found[0]

    def held(self, flow: str, limit: int) -> list[Pack]:
        """Up to ``limit`` decoded packs of a flow this process holds, most recently used first. A request that tells
        the server not to send these must keep the objects: the cache may drop them before the reply arrives."""
        with self._lock:
            ids = self._flow_packs.get(flow)
            if not ids:
                return []
            return [self._packs[(flow, pack_id)][0] for pack_id in islice(reversed(ids), limit)]

    def add_pack(self, flow: str, pack: Pack) -> None:
        """Keep a decoded pack; evicts the least recently used ones past the byte budget."""
        size = len(pack.body) + sum(len(c) for c in pack.chunks.values())
        self.learn_links(flow, {pack.id: pack.base})
        with self._lock:
            if (flow, pack.id) in self._packs:
                return
            self._packs[(flow, pack.id)] = (pack, size)
            self._flow_packs.setdefault(flow, OrderedDict())[pack.id] = None
            self._pack_bytes += size
            while self._pack_bytes > self._max_pack_bytes and len(self._packs) > 1:
                (old_flow, old_id), (_, dropped) = self._packs.popitem(last=False)
                self._pack_bytes -= dropped
                held = self._flow_packs[old_flow]
                del held[old_id]
                if not held:
                    del self._flow_packs[old_flow]

    def learn_links(self, flow: str, links: dict[str, str]) -> None:
        """Remember pack -> base links of a flow (a base '' = the pack holds none). Only links read from a pack
        itself belong here: they never change."""
        with self._lock:
            for pack, base in links.items():
                if pack:
                    self._links[(flow, pack)] = base
                    self._links.move_to_end((flow, pack))
            while len(self._links) > self._max_links:
                self._links.popitem(last=False)

    def chains(self, flow: str, packs) -> list[str]:
        """``packs`` and the bases they hold, down every chain as far as the links known go (in walk order)."""
        with self._lock:
            return self._chains(flow, packs)

    def unknown_links(self, flow: str, packs) -> list[str]:
        """The packs down the chains of ``packs`` (those included) whose base this process does not know yet."""
        unknown: list[str] = []
        with self._lock:
            for pack in self._chains(flow, packs):
                if (flow, pack) not in self._links:
                    unknown.append(pack)
        return unknown

    def _chains(self, flow: str, packs) -> list[str]:
        found: dict[str, None] = {}
        for pack in packs:
            while pack and pack not in found:
                found[pack] = None
                base = self._links.get((flow, pack), "")
                pack = base if linked(base) else ""
        return list(found)

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._links.clear()
            self._states.clear()
            self._packs.clear()
            self._flow_packs.clear()
            self._pack_bytes = 0
