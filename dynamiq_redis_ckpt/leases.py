"""Run leases: which process may write a run's checkpoints, proven by a fencing token.

A run (keyed by its ``wf_run_id``) holds a lease in Redis from its first save until it ends or pauses. Every save
is fenced in the save script: it lands only under the lease it names. One :class:`LeaseRegistry` per process keeps
the leases this process holds, for every backend object at once (flow builders often make a backend per Flow),
and one heartbeat thread renews them all, never blocked by the work a node does.

A holder that cannot confirm a renewal before its lease would run out (by the monotonic clock) stops writing on
its own; a holder whose lease was taken over is refused by Redis. Either way its saves raise
:class:`~dynamiq_redis_ckpt.errors.LeaseLostError`, a ``BaseException`` that Dynamiq does not swallow, so the run
stops at its next checkpoint. A process never takes a lost lease back by itself; a *new* ``run_sync`` of the run
(an explicit resume, from any process) takes it over, bumping the token so the earlier holder is fenced.
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
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.errors import CheckpointStoreError, LeaseLostError, WrongKeyTypeError
from dynamiq_redis_ckpt.requests import Batch, Script
from dynamiq_redis_ckpt.store import LeaseIntent, Saved, StoreCore, run_key, text

logger = logging.getLogger(__name__)

ACTIVE = CheckpointStatus.ACTIVE.value
TERMINAL = {CheckpointStatus.COMPLETED.value, CheckpointStatus.FAILED.value, CheckpointStatus.CANCELED.value}
_owner: tuple[int, str] | None = None


_RENEW_BATCH = 200  # renew scripts sent in one pipeline by the heartbeat


def process_owner() -> str:
    """This process's lease owner id: host, pid and a random part (made anew after a fork)."""
    global _owner
    if _owner is None or _owner[0] != os.getpid():
        _owner = (os.getpid(), f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
    return _owner[1]


@dataclass
class HeldLease:
    """A lease this process holds (or held, when ``lost`` says why not)."""

    namespace: str
    flow: str
    run: str
    owner: str
    token: int
    ttl: float
    interval: float
    renewer: Any  # (driver, core) used by the heartbeat
    run_id: str | None = None  # the Dynamiq run_id writing under it; None until a worker's resumed run saves
    head: str | None = None  # for a worker's claim: the checkpoint the resumed run starts from
    paused: bool = False  # the run saved a non-active status: lease handed back, token kept, no heartbeat
    deadline: float = 0.0  # monotonic; past it the lease may have run out
    next_renewal: float = 0.0
    lost: str | None = None
    on_lost: list[Callable[[str], None]] = field(default_factory=list)
    saves: int = 0  # confirmed saves under it: a renewal sent before the latest one answers for an older state

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.flow, self.run)

    def confirmed(self, sent_at: float) -> None:
        """A renewal or save sent at ``sent_at`` (monotonic) was confirmed: the server's expiry is later than
        ``sent_at + ttl``, so that is a safe local deadline (less a margin for clock-rate differences)."""
        self.deadline = sent_at + self.ttl - min(1.0, self.ttl / 10)
        self.next_renewal = sent_at + self.interval


def _renew_script(core: StoreCore, held: HeldLease) -> Script:
    keys = (core.keys.lease(held.flow, held.run), core.keys.lease_index(held.flow))
    return Script("renew", keys, (held.owner, held.token, int(held.ttl * 1000), held.run))


def renew_op(core: StoreCore, held: HeldLease):
    """Extend a lease (a store operation: yields the renew script)."""
    return verdict((yield _renew_script(core, held)))


def renew_many_op(core: StoreCore, leases: list[HeldLease]):
    """Extend several leases of one store in one round trip (a pipeline of renew scripts, each atomic on its own);
    returns each lease's verdict, or the WrongKeyTypeError its script answered."""
    replies = yield Batch(tuple(_renew_script(core, held) for held in leases))
    out: list[str | WrongKeyTypeError] = []
    for reply in replies:
        try:
            out.append(verdict(reply))
        except WrongKeyTypeError as e:
            out.append(e)
    return out


def release_op(core: StoreCore, flow: str, run: str, owner: str, token: int, *, failed: bool, backoff_ms: int = 0):
    """Hand a lease back: at once for another worker (``failed=False``), or after a backoff (a failed attempt)."""
    keys = (core.keys.lease(flow, run), core.keys.lease_index(flow))
    reply = yield Script("release", keys, (owner, token, run, "failed" if failed else "handback", backoff_ms))
    return verdict(reply)


def verdict(reply: list) -> str:
    """The first word of a lease or worker script's reply; a WRONGTYPE answer raises WrongKeyTypeError."""
    word = text(reply[0])
    if word == "WRONGTYPE":
        raise WrongKeyTypeError("a run-lease script found a key of another type; nothing was written", (text(reply[1]),))
    return word


class LeaseRegistry:
    """The leases this process holds, shared by all backend objects, renewed by one heartbeat thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str, str], HeldLease] = {}
        # Dynamiq run_ids that lost their run's lease in this process, kept for the life of the process (bounded):
        # a fenced run must never write again, however long its node takes.
        self._retired: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def reset_after_fork(self) -> None:
        """A forked child holds none of its parent's leases and must not renew them."""
        self._lock = threading.Lock()
        self._leases = {}
        self._wake = threading.Event()
        self._thread = None

    # ---- used by saves ----------------------------------------------------------------------------------------

    def intent(self, namespace: str, checkpoint: FlowCheckpoint, ttl: float) -> tuple[LeaseIntent, HeldLease | None]:
        """How a save of ``checkpoint`` must treat the run's lease; raises LeaseLostError if it is lost here.

        ``take`` acquires the lease or takes it over (a new run_sync of the run: an explicit resume); ``held``
        writes under the lease this run holds; ``resume`` re-takes a lease this run handed back when it saved a
        pause mid-run, only if nobody took the run meanwhile.
        """
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        with self._lock:
            if key + (checkpoint.run_id,) in self._retired:
                raise LeaseLostError(key[2], "this run_sync lost the run's lease earlier in this process")
            held = self._leases.get(key)
            if held is not None and held.lost is None and not held.paused and time.monotonic() >= held.deadline:
                self._lose_locked(held, "no renewal was confirmed before the lease could run out (self-fenced)")
            if held is None:
                return self._take(ttl), None
            if held.run_id is None and held.head not in (checkpoint.parent_checkpoint_id, checkpoint.id):
                # A worker claimed the run here; only the run it resumes (from the claimed head) may write under it.
                raise LeaseLostError(key[2], "the run was claimed by a worker of this process")
            if held.run_id is not None and held.run_id != checkpoint.run_id:
                return self._take(ttl), held  # a new run_sync of this run: it takes over; the old one is retired
            if held.lost is not None:
                raise LeaseLostError(held.run, held.lost)
            held.run_id = checkpoint.run_id
            if held.paused:
                return LeaseIntent("resume", held.owner, held.token, int(held.ttl * 1000)), held
            return LeaseIntent("held", held.owner, held.token, int(held.ttl * 1000)), held

    @staticmethod
    def _take(ttl: float) -> LeaseIntent:
        return LeaseIntent("take", process_owner(), 0, int(ttl * 1000))

    def saved(self, namespace, checkpoint, intent, previous, saved: Saved, sent_at, ttl, interval, renewer) -> None:
        """Record the lease state a confirmed save left behind."""
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        status = checkpoint.status.value if isinstance(checkpoint.status, CheckpointStatus) else str(checkpoint.status)
        with self._lock:
            if intent.mode == "take" and previous is not None:
                self._retire_locked(previous, "a new run_sync of the run took the lease over")
            held = self._leases.get(key)
            # The heartbeat is woken only for a lease it does not renew yet: waking it on every save cost each
            # save a thread switch, and a confirmed save only moves the next renewal later.
            wake = intent.mode == "take" or held is None or held.paused
            if intent.mode == "take" or held is None:
                callbacks = list(previous.on_lost) if previous is not None else []
                held = HeldLease(namespace, checkpoint.flow_id, key[2], intent.owner, saved.token, ttl, interval,
                                 renewer, run_id=checkpoint.run_id, on_lost=callbacks)  # fmt: skip
                self._leases[key] = held
            if status in TERMINAL:
                del self._leases[key]  # the save script handed the lease back for good
                return
            held.token = saved.token
            held.paused = status != ACTIVE  # a pause (maybe mid-run): handed back, token kept, no heartbeat
            held.saves += 1
            held.confirmed(sent_at)
        if wake and not held.paused:
            self._ensure_heartbeat()

    def lost_write(self, namespace: str, checkpoint: FlowCheckpoint, held: HeldLease | None, reason: str) -> None:
        """The store refused a save: the lease it used is lost, and its run_sync never writes this run again."""
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        with self._lock:
            if held is not None and held.lost is None:
                self._lose_locked(held, reason)
            self._retire_run_locked(key, checkpoint.run_id)

    def fence(self, namespace: str, flow: str, run: str, token: int, reason: str) -> None:
        """Mark the run's lease with this fencing token lost (handed back) and retire its run_sync.

        A lease of the run this process took later (a newer token) is another holder's and is left alone.
        """
        with self._lock:
            held = self._leases.get((namespace, flow, run))
            if held is not None and held.token == token:
                self._retire_locked(held, reason)

    def _retire_locked(self, held: HeldLease, reason: str) -> None:
        """The lease is lost (if it was not already) and the run_sync that wrote under it never writes again."""
        if held.lost is None:
            self._lose_locked(held, reason)
        if held.run_id is not None:
            self._retire_run_locked(held.key, held.run_id)

    def _retire_run_locked(self, key: tuple[str, str, str], run_id: str) -> None:
        self._retired[key + (run_id,)] = None
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
            if previous is not None:
                self._retire_locked(previous, "the run was claimed by a worker")
            self._leases[held.key] = held
        self._ensure_heartbeat()

    def drop(self, key: tuple[str, str, str]) -> HeldLease | None:
        """Forget a lease (handed back by its holder)."""
        with self._lock:
            return self._leases.pop(key, None)

    def get(self, key: tuple[str, str, str]) -> HeldLease | None:
        """The lease this process holds for a run, if any."""
        with self._lock:
            return self._leases.get(key)

    # ---- heartbeat --------------------------------------------------------------------------------------------

    def _lose_locked(self, held: HeldLease, reason: str) -> None:
        held.lost = reason
        logger.warning("lease of run %s (flow %s) lost: %s", held.run, held.flow, reason)
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
                # Lost and paused entries go after an hour; a lost run_sync stays retired (self._retired).
                stale = [k for k, h in self._leases.items()
                         if (h.lost or h.paused) and time.monotonic() > h.deadline + 3600]  # fmt: skip
                for k in stale:
                    del self._leases[k]
            now = time.monotonic()
            # By store: one round trip renews all of a store's leases that are due, or due within a quarter of their
            # interval (renewing early is safe), so leases taken at different moments share the next beat.
            due: dict[int, list[HeldLease]] = {}
            for held in live:
                if now >= held.next_renewal - held.interval / 4:
                    due.setdefault(id(held.renewer[1]), []).append(held)
            for group in due.values():
                for start in range(0, len(group), _RENEW_BATCH):
                    self._renew(group[start : start + _RENEW_BATCH])
            with self._lock:
                now = time.monotonic()
                for held in live:
                    if held.lost is None and now >= held.deadline:
                        self._lose_locked(held, "no renewal was confirmed before the lease could run out (self-fenced)")
                upcoming = [h.next_renewal for h in self._leases.values() if h.lost is None and not h.paused]
            self._wake.wait(max(0.01, min(upcoming, default=now + 1.0) - time.monotonic()))
            self._wake.clear()

    @staticmethod
    def _back_off(held: HeldLease) -> None:
        # past the early window of the next beat too, so a store that is down is not retried on every wake-up
        held.next_renewal = time.monotonic() + min(held.interval, 0.5) + held.interval / 4

    def _renew(self, leases: list[HeldLease]) -> None:
        driver, core = leases[0].renewer
        with self._lock:
            saves = [held.saves for held in leases]
        sent_at = time.monotonic()
        try:
            verdicts = driver.run(renew_many_op(core, leases))
        except CheckpointStoreError as e:
            logger.warning("lease renewal of %d run(s) failed: %s", len(leases), e)
            for held in leases:
                self._back_off(held)
            return
        with self._lock:
            for held, verdict, before in zip(leases, verdicts, saves):
                if held.paused or held.saves != before:
                    # a save (a pause, or a pause and a resume) landed while this renewal was under way: its
                    # confirmed state is newer than this answer
                    continue
                if isinstance(verdict, WrongKeyTypeError):
                    logger.warning("lease renewal of run %s failed: %s", held.run, verdict)
                    self._back_off(held)
                elif verdict == "OK":
                    if held.lost is None:
                        held.confirmed(sent_at)
                elif held.lost is None and verdict == "EXPIRED":
                    self._lose_locked(held, "the lease ran out before a renewal reached Redis (process stalled?)")
                elif held.lost is None:
                    self._lose_locked(held, "the lease was taken over by another holder")


REGISTRY = LeaseRegistry()
os.register_at_fork(after_in_child=REGISTRY.reset_after_fork)


def idempotency_key(config: Any, node_id: str, step: int | str = 0) -> str:
    """A key for the side effects a node causes outside (a payment, an email, a tool call), to deduplicate them.

    It is the same for every execution of the node in one run — including the re-execution of the node that was
    in flight when its process died, the one case where a node runs twice — so a downstream service that keeps
    the keys it has seen applies the effect once. ``step`` tells apart effects a node makes more than once on
    purpose (a loop iteration, the n-th email). The run is ``config.run_id``, which is the run's wf_run_id when
    the run was started with ``RunnableConfig(run_id=...)``; the recovery worker always resumes that way.
    """
    run = getattr(config, "run_id", None)
    if not run:
        raise ValueError("idempotency_key needs the RunnableConfig the node was given (with its run_id)")
    return f"dynamiq:{run}:{node_id}:{step}"
