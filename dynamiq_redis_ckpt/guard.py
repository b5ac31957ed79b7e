"""The lease guard: a running flow's saves are fenced by its run's lease; every other call passes untouched.

Leases exist to stop zombie runs: a ``run_sync``/``run_async`` that lost its lease, or a worker's resumed run. A
plain API call — a script, a test, a migration, an operator's ``update()`` in another process — never takes, bumps,
hands back or waits for a lease, and never raises :class:`~dynamiq_redis_ckpt.errors.LeaseLostError`.

Dynamiq passes nothing that says who is saving, so the backend looks at its caller: a save made by Dynamiq's own
checkpoint code of a running Flow (``CheckpointFlowMixin``'s save methods, sync or async, from the flow's thread or
a node's) is a run's write. Code that drives runs some other way marks its saves with :func:`as_running_flow`.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from contextvars import ContextVar
from types import CodeType, FrameType, FunctionType
from typing import Iterator

from dynamiq.checkpoints.checkpoint import CheckpointFlowMixin, FlowCheckpoint

from dynamiq_redis_ckpt.errors import CheckpointStoreError, LeaseLostError, StoreUnavailableError
from dynamiq_redis_ckpt.logs import ids
from dynamiq_redis_ckpt.registry import REGISTRY, LeasePolicy, LeaseRegistry, safe_span
from dynamiq_redis_ckpt.requests import Sleep
from dynamiq_redis_ckpt.store import Saved, StoreCore

logger = logging.getLogger(__name__)

_RETRY_PAUSE = 0.25  # seconds between tries of a running flow's save that Redis did not confirm
_CALLER_DEPTH = 8  # frames above the backend's method searched for Dynamiq's saver (subclasses may wrap save)
_FLOW_SAVERS: frozenset[CodeType] = frozenset(
    f.__code__ for name, f in vars(CheckpointFlowMixin).items()
    if isinstance(f, FunctionType) and ("save_checkpoint" in name or "update_checkpoint" in name)
)
if not {"_save_checkpoint_unlocked", "_save_checkpoint_async_unlocked"} <= set(vars(CheckpointFlowMixin)):
    logger.warning(
        "this Dynamiq's Flow saves checkpoints from methods dynamiq-redis-ckpt does not know: its saves are not "
        "fenced by run leases unless made inside as_running_flow()"
    )
_running_flow: ContextVar[bool] = ContextVar("dynamiq_redis_ckpt_running_flow", default=False)


@contextmanager
def as_running_flow() -> Iterator[None]:
    """Saves made inside this block (by this thread or task) are a running run's: fenced by its lease, as the saves
    of Dynamiq's own Flow are. For code that drives runs without Dynamiq's Flow, and for tests."""
    reset = _running_flow.set(True)
    try:
        yield
    finally:
        _running_flow.reset(reset)


def saved_by_running_flow(caller: FrameType | None) -> bool:
    """Whether a save whose caller is ``caller`` (the frame above the backend's method) is a running flow's."""
    if _running_flow.get():
        return True
    for _ in range(_CALLER_DEPTH):
        if caller is None:
            return False
        if caller.f_code in _FLOW_SAVERS:
            return True
        caller = caller.f_back
    return False


def _unconfirmed(error: CheckpointStoreError) -> bool:
    """Whether a failed save's outcome is unknown or may change on a retry: Redis unreachable or refusing for now,
    or an error reply (the typed subclasses — a key of another type, too large — are final)."""
    return isinstance(error, StoreUnavailableError) or type(error) is CheckpointStoreError


class LeaseGuard:
    """Runs a save as the store operation it is: plain, or fenced by the run's lease (with the registry)."""

    def __init__(self, store: StoreCore, namespace: str, policy: LeasePolicy, registry: LeaseRegistry = REGISTRY):
        self.store = store
        self.namespace = namespace
        self.policy = policy
        self.registry = registry

    def save(self, checkpoint: FlowCheckpoint, *, must_exist: bool, fenced: bool):
        """Store ``checkpoint``; when ``fenced``, only under the run's lease (see :class:`LeaseRegistry.begin`).

        A fenced save that Redis does not confirm (unreachable, refusing, an error reply) is tried again until the
        lease could run out — for a save that takes the lease, for one ttl — then the run stops with LeaseLostError:
        a run never starts its next node on a lease it cannot prove it holds (Dynamiq would log the failed save and
        go on while a worker resumes the run elsewhere).
        """
        if not fenced:
            return (yield from self.store.save(checkpoint, must_exist=must_exist))
        save = self.registry.begin(self.namespace, checkpoint, self.policy.ttl)
        cutoff: float | None = None
        while True:
            sent_at = time.monotonic()
            try:
                saved: Saved = yield from self.store.save(checkpoint, must_exist=must_exist, ticket=save.ticket)
            except LeaseLostError as lost:
                self.registry.refuse(save, lost.reason, lost.kind)
                raise
            except CheckpointStoreError as error:
                if not _unconfirmed(error):  # refused for good (a key of another type, ...): nothing was written
                    raise
                if cutoff is None:
                    cutoff = save.held.deadline if save.ticket.mode == "held" else sent_at + safe_span(self.policy.ttl)
                left = cutoff - time.monotonic()
                if left <= 0:
                    reason = (f"Redis did not confirm the run's checkpoint before its lease could run out ({error}); "
                              "the run stops here and a worker resumes it from its newest stored checkpoint")
                    self.registry.refuse(save, reason, "unconfirmed")
                    raise LeaseLostError(save.key[2], reason, "unconfirmed") from error
                logger.warning("save of run %s not confirmed (%s); trying again for %.1f s", save.key[2], error, left,
                               extra=ids(save.key[1], save.key[2], checkpoint.id))
                yield Sleep(min(_RETRY_PAUSE, left))
                continue
            self.registry.confirm(save, checkpoint, saved.token, sent_at, self.policy, saved.home)
            return saved
