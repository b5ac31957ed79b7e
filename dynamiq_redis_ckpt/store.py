"""Checkpoint store operations, written once for sync and async.

Each operation is a generator: it yields :mod:`requests <dynamiq_redis_ckpt.requests>` and receives their replies,
and returns its result. :mod:`dynamiq_redis_ckpt.driver` runs them on a ``redis.Redis`` or a ``redis.asyncio.Redis``.
Nothing here does I/O or imports redis.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Generator, Iterable

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt import catalog, codec
from dynamiq_redis_ckpt.codec import micros
from dynamiq_redis_ckpt.cache import Cache, StoredState, pack_list
from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointEncodeError,
    CheckpointNotFoundError,
    CheckpointStoreError,
    CheckpointTooLargeError,
    ConfigurationError,
    LeaseLostError,
    UnsupportedFormatError,
    WrongKeyTypeError,
)
from dynamiq_redis_ckpt.keys import HOME_SEP, KINDS, Keys, flow_homes, flow_of, new_run_home
from dynamiq_redis_ckpt.logs import ids
from dynamiq_redis_ckpt.leases import (
    NO_TICKET_ARGS,
    PAUSED,
    VANISHED,
    LeaseTicket,
    announce,
    due_ms,
    run_key,
    status_name,
    status_of,
)
from dynamiq_redis_ckpt.requests import Batch, Command, Script, cmd, pairs, score_pairs, text

Op = Generator[Any, Any, Any]
logger = logging.getLogger(__name__)
_PAGE = 100
_SAVE_ATTEMPTS = 8
_DELETE_BATCH = 100
_PACK_COUNT = 8  # a pack string starts with its reference count, 8 ASCII digits (see save.lua)
_MAX_EXTRA_PACKS = 8  # superseded packs a checkpoint may keep as the dictionary chain of its new pack
_HELD_PACKS_SENT = 64  # a load tells the server up to this many packs of the flow it need not send
# A script touches only the keys it is given (Redis Cluster). When one meets a chain link to a key it was not given,
# it answers UNDECLARED; the chains below are then read with plain GETRANGEs of the pack heads (one round trip per
# level this process did not know) and the script is sent again with every key. Each resend must add keys, and they
# are bounded (a concurrent writer can start new chains meanwhile, not many times over); so are the levels read.
_DECLARE_ROUNDS = 16
_LOAD_ATTEMPTS = 8  # fresh reads of a checkpoint whose packs went while it was read (a writer overwriting it)
_DISCOVER_LEVELS = 1_000_000
_PACK_HEAD = _PACK_COUNT + 1 + codec.DIGEST_SIZE  # count, layer byte, base id (12 bytes linked, 16 in format 3)
_HEAD_WITH_ANCESTORS = _PACK_COUNT + 1 + codec.PACK_ID_SIZE * (2 + codec.MAX_ANCESTORS) + 1  # format 5's head
_REQUIRED_FIELDS = ("st", "run", "ts", "pk")  # in every stored format


@dataclass(frozen=True)
class Saved:
    """The outcome of a save: the id, the fencing token the run's lease now carries (0 without a lease), and its
    sizes in bytes: the encoded checkpoint, and the new content it stored before and after compression."""

    checkpoint_id: str
    token: int
    encoded_bytes: int = 0
    new_raw_bytes: int = 0
    new_stored_bytes: int = 0
    home: str = ""  # where it went: its flow, or one of its flow's buckets (keys.flow_homes)


@dataclass
class _Known:
    """Stored content a save may build on: chunk address -> pack, and pack -> its base ('' = none), newest first."""

    chunks: dict[bytes, str] = field(default_factory=dict)
    packs: dict[str, str] = field(default_factory=dict)

    def closure(self, packs: Iterable[str]) -> set[str]:
        """``packs`` and every pack they were compressed against, transitively (what loading them needs)."""
        found: set[str] = set()
        for pack in packs:
            while pack and pack not in found:
                found.add(pack)
                pack = self.packs.get(pack, "")
        return found

    def named(self, packs: list[str]) -> list[str]:
        """Of ``packs`` (a closure), those a checkpoint must name: the others are bases that a linked pack among
        them holds (format 4), directly or down its chain."""
        held: set[str] = set()
        for pack in packs:
            while codec.linked(pack) and (base := self.packs.get(pack, "")) and base not in held:
                held.add(base)
                pack = base
        return [p for p in packs if p not in held]


@dataclass
class _PackPlan:
    new: codec.Pack | None
    blob: bytes
    named: list[str]  # what the checkpoint's 'pk' field lists
    chunk_packs: dict[bytes, str]
    bases: dict[str, str]  # every pack loading it needs -> its base, newest first
    raw_size: int = 0  # the new pack's chunks before compression


@dataclass
class Record:
    """One checkpoint hash as read from Redis (fields decoded to str, the blobs left as bytes)."""

    flow: str
    id: str
    fields: dict[str, bytes]

    def get(self, name: str) -> str:
        return text(self.fields.get(name))

    @property
    def packs(self) -> list[str]:
        return pack_list(self.get("pk"))

    @property
    def root(self) -> bytes | None:
        """The root document's address (format 4), None when the field is absent."""
        found = self.fields.get("root")
        return None if found is None else bytes.fromhex(text(found))

    def state(self, chunk_packs: dict[bytes, str], bases: dict[str, str], slots: dict | None = None) -> StoredState:
        return StoredState(
            self.flow, self.get("st"), self.get("run"), self.get("wf"), self.get("par"), self.get("pk"),
            chunk_packs, bases, slots or {},
        )  # fmt: skip


class BucketsCheck:
    """The once-per-backend check that every backend of a namespace spreads a flow's runs over the same number of
    buckets (keys.flow_homes): the first one with more than one records its number (``P:meta:{buckets}``); a
    backend configured otherwise is refused, since it would list only some of a flow's runs. A backend that
    *adopts* (the operator's command line) takes the recorded number instead, or one when none is recorded, and
    records nothing."""

    def __init__(self, keys: Keys, buckets: int, adopt: Callable[[int], None] | None = None):
        self.keys = keys
        self.buckets = buckets
        self.adopt = adopt
        self.passed = False

    def op(self) -> Op:
        meta = self.keys.buckets_meta()
        if self.adopt is not None:
            found = yield cmd("GET", meta)
            self.buckets = int(text(found)) if found is not None and text(found).isdigit() else 1
            self.adopt(self.buckets)
        elif self.buckets > 1:
            found = (yield Batch((cmd("SET", meta, self.buckets, "NX"), cmd("GET", meta))))[1]
        else:
            found = yield cmd("GET", meta)
        if found is not None and text(found) != str(self.buckets):
            raise ConfigurationError(
                f"namespace {self.keys.prefix!r} spreads each flow over {text(found)} buckets, this backend over "
                f"{self.buckets}: set flow_buckets={text(found)} (the number cannot change for a namespace)"
            )
        self.passed = True


class Preflight:
    """Checks a backend passes before its first operation (each has ``passed`` and ``op()``), run by the driver."""

    def __init__(self, *checks: Any):
        self.checks = [check for check in checks if check is not None]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def op(self) -> Op:
        for check in self.checks:
            if not check.passed:
                yield from check.op()


class StoreCore:
    """Every checkpoint operation of one namespace, as request generators."""

    def __init__(self, keys: Keys, *, ttl_ms: int, max_checkpoint_bytes: int, cache: Cache | None = None,
                 buckets: int = 1):
        self.keys = keys
        self.buckets = buckets  # homes per flow a new run may go to (see keys.flow_homes)
        self.ttl_ms = ttl_ms
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.cache = cache or Cache()
        self._last_flow: str | None = None  # the flow a load tries first (see load)
        self.damaged_skipped = 0  # damaged checkpoints lists have left out (each one logged)
        self.observer = None  # a metrics.StoreMetrics when metrics are on
        self.sealer = None  # a crypto.Sealer when encryption at rest is on: new packs are sealed, sealed ones opened
        self.registrations = catalog.Registrations()  # when this process last put each flow in the catalog

    # ---- save -------------------------------------------------------------------------------------------------

    def save(self, checkpoint: FlowCheckpoint, *, must_exist: bool = False, ticket: LeaseTicket | None = None) -> Op:
        """Store ``checkpoint`` (insert, or overwrite the same id); with ``must_exist`` only overwrite.

        With a ``ticket`` (a running flow's save) the write is fenced: it lands only under the run's current lease
        (``held``) or takes the lease (``take``), in the same script. Without one the run's lease is not touched.
        Returns :class:`Saved`.
        """
        encoded = codec.encode_checkpoint(checkpoint, self._prior(checkpoint))
        if encoded.raw_size > self.max_checkpoint_bytes:
            raise CheckpointTooLargeError(checkpoint.id, encoded.raw_size, self.max_checkpoint_bytes)
        cp_id = checkpoint.id
        if HOME_SEP in checkpoint.flow_id:
            raise CheckpointEncodeError(cp_id, ("flow_id",), checkpoint.flow_id, "holds a NUL character (reserved)")
        flow = yield from self._home(checkpoint)
        status = status_of(checkpoint)
        run, wf, parent = checkpoint.run_id, checkpoint.wf_run_id or "", checkpoint.parent_checkpoint_id or ""
        root = codec.digest(encoded.root)
        chunks = {**encoded.chunks, root: encoded.root}  # packed with the rest: compressed against the parent's root
        known = self._known_content(flow, cp_id, parent)
        stored = self.cache.state(cp_id)
        if stored is not None and stored.flow != flow:
            stored = None
        # The lookup keys live in other slots, so a new checkpoint's are written first: a crash in between leaves a
        # locator that names no checkpoint (load answers None), never a checkpoint that cannot be found. An update's
        # checkpoint has them already: it refreshes them after the script agreed, so a refused update writes nothing.
        lookups = self._lookup_writes(checkpoint, flow, status, locate=not must_exist)
        registers = not must_exist and self.registrations.due(checkpoint.flow_id)
        writes = () if must_exist else lookups + (catalog.register(self.keys, checkpoint.flow_id) if registers else ())
        # Workers learn of a new lease, a pause or an end from the flow's wake shard, written right after the script
        # in the same pipeline (a no-op for them when the script refused the save).
        after = announce(self.keys, flow) if ticket is not None and ticket.announces(checkpoint) else ()
        moved_from = None
        declared: dict[str, None] = {}  # keys the script asked for (UNDECLARED), sent with every later attempt
        attempts = rounds = 0
        while attempts < _SAVE_ATTEMPTS:
            plan = self._plan_packs(flow, chunks, known, encoded.deltas)
            keys, args = self._save_call(checkpoint, flow, must_exist, status, stored, root, plan, encoded.raw_size,
                                         ticket)  # fmt: skip
            keys += tuple(k for k in self._with_chains(flow, declared) if k not in keys)
            # One round trip: the server runs a pipeline in order, so the lookup writes still land first.
            replies = yield Batch((*writes, Script("save", keys, args), *after))
            if writes:  # the GET before the locator's SET: the flow the id belonged to before
                moved_from = text(replies[0]) if replies[0] is not None and text(replies[0]) != flow else None
            writes, reply = (), replies[len(writes)]
            verdict = text(reply[0])
            if verdict == "UNDECLARED":
                rounds += 1
                what = f"save of checkpoint {cp_id}"
                yield from self._undeclared(flow, reply[1], reply[2], keys, declared, rounds, what)
                continue
            attempts += 1
            if verdict == "OK":
                if must_exist:
                    yield Batch(lookups)
                if moved_from is not None:  # one checkpoint per id: the version stored in another flow goes
                    yield from self._delete_elsewhere(moved_from, cp_id)
                self._last_flow = flow
                if registers:
                    self.registrations.done(checkpoint.flow_id)
                state = StoredState(flow, status, run, wf, parent, ",".join(plan.named), plan.chunk_packs, plan.bases,
                                    encoded.slots)  # fmt: skip
                self.cache.remember(cp_id, state)
                if plan.new is not None:
                    self.cache.add_pack(flow, plan.new)
                return Saved(cp_id, int(text(reply[2]) or 0), encoded.raw_size, plan.raw_size, len(plan.blob), flow)
            if verdict == "NOTFOUND":
                raise CheckpointNotFoundError(cp_id)
            if verdict == "RETRY":
                present, *fields = [text(v) for v in reply[1:]]
                stored = StoredState(flow, *fields) if present == "1" else None
            elif verdict == "MISSING":
                known = _Known()
            elif verdict == "FENCED":
                holder, token = text(reply[1]), text(reply[2])
                raise LeaseLostError(run_key(checkpoint), f"the lease is now held by {holder or 'nobody'} with token {token}",
                                    "taken_over")
            elif verdict == "VANISHED":
                raise LeaseLostError(run_key(checkpoint), VANISHED, "vanished")
            elif verdict == "WRONGTYPE":
                raise WrongKeyTypeError("the save found a key of another type; nothing was written", (text(reply[1]),))
            else:
                raise CheckpointStoreError(f"unexpected reply from save script: {reply!r}")
        raise CheckpointStoreError(f"Checkpoint {cp_id}: save kept racing with concurrent writers; gave up")

    def _home(self, checkpoint: FlowCheckpoint) -> Op:
        """Where the checkpoint goes (see keys.flow_homes). With one bucket, its flow. Else, in this order: where its
        id is stored now; its parent's home (a run resumed or forked from a checkpoint stays in that checkpoint's
        slot: the save script takes over the run it came from there); the home already holding its run (whose lease
        is there, even once the checkpoint it came from is gone); else the bucket its run id picks. This process's
        cache answers the first two when it knows them; otherwise one round trip reads the id's and the parent's
        locators and the run's homes at once (a new checkpoint of a run this process is writing needs none)."""
        flow, parent, run = checkpoint.flow_id, checkpoint.parent_checkpoint_id, run_key(checkpoint)
        if self.buckets <= 1:
            return flow
        for known in (self.cache.state(checkpoint.id), self.cache.state(parent or None)):
            if known is not None and flow_of(known.flow) == flow:
                return known.flow
        located = (checkpoint.id, *((parent,) if parent else ()))
        *homes, runs = yield Batch((*(cmd("GET", self.keys.locator(i)) for i in located),
                                    cmd("SMEMBERS", self.keys.run_flows(run))))  # fmt: skip
        for home in (*(text(h) for h in homes), *sorted(text(h) for h in runs or ())):
            if home and flow_of(home) == flow:
                return home
        return new_run_home(flow, run, self.buckets)

    def _undeclared(self, flow: str, links: list, wanted: list, sent, declared: dict, rounds: int, what: str) -> Op:
        """After a script asked for keys it was not given (``links`` it learned, the keys ``wanted``): learn the
        links, read the chains below the packs asked for, and add the keys to ``declared``; raise when the rounds do
        not converge (too many, or a reply asking only for keys already sent)."""
        _, wanted = self._learned(flow, links, wanted)
        new = [key for key in wanted if key not in sent]
        if not new or rounds >= _DECLARE_ROUNDS:
            raise CheckpointStoreError(
                f"{what}: the script kept asking for keys it was not given ({rounds} rounds, last {wanted[:4]!r}); "
                f"gave up"
            )
        declared.update(dict.fromkeys(new))
        prefix = self.keys.pack_prefix(flow)
        yield from self._discover(flow, [key[len(prefix) :] for key in new if key.startswith(prefix)])

    def _discover(self, flow: str, packs: list[str]) -> Op:
        """Learn the chains below ``packs`` as far as this process does not know them: plain single-key reads of the
        pack heads (GETRANGE declares its key), nothing when every link is known. Every other format-5 head names
        the packs below its base too, so a chain is learnt in two or three round trips; older heads name only their
        base, one round trip per level."""
        frontier = self.cache.unknown_links(flow, packs)
        for _ in range(_DISCOVER_LEVELS):
            if not frontier:
                return
            heads = yield Batch(tuple(cmd("GETRANGE", self.keys.pack(flow, p), 0, _HEAD_WITH_ANCESTORS - 1)
                                      for p in frontier))  # fmt: skip
            found: dict[str, str] = {}
            for p, head in zip(frontier, heads):
                if head:
                    found |= codec.chain_links(p, head[_PACK_COUNT:])
            self.cache.learn_links(flow, found)
            frontier = self.cache.unknown_links(flow, [base for base in found.values() if codec.linked(base)])
        raise CheckpointStoreError(f"a pack chain of flow {flow} is longer than {_DISCOVER_LEVELS} packs")

    def _learn_chains(self, flow: str, blobs) -> None:
        """Remember the links the heads of pack strings tell ((flow, pack id), pack string or None pairs)."""
        links: dict[str, str] = {}
        for (_, pack), blob in blobs:
            if blob:
                links |= codec.chain_links(pack, blob[_PACK_COUNT:])
        self.cache.learn_links(flow, links)

    def _learned(self, flow: str, links: list, wanted: list) -> tuple[dict[str, str], list[str]]:
        """A script's lists of links it learned (pack id, base id, flat) and keys it still needs, the links
        remembered in the cache."""
        learned = pairs([text(x) for x in links or ()])
        if learned:
            self.cache.learn_links(flow, learned)
        return learned, [text(key) for key in wanted or ()]

    def _chain_keys(self, flow: str, packs) -> list[str]:
        """The keys of ``packs`` and of the bases down their chains, as far as this process knows the links."""
        return [self.keys.pack(flow, p) for p in self.cache.chains(flow, packs)]

    def _with_chains(self, flow: str, keys) -> list[str]:
        """``keys`` (a script asked for them), and below each pack key among them the chain as far as known."""
        prefix = self.keys.pack_prefix(flow)
        packs = [key[len(prefix) :] for key in keys if key.startswith(prefix)]
        return list(dict.fromkeys([*keys, *self._chain_keys(flow, packs)]))

    def _known_content(self, flow: str, cp_id: str, parent: str) -> _Known:
        """What is already stored that this save may reference: the packs of its own id's stored version and of its
        parent, as this process knows them (the save script checks that they still exist)."""
        known = _Known()
        for state in (self.cache.state(cp_id), self.cache.state(parent or None)):
            if state is None or state.flow != flow:
                continue
            for pack, base in state.bases.items():
                known.packs.setdefault(pack, base)
            for ref, pack in state.chunk_packs.items():
                known.chunks.setdefault(ref, pack)
        return known

    def _prior(self, checkpoint: FlowCheckpoint) -> codec.Prior | None:
        """The previous version of each node state and of the input, as this process stored them: of the version of
        this id it wrote, else of the parent (the snapshot before, in APPEND mode); None when it knows neither."""
        state = self.cache.state(checkpoint.id) or self.cache.state(checkpoint.parent_checkpoint_id)
        if state is None or not state.slots:
            return None
        slots, chunk_packs, flow = state.slots, state.chunk_packs, state.flow
        packs: dict[str, codec.Pack | None] = {}  # each pack looked up once per save, not once per node

        def prior(slot: str) -> tuple[bytes, bytes] | None:
            ref = slots.get(slot)
            pack_id = chunk_packs.get(ref) if ref is not None else None
            if pack_id is None:
                return None
            if pack_id not in packs:
                packs[pack_id] = self.cache.pack(flow, pack_id)
            chunk = packs[pack_id].chunks.get(ref) if packs[pack_id] is not None else None
            return None if chunk is None else (ref, chunk)

        return prior

    def _plan_packs(self, flow: str, chunks: dict[bytes, bytes], known: _Known,
                    deltas: dict[bytes, tuple[bytes, list]] | None = None) -> _PackPlan:  # fmt: skip
        """Which packs the save references, and the new pack of the chunks not stored yet.

        The new pack is compressed against the newest known pack (the one the version it replaces or extends added)
        unless that would keep more than ``_MAX_EXTRA_PACKS`` packs alive only as dictionaries, or the newest is a
        format-3 pack (whose base it holds no reference on). A new pack with no base starts afresh with every chunk
        of the checkpoint, so the checkpoint names one pack however many chains its content came from.
        """
        reused = {known.chunks[ref] for ref in chunks if ref in known.chunks}
        needed = known.closure(reused)
        new = {ref: chunk for ref, chunk in chunks.items() if ref not in known.chunks}
        pack, blob, bases = None, b"", {}
        if new:
            base, newest = None, next(iter(known.packs), None)
            if newest and codec.linked(newest) and len(known.closure({newest}) - needed) <= _MAX_EXTRA_PACKS:
                base = self.cache.pack(flow, newest)  # None when this process no longer holds its body
            if base is not None:
                needed |= known.closure({base.id})
            else:
                new, needed, known = dict(chunks), set(), _Known()
            below: dict[str, None] = {}  # the chain under the base, which the new pack's head names (a cold
            link = base.base if base is not None else ""  # reader's discovery)
            while codec.linked(link) and link not in below:
                below[link] = None
                link = known.packs.get(link, "")
            # Every other pack of a chain names them (12 bytes each): a cold load reads a pack that does in its
            # first or second round trip, and the rest in the next.
            below = list(below)[: codec.MAX_ANCESTORS] if len(below) % 2 else []
            pack, blob = codec.build_pack(new, base, sealer=self.sealer, flow=flow, deltas=deltas, ancestors=below)
            bases[pack.id] = pack.base
            known = _Known(known.chunks, bases | known.packs)
        order = [p for p in known.packs if p in needed]  # newest first, as the stored versions listed them
        bases |= {p: known.packs.get(p, "") for p in order + sorted(needed.difference(order))}
        chunk_packs = {ref: known.chunks.get(ref) or pack.id for ref in chunks}
        raw_size = sum(len(chunk) for chunk in new.values())
        return _PackPlan(pack, blob, known.named(list(bases)), chunk_packs, bases, raw_size)

    def _lookup_ttl_ms(self, checkpoint: FlowCheckpoint, status: str) -> int:
        """How long a checkpoint's lookup keys live, in ms (0: no expiry): the ttl, or, for a paused run's
        checkpoint, as long as save.lua holds it (a day past its timer, or for as long as a person is awaited)."""
        if not self.ttl_ms or status not in PAUSED:
            return self.ttl_ms
        due = due_ms(checkpoint)
        return 0 if due is None else max(self.ttl_ms, due - int(time.time() * 1000) + 86_400_000)

    def _lookup_writes(self, checkpoint: FlowCheckpoint, flow: str, status: str, *, locate: bool
                       ) -> tuple[Command | Script, ...]:  # fmt: skip
        """The locator (read, then set, when ``locate``; else its expiry refreshed) and the run-flows sets of a
        checkpoint; and a paused parent's lookup keys handed back to the ttl once the run goes on from it."""
        cp_id, ttl = checkpoint.id, self._lookup_ttl_ms(checkpoint, status)
        locator = self.keys.locator(cp_id)
        if locate:  # GET first: the flow the id belonged to before (redis-py's reply to SET ... GET is a bool)
            writes = [cmd("GET", locator), cmd("SET", locator, flow, *(("PX", ttl) if ttl else ()))]
        else:
            writes = [cmd("PEXPIRE", locator, ttl) if ttl else cmd("PERSIST", locator)]
        for run in dict.fromkeys(r for r in (checkpoint.run_id, checkpoint.wf_run_id) if r is not None):
            key = self.keys.run_flows(run)
            writes.append(cmd("SADD", key, flow))
            if ttl:  # a new set takes the ttl; an existing one is only lengthened
                writes.append(Script("expire", (key,), (ttl, "longer")))  # PEXPIRE NX + GT, also on Redis 6.2
            else:
                writes.append(cmd("PERSIST", key))
        parent = checkpoint.parent_checkpoint_id
        known = self.cache.state(parent)
        if parent and ttl and status not in PAUSED and (known is None or known.status in PAUSED):
            # LT: only a key held longer than the ttl (or forever) for the pause is shortened
            runs = (known.run, known.wf) if known is not None else ()
            held = [self.keys.locator(parent)] + [self.keys.run_flows(r) for r in runs if r]
            writes += [Script("expire", (key,), (ttl, "shorter")) for key in dict.fromkeys(held)]  # PEXPIRE LT
        return tuple(writes)

    def _delete_elsewhere(self, flow: str, cp_id: str) -> Op:
        """Delete the version of ``cp_id`` stored in ``flow`` (the id was saved again in another flow); its locator
        already names the new flow and stays."""
        fields = yield cmd("HGETALL", self.keys.checkpoint(flow, cp_id))
        if fields:
            yield from self._delete_records(flow, [Record(flow, cp_id, _fields(fields))], protect=False, locators=False)

    def _save_call(self, cp, flow, must_exist, status, stored, root: bytes, plan: _PackPlan, raw_size: int, ticket):
        k, cp_id = self.keys, cp.id
        run, wf, parent = cp.run_id, cp.wf_run_id or cp.run_id, cp.parent_checkpoint_id or ""
        old = stored or StoredState(flow, status, run, wf, parent, "")
        keys = [
            k.checkpoint(flow, cp_id), k.flow_index(flow), k.status_index(flow, status),
            k.run_index(flow, run), k.run_index(flow, wf),
            k.checkpoint(flow, parent) if parent else k.checkpoint(flow, cp_id),
            k.status_index(flow, old.status), k.run_index(flow, old.run), k.run_index(flow, old.wf or old.run),
            k.checkpoint(flow, old.parent) if old.parent else k.checkpoint(flow, cp_id),
            k.lease(flow, run_key(cp)), k.lease_index(flow), k.due_index(flow),
        ]  # fmt: skip
        keys += [k.pack(flow, p) for p in plan.named]
        old_packs = [k.pack(flow, p) for p in old.pack_ids if stored is not None]
        keys += old_packs
        # Every further key the script may touch, as far as this process knows (it answers UNDECLARED for the rest):
        # the chains below those packs and the new pack's base, a paused parent's packs (a run going on from it hands
        # them back to the ttl), and the lease of a run this save may supersede.
        roots = [*plan.named, *(old.pack_ids if stored is not None else ()), *((plan.new.base,) if plan.new else ())]
        parent_state = self.cache.state(parent or None)
        if parent_state is not None and parent_state.flow != flow:
            parent_state = None
        if parent_state is not None and self.ttl_ms and status not in PAUSED:
            roots += parent_state.pack_ids
        extra = dict.fromkeys(self._chain_keys(flow, roots))
        if parent_state is not None and ticket is not None and ticket.mode == "take":
            parent_run = parent_state.wf or parent_state.run
            if parent_run and parent_run != run_key(cp):
                extra[k.lease(flow, parent_run)] = None
        keys += [key for key in extra if key not in keys]
        args = [
            "1" if must_exist else "0", self.ttl_ms, "1" if stored is not None else "0",
            old.status, old.run, old.wf, old.parent, old.packs,
            cp_id, flow, status, cp.run_id, cp.wf_run_id or "", parent, micros(cp.created_at),
            root.hex(), plan.new.base if plan.new else "", codec.FORMAT_VERSION, plan.blob, len(plan.named),
            ",".join(plan.named), raw_size, len(plan.blob),
        ]  # fmt: skip
        args += ticket.script_args() if ticket is not None else NO_TICKET_ARGS
        due = due_ms(cp)
        args += [run_key(cp), "" if due is None else due, len(cp.completed_node_ids), len(old_packs)]
        return tuple(keys), tuple(args)

    # ---- load -------------------------------------------------------------------------------------------------

    def load(self, checkpoint_id: str) -> Op:
        """The checkpoint with this id, or None.

        The locator names the checkpoint's flow. A process mostly loads checkpoints of the flow it last touched, so
        the load script runs for that flow in the same round trip as the locator read; its answer is used only when
        the locator confirms the flow (else the script runs again for the right one).
        """
        locator = cmd("GET", self.keys.locator(checkpoint_id))
        guess, pinned = self._last_flow, {}
        if guess is None:
            flow, reply = (yield locator), None
        else:
            flow, reply = yield Batch((locator, self._load_script(guess, checkpoint_id, pinned)))
        if flow is None:
            return None
        flow = text(flow)
        if flow != guess:
            reply = yield self._load_script(flow, checkpoint_id, pinned)
        self._last_flow = flow
        reply, blobs = yield from self._load_rest(flow, checkpoint_id, reply, pinned)
        if not reply:
            return None
        found = yield from self._decode([Record(flow, checkpoint_id, _fields(pairs(reply[0])))], blobs, pinned)
        return found[0] if found else None

    def _load_rest(self, flow: str, checkpoint_id: str, reply: list, pinned: dict) -> Op:
        """A load script's reply made whole. When it names packs it was not given (a cold process does not know the
        packs a checkpoint names, nor their chains), the hash it read is completed with plain reads of the packs
        down those chains (every other format-5 pack's head names the chain below it: one or two round trips). Packs
        never change, so the hash and those packs are the checkpoint as it was when the script read it, even if a
        writer has overwritten it since; only when one of them is gone (released by such an overwrite, or damaged)
        is the script sent again for a fresh read. (Sending the script again with more keys instead could chase a
        fast writer forever.) Returns the last reply and the pack strings read, by (flow, pack id)."""
        blobs: dict[tuple[str, str], bytes | None] = {}
        for _ in range(_LOAD_ATTEMPTS):
            if not reply:
                break
            blobs |= {(flow, text(pack_id)): blob for pack_id, blob in pairs(reply[1]).items()}
            # the links of the packs sent, so the next request declares their chains (and a warm one needs none)
            self._learn_chains(flow, blobs.items())
            if len(reply) < 4 or not reply[3]:
                break
            self._learned(flow, reply[2], reply[3])
            # Every other format-5 pack names the chain below its base, so the pack the script sent, or its base,
            # tells the whole chain; what is missing is read whole (its head tells the links below it): a cold load
            # of a format-5 chain takes one or two more round trips, of a format-4 one a round trip a level.
            for _ in range(_DISCOVER_LEVELS):
                chain = self.cache.chains(flow, Record(flow, checkpoint_id, _fields(pairs(reply[0]))).packs)
                absent = [p for p in chain if (flow, p) not in pinned and (flow, p) not in blobs
                          and self.cache.pack(flow, p) is None]  # fmt: skip
                if not absent:
                    break
                got = yield Batch(tuple(cmd("GET", self.keys.pack(flow, p)) for p in absent))
                blobs |= {(flow, p): blob for p, blob in zip(absent, got)}
                self._learn_chains(flow, (((flow, p), b) for p, b in zip(absent, got)))
            if all(blobs[(flow, p)] is not None for p in chain if (flow, p) in blobs):  # none went meanwhile
                return [reply[0], [], [], []], blobs
            reply = yield self._load_script(flow, checkpoint_id, pinned)  # a pack went: read the checkpoint afresh
        return reply, blobs

    def _load_script(self, flow: str, checkpoint_id: str, pinned: dict, declared=(), have=()) -> Script:
        """The load script, told which packs not to send; those are kept in ``pinned`` until the reply is used
        (``have``: pack strings the caller was sent already). It is given the keys of the packs this process knows
        the checkpoint names and their chains, and ``declared``."""
        held = self.cache.held(flow, _HELD_PACKS_SENT)
        pinned.update({(flow, p.id): p for p in held})
        args = (self.keys.pack_prefix(flow), *(p.id for p in held), *have)
        state = self.cache.state(checkpoint_id)
        named = state.pack_ids if state is not None and state.flow == flow else ()
        keys = dict.fromkeys([self.keys.checkpoint(flow, checkpoint_id), *self._chain_keys(flow, named),
                              *self._with_chains(flow, declared)])
        return Script("load", tuple(keys), args)

    def _decode(self, records: list[Record], fetched: dict | None = None, pinned: dict | None = None,
                damaged: list | None = None) -> Op:
        """Checkpoints from records, fetching the packs this process does not hold (nor was given) in one round
        trip per attempt. ``fetched`` maps (flow, pack id) to a pack string as stored, None when it was absent;
        ``pinned`` holds the decoded packs an earlier request told the server it had.

        A record whose packs are gone was deleted meanwhile (left out) or overwritten between the hash read and the
        pack read (a list's two round trips): it is read again in one script, hash and packs together, and only a
        version whose own packs are missing is damaged. A damaged record raises, or, given a ``damaged`` list, is
        appended to it as (record, error) and left out."""
        fetched = dict(fetched or {})
        held: dict[tuple[str, str], codec.Pack] = dict(pinned or {})
        records = [rec for rec in records if self._usable(rec, damaged)]
        walks = [self._needs(rec, held, fetched) for rec in records]
        unknown = {w for _, missing, _ in walks for w in missing}
        if unknown:  # lists read only hashes; the script answers for every pack asked and walks its chain
            fetched |= yield from self._fetch_packs(unknown, held)
            walks = [self._needs(rec, held, fetched) for rec in records]
        gone = [i for i, (_, missing, lost) in enumerate(walks) if missing or lost]
        if gone:
            calls = []
            for i in gone:
                calls.append(self._load_script(records[i].flow, records[i].id, held))
            replies = yield Batch(tuple(calls))
            for i, reply in zip(gone, replies):
                flow = records[i].flow
                reply, blobs = yield from self._load_rest(flow, records[i].id, reply, held)
                if not reply:  # deleted meanwhile
                    records[i] = None
                    continue
                fetched |= blobs
                records[i] = Record(flow, records[i].id, _fields(pairs(reply[0])))
                if not self._usable(records[i], damaged):
                    records[i] = None
                    continue
                walks[i] = self._needs(records[i], held, fetched)
        blobs = {w: b[_PACK_COUNT:] for w, b in fetched.items() if b is not None}  # after the count
        found = []
        for rec, (order, missing, lost) in zip(records, walks):
            if rec is None:
                continue
            try:
                if missing or lost:
                    raise CheckpointCorruptedError(rec.id, "a content pack it references is missing")
                for pack_id in order:
                    if (rec.flow, pack_id) not in held:
                        self._read_pack((rec.flow, pack_id), rec, blobs, held)
                found.append(self._decode_one(rec, [held[(rec.flow, p)] for p in order]))
            except (CheckpointCorruptedError, UnsupportedFormatError) as error:
                if damaged is None:
                    raise
                damaged.append((rec, error))
        return found

    def _usable(self, rec: Record, damaged: list | None) -> bool:
        """Whether a record's hash is whole and of a format this reader knows; if not, it raises, or with a
        ``damaged`` list records it there."""
        try:
            self._check_record(rec)
        except (CheckpointCorruptedError, UnsupportedFormatError) as error:
            if damaged is None:
                raise
            damaged.append((rec, error))
            return False
        return True

    def _needs(self, rec: Record, held: dict, fetched: dict) -> tuple[list[str], set[tuple[str, str]], bool]:
        """The packs ``rec`` needs (those it names and their bases, newest first), which of them are neither held
        nor fetched yet, and whether one is gone. Held packs found in the cache are added to ``held``."""
        order: dict[str, None] = {}
        missing: set[tuple[str, str]] = set()
        for pack_id in rec.packs:
            while pack_id and pack_id not in order:
                order[pack_id] = None
                where = (rec.flow, pack_id)
                pack = held.get(where) or self.cache.pack(*where)
                if pack is not None:
                    held[where] = pack
                    pack_id = pack.base
                elif where not in fetched:
                    missing.add(where)
                    break
                elif fetched[where] is None:
                    return list(order), missing, True
                else:
                    pack_id = codec.pack_base(fetched[where][_PACK_COUNT:])
        return list(order), missing, False

    def _fetch_packs(self, wanted: set[tuple[str, str]], held: dict) -> Op:
        """Pack strings of ``wanted`` (flow, pack id) and of the bases they hold, one script per flow; the packs
        the script is told not to send are kept in ``held``."""
        by_flow: dict[str, list[str]] = {}
        for flow, pack_id in sorted(wanted):
            by_flow.setdefault(flow, []).append(pack_id)
        fetched: dict[tuple[str, str], bytes | None] = {}
        declared: dict[str, dict[str, None]] = {flow: {} for flow in by_flow}
        for flow, pack_ids in by_flow.items():  # a cold process reads the chains below first (a round trip a level)
            yield from self._discover(flow, pack_ids)
        rounds = 0
        while by_flow:  # again while a script names keys it was not given (_undeclared bounds the rounds)
            calls = []
            for flow, pack_ids in by_flow.items():
                kept = [p for p in self.cache.held(flow, _HELD_PACKS_SENT) if (flow, p.id) not in wanted]
                held.update({(flow, p.id): p for p in kept})
                sent = [p for (f, p), b in fetched.items() if f == flow and b is not None]
                args = (self.keys.pack_prefix(flow), len(pack_ids), *pack_ids, *(p.id for p in kept), *sent)
                keys = dict.fromkeys([*self._chain_keys(flow, pack_ids), *self._with_chains(flow, declared[flow])])
                calls.append(Script("packs", tuple(keys), args))
            replies = yield Batch(tuple(calls))
            rounds += 1
            again: dict[str, list[str]] = {}
            for call, (flow, pack_ids), reply in zip(calls, by_flow.items(), replies):
                fetched |= {(flow, text(p)): blob for p, blob in pairs(reply[0]).items()}
                self._learn_chains(flow, ((k, b) for k, b in fetched.items() if k[0] == flow))
                if reply[2]:
                    yield from self._undeclared(flow, reply[1], reply[2], call.keys, declared[flow], rounds,
                                                f"reading packs of flow {flow}")  # fmt: skip
                    again[flow] = pack_ids
            by_flow = again
        return fetched

    def _read_pack(self, where: tuple[str, str], rec: Record, blobs: dict, held: dict) -> None:
        """Decode a fetched pack, and first the packs it was compressed against (oldest first, no recursion)."""
        flow = where[0]
        chain = []
        while where not in held:
            blob = blobs.get(where)
            if blob is None:
                raise CheckpointCorruptedError(rec.id, "the pack a pack was compressed against is missing",
                                               self.keys.pack(*where))  # fmt: skip
            base = codec.pack_base(blob)
            chain.append((where, blob, base))
            if not base:
                break
            where = (flow, base)
            cached = self.cache.pack(flow, base)
            if cached is not None:
                held[where] = cached
        for where, blob, base in reversed(chain):
            pack = codec.read_pack(where[1], blob, rec.id, self.keys.pack(*where), held.get((flow, base)),
                                   sealer=self.sealer, flow=flow)  # fmt: skip
            held[where] = pack
            self.cache.add_pack(flow, pack)

    def _check_record(self, rec: Record) -> None:
        """A hash missing a field every checkpoint has, or of an unknown format, is a typed error naming its key."""
        key = self.keys.checkpoint(rec.flow, rec.id)
        version = rec.get("fmt")
        if not version.isdigit():
            raise CheckpointCorruptedError(rec.id, f"format version field is {version!r}", key)
        missing = [name for name in _REQUIRED_FIELDS if name not in rec.fields]
        if missing or not rec.get("ts").lstrip("-").isdigit():
            raise CheckpointCorruptedError(rec.id, f"hash fields {missing or ['ts']} are missing or damaged", key)
        if int(version) not in codec.READABLE_FORMATS:  # format 1 was never released; a newer one needs a newer reader
            raise UnsupportedFormatError(rec.id, version, codec.FORMAT_VERSION)

    def _decode_one(self, rec: Record, packs: list[codec.Pack]) -> FlowCheckpoint:
        key = self.keys.checkpoint(rec.flow, rec.id)
        chunk_packs: dict[bytes, str] = {}
        chunks: dict[bytes, bytes] = {}
        for pack in packs:
            for ref, chunk in pack.chunks.items():
                if ref not in chunks:
                    chunk_packs[ref], chunks[ref] = pack.id, chunk
        try:
            address = rec.root if int(rec.get("fmt")) >= 4 else None
        except ValueError:
            raise CheckpointCorruptedError(rec.id, f"root address {rec.get('root')!r} is not hex", key) from None
        if address is not None:
            root = chunks.get(address)
            if root is None or codec.digest(root) != address:
                raise CheckpointCorruptedError(rec.id, "root document is missing from its packs", key)
        else:  # format 2 and 3 kept it in the hash
            blob = rec.fields.get("doc")
            if blob is None:
                raise CheckpointCorruptedError(rec.id, "root document field is missing", key)
            root = codec.unwrap(blob, rec.id, key)
            if codec.short_sum(root) != rec.get("sum"):
                raise CheckpointCorruptedError(rec.id, "root document fails its checksum", key)
        checkpoint = codec.decode_checkpoint(rec.id, root, chunks.get)
        slots = codec.root_slots(root) if address is not None else {}  # the next save's deltas start from these
        self.cache.remember(rec.id, rec.state(chunk_packs, {p.id: p.base for p in packs}, slots))
        return checkpoint

    # ---- lists ------------------------------------------------------------------------------------------------

    def list_by_flow(
        self, flow_id: str, status: CheckpointStatus | None, limit: int | None, before: datetime | None,
        *, newest: bool = False,
    ) -> Op:
        """Checkpoints of a flow, newest first, optionally of one status and created before a moment. With
        ``newest`` (the latest checkpoint) a damaged newest one raises instead of being passed over: resuming from
        an older one would run nodes again."""
        sources = [(h, self.keys.status_index(h, status_name(status)) if status else self.keys.flow_index(h))
                   for h in flow_homes(flow_id, self.buckets)]  # fmt: skip
        top = f"({micros(before)}" if before is not None else "+inf"
        return (yield from self._listed(sources, limit, top=top, newest=newest))

    def list_by_flow_and_run(
        self, flow_id: str, run_id: str, wf_run_id: str | None, status: CheckpointStatus | None, limit: int | None,
        *, newest: bool = False,
    ) -> Op:
        """Checkpoints of a flow labelled with ``run_id`` or ``wf_run_id`` (either field), newest first."""
        runs = dict.fromkeys((run_id, *((wf_run_id,) if wf_run_id else ())))  # as Dynamiq's: run_id even when ''
        if self.buckets > 1:  # the homes holding the runs' checkpoints (one, mostly), not every bucket of the flow
            found = yield Batch(tuple(cmd("SMEMBERS", self.keys.run_flows(r)) for r in runs))
            homes = sorted({text(h) for members in found for h in members if flow_of(text(h)) == flow_id})
            homes = homes or list(flow_homes(flow_id, self.buckets))  # no lookup left (expired): look everywhere
        else:
            homes = list(flow_homes(flow_id, 1))
        sources = [(h, self.keys.run_index(h, r)) for h in homes for r in runs]
        wanted = status_name(status) if status else None
        return (yield from self._listed(sources, limit, status=wanted, newest=newest))

    def list_by_run(self, run_id: str, limit: int | None) -> Op:
        """Checkpoints of every flow whose run_id or wf_run_id is ``run_id``, newest first."""
        flows = yield cmd("SMEMBERS", self.keys.run_flows(run_id))
        sources = [(f, self.keys.run_index(f, run_id)) for f in sorted(text(x) for x in flows)]
        return (yield from self._listed(sources, limit))

    def decode_records(self, records: list[Record]) -> Op:
        """The checkpoints of hashes another operation read (a page of a listing, say), in order; one deleted meanwhile
        or damaged is left out (a damaged one is counted and logged, as in a list)."""
        damaged: list[tuple[Record, Exception]] = []
        found = yield from self._decode(records, damaged=damaged)
        for rec, error in damaged:
            self.damaged_skipped += 1
            logger.warning("left damaged checkpoint %s (flow %s) out: %s", rec.id, rec.flow, error,
                           extra=ids(rec.flow, checkpoint=rec.id))
        return found

    def _listed(self, sources: list[tuple[str, str]], limit: int | None, *, newest: bool = False, **walk) -> Op:
        """A list's checkpoints. One damaged checkpoint must not take its whole flow down: it is left out, logged and
        counted (``damaged_skipped``), and older ones fill its place; only for ``newest`` does it raise."""
        want = limit
        while True:
            records = yield from self._walk(sources, want, **walk)
            damaged: list[tuple[Record, Exception]] = []
            found = yield from self._decode(records, damaged=None if newest else damaged)
            for rec, error in damaged:
                self.damaged_skipped += 1
                if self.observer is not None:
                    self.observer.damaged_found()
                logger.warning("left damaged checkpoint %s (flow %s) out of a list: %s", rec.id, rec.flow, error,
                               extra=ids(rec.flow, checkpoint=rec.id))
            if not damaged or limit is None or len(records) < want:
                return found if limit is None else found[:limit]
            want += len(damaged)

    def _walk(self, sources: list[tuple[str, str]], limit: int | None, *, top: str = "+inf", status: str | None = None) -> Op:
        """Merge several indexes newest first, keeping live entries (pruning expired ones) until ``limit``."""
        if limit is not None and limit <= 0 or not sources:
            return []
        page = min(limit, _PAGE) if limit else _PAGE
        heads: list[list[tuple[float, str]]] = [[] for _ in sources]
        offsets = [0] * len(sources)
        done = [False] * len(sources)
        found: list[Record] = []
        seen: set[tuple[str, str]] = set()
        dead: dict[int, list[str]] = {}
        while limit is None or len(found) < limit:
            refill = [i for i, h in enumerate(heads) if not h and not done[i]]
            if refill:
                replies = yield Batch(tuple(
                    cmd("ZREVRANGEBYSCORE", sources[i][1], top, "-inf", "WITHSCORES", "LIMIT", offsets[i], page)
                    for i in refill
                ))  # fmt: skip
                for i, rows in zip(refill, replies):
                    heads[i] = score_pairs(rows)
                    offsets[i] += len(heads[i])
                    done[i] = len(heads[i]) < page
            if not any(heads):
                break
            batch: list[tuple[int, str]] = []
            want = page if limit is None else max(limit - len(found), 1)
            while len(batch) < want:
                live = [i for i, h in enumerate(heads) if h]
                if not live or any(not heads[i] and not done[i] for i in range(len(sources))):
                    break
                best = max(live, key=lambda i: (heads[i][0][0], heads[i][0][1]))
                _, member = heads[best].pop(0)
                if (sources[best][0], member) not in seen:
                    seen.add((sources[best][0], member))
                    batch.append((best, member))
            if not batch:
                continue
            rows = yield Batch(tuple(cmd("HGETALL", self.keys.checkpoint(sources[i][0], m)) for i, m in batch))
            for (i, member), fields in zip(batch, rows):
                if not fields:
                    dead.setdefault(i, []).append(member)
                    continue
                rec = Record(sources[i][0], member, _fields(fields))
                if status is None or rec.get("st") == status:
                    found.append(rec)
        for i, members in dead.items():
            flow, index = sources[i]
            yield Script("prune", (index, *(self.keys.checkpoint(flow, m) for m in members)), tuple(members))
        return found[:limit] if limit is not None else found

    # ---- delete, cleanup, clear -------------------------------------------------------------------------------

    def delete(self, checkpoint_id: str) -> Op:
        """Delete one checkpoint; True when it existed."""
        locator = self.keys.locator(checkpoint_id)
        for _ in range(_SAVE_ATTEMPTS):
            flow = yield cmd("GET", locator)
            if flow is None:
                return False
            flow = text(flow)
            fields = yield cmd("HGETALL", self.keys.checkpoint(flow, checkpoint_id))
            if not fields:
                yield cmd("DEL", locator)
                return False
            deleted = yield from self._delete_records(flow, [Record(flow, checkpoint_id, _fields(fields))], protect=False)
            if deleted:
                return True
        raise CheckpointStoreError(f"Checkpoint {checkpoint_id}: delete kept racing with concurrent writers; gave up")

    def _delete_records(self, flow: str, records: list[Record], *, protect: bool, locators: bool = True) -> Op:
        k = self.keys
        deleted: list[str] = []
        for start in range(0, len(records), _DELETE_BATCH):
            keys, args = [k.flow_index(flow)], ["1" if protect else "0"]
            batch = records[start : start + _DELETE_BATCH]
            for rec in batch:
                st, run, wf, par = rec.get("st"), rec.get("run"), rec.get("wf"), rec.get("par")
                keys += [
                    k.checkpoint(flow, rec.id), k.status_index(flow, st), k.run_index(flow, run),
                    k.run_index(flow, wf or run), k.checkpoint(flow, par) if par else k.checkpoint(flow, rec.id),
                ]  # fmt: skip
                keys += [k.pack(flow, p) for p in rec.packs]
                args += [rec.id, st, run, wf, par, rec.get("pk"), rec.get("ts"), len(rec.packs)]
            # then the chains below the packs (a pack let go of may let go of its bases), as far as known
            keys += [key for key in self._chain_keys(flow, [p for rec in batch for p in rec.packs]) if key not in keys]
            declared: dict[str, None] = {}
            for rounds in range(1, _DECLARE_ROUNDS + 2):
                sent = (*keys, *(key for key in self._with_chains(flow, declared) if key not in keys))
                reply = yield Script("delete", sent, tuple(args))
                if text(reply[0]) != "UNDECLARED":
                    break
                yield from self._undeclared(flow, reply[1], reply[2], sent, declared, rounds, f"delete in flow {flow}")
            if text(reply[0]) == "WRONGTYPE":
                raise WrongKeyTypeError("the delete found a key of another type; nothing was deleted", (text(reply[1]),))
            deleted += [text(x) for x in reply[1:]]
        if deleted and locators:
            yield Batch(tuple(cmd("DEL", k.locator(i)) for i in deleted))
            for cp_id in deleted:
                self.cache.forget(cp_id)
        return deleted

    def cleanup_by_flow(self, flow_id: str, keep_count: int, max_ttl_minutes: float | None, fetch_limit: int) -> Op:
        """Dynamiq's retention rule (keep the newest ``keep_count``, delete what is older than ``max_ttl_minutes``)
        over the flow's newest ``fetch_limit`` checkpoints, except that in-flight chain heads (active, paused,
        pending_input) stay — and, spared, do not use up the ``fetch_limit`` window, so retention reaches past any
        number of runs waiting for people. Ages are read from the index (created_at), not from the hashes. With
        buckets, the flow's homes are merged newest first, a page at a time."""
        homes = flow_homes(flow_id, self.buckets)
        if not homes:
            return 0
        indexes = [self.keys.flow_index(h) for h in homes]
        cutoff = None if max_ttl_minutes is None else micros(datetime.now(timezone.utc)) - max_ttl_minutes * 60e6
        rank = considered = deleted = 0
        stays = [0] * len(homes)  # per home: entries looked at that are still in its index (the next page follows)
        while considered < fetch_limit:
            pages = yield Batch(tuple(cmd("ZREVRANGE", index, stays[i], stays[i] + _PAGE - 1, "WITHSCORES")
                                      for i, index in enumerate(indexes)))  # fmt: skip
            # Newest first across homes (a stable sort keeps each home's own order): the first _PAGE entries never
            # need one a home's page did not bring, since that page alone holds _PAGE newer ones.
            merged = sorted(((score, member, i) for i, rows in enumerate(pages) for score, member in score_pairs(rows)),
                            key=lambda entry: -entry[0])[: min(_PAGE, fetch_limit - considered)]  # fmt: skip
            if not merged:
                break
            rows = yield Batch(tuple(cmd("HGETALL", self.keys.checkpoint(homes[i], m)) for _, m, i in merged))
            doomed: dict[int, list[Record]] = {}
            kept, gone = [0] * len(homes), {}
            for (score, member, i), fields in zip(merged, rows):
                if not fields:  # expired: not a checkpoint any more, and pruned from the index below
                    gone.setdefault(i, []).append(member)
                    continue
                if rank >= keep_count or (cutoff is not None and score < cutoff):
                    doomed.setdefault(i, []).append(Record(homes[i], member, _fields(fields)))
                else:
                    kept[i] += 1
                rank += 1
            for i, members in gone.items():
                keys = (indexes[i], *(self.keys.checkpoint(homes[i], m) for m in members))
                yield Script("prune", keys, tuple(members))
            for i in range(len(homes)):
                removed = len((yield from self._delete_records(homes[i], doomed[i], protect=True))) if i in doomed else 0
                deleted += removed
                considered += kept[i] + removed
                stays[i] += kept[i] + len(doomed.get(i, ())) - removed
        return deleted

    def encryption_key_ids(self) -> Op:
        """How many stored packs of this namespace each encryption key id sealed ('' counts packs stored
        unencrypted): a key may leave the provider once its count is zero. SCANs the pack keys (never KEYS) and reads
        only each pack's head (GETRANGE)."""
        pattern = self.keys.namespace_patterns()[KINDS.index("pack")]
        head = _PACK_COUNT + 1 + codec.DIGEST_SIZE + 1 + 255  # count, layer byte, base id, key id length and id
        counts: dict[str, int] = {}
        cursor = b"0"
        while True:
            cursor, found = yield cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            if found:
                for blob in (yield Batch(tuple(cmd("GETRANGE", key, 0, head - 1) for key in found))):
                    if blob:  # '' for a pack deleted meanwhile
                        key_id = codec.sealed_key_id(blob[_PACK_COUNT:]) or ""
                        counts[key_id] = counts.get(key_id, 0) + 1
            if text(cursor) == "0":
                return counts

    def ping(self) -> Op:
        """True when Redis answers."""
        reply = yield cmd("PING")
        return bool(reply)

    def clear(self) -> Op:
        """Delete every key of this namespace (SCAN, never KEYS), except what live runs need: a lease a run holds
        right now and its flow's lease index; their flows are announced to workers again (a plain call never
        disturbs a live run, and its orphan stays findable)."""
        removed, live_flows, lease_indexes = 0, set(), set()
        for kind, pattern in zip(KINDS, self.keys.namespace_patterns()):
            cursor = b"0"
            while True:
                cursor, found = yield cmd("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
                if kind == "flow":
                    lease_indexes.update(text(key) for key in found if self.keys.is_lease_index(text(key)))
                    found = [key for key in found if not self.keys.is_lease_index(text(key))]
                # one key per command: on a cluster the keys of one SCAN page span many slots
                deletes = (Script("clear_lease", (key,), ()) if kind == "lease" else cmd("UNLINK", key) for key in found)
                if found:
                    for reply in (yield Batch(tuple(deletes))):
                        if isinstance(reply, list):  # a live lease, kept: [its flow]
                            live_flows.add(text(reply[0]))
                        else:
                            removed += reply
                if text(cursor) == "0":
                    break
        # A lease index keeps only the runs whose lease is still there (live): the entries of the leases deleted
        # above go, and an index left empty goes with them (a live run's renewal adds its entry back anyway).
        for index in sorted(lease_indexes):
            runs = [text(run) for run in (yield cmd("ZRANGE", index, 0, -1))]
            for i in range(0, len(runs), _PAGE):
                page = runs[i : i + _PAGE]
                yield Script("prune", (index, *(self.keys.lease_of_index(index, run) for run in page)), tuple(page))
        if live_flows:
            yield Batch(tuple(c for flow in sorted(live_flows) for c in announce(self.keys, flow)))
        self.cache.clear()
        return removed


def _fields(raw: dict) -> dict[str, bytes]:
    return {text(k): v for k, v in raw.items()}


