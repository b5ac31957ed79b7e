"""Garbage collection: remove what no stored checkpoint or run needs any more, safely beside running saves.

What is garbage (per home of the flows collected, see :func:`dynamiq_redis_ckpt.keys.flow_homes`):

==============  ==========================================================================================
kind            what goes
==============  ==========================================================================================
``index``       entries of a flow's checkpoint indexes (all, by status, by run) whose checkpoint hash is gone
``lease_index`` entries of a flow's lease, timer and dead-letter indexes whose lease hash is gone
``pack``        content packs that no stored checkpoint names, directly or as the base of a needed pack
``locator``     ``P:id:{id}`` naming a home that does not hold checkpoint ``id``
``run_lookup``  homes in ``P:runflows:{run}`` that hold neither a checkpoint nor the lease of ``run``
``catalog``     catalog entries (:mod:`dynamiq_redis_ckpt.catalog`) of flows with nothing left in any home
==============  ==========================================================================================

Such things are left behind by checkpoints that expired (ttl) or were deleted by hand, and by processes that died
between the writes of a save: the counts of their packs stay high, so the packs are never released.

Finding garbage reads a lot (a SCAN inside each home, MATCH on its hash tag; a SCAN of the namespace's lookup keys)
and decides nothing: every removal is a Lua script that checks again, at removal time and atomically, what it relies
on. Why each removal is safe while runs save, load, resume and delete:

- ``index`` (``prune.lua``): an entry goes only if its hash does not exist when the script runs. A save writes the
  hash and its index entries in one script (same slot), so an entry whose hash is absent is not one a save is in the
  middle of; a save landing later adds the entry again.
- ``lease_index`` (``prune.lua``): the same, with the run's lease hash; every script that adds a run to these
  indexes (save, claim, release, retry_dead, deliver) writes or requires the lease hash in the same script, and
  claim.lua itself drops entries whose lease is gone.
- ``pack`` (``gc_packs.lua``): not judged by reference counts, which leaked hashes leave too high and which a save
  and a delete can move up and back down between gc's reads (a save naming the pack after gc read the checkpoints,
  and a delete of the checkpoint that named it before: the count is what gc saw, yet a checkpoint needs the pack;
  tests/test_gc.py's race test loses checkpoints within seconds under that rule).
  The script reads every checkpoint hash of the home itself and walks the chains of the packs they name (bases
  included); it refuses to run (``CHANGED``) when the home's flow index holds a checkpoint gc did not declare, so
  no checkpoint escapes it (a save adds its id to the index in the same script that writes the hash). A pack is
  removed only if no checkpoint needs it at that moment. After that no checkpoint names it, and a later save that
  would name it finds it missing and stores its content again (save.lua's ``MISSING``); a load that read a hash
  naming it earlier read a version that has since been overwritten or deleted, and reads again, exactly as after a
  delete. Counts are never changed: a kept base stays counted by a removed pack, which only delays its release to
  a later gc (too high is safe, too low would not be).
- ``locator`` and ``run_lookup`` (``gc_peek.lua``, ``gc_lookup.lua``): these keys live in slots of their own, so
  no script can look at them and at the home at once (a cluster). A save writes them (SET, SADD) and then, in a
  second request, its script. gc reads each candidate with ``gc_peek`` (noting the server time), waits ``grace``,
  checks that the home still holds nothing the key points to, and removes it with ``gc_lookup`` only if still
  nothing touched it since the peek (its idle time, read before anything touches it: a save's SET or SADD touches
  it, so does a load's GET) and it still names the home. A save that could slip
  through wrote its lookup before the peek (or within the peek's second, idle time counting whole seconds) and its
  script after the check: it stalled for about ``grace`` between two requests sent back to back. Then, as a last
  guard, the home is checked once more and a lookup removed in such a race is written back. A server with an LFU
  eviction policy does not track idle time: there lookups are left alone (reported in ``skipped``).
- ``catalog`` (``forget_flow.lua``, through :func:`catalog.forget_op`): the entry's score is read before the flow's
  homes are looked at; it goes only if that score is older than :data:`catalog.FORGET_AFTER`, every home was found
  without a checkpoint, a lease or answers, and the score is still the one read. A save registers its flow (a new
  score) before its script whenever its process has not done so for :data:`catalog.REGISTER_EVERY`, which any
  process saving since an entry that old has not; so a save landing meanwhile keeps the entry.

Removed bytes are each kind's payload: a pack's string, a locator's key and value, an index entry's or a run
lookup's member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator

from dynamiq_redis_ckpt import catalog
from dynamiq_redis_ckpt.errors import CheckpointStoreError, WrongKeyTypeError
from dynamiq_redis_ckpt.keys import KINDS, Keys, flow_homes, flow_of, glob_escape, tag
from dynamiq_redis_ckpt.requests import Batch, Script, Sleep, cmd, server_ms, text

Op = Generator[Any, Any, Any]
GARBAGE_KINDS = ("index", "lease_index", "pack", "locator", "run_lookup", "catalog")
DEFAULT_GRACE_SECONDS = 10.0
MIN_GRACE_SECONDS = 3.0  # the CLI's floor: idle time counts whole seconds, so a shorter wait proves little
_SCAN_COUNT = 1000
_BATCH = 500
_PACK_HEAD = 25  # count (8), layer byte (1), base id (up to 16)
_PRUNE_BATCH = 200
_ROUNDS = 32


@dataclass
class Found:
    """One kind of garbage: how many things, their bytes, and which (labels)."""

    count: int = 0
    bytes: int = 0
    items: list[str] = field(default_factory=list)

    def add(self, label: str, size: int, n: int = 1) -> None:
        self.count += n
        self.bytes += size
        self.items.append(label)


@dataclass
class Report:
    """What a gc pass found (``dry_run``) or removed, per kind of :data:`GARBAGE_KINDS`."""

    dry_run: bool
    flows: list[str]
    homes: int = 0
    kinds: dict[str, Found] = field(default_factory=lambda: {kind: Found() for kind in GARBAGE_KINDS})
    skipped: list[str] = field(default_factory=list)  # what was left alone, and why

    def to_dict(self, verbose: bool = False) -> dict:
        """A plain dict (for --json)."""
        kinds = {name: {"count": f.count, "bytes": f.bytes, **({"items": f.items} if verbose else {})}
                 for name, f in self.kinds.items()}  # fmt: skip
        return {"dry_run": self.dry_run, "flows": self.flows, "homes": self.homes, "kinds": kinds,
                "skipped": self.skipped}  # fmt: skip


def gc_op(keys: Keys, flows: list[str], buckets: int = 1, *, dry_run: bool = False,
          grace_seconds: float = DEFAULT_GRACE_SECONDS, lookups: bool = True) -> Op:  # fmt: skip
    """Collect the garbage of ``flows`` (every home of each): a :class:`Report` of what went (or, with ``dry_run``,
    of what would go; nothing is written then). ``lookups`` False leaves locators and run lookups alone (they need a
    SCAN of the namespace's lookup keys and a wait of ``grace_seconds``, at least 2: the command line asks for
    :data:`MIN_GRACE_SECONDS`; less only makes sense in tests)."""
    flows = list(dict.fromkeys(flows))
    report = Report(dry_run, flows)
    scores = yield from catalog.scores_op(keys, flows)  # before the homes are looked at (see catalog.forget_op)
    homes: list[str] = []
    for flow, score in zip(flows, scores):
        left = False
        for home in flow_homes(flow, buckets):
            homes.append(home)
            left = (yield from _home_op(keys, home, report)) or left
        if left or not catalog.forgettable(score):
            continue
        if dry_run or (yield from catalog.forget_op(keys, flow, score)):
            report.kinds["catalog"].add(flow, len(flow.encode()))
    report.homes = len(homes)
    if lookups and homes:
        yield from _lookups_op(keys, set(homes), report, max(grace_seconds, 2.0))
    return report


# ---- one home: indexes and packs ---------------------------------------------------------------------------------


@dataclass
class _Home:
    hashes: set[str] = field(default_factory=set)  # checkpoint ids whose hash the SCAN found
    held: bool = False  # a lease or a person's answers of a run
    indexes: list[str] = field(default_factory=list)  # flow, status and run indexes
    lease_indexes: list[str] = field(default_factory=list)  # lease, due and dead indexes
    packs: set[str] = field(default_factory=set)


def _scan_home(keys: Keys, home: str) -> Op:
    """Every key of one home (SCAN, MATCH on the home's hash tag), sorted by kind."""
    found = _Home()
    cp, pack, index = keys.checkpoint(home, ""), keys.pack_prefix(home), keys.flow_index(home)
    lease_kinds = {keys.lease_index(home), keys.due_index(home), keys.dead_index(home)}
    held = (keys.lease(home, ""), keys.inbox(home, ""))
    pattern = f"{glob_escape(keys.prefix)}:*:{glob_escape(tag(home))}*"
    cursor = b"0"
    while True:
        cursor, page = yield cmd("SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT)
        for key in map(text, page):  # the pattern also matches nested namespaces' keys: sorted out exactly here
            if key.startswith(cp):
                found.hashes.add(key[len(cp) :])
            elif key.startswith(pack):
                found.packs.add(key[len(pack) :])
            elif key.startswith(held):
                found.held = True
            elif key in lease_kinds:
                found.lease_indexes.append(key)
            elif key == index or key.startswith(index + ":st:") or key.startswith(index + ":run:"):
                found.indexes.append(key)
        if text(cursor) == "0":
            break
    found.indexes.sort()
    found.lease_indexes.sort()
    return found


def _home_op(keys: Keys, home: str, report: Report) -> Op:
    """Collect one home; returns whether it still holds something (a checkpoint, a lease, answers)."""
    found = yield from _scan_home(keys, home)
    # Pack heads first (their bases), then the checkpoints: a pack judged unneeded below is judged again by the
    # removal script anyway; reading in this order only keeps the dry run's answer close to what a pass removes.
    packs = sorted(found.packs)
    bases: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for start in range(0, len(packs), _BATCH):
        page = packs[start : start + _BATCH]
        replies = yield Batch(tuple(c for p in page for c in (cmd("GETRANGE", keys.pack(home, p), 0, _PACK_HEAD - 1),
                                                             cmd("STRLEN", keys.pack(home, p)))))  # fmt: skip
        for i, p in enumerate(page):
            head, size = replies[2 * i], replies[2 * i + 1]
            if head:
                bases[p], sizes[p] = _base_of(head), int(size)
    indexed = [text(m) for m in (yield cmd("ZRANGE", keys.flow_index(home), 0, -1))]
    ids = sorted(found.hashes | set(indexed))
    named: dict[str, str] = {}
    for start in range(0, len(ids), _BATCH):
        page = ids[start : start + _BATCH]
        replies = yield Batch(tuple(cmd("HGET", keys.checkpoint(home, i), "pk") for i in page))
        exists = yield Batch(tuple(cmd("EXISTS", keys.checkpoint(home, i)) for i in page))
        for i, pk, there in zip(page, replies, exists):
            if there:
                named[i] = text(pk)
    yield from _prune_indexes(keys, home, found, set(named), report)
    needed: set[str] = set()
    for pk in named.values():
        for pack in filter(None, pk.split(",")):
            while pack and pack not in needed:
                needed.add(pack)
                pack = bases.get(pack, "")
    unneeded = [p for p in packs if p in bases and p not in needed]
    if report.dry_run:
        for p in unneeded:
            report.kinds["pack"].add(f"{home} {p}", sizes[p])
    elif unneeded:
        yield from _remove_packs(keys, home, ids, packs, unneeded, report)
    return bool(named) or found.held


def _base_of(head: bytes) -> str:
    """The base a pack was compressed against, from the head of its string ('' for none)."""
    from dynamiq_redis_ckpt.codec import pack_base

    return pack_base(head[8:])


def _prune_indexes(keys: Keys, home: str, found: _Home, present: set[str], report: Report) -> Op:
    """Entries of the checkpoint indexes whose hash is gone, and of the lease indexes whose lease is gone."""
    for kind, indexes, target in (("index", found.indexes, lambda m: keys.checkpoint(home, m)),
                                  ("lease_index", found.lease_indexes, lambda m: keys.lease(home, m))):  # fmt: skip
        for index in indexes:
            members = [text(m) for m in (yield cmd("ZRANGE", index, 0, -1))]
            if kind == "index":
                candidates = [m for m in members if m not in present]
            else:
                exists = (yield Batch(tuple(cmd("EXISTS", target(m)) for m in members))) if members else []
                candidates = [m for m, there in zip(members, exists) if not there]
            short = index[len(keys.flow_index(home)) :] or "(all)"
            for start in range(0, len(candidates), _PRUNE_BATCH):
                page = candidates[start : start + _PRUNE_BATCH]
                if report.dry_run:
                    gone = page
                else:
                    checks = yield Batch(tuple(cmd("EXISTS", target(m)) for m in page))
                    page = [m for m, there in zip(page, checks) if not there]
                    if not page:
                        continue
                    removed = yield Script("prune", (index, *(target(m) for m in page)), tuple(page))
                    if not removed:
                        continue
                    left = yield Batch(tuple(cmd("ZSCORE", index, m) for m in page))
                    gone = [m for m, score in zip(page, left) if score is None]
                for m in gone:
                    report.kinds[kind].add(f"{home} {short} {m}", len(m.encode()))


def _remove_packs(keys: Keys, home: str, ids: list[str], packs: list[str], unneeded: list[str], report: Report) -> Op:
    """Remove ``unneeded`` packs with gc_packs.lua, declaring every checkpoint and pack key of the home; when the
    script finds checkpoints or packs it was not given (saved meanwhile), they are added and it is sent again."""
    declared = dict.fromkeys([*(keys.checkpoint(home, i) for i in ids), *(keys.pack(home, p) for p in packs)])
    args = (keys.pack_prefix(home), keys.checkpoint(home, ""))
    for start in range(0, len(unneeded), _BATCH):
        page = unneeded[start : start + _BATCH]
        for _ in range(_ROUNDS):
            reply = yield Script("gc_packs", (keys.flow_index(home), *declared), (*args, *page))
            verdict = text(reply[0])
            if verdict == "OK":
                for i in range(1, len(reply), 2):
                    report.kinds["pack"].add(f"{home} {text(reply[i])}", int(reply[i + 1]))
                break
            if verdict == "CHANGED":
                declared.update(dict.fromkeys(keys.checkpoint(home, text(i)) for i in reply[1:]))
            elif verdict == "UNDECLARED":
                declared.update(dict.fromkeys(text(key) for key in reply[1:]))
            elif verdict == "WRONGTYPE":
                raise WrongKeyTypeError("gc found a key of another type; it was left alone", (text(reply[1]),))
            else:
                raise CheckpointStoreError(f"unexpected reply from gc_packs: {reply!r}")
        else:
            report.skipped.append(f"packs of {home}: the home kept changing under gc ({_ROUNDS} rounds)")


# ---- lookups: locators and run homes ------------------------------------------------------------------------------


@dataclass
class _Lookup:
    key: str
    kind: str  # 'locator' | 'runflows'
    name: str  # the checkpoint id or the run
    home: str
    peek_ms: int
    size: int


def _lookups_op(keys: Keys, homes: set[str], report: Report, grace_seconds: float) -> Op:
    grace_ms = int(grace_seconds * 1000)
    patterns = keys.namespace_patterns()
    candidates: list[_Lookup] = []
    for kind, pattern in (("locator", patterns[KINDS.index("id")]), ("runflows", patterns[KINDS.index("runflows")])):
        stem = keys.locator("") if kind == "locator" else keys.run_flows("")
        stem = stem[: stem.index("{")]
        cursor = b"0"
        while True:
            cursor, page = yield cmd("SCAN", cursor, "MATCH", pattern, "COUNT", _SCAN_COUNT)
            page = [text(k) for k in page]
            if page:
                found = yield from _peek(keys, kind, stem, page, homes, report)
                if found is None:
                    return
                candidates += found
            if text(cursor) == "0":
                break
    if not candidates:
        return
    if report.dry_run:
        for c in candidates:
            report.kinds["locator" if c.kind == "locator" else "run_lookup"].add(_label(c), c.size)
        return
    now = yield cmd("TIME")
    wait_ms = max(c.peek_ms for c in candidates) + grace_ms - server_ms(now)
    if wait_ms > 0:
        yield Sleep(wait_ms / 1000 + 0.05)
    still = yield from _unused(keys, candidates)
    candidates = [c for c, unused in zip(candidates, still) if unused]
    if not candidates:
        return
    replies = yield Batch(tuple(Script("gc_lookup", (c.key,), (c.kind, c.home, c.peek_ms, grace_ms))
                                for c in candidates))  # fmt: skip
    removed = [c for c, r in zip(candidates, replies) if int(r) == 1]
    if not removed:
        return
    # the last guard: a lookup removed while a save of its checkpoint or run stalled between its two requests
    again = yield from _unused(keys, removed)
    restore = [c for c, unused in zip(removed, again) if not unused]
    if restore:
        yield Batch(tuple(cmd("SET", c.key, c.home, "NX") if c.kind == "locator" else cmd("SADD", c.key, c.home)
                          for c in restore))  # fmt: skip
    for c in removed:
        if c not in restore:
            report.kinds["locator" if c.kind == "locator" else "run_lookup"].add(_label(c), c.size)


def _label(c: _Lookup) -> str:
    return f"{c.name} -> {c.home}"


def _peek(keys: Keys, kind: str, stem: str, page: list[str], homes: set[str], report: Report) -> Op:
    """The stale lookups among one SCAN page: those whose home (one of ``homes``) holds nothing they point to, each
    with the server time of its peek; None when the server does not track idle time. (A dry run peeks too, so a gc
    right after one waits its grace period from then.)"""
    replies = yield Batch(tuple(Script("gc_peek", (k,), (kind,)) for k in page))
    found: list[_Lookup] = []
    for key, reply in zip(page, replies):
        word = text(reply[0]) if isinstance(reply[0], bytes) else ""
        if word == "NOIDLE":
            report.skipped.append("locators and run lookups: the server does not track idle time (LFU policy)")
            return None
        if word == "NONE":
            continue
        name = _untag(key[len(stem) :])
        if name is None or (keys.locator(name) if kind == "locator" else keys.run_flows(name)) != key:
            continue
        peek_ms = int(reply[1])
        if kind == "locator":
            home = text(reply[2])
            if home in homes:
                found.append(_Lookup(key, kind, name, home, peek_ms, len(key) + len(home)))
        else:
            found += [_Lookup(key, kind, name, text(h), peek_ms, len(text(h).encode()))
                      for h in reply[2] if text(h) in homes]  # fmt: skip
    still = yield from _unused(keys, found)
    return [c for c, unused in zip(found, still) if unused]


def _unused(keys: Keys, lookups: list[_Lookup]) -> Op:
    """For each lookup, whether its home holds nothing it points to: no checkpoint hash (a locator); no checkpoint
    of the run, no lease and no answers (a run's home)."""
    if not lookups:
        return []
    reads = []
    for c in lookups:
        if c.kind == "locator":
            reads.append(cmd("EXISTS", keys.checkpoint(c.home, c.name)))
        else:
            reads.append(cmd("ZRANGE", keys.run_index(c.home, c.name), 0, -1))
            reads.append(cmd("EXISTS", keys.lease(c.home, c.name), keys.inbox(c.home, c.name)))
    replies = iter((yield Batch(tuple(reads))))
    out, members = [], []
    for c in lookups:
        if c.kind == "locator":
            out.append(not next(replies))
        else:
            entries, held = [text(m) for m in next(replies)], next(replies)
            out.append(not held)
            members.append((len(out) - 1, c, entries))
    checks = [(i, c, m) for i, c, entries in members if out[i] for m in entries]
    if checks:
        exists = yield Batch(tuple(cmd("EXISTS", keys.checkpoint(c.home, m)) for _, c, m in checks))
        for (i, _, _), there in zip(checks, exists):
            if there:
                out[i] = False
    return out


def _untag(inner: str) -> str | None:
    """The id inside a hash tag made by keys.tag, or None when it is not one."""
    if not (inner.startswith("{") and inner.endswith("}")):
        return None
    body = inner[1:-1]
    if body == "%":
        return ""
    return body.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")


def flows_of_homes(homes: list[str]) -> list[str]:
    """The flows of some homes, each once, in order."""
    return list(dict.fromkeys(flow_of(h) for h in homes))
