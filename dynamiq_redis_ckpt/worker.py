"""Recovery worker: finds runs whose lease ran out or whose timer is due, claims each atomically, and resumes it.

:class:`Recovery` is the embeddable API (find, claim, resume, hand back, dead letters); :class:`Worker` is the
daemon behind ``dynamiq-redis-ckpt worker``: bounded concurrency on threads (importing Dynamiq takes seconds, so
never a process per run), heartbeats for what it resumes, and a graceful stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.config import CheckpointConfig
from dynamiq.runnables import RunnableConfig, RunnableResult
from dynamiq.types.cancellation import CancellationConfig, CancellationToken

from dynamiq_redis_ckpt import crypto, leases
from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.errors import (
    AlreadyAnsweredError,
    CheckpointStoreError,
    ConfigurationError,
    LeaseLostError,
    RunNotWaitingError,
    WrongKeyTypeError,
)
from dynamiq_redis_ckpt.inbox import attach_answers
from dynamiq_redis_ckpt.keys import flow_of
from dynamiq_redis_ckpt.leases import Claim, DeadLetter
from dynamiq_redis_ckpt.logs import ids
from dynamiq_redis_ckpt.registry import REGISTRY, HeldLease, process_owner

if TYPE_CHECKING:  # prometheus_client is imported only by those who serve metrics (see cli)
    from dynamiq_redis_ckpt.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
FlowFactory = Callable[[str], Any]
_MIGRATE_EVERY = 30.0  # seconds between looks at the registry of flows versions before the wake shards kept


def load_flow_factory(flows: str | None = None, yaml_path: str | None = None) -> FlowFactory:
    """The registry a worker rebuilds flows from.

    ``flows="module:attr"``: ``attr`` is a callable ``flow_id -> Flow`` or a dict ``flow_id -> zero-argument factory``.
    ``yaml_path``: a Dynamiq YAML file, loaded anew for every resume so each run gets fresh Flow objects.
    """
    if (flows is None) == (yaml_path is None):
        raise ConfigurationError("give exactly one of flows='module:attr' or yaml_path")
    if yaml_path is not None:
        from dynamiq.serializers.loaders.yaml import WorkflowYAMLLoader

        def from_yaml(flow_id: str):
            data = WorkflowYAMLLoader.load(yaml_path, init_components=False)
            found = data.flows.get(flow_id)
            if found is None:
                raise KeyError(f"flow {flow_id!r} is not in {yaml_path}")
            return found

        return from_yaml
    module_name, _, attr = flows.partition(":")
    if not attr:
        raise ConfigurationError(f"--flows must look like module:attr, got {flows!r}")
    target = getattr(importlib.import_module(module_name), attr)
    if isinstance(target, dict):
        return lambda flow_id: target[flow_id]()
    if callable(target):
        return target
    raise ConfigurationError(f"{flows} is neither a callable nor a dict of factories")


class Recovery:
    """Find, claim and resume runs of one backend's namespace. Thread-safe; usable inside any service.

    Every call is a store operation (:mod:`dynamiq_redis_ckpt.leases`, atomic where it writes more than one key)
    run by the backend's own drivers, so it gets the backend's retries and typed errors, and its ``*_async`` twin
    never blocks the event loop.
    """

    def __init__(self, backend: RedisCheckpointBackend, *, max_attempts: int = 5, backoff_seconds: float = 2.0,
                 metrics: WorkerMetrics | None = None):  # fmt: skip
        self.backend = backend
        self.metrics = metrics  # claims, dead letters, recovery latency, timer lag and people's wait when set
        self.keys = backend.store.keys
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.on_dead: Callable[[str, str], None] | None = None  # called when a claim moves a run to dead letters
        self._migrated_at: float | None = None
        self._triggers: dict[tuple[str, str, int], str] = {}  # a resumed claim -> orphan | timer | input

    # ---- operations shared by the sync and async paths --------------------------------------------------------

    def _find_op(self, limit: int):
        now = time.monotonic()
        if self._migrated_at is None or now - self._migrated_at >= _MIGRATE_EVERY:
            yield from leases.migrate_registry_op(self.keys)  # flows older pods register, during a rolling upgrade
            self._migrated_at = now
        return (yield from leases.find_work_op(self.keys, limit))

    def _claim_op(self, flow: str, run: str, reason: str):
        ttl_ms = int(self.backend.lease_ttl_seconds * 1000)
        outcome = yield from leases.claim_op(self.keys, flow, run, process_owner(), ttl_ms, reason, self.max_attempts)
        if self.metrics is not None:
            won = "won" if isinstance(outcome, Claim) else "dead_lettered" if outcome == "DEAD" else "lost_race"
            self.metrics.claims.labels(reason, won).inc()
            if outcome == "DEAD":
                self.metrics.dead_letters.inc()
        if outcome == "DEAD":
            logger.error("run %s of flow %s failed %d recoveries: moved to dead letters", run, flow_of(flow),
                         self.max_attempts, extra=ids(flow, run))  # fmt: skip
            if self.on_dead is not None:
                self.on_dead(flow_of(flow), run)
            return None
        return outcome

    def claim_some_op(self, free: int, skip: Callable[[str, str], bool]):
        """A store operation: find claimable runs (due first) and claim up to ``free`` of them, passing over those
        ``skip(flow, run)`` rejects. Returns the claims."""
        claims: list[Claim] = []
        for flow, run, reason in (yield from self._find_op(free * 2)):
            if len(claims) >= free:
                break
            if skip(flow, run):
                continue
            try:
                claim = yield from self._claim_op(flow, run, reason)
            except WrongKeyTypeError as e:  # one damaged run: the others are still claimed
                logger.warning("cannot claim run %s of flow %s: %s", run, flow_of(flow), e, extra=ids(flow, run))
                continue
            except CheckpointStoreError as e:  # Redis went away: keep (and resume) what was claimed so far
                logger.warning("claiming stopped after %d claim(s): %s", len(claims), e)
                break
            if claim is not None:
                claims.append(claim)
        return claims

    def _release_op(self, flow: str, run: str, owner: str, token: int, *, failed: bool, attempt: int):
        # Fenced here first: the run's thread, if still going, must never take the lease back by itself.
        REGISTRY.fence(self.backend.namespace, flow_of(flow), run, token, "handed back by this worker")
        backoff_ms = int(self.backoff_seconds * 1000 * 2 ** max(attempt - 1, 0))
        verdict = yield from leases.release_op(self.keys, flow, run, owner, token, failed=failed, backoff_ms=backoff_ms)
        return verdict == "OK"

    def _after_run_op(self, claim: Claim, held: HeldLease, served: list[str]):
        """After a resumed run returned: forget the answers of nodes it completed, and give back a lease it still
        holds. A run that ended or paused handed its lease back in its last save; if that save failed (Dynamiq logs
        and swallows it), the lease would be renewed for as long as this process lives and nobody could recover the
        run: it is handed back as a failed attempt, so another worker retries it after the back-off."""
        try:
            if served:
                store = self.backend.store
                latest = yield from store.list_by_flow_and_run(flow_of(claim.flow), claim.run, None, None, 1)
                done = set(latest[0].completed_node_ids) if latest else set()
                yield from leases.forget_answers_op(self.keys, claim.flow, claim.run, [n for n in served if n in done])
        finally:
            # The owner name is the process's, shared by every lease here: only this very lease is this claim's.
            if REGISTRY.get(held.key) is held and held.lost is None and not held.paused:
                logger.warning("run %s returned still holding its lease (its last save failed?): handing it back",
                               claim.run, extra=ids(claim.flow, claim.run))  # fmt: skip
                yield from self._release_op(claim.flow, claim.run, held.owner, held.token, failed=True,
                                            attempt=claim.attempt)  # fmt: skip

    # ---- finding and claiming ---------------------------------------------------------------------------------

    def find_work(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """(flow, run, reason) of runs a worker may claim now, due runs first: ``due`` (a timer fell due or a
        person answered) or ``orphan`` (its lease ran out by the server's clock, or was handed back)."""
        return [(flow_of(home), run, reason) for home, run, reason in self.backend.execute(self._find_op(limit))]

    def find_orphans(self, limit: int = 100) -> list[tuple[str, str]]:
        """(flow, run) pairs whose lease ran out (by the server's clock) or was handed back."""
        return [(flow, run) for flow, run, reason in self.find_work(limit) if reason == "orphan"]

    def find_due(self, limit: int = 100) -> list[tuple[str, str]]:
        """(flow, run) pairs paused until a time that has come, or answered by a person."""
        return [(flow, run) for flow, run, reason in self.find_work(limit) if reason == "due"]

    def _claim_run_op(self, flow: str, run: str, reason: str):
        homes = yield from leases.run_homes_op(self.keys, run, flow, self.backend.store.buckets)
        for home in homes:  # a run lives in one home of its flow
            claim = yield from self._claim_op(home, run, reason)
            if claim is not None:
                return claim
        return None

    def claim(self, flow: str, run: str, reason: str = "orphan") -> Claim | None:
        """Claim a run atomically; None when another worker got it first, it is not due, or it went dead."""
        return self.backend.execute(self._claim_run_op(flow, run, reason))

    async def find_work_async(self, limit: int = 100) -> list[tuple[str, str, str]]:
        """Async :meth:`find_work`."""
        found = await self.backend.execute_async(self._find_op(limit))
        return [(flow_of(home), run, reason) for home, run, reason in found]

    async def claim_async(self, flow: str, run: str, reason: str = "orphan") -> Claim | None:
        """Async :meth:`claim`."""
        return await self.backend.execute_async(self._claim_run_op(flow, run, reason))

    # ---- resuming ---------------------------------------------------------------------------------------------

    def _adopt(self, claim: Claim, cancel: CancellationToken | None) -> tuple[HeldLease, RunnableConfig]:
        """Heartbeat the claimed lease (a loss cancels the run) and build the resumed run's config."""
        token = cancel or CancellationToken()
        held = HeldLease(self.backend.namespace, flow_of(claim.flow), claim.run, claim.owner, claim.token,
                         self.backend.lease_policy, head=claim.head, on_lost=[lambda reason: token.cancel()],
                         on_first_save=self._latency_observer(claim), home=claim.flow)  # fmt: skip
        REGISTRY.adopt(held, time.monotonic())
        config = RunnableConfig(
            run_id=claim.run,
            checkpoint=CheckpointConfig(resume_from=claim.head, backend=self.backend),
            cancellation=CancellationConfig(token=token),
        )
        logger.info("resuming run %s of flow %s from %s (attempt %d)", claim.run, flow_of(claim.flow), claim.head,
                    claim.attempt,
                    extra=ids(claim.flow, claim.run, claim.head, claim.attempt))
        return held, config

    def _latency_observer(self, claim: Claim) -> Callable[[], None] | None:
        """Observes, at the resumed run's first confirmed save, how long after the run became claimable it got going
        again: recovery latency for an orphan, timer lag for a due run (server clock until the claim, then this
        process's monotonic clock: no skew between hosts)."""
        if self.metrics is None or claim.waited_ms is None:
            return None
        histogram = self.metrics.recovery_latency if claim.reason == "orphan" else self.metrics.timer_lag
        return lambda: histogram.observe(claim.waited_ms / 1000 + time.monotonic() - claim.claimed_at)

    def _wants_pause_time(self, claim: Claim, served: list[str]) -> bool:
        """Whether to load the paused checkpoint for the people's-wait metric: a due claim that served an answer (an
        orphan's claim may serve the same answer again, after a crash; it is not a second wait)."""
        return bool(served) and self.metrics is not None and claim.reason == "due"

    def _served(self, claim: Claim, served: list[str], paused: FlowCheckpoint | None) -> None:
        """Record what woke the run; for a person's answer, how long the run waited (its ``paused`` checkpoint's
        time to now)."""
        if self.metrics is None:
            return
        trigger = "orphan" if claim.reason == "orphan" else "input" if served else "timer"
        self._triggers[(claim.flow, claim.run, claim.token)] = trigger  # popped by Worker when the resume ends
        if self._wants_pause_time(claim, served):
            if paused is not None:
                waited = datetime.now(timezone.utc) - paused.updated_at.astimezone(timezone.utc)
                self.metrics.input_wait.observe(max(0.0, waited.total_seconds()))

    def trigger_of(self, claim: Claim) -> str:
        """What woke a resumed run (orphan, timer or input), forgotten once asked."""
        fallback = "orphan" if claim.reason == "orphan" else "timer"
        return self._triggers.pop((claim.flow, claim.run, claim.token), fallback)

    def resume(self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None = None) -> RunnableResult:
        """Resume a claimed run through Dynamiq's own resume path, with the run's own wf_run_id.

        The lease is heartbeated while the run goes on; if it is lost, ``cancel`` is canceled and the run's
        remaining writes are refused. Raises LeaseLostError if the run stopped because its lease was lost.
        """
        held, config = self._adopt(claim, cancel)
        served: list[str] = []
        try:
            flow = flow_factory(flow_of(claim.flow))
            inbox = self.backend.execute(leases.inbox_op(self.keys, claim.flow, claim.run))
            served = attach_answers(flow, self._opened(claim, inbox))
            paused = None
            if self._wants_pause_time(claim, served):
                try:
                    paused = self.backend.load(claim.head)
                except CheckpointStoreError:  # a metric must not fail a recovery: Dynamiq loads it again anyway
                    pass
            self._served(claim, served, paused)
            result = flow.run_sync(None, config=config)
        finally:
            lost = held.lost  # read before the hand-back below, which would look like a loss
            self.backend.execute(self._after_run_op(claim, held, served))
        if lost is not None:
            raise LeaseLostError(claim.run, lost)
        return result

    async def resume_async(
        self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None = None
    ) -> RunnableResult:
        """Async :meth:`resume`, through Dynamiq's ``run_async``."""
        held, config = self._adopt(claim, cancel)
        served: list[str] = []
        try:
            flow = flow_factory(flow_of(claim.flow))
            inbox = await self.backend.execute_async(leases.inbox_op(self.keys, claim.flow, claim.run))
            served = attach_answers(flow, self._opened(claim, inbox))
            paused = None
            if self._wants_pause_time(claim, served):
                try:
                    paused = await self.backend.load_async(claim.head)
                except CheckpointStoreError:
                    pass
            self._served(claim, served, paused)
            result = await flow.run_async(None, config=config)
        finally:
            lost = held.lost
            await self.backend.execute_async(self._after_run_op(claim, held, served))
        if lost is not None:
            raise LeaseLostError(claim.run, lost)
        return result

    def hand_back(self, claim: Claim, *, failed: bool = False) -> bool:
        """Give a claimed lease back: at once (graceful stop), or after a back-off when the attempt failed.

        The claim's token is still its lease's: the resumed run writes under it and never takes the lease anew.
        """
        op = self._release_op(claim.flow, claim.run, claim.owner, claim.token, failed=failed, attempt=claim.attempt)
        return self.backend.execute(op)

    # ---- people's answers and dead letters --------------------------------------------------------------------

    def _opened(self, claim: Claim, inbox: dict[str, str]) -> dict[str, str]:
        """A run's stored answers, decrypted where they were sealed (encryption at rest)."""
        if not any(v.startswith(crypto.SEALED_TEXT) for v in inbox.values()):
            return inbox
        key = self.keys.inbox(claim.flow, claim.run)
        sealer = self.backend.store.sealer
        return {
            node: crypto.open_text(sealer, answer, (claim.flow, claim.run, node), claim.head, key)
            for node, answer in inbox.items()
        }

    def deliver_input(self, run: str, data: Any, *, node_id: str | None = None, flow: str | None = None) -> str:
        """Store a person's answer for a run paused waiting for input, and make it due: a worker resumes it.

        ``run`` is the wf_run_id; ``node_id`` may be left out when exactly one node waits. ``data`` is what the
        node reads: for an approval ``{"feedback": ..., "is_approved": ..., "data": {...}}``, for a
        HumanFeedbackTool ``{"content": ...}``, for a custom node whatever it expects. Returns the node id. The
        first answer for a node stands: a later one raises AlreadyAnsweredError.
        """
        ttl = self.backend.ttl_seconds
        keep_ms = max(int(ttl * 1000), 7 * 86400_000) if ttl else 0  # answers live as long as the run's checkpoints
        heads = self.backend.execute(leases.lease_head_op(self.keys, run, flow, self.backend.store.buckets))
        for candidate, head in heads:
            checkpoint = self.backend.load(head)
            waiting = list(checkpoint.pending_inputs) if checkpoint else []
            if node_id is None and len(waiting) > 1:
                raise ConfigurationError(f"run {run} waits on {waiting} in flow {flow_of(candidate)}: name the node")
            target = node_id or (waiting[0] if waiting else None)
            if target not in waiting:
                continue  # not waiting in this flow; the run may span several
            answer = json.dumps(data)
            if self.backend.store.sealer is not None:  # encryption at rest: the answer is content too
                answer = crypto.seal_text(self.backend.store.sealer, answer, (candidate, run, target))
            reply = self.backend.execute(leases.deliver_op(self.keys, candidate, run, target, answer, keep_ms))
            if reply == "RUNNING":
                raise RunNotWaitingError(f"run {run} is running (it holds a live lease), not waiting for input", run,
                                         running=True)
            if reply == "ANSWERED":
                raise AlreadyAnsweredError(run, target)
            if reply == "OK":
                return target
        raise RunNotWaitingError(f"no run {run!r} is paused waiting on {node_id or 'a node'}", run)

    def dead_letters(self) -> list[DeadLetter]:
        """Runs moved to dead letters after ``max_attempts`` failed recoveries."""
        return self.backend.execute(leases.dead_letters_op(self.keys))

    async def dead_letters_async(self) -> list[DeadLetter]:
        """Async :meth:`dead_letters`."""
        return await self.backend.execute_async(leases.dead_letters_op(self.keys))

    def retry_dead(self, flow: str, run: str) -> bool:
        """Put a dead-lettered run back (atomically): the next worker claims it with a fresh attempt count."""
        return self.backend.execute(leases.retry_dead_op(self.keys, flow, run, self.backend.store.buckets))

    def drop_dead(self, flow: str, run: str) -> bool:
        """Forget a dead-lettered run (its checkpoints stay for inspection and cleanup)."""
        return self.backend.execute(leases.drop_dead_op(self.keys, flow, run, self.backend.store.buckets))


class Worker:
    """The recovery daemon: polls, claims up to ``concurrency`` runs and resumes them on threads (:meth:`run`) or as
    tasks on a service's event loop (:meth:`run_async`); both share one claim operation."""

    def __init__(
        self,
        recovery: Recovery,
        flow_factory: FlowFactory,
        *,
        concurrency: int = 4,
        poll_seconds: float = 0.5,
        metrics: WorkerMetrics | None = None,
        stall_seconds: float = 60.0,
    ):
        self.recovery = recovery
        self.metrics = metrics
        if metrics is not None:
            recovery.metrics = metrics
        self.flow_factory = flow_factory
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.stall_seconds = stall_seconds
        self._last_pass = time.monotonic()  # when the loop last completed a pass (a failed one counts)
        self._stop = threading.Event()
        self._running: dict[tuple[str, str], tuple[Claim, CancellationToken, Future | asyncio.Task]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dynamiq-redis-ckpt-resume")
        self.resumed = 0

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the worker gracefully (call from the main thread)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.stop())

    @staticmethod
    def warm_up() -> None:
        """Import what Dynamiq loads lazily on a run's first node failure or pause (seconds on small machines), so
        the first recovery does not pay it after a lease has already run out."""
        importlib.import_module("dynamiq.nodes.agents.exceptions")

    def stop(self) -> None:
        """Stop claiming; running runs are handed back at once and canceled at their next node boundary."""
        self._stop.set()

    @property
    def alive(self) -> bool:
        """True while the loop has not been asked to stop and completed a pass within ``stall_seconds`` (a pass
        whose request to Redis failed counts: liveness is about this process, readiness about Redis)."""
        return not self._stop.is_set() and time.monotonic() - self._last_pass <= self.stall_seconds

    def idle(self, seconds: float) -> None:
        """Count a pass of a loop that has nothing to do yet (waiting for Redis at start) and sleep up to
        ``seconds``, less if stopped."""
        self._last_pass = time.monotonic()
        self._stop.wait(seconds)

    def _claims_op(self):
        """The one claim step of both loops (a store operation): claims for the free slots, none once stopping."""
        with self._lock:
            free = self.concurrency - len(self._running)
            running = set(self._running)
        if free <= 0:
            return []
        claims = yield from self.recovery.claim_some_op(free, lambda f, r: (f, r) in running or self._stop.is_set())
        if self.metrics:
            self.metrics.running.inc(len(claims))
        return claims

    def run(self) -> None:
        """Poll until stopped, then hand back what is still running and return."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for claim in self.recovery.backend.execute(self._claims_op()):
                    cancel = CancellationToken()
                    with self._lock:
                        self._running[(claim.flow, claim.run)] = (claim, cancel, self._pool.submit(self._resume, claim, cancel))
            except Exception:
                logger.exception("worker poll failed")
            self._passed(started)
            self._stop.wait(self.poll_seconds)
        self._shutdown()

    async def run_async(self) -> None:
        """The same loop on an event loop (for services that embed it): claims with ``redis.asyncio`` and resumes
        through ``run_async`` as tasks, at most ``concurrency`` at once. Stop it with :meth:`stop`."""
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                for claim in await self.recovery.backend.execute_async(self._claims_op()):
                    cancel = CancellationToken()
                    task = asyncio.create_task(self._resume_task(claim, cancel))
                    with self._lock:
                        self._running[(claim.flow, claim.run)] = (claim, cancel, task)
            except Exception:
                logger.exception("worker poll failed")
            self._passed(started)
            await asyncio.sleep(self.poll_seconds)
        running = self._hand_back_running()
        if running:
            await asyncio.wait([task for _, _, task in running], timeout=30)

    def _passed(self, started: float) -> None:
        """A poll pass ended (a failed one counts: liveness is about this loop, readiness about Redis)."""
        self._last_pass = time.monotonic()
        if self.metrics:
            self.metrics.scan_seconds.observe(self._last_pass - started)
            self.metrics.last_scan.set(time.time())

    def _count_end(self, claim: Claim, outcome: str, started: float) -> None:
        trigger = self.recovery.trigger_of(claim)
        if self.metrics:
            self.metrics.resumes.labels(trigger, outcome).inc()
            self.metrics.running.dec()
            self.metrics.resume_seconds.observe(time.monotonic() - started)

    @contextmanager
    def _outcome(self, claim: Claim):
        """Around one resume: log and count how it ended; a failed attempt hands the lease back with a back-off;
        the run leaves the running set whatever happened."""
        started, ended = time.monotonic(), ["error"]
        try:
            yield lambda result: ended.__setitem__(0, result.status.value)
            self.resumed += 1
            logger.info("run %s of flow %s ended: %s", claim.run, flow_of(claim.flow), ended[0],
                        extra=ids(claim.flow, claim.run))  # fmt: skip
        except LeaseLostError as lost:
            ended[0] = "handed_back" if self._stop.is_set() else "lease_lost"  # a stop fences the runs it hands back
            logger.warning("run %s stopped: %s", claim.run, lost, extra=ids(claim.flow, claim.run))
        except Exception:
            logger.exception("recovery of run %s failed (attempt %d)", claim.run, claim.attempt,
                             extra=ids(claim.flow, claim.run, claim.head, claim.attempt))
            try:
                self.recovery.hand_back(claim, failed=True)  # refused harmlessly if already handed back on stop
            except Exception:
                logger.exception("hand-back of run %s failed; its lease will run out instead", claim.run,
                                 extra=ids(claim.flow, claim.run))
        finally:
            self._count_end(claim, ended[0], started)
            with self._lock:
                self._running.pop((claim.flow, claim.run), None)

    def _resume(self, claim: Claim, cancel: CancellationToken) -> None:
        with self._outcome(claim) as record:
            record(self.recovery.resume(claim, self.flow_factory, cancel))

    async def _resume_task(self, claim: Claim, cancel: CancellationToken) -> None:
        with self._outcome(claim) as record:
            record(await self.recovery.resume_async(claim, self.flow_factory, cancel))

    def _hand_back_running(self) -> list:
        """Stopping: hand every running run's lease back at once (another worker continues) and cancel the run."""
        with self._lock:
            running = list(self._running.values())
        for claim, cancel, _ in running:
            try:
                self.recovery.hand_back(claim, failed=False)
            except Exception:
                logger.exception("hand-back of run %s failed; its lease will run out instead", claim.run,
                                 extra=ids(claim.flow, claim.run))
            cancel.cancel()
        return running

    def _shutdown(self) -> None:
        running = self._hand_back_running()
        for _, _, future in running:
            try:
                future.result(timeout=30)
            except Exception:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
