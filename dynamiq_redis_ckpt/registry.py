"""The leases this process holds, and the heartbeat thread that renews them.

One :class:`LeaseRegistry` per process keeps the leases of every backend object at once (flow builders often make a
backend per Flow), and one heartbeat thread renews them all, never blocked by the work a node does. A holder that
cannot confirm a renewal before its lease could run out (by the monotonic clock) stops writing on its own; a holder
whose lease was taken over is refused by Redis. Either way the run's next save raises
:class:`~dynamiq_redis_ckpt.errors.LeaseLostError`. A process never takes a lost lease back by itself; a *new*
``run_sync`` of the run (an explicit resume, from any process) takes it over, bumping the token.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt.driver import SyncDriver
from dynamiq_redis_ckpt.errors import CheckpointStoreError, LeaseLostError, WrongKeyTypeError
from dynamiq_redis_ckpt.keys import Keys
from dynamiq_redis_ckpt.logs import ids
from dynamiq_redis_ckpt.leases import ACTIVE, TERMINAL, VANISHED, LeaseRef, LeaseTicket, renew_many_op, run_key, status_of

logger = logging.getLogger(__name__)

_RENEW_BATCH = 200  # renew scripts sent in one pipeline by the heartbeat
_STALE_SECONDS = 3600  # lost and paused entries are forgotten this long after their deadline
_owner: tuple[int, str] | None = None

RunRef = tuple[str, str, str]  # (namespace, flow, run key)


def process_owner() -> str:
    """This process's lease owner id: host, pid and a random part (made anew after a fork)."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _owner[1]


def safe_span(ttl: float) -> float:
    """How long after a confirmed renewal (or a save that took the lease was sent) a holder may count on its lease:
    the ttl less a margin for clock-rate differences between this host and Redis."""
    return ttl - min(1.0, ttl / 10)


@dataclass(frozen=True, eq=False)
class LeaseStore:
    """Where a lease lives: the store's keys and the sync driver the heartbeat renews it with."""

    keys: Keys
    driver: SyncDriver

    def renew(self, leases: list[LeaseRef], announce_flows: tuple[str, ...] = ()) -> list:
        """Renew several leases of this store in one round trip; a verdict (or WrongKeyTypeError) each."""
        return self.driver.run(renew_many_op(self.keys, leases, announce_flows))


@dataclass(frozen=True)
class LeasePolicy:
    """How a backend's runs hold their leases: ttl and heartbeat interval (seconds), and where they live."""

    ttl: float
    interval: float
    store: LeaseStore
    observer: Any = None  # a metrics.StoreMetrics when the backend's metrics are on


@dataclass
class HeldLease:
    """A lease this process holds (or held, when ``lost`` says why not)."""

    namespace: str
    flow: str
    run: str
    owner: str
    token: int
    policy: LeasePolicy
    run_id: str | None = None  # the Dynamiq run_id writing under it; None until a worker's resumed run saves
    head: str | None = None  # for a worker's claim: the checkpoint the resumed run starts from
    paused: bool = False  # the run saved a non-active status: lease handed back, token kept, no heartbeat
    deadline: float = 0.0  # monotonic; past it the lease may have run out
    next_renewal: float = 0.0
    lost: str | None = None
    last_error: str | None = None  # why the latest renewal failed, if it did: named when the lease is self-fenced
    on_lost: list[Callable[[str], None]] = field(default_factory=list)
    on_first_save: Callable[[], None] | None = None  # a worker's claim: called once its resumed run's save lands
    saves: int = 0  # confirmed saves under it: a renewal sent before the latest one answers for an older state
    announced: bool = False  # its flow was announced to workers by a renewal (see LeaseRegistry._renew)
    ended: bool = False  # the run saved a final status: the lease was handed back for good
    ending: bool = False  # a save of a final status is on its way (it may land before a renewal sent earlier)
    home: str = ""  # where the run's keys live (keys.flow_homes): its flow, or one of the flow's buckets

    @property
    def where(self) -> str:
        """The home its lease key is in (its flow when no bucket was recorded)."""
        return self.home or self.flow

    @property
    def key(self) -> RunRef:
        return (self.namespace, self.flow, self.run)

    @property
    def ref(self) -> LeaseRef:
        return LeaseRef(self.where, self.run, self.owner, self.token, int(self.policy.ttl * 1000))

    def confirmed(self, sent_at: float) -> None:
        """A renewal or save sent at ``sent_at`` (monotonic) was confirmed: the server's expiry is later than
        ``sent_at + ttl``, so that is a safe local deadline (less a margin for clock-rate differences)."""
        self.deadline = sent_at + safe_span(self.policy.ttl)
        self.next_renewal = sent_at + self.policy.interval
        self.last_error = None

    def loss_reason(self, reason: str) -> str:
        """``reason``, and why the latest renewal failed if it did (the cause a user needs: OOM, a timeout)."""
        return f"{reason}; the last renewal failed: {self.last_error}" if self.last_error else reason

    def self_fence_reason(self) -> str:
        return self.loss_reason("no renewal was confirmed before the lease could run out (self-fenced)")


@dataclass(frozen=True)
class FencedSave:
    """A running flow's save on its way: the run, the ticket it writes with, and the lease it held before."""

    key: RunRef
    run_id: str
    ticket: LeaseTicket
    held: HeldLease | None


class LeaseRegistry:
    """The leases this process holds, shared by all backend objects, renewed by one heartbeat thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[RunRef, HeldLease] = {}
        # Dynamiq run_ids that lost their run's lease in this process, kept for the life of the process (bounded):
        # a fenced run must never write again, however long its node takes.
        self._retired: OrderedDict[tuple[str, str, str, str], str] = OrderedDict()  # -> why
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._observers: set[Any] = set()  # metrics observers of leases seen here (their gauge goes back to 0)

    def reset_after_fork(self) -> None:
        """A forked child holds none of its parent's leases and must not renew them."""
        self._lock = threading.Lock()
        self._leases = {}
        self._wake = threading.Event()
        self._thread = None
        self._observers = set()

    # ---- a running flow's saves -------------------------------------------------------------------------------

    def begin(self, namespace: str, checkpoint: FlowCheckpoint, ttl: float) -> FencedSave:
        """How a running flow's save of ``checkpoint`` must treat the run's lease; raises LeaseLostError if the
        run_sync saving it lost the lease in this process.

        A first save takes the lease; a new run_sync of the run (an explicit resume) takes it over; the run_sync
        holding it writes under it; one that handed it back when it saved a pause mid-run re-takes it (``resume``)
        only if nobody took the run meanwhile.
        """
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        run_id = checkpoint.run_id
        with self._lock:
            retired = self._retired.get(key + (run_id,))
            if retired is not None:
                raise LeaseLostError(key[2], f"this run_sync lost the run's lease earlier in this process: {retired}",
                                     "retired")
            held = self._leases.get(key)
            if held is not None and held.lost is None and not held.paused and time.monotonic() >= held.deadline:
                self._lose_locked(held, held.self_fence_reason(), "self_fenced")
            if held is None:
                return FencedSave(key, run_id, self._take(ttl), None)
            if held.run_id is None and held.head not in (checkpoint.parent_checkpoint_id, checkpoint.id):
                # A worker claimed the run here; only the run it resumes (from the claimed head) may write under it.
                raise LeaseLostError(key[2], "the run was claimed by a worker of this process", "claimed")
            if held.run_id is not None and held.run_id != run_id:
                return FencedSave(key, run_id, self._take(ttl), held)  # takes over; the old run_sync is retired
            if held.lost is not None:
                raise LeaseLostError(held.run, held.lost)
            held.run_id = run_id
            if status_of(checkpoint) in TERMINAL:
                held.ending = True  # the save hands the lease back: a renewal it crosses is answered FENCED
            mode = "resume" if held.paused else "held"
            return FencedSave(key, run_id, LeaseTicket(mode, held.owner, held.token, int(ttl * 1000)), held)

    @staticmethod
    def _take(ttl: float) -> LeaseTicket:
        return LeaseTicket("take", process_owner(), 0, int(ttl * 1000))

    def confirm(self, save: FencedSave, checkpoint: FlowCheckpoint, token: int, sent_at: float, policy: LeasePolicy,
                home: str = ""):
        """Record the lease state a confirmed save left behind (``token``: the lease's token after it; ``home``:
        where the save went)."""
        status = status_of(checkpoint)
        with self._lock:
            first = self._first_save_locked(save.key)
            previous = save.held
            if save.ticket.mode == "take" and previous is not None:
                self._retire_locked(previous, "a new run_sync of the run took the lease over", "superseded")
            held = self._leases.get(save.key)
            # The heartbeat is woken only for a lease it does not renew yet: waking it on every save cost each
            # save a thread switch, and a confirmed save only moves the next renewal later.
            wake = save.ticket.mode == "take" or held is None or held.paused
            if save.ticket.mode == "take" or held is None:
                callbacks = list(previous.on_lost) if previous is not None else []
                held = HeldLease(*save.key, save.ticket.owner, token, policy, run_id=save.run_id, on_lost=callbacks,
                                 home=home)  # fmt: skip
                self._leases[save.key] = held
            if status in TERMINAL:
                del self._leases[save.key]  # the save script handed the lease back for good
                held.saves += 1  # a renewal under way answers for the lease before it was handed back
                held.ended = True
                wake = False
            else:
                held.token = token
                held.ending = False
                held.paused = status != ACTIVE  # a pause (maybe mid-run): handed back, token kept, no heartbeat
                held.saves += 1
                held.confirmed(sent_at)
        if first is not None:
            try:
                first()
            except Exception:  # a metric callback must not fail a save that landed
                logger.exception("on_first_save callback failed")
        if wake and not held.paused:
            self._ensure_heartbeat()

    def _first_save_locked(self, key: RunRef) -> Callable[[], None] | None:
        held = self._leases.get(key)
        if held is None or held.on_first_save is None:
            return None
        callback, held.on_first_save = held.on_first_save, None
        return callback

    def refuse(self, save: FencedSave, reason: str, kind: str) -> None:
        """The save was refused (or could not be confirmed in time): the lease it used is lost, and its run_sync
        never writes this run again."""
        with self._lock:
            if save.held is not None and save.held.lost is None:
                self._lose_locked(save.held, reason, kind)
            self._retire_run_locked(save.key, save.run_id, reason)

    def fence(self, namespace: str, flow: str, run: str, token: int, reason: str) -> None:
        """Mark the run's lease with this fencing token lost (handed back) and retire its run_sync.

        A lease of the run this process took later (a newer token) is another holder's and is left alone.
        """
        with self._lock:
            held = self._leases.get((namespace, flow, run))
            if held is not None and held.token == token:
                self._retire_locked(held, reason, "handed_back")

    def _retire_locked(self, held: HeldLease, reason: str, kind: str) -> None:
        """The lease is lost (if it was not already) and the run_sync that wrote under it never writes again."""
        if held.lost is None:
            self._lose_locked(held, reason, kind)
        elif held.run_id is not None:
            self._retire_run_locked(held.key, held.run_id, reason)

    def _retire_run_locked(self, key: RunRef, run_id: str, reason: str) -> None:
        self._retired[key + (run_id,)] = reason
        while len(self._retired) > 100_000:
            self._retired.popitem(last=False)

    # ---- used by workers --------------------------------------------------------------------------------------

    def adopt(self, held: HeldLease, sent_at: float) -> None:
        """Register a lease claimed by a worker (``held.head`` set); the resumed run's first save binds its run_id.

        Whatever this process held for the run before is lost and retired: it was claimed away from it.
        """
        held.confirmed(sent_at)
        with self._lock:
            previous = self._leases.get(held.key)
            if previous is not None and previous.paused and previous.lost is None:
                # it handed its lease back when it paused: resumed, not lost (no warning, no lost-lease count)
                previous.lost = "the run was resumed by a worker after its pause"
                if previous.run_id is not None:
                    self._retire_run_locked(previous.key, previous.run_id, previous.lost)
            elif previous is not None:
                self._retire_locked(previous, "the run was claimed by a worker", "claimed")
            self._leases[held.key] = held
        self._ensure_heartbeat()

    def drop(self, key: RunRef) -> HeldLease | None:
        """Forget a run's lease here (as the purge of entries lost an hour ago does); its run_sync stays retired."""
        with self._lock:
            return self._leases.pop(key, None)

    def get(self, key: RunRef) -> HeldLease | None:
        """The lease this process holds for a run, if any."""
        with self._lock:
            return self._leases.get(key)

    # ---- heartbeat --------------------------------------------------------------------------------------------

    def _lose_locked(self, held: HeldLease, reason: str, kind: str) -> None:
        """The lease is lost (``kind``: why, in one word, for the metric): its run_sync never writes again, even
        after the entry itself is purged."""
        held.lost = reason
        if held.policy.observer is not None:
            held.policy.observer.lease_lost(kind)
        if held.run_id is not None:
            self._retire_run_locked(held.key, held.run_id, reason)
        logger.warning("lease of run %s (flow %s) lost: %s", held.run, held.flow, reason, extra=ids(held.flow, held.run))
        for callback in held.on_lost:
            try:
                callback(reason)
            except Exception:  # a callback must not stop the others or the heartbeat
                logger.exception("on_lost callback failed")

    def _ensure_heartbeat(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="dynamiq-redis-ckpt-heartbeat", daemon=True)
                self._thread.start()
        self._wake.set()

    def _beat(self) -> None:
        while True:
            with self._lock:
                live = [h for h in self._leases.values() if h.lost is None and not h.paused]
                stale = [k for k, h in self._leases.items()
                         if (h.lost or h.paused) and time.monotonic() > h.deadline + _STALE_SECONDS]  # fmt: skip
                for k in stale:  # a run_sync paused this long must not take the run back by itself either
                    held = self._leases.pop(k)
                    if held.run_id is not None:
                        self._retire_run_locked(k, held.run_id, held.lost or "it paused over an hour ago here")
            now = time.monotonic()
            # By store: one round trip renews all of a store's leases that are due, or due within a quarter of their
            # interval (renewing early is safe), so leases taken at different moments share the next beat.
            due: dict[int, list[HeldLease]] = {}
            for held in live:
                if now >= held.next_renewal - held.policy.interval / 4:
                    due.setdefault(id(held.policy.store), []).append(held)
            for group in due.values():
                for start in range(0, len(group), _RENEW_BATCH):
                    self._renew(group[start : start + _RENEW_BATCH])
            with self._lock:
                now = time.monotonic()
                for held in live:
                    if held.lost is None and now >= held.deadline:
                        self._lose_locked(held, held.self_fence_reason(), "self_fenced")
                upcoming = [h.next_renewal for h in self._leases.values() if h.lost is None and not h.paused]
                self._report_held_locked()
            self._wake.wait(max(0.01, min(upcoming, default=now + 1.0) - time.monotonic()))
            self._wake.clear()

    def _report_held_locked(self) -> None:
        """Set each observer's gauge of leases held (every beat, at least once a second: cheaper than tracking
        every change, and a plain gauge works in prometheus-client's multiprocess mode)."""
        counts = dict.fromkeys(self._observers, 0)
        for held in self._leases.values():
            observer = held.policy.observer
            if observer is not None:
                self._observers.add(observer)
                counts[observer] = counts.get(observer, 0) + (held.lost is None and not held.paused)
        for observer, count in counts.items():
            observer.leases_now(count)

    @staticmethod
    def _back_off(held: HeldLease, error: str) -> None:
        held.last_error = error
        # past the early window of the next beat too, so a store that is down is not retried on every wake-up
        interval = held.policy.interval
        held.next_renewal = time.monotonic() + min(interval, 0.5) + interval / 4

    def _renew(self, leases: list[HeldLease]) -> None:
        store = leases[0].policy.store
        with self._lock:
            sent = [(held.ref, held.saves) for held in leases]
        # The first renewal of a lease announces its flow again, in case the announcement that followed the save
        # taking it was lost with its connection: an orphan no worker looks for would never be recovered.
        first = tuple(held.where for held in leases if not held.announced)
        sent_at = time.monotonic()
        try:
            verdicts = store.renew([ref for ref, _ in sent], first)
        except CheckpointStoreError as e:
            logger.warning("lease renewal of %d run(s) failed: %s", len(leases), e)
            _count_renewals(leases, "error")
            for held in leases:
                self._back_off(held, str(e))
            return
        with self._lock:
            for held, verdict, (_, before) in zip(leases, verdicts, sent):
                if held.paused or held.ended or held.saves != before:
                    # a save (a pause, an end, or a pause and a resume) landed while this renewal was under way:
                    # its confirmed state is newer than this answer (an ended run's lease is not lost, it was
                    # handed back)
                    continue
                if isinstance(verdict, WrongKeyTypeError):
                    logger.warning("lease renewal of run %s failed: %s", held.run, verdict, extra=ids(held.flow, held.run))
                    self._back_off(held, str(verdict))
                    _count_renewals([held], "error")
                elif verdict == "OK":
                    _count_renewals([held], "ok")
                    held.announced = True
                    if held.lost is None:
                        held.confirmed(sent_at)
                elif held.ending:
                    # the run's final save may have handed the lease back before this renewal arrived: that save's
                    # own answer says whether the lease was still ours (it is refused, and the lease lost, if not)
                    continue
                elif held.lost is None:
                    _count_renewals([held], "lost")
                    kind, reason = _LOSS_REASONS.get(verdict, ("taken_over", "the lease was taken over by another holder"))
                    self._lose_locked(held, held.loss_reason(reason), kind)


def _count_renewals(leases: list[HeldLease], outcome: str) -> None:
    observer = leases[0].policy.observer if leases else None
    if observer is not None:
        observer.renewed(outcome, len(leases))


_LOSS_REASONS = {
    "EXPIRED": ("expired", "the lease ran out before a renewal reached Redis (process stalled?)"),
    "VANISHED": ("vanished", VANISHED),
}

REGISTRY = LeaseRegistry()
os.register_at_fork(after_in_child=REGISTRY.reset_after_fork)
