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
from dataclasses import dataclass, field
from typing import Any, Callable

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.errors import CheckpointStoreError, LeaseLostError, WrongKeyTypeError
from dynamiq_redis_ckpt.requests import Script
from dynamiq_redis_ckpt.store import LeaseIntent, Saved, StoreCore, run_key

logger = logging.getLogger(__name__)

ACTIVE = CheckpointStatus.ACTIVE.value
_owner: tuple[int, str] | None = None


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
    deadline: float = 0.0  # monotonic; past it the lease may have run out
    next_renewal: float = 0.0
    lost: str | None = None
    on_lost: list[Callable[[str], None]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.namespace, self.flow, self.run)

    def confirmed(self, sent_at: float) -> None:
        """A renewal or save sent at ``sent_at`` (monotonic) was confirmed: the server's expiry is later than
        ``sent_at + ttl``, so that is a safe local deadline (less a margin for clock-rate differences)."""
        self.deadline = sent_at + self.ttl - min(1.0, self.ttl / 10)
        self.next_renewal = sent_at + self.interval


def renew_op(core: StoreCore, held: HeldLease):
    """Extend a lease (a store operation: yields the renew script)."""
    keys = (core.keys.lease(held.flow, held.run), core.keys.lease_index(held.flow))
    reply = yield Script("renew", keys, (held.owner, held.token, int(held.ttl * 1000), held.run))
    return _verdict(reply, held.run)


def release_op(core: StoreCore, flow: str, run: str, owner: str, token: int, *, failed: bool, backoff_ms: int = 0):
    """Hand a lease back: at once for another worker (``failed=False``), or after a backoff (a failed attempt)."""
    keys = (core.keys.lease(flow, run), core.keys.lease_index(flow))
    reply = yield Script("release", keys, (owner, token, run, "failed" if failed else "handback", backoff_ms))
    return _verdict(reply, run)


def _verdict(reply: list, run: str) -> str:
    verdict = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if verdict == "WRONGTYPE":
        raise WrongKeyTypeError("lease key", (reply[1].decode(),))
    return verdict


class LeaseRegistry:
    """The leases this process holds, shared by all backend objects, renewed by one heartbeat thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: dict[tuple[str, str, str], HeldLease] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- used by saves ----------------------------------------------------------------------------------------

    def intent(self, namespace: str, checkpoint: FlowCheckpoint, ttl: float) -> tuple[LeaseIntent, HeldLease | None]:
        """How a save of ``checkpoint`` must treat the run's lease; raises LeaseLostError if it is lost here."""
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        now = time.monotonic()
        with self._lock:
            held = self._leases.get(key)
            if held is not None and held.lost is None and now >= held.deadline:
                self._lose_locked(held, "no renewal was confirmed before the lease could run out (self-fenced)")
            if held is None:
                return LeaseIntent("take", process_owner(), 0, int(ttl * 1000)), None
            if held.run_id is not None and held.run_id != checkpoint.run_id:
                # A new run_sync of this run (an explicit resume): it takes the lease over, fencing the old one.
                return LeaseIntent("take", process_owner(), 0, int(ttl * 1000)), None
            if held.lost is not None:
                raise LeaseLostError(held.run, held.lost)
            held.run_id = checkpoint.run_id
            return LeaseIntent("held", held.owner, held.token, int(held.ttl * 1000)), held

    def saved(self, namespace, checkpoint, intent, saved: Saved, sent_at, ttl, interval, renewer) -> None:
        """Record the lease state a confirmed save left behind."""
        key = (namespace, checkpoint.flow_id, run_key(checkpoint))
        status = checkpoint.status.value if isinstance(checkpoint.status, CheckpointStatus) else str(checkpoint.status)
        with self._lock:
            if status != ACTIVE:
                self._leases.pop(key, None)  # ended or paused: the save script handed the lease back
                return
            held = self._leases.get(key)
            if held is None or intent.mode == "take":
                callbacks = held.on_lost if held is not None else []
                held = HeldLease(namespace, checkpoint.flow_id, key[2], intent.owner, saved.token, ttl, interval,
                                 renewer, run_id=checkpoint.run_id, on_lost=callbacks)  # fmt: skip
                self._leases[key] = held
            held.confirmed(sent_at)
        self._ensure_heartbeat()

    def fence(self, namespace: str, flow: str, run: str, reason: str) -> None:
        """Mark a lease lost (the store refused a write under it)."""
        with self._lock:
            held = self._leases.get((namespace, flow, run))
            if held is not None and held.lost is None:
                self._lose_locked(held, reason)

    # ---- used by workers --------------------------------------------------------------------------------------

    def adopt(self, held: HeldLease, sent_at: float) -> None:
        """Register a lease claimed by a worker; the resumed run's first save binds its run_id."""
        held.confirmed(sent_at)
        with self._lock:
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
                live = [h for h in self._leases.values() if h.lost is None]
                # Lost leases stay (their runs must stay fenced here) until long after anything could use them.
                stale = [k for k, h in self._leases.items() if h.lost and time.monotonic() > h.deadline + 3600]
                for k in stale:
                    del self._leases[k]
            now = time.monotonic()
            for held in live:
                if now >= held.next_renewal:
                    self._renew(held)
            with self._lock:
                now = time.monotonic()
                for held in live:
                    if held.lost is None and now >= held.deadline:
                        self._lose_locked(held, "no renewal was confirmed before the lease could run out (self-fenced)")
                upcoming = [h.next_renewal for h in self._leases.values() if h.lost is None]
            self._wake.wait(max(0.01, min(upcoming, default=now + 1.0) - time.monotonic()))
            self._wake.clear()

    def _renew(self, held: HeldLease) -> None:
        driver, core = held.renewer
        sent_at = time.monotonic()
        try:
            verdict = driver.run(renew_op(core, held))
        except CheckpointStoreError as e:
            logger.warning("lease renewal of run %s failed: %s", held.run, e)
            held.next_renewal = time.monotonic() + min(held.interval, 0.5)
            return
        with self._lock:
            if verdict == "OK":
                if held.lost is None:
                    held.confirmed(sent_at)
            elif held.lost is None and verdict == "EXPIRED":
                self._lose_locked(held, "the lease ran out before a renewal reached Redis (process stalled?)")
            elif held.lost is None:
                self._lose_locked(held, "the lease was taken over by another holder")


REGISTRY = LeaseRegistry()


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
