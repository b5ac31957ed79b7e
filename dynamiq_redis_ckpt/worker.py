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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dynamiq.checkpoints.config import CheckpointConfig
from dynamiq.runnables import RunnableConfig, RunnableResult
from dynamiq.types.cancellation import CancellationConfig, CancellationToken

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.errors import ConfigurationError, LeaseLostError
from dynamiq_redis_ckpt.inbox import attach_answers
from dynamiq_redis_ckpt.keys import FLOW_SHARDS
from dynamiq_redis_ckpt.leases import REGISTRY, HeldLease, process_owner, release_op, verdict
from dynamiq_redis_ckpt.requests import Batch, Script, cmd
from dynamiq_redis_ckpt.store import score_pairs, text

if TYPE_CHECKING:  # prometheus_client is imported only by those who serve metrics (see cli)
    from dynamiq_redis_ckpt.metrics import WorkerMetrics

logger = logging.getLogger(__name__)
FlowFactory = Callable[[str], Any]


@dataclass(frozen=True)
class Claim:
    """A run this worker claimed: it holds the lease with ``token`` and resumes from checkpoint ``head``."""

    flow: str
    run: str
    token: int
    head: str
    attempt: int
    owner: str
    reason: str  # "orphan" | "due"


@dataclass(frozen=True)
class DeadLetter:
    """A run whose recovery kept failing; it waits for a person to retry or drop it."""

    flow: str
    run: str
    since_ms: int


def _script(name: str, keys: tuple, args: tuple):
    reply = yield Script(name, keys, args)
    return verdict(reply)


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
    """Find, claim and resume runs of one backend's namespace. Thread-safe; usable inside any service."""

    def __init__(self, backend: RedisCheckpointBackend, *, max_attempts: int = 5, backoff_seconds: float = 2.0):
        self.backend = backend
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.on_dead: Callable[[str, str], None] | None = None  # called when a claim moves a run to dead letters
        self._core = backend._core
        self._keys = backend._core.keys

    # ---- store operations (generators, shared by the sync and async paths) --------------------------------------

    def _registered_flows_op(self):
        """Every flow that has leases, timers or dead letters (the 16 registry shards, one round trip)."""
        shards = yield Batch(tuple(cmd("SMEMBERS", self._keys.flow_registry(i)) for i in range(FLOW_SHARDS)))
        return sorted({text(f) for shard in shards for f in shard})

    def _find_op(self, index_of: Callable[[str], str], limit: int):
        flows = yield from self._registered_flows_op()
        if not flows:
            return []
        seconds, micros = (yield cmd("TIME"))
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        replies = yield Batch(tuple(cmd("ZRANGEBYSCORE", index_of(f), "-inf", now_ms, "LIMIT", 0, limit) for f in flows))
        return [(flow, text(run)) for flow, runs in zip(flows, replies) for run in runs][:limit]

    def _claim_op(self, flow: str, run: str, reason: str):
        k = self._keys
        keys = (k.lease(flow, run), k.lease_index(flow), k.due_index(flow), k.dead_index(flow))
        owner = process_owner()
        args = (run, owner, int(self.backend.lease_ttl_seconds * 1000), reason, self.max_attempts)
        reply = yield Script("claim", keys, args)
        outcome = verdict(reply)
        if outcome == "OK":
            return Claim(flow, run, int(text(reply[1])), text(reply[2]), int(text(reply[3])), owner, reason)
        if outcome == "DEAD":
            logger.error("run %s of flow %s failed %d recoveries: moved to dead letters", run, flow, self.max_attempts)
            if self.on_dead is not None:
                self.on_dead(flow, run)
        return None

    def _dead_op(self):
        flows = yield from self._registered_flows_op()
        replies = yield Batch(tuple(cmd("ZRANGE", self._keys.dead_index(f), 0, -1, "WITHSCORES") for f in flows))
        return [DeadLetter(flow, run, int(score)) for flow, rows in zip(flows, replies) for score, run in score_pairs(rows)]

    # ---- sync API ---------------------------------------------------------------------------------------------

    def find_orphans(self, limit: int = 100) -> list[tuple[str, str]]:
        """(flow, run) pairs whose lease ran out (by the server's clock) or was handed back."""
        return self.backend._sync.run(self._find_op(self._keys.lease_index, limit))

    def find_due(self, limit: int = 100) -> list[tuple[str, str]]:
        """(flow, run) pairs paused until a time that has come (by the server's clock)."""
        return self.backend._sync.run(self._find_op(self._keys.due_index, limit))

    def claim(self, flow: str, run: str, reason: str = "orphan") -> Claim | None:
        """Claim a run atomically; None when another worker got it first, it is not due, or it went dead."""
        return self.backend._sync.run(self._claim_op(flow, run, reason))

    def resume(self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None = None) -> RunnableResult:
        """Resume a claimed run through Dynamiq's own resume path, with the run's own wf_run_id.

        The lease is heartbeated while the run goes on; if it is lost, ``cancel`` is canceled and the run's
        remaining writes are refused. Raises LeaseLostError if the run stopped because its lease was lost.
        """
        with self._resumed(claim, flow_factory, cancel) as (flow, config):
            return flow.run_sync(None, config=config)

    async def resume_async(
        self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None = None
    ) -> RunnableResult:
        """Async :meth:`resume`, through Dynamiq's ``run_async``."""
        with self._resumed(claim, flow_factory, cancel) as (flow, config):
            return await flow.run_async(None, config=config)

    @contextmanager
    def _resumed(self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None):
        """Around running a claimed run: yields (flow, config); afterwards forgets used answers, hands back a lease
        the run still holds, and raises LeaseLostError if the lease was lost while the run went on."""
        held, flow, config, served = self._prepare(claim, flow_factory, cancel)
        try:
            yield flow, config
        finally:
            lost = held.lost  # read before _after_run, whose own hand-back would look like a loss
            self._after_run(claim, held, served)
        if lost is not None:
            raise LeaseLostError(claim.run, lost)

    def _prepare(self, claim: Claim, flow_factory: FlowFactory, cancel: CancellationToken | None):
        """Heartbeat the claimed lease, rebuild the flow, hand it any stored answers, and build the run config."""
        token = cancel or CancellationToken()
        held = HeldLease(
            self.backend._namespace, claim.flow, claim.run, claim.owner, claim.token, self.backend.lease_ttl_seconds,
            self.backend.heartbeat_interval_seconds, (self.backend._sync, self._core),
            head=claim.head, on_lost=[lambda reason: token.cancel()],
        )  # fmt: skip
        REGISTRY.adopt(held, time.monotonic())
        flow = flow_factory(claim.flow)
        inbox = self.backend.redis.hgetall(self._keys.inbox(claim.flow, claim.run))
        served = attach_answers(flow, {text(k): text(v) for k, v in inbox.items()})
        config = RunnableConfig(
            run_id=claim.run,
            checkpoint=CheckpointConfig(resume_from=claim.head, backend=self.backend),
            cancellation=CancellationConfig(token=token),
        )
        logger.info("resuming run %s of flow %s from %s (attempt %d)", claim.run, claim.flow, claim.head, claim.attempt)
        return held, flow, config, served

    def _after_run(self, claim: Claim, held: HeldLease, served: list[str]) -> None:
        """After a resumed run returned: forget used answers, and give back a lease the run still holds.

        A run that ended or paused handed its lease back in its last save. If that save failed (Dynamiq logs and
        swallows it), the lease would be renewed for as long as this process lives and nobody could recover the
        run: hand it back as a failed attempt, so another worker retries it after the backoff.
        """
        try:
            self._forget_used_answers(claim, served)
        finally:
            # The owner name is the process's, shared by every lease here: only this very lease is this claim's.
            if REGISTRY.get(held.key) is held and held.lost is None and not held.paused:
                logger.warning("run %s returned still holding its lease (its last save failed?): handing it back",
                               claim.run)  # fmt: skip
                self._release(claim.flow, claim.run, held.owner, held.token, failed=True, attempt=claim.attempt)

    def _forget_used_answers(self, claim: Claim, served: list[str]) -> None:
        """Drop the answers of nodes the run has completed since; the others stay for the next resume."""
        if not served:
            return
        latest = self.backend.get_latest_by_flow_and_run(claim.flow, claim.run)
        used = [n for n in served if latest is not None and n in latest.completed_node_ids]
        if used:
            self.backend.redis.hdel(self._keys.inbox(claim.flow, claim.run), *used)

    def deliver_input(self, run: str, data: Any, *, node_id: str | None = None, flow: str | None = None) -> str:
        """Store a person's answer for a run paused waiting for input, and make it due: a worker resumes it.

        ``run`` is the wf_run_id; ``node_id`` may be left out when exactly one node waits. ``data`` is what the
        node reads: for an approval ``{"feedback": ..., "is_approved": ..., "data": {...}}``, for a
        HumanFeedbackTool ``{"content": ...}``, for a custom node whatever it expects. Returns the node id.
        """
        flows = [flow] if flow else sorted(text(f) for f in self.backend.redis.smembers(self._keys.run_flows(run)))
        for candidate in flows:
            head = self.backend.redis.hget(self._keys.lease(candidate, run), "head")
            if head is None:
                continue
            checkpoint = self.backend.load(text(head))
            waiting = list(checkpoint.pending_inputs) if checkpoint else []
            if node_id is None and len(waiting) > 1:
                raise ConfigurationError(f"run {run} waits on {waiting} in flow {candidate}: name the node")
            target = node_id or (waiting[0] if waiting else None)
            if target not in waiting:
                continue  # not waiting in this flow; the run may span several
            ttl = self.backend._core.ttl_ms
            keep_ms = max(ttl, 7 * 86400_000) if ttl else 0  # answers live as long as the run's checkpoints
            keys = (self._keys.inbox(candidate, run), self._keys.due_index(candidate), self._keys.lease(candidate, run))
            reply = self.backend._sync.run(_script("deliver", keys, (run, target, json.dumps(data), keep_ms)))
            if reply == "RUNNING":
                raise ConfigurationError(f"run {run} is running (it holds a live lease), not waiting for input")
            if reply == "OK":
                return target
        raise ConfigurationError(f"no run {run!r} is paused waiting on {node_id or 'a node'}")

    def hand_back(self, claim: Claim, *, failed: bool = False) -> bool:
        """Give a claimed lease back: at once (graceful stop), or after a backoff when the attempt failed.

        The claim's token is still its lease's: the resumed run writes under it and never takes the lease anew.
        """
        return self._release(claim.flow, claim.run, claim.owner, claim.token, failed=failed, attempt=claim.attempt)

    def _release(self, flow: str, run: str, owner: str, token: int, *, failed: bool, attempt: int) -> bool:
        # Fenced here first: the run's thread, if still going, must never take the lease back by itself.
        REGISTRY.fence(self.backend._namespace, flow, run, token, "handed back by this worker")
        backoff_ms = int(self.backoff_seconds * 1000 * 2 ** max(attempt - 1, 0))
        op = release_op(self._core, flow, run, owner, token, failed=failed, backoff_ms=backoff_ms)
        return self.backend._sync.run(op) == "OK"

    def dead_letters(self) -> list[DeadLetter]:
        """Runs moved to dead letters after ``max_attempts`` failed recoveries."""
        return self.backend._sync.run(self._dead_op())

    def retry_dead(self, flow: str, run: str) -> bool:
        """Put a dead-lettered run back: the next worker claims it with a fresh attempt count."""
        k = self._keys
        removed = self.backend.redis.zrem(k.dead_index(flow), run)
        if removed:
            self.backend.redis.hset(k.lease(flow, run), "attempts", 0)
            self.backend.redis.zadd(k.lease_index(flow), {run: 0})
        return bool(removed)

    def drop_dead(self, flow: str, run: str) -> bool:
        """Forget a dead-lettered run (its checkpoints stay for inspection and cleanup)."""
        return bool(self.backend.redis.zrem(self._keys.dead_index(flow), run))

    # ---- async API --------------------------------------------------------------------------------------------

    async def find_orphans_async(self, limit: int = 100) -> list[tuple[str, str]]:
        """Async :meth:`find_orphans`."""
        return await self.backend._async.run(self._find_op(self._keys.lease_index, limit))

    async def find_due_async(self, limit: int = 100) -> list[tuple[str, str]]:
        """Async :meth:`find_due`."""
        return await self.backend._async.run(self._find_op(self._keys.due_index, limit))

    async def claim_async(self, flow: str, run: str, reason: str = "orphan") -> Claim | None:
        """Async :meth:`claim`."""
        return await self.backend._async.run(self._claim_op(flow, run, reason))

    async def dead_letters_async(self) -> list[DeadLetter]:
        """Async :meth:`dead_letters`."""
        return await self.backend._async.run(self._dead_op())


class Worker:
    """The recovery daemon: polls, claims up to ``concurrency`` runs and resumes them on threads."""

    def __init__(
        self,
        recovery: Recovery,
        flow_factory: FlowFactory,
        *,
        concurrency: int = 4,
        poll_seconds: float = 0.5,
        metrics: WorkerMetrics | None = None,
    ):
        self.recovery = recovery
        self.metrics = metrics
        if metrics is not None:
            recovery.on_dead = lambda flow, run: metrics.dead_letters.inc()
        self.flow_factory = flow_factory
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._running: dict[tuple[str, str], tuple[Claim, CancellationToken, Future]] = {}
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

    def run(self) -> None:
        """Poll until stopped, then hand back what is still running and return."""
        while not self._stop.is_set():
            free = self.concurrency - len(self._running)
            try:
                if free > 0:
                    self._claim_some(free)
            except Exception:
                logger.exception("worker poll failed")
            self._stop.wait(self.poll_seconds)
        self._shutdown()

    def _claim_some(self, free: int) -> None:
        candidates = [(f, r, "due") for f, r in self.recovery.find_due(free * 2)]
        candidates += [(f, r, "orphan") for f, r in self.recovery.find_orphans(free * 2)]
        for flow, run, reason in candidates:
            if free <= 0 or self._stop.is_set():
                return
            with self._lock:
                if (flow, run) in self._running:
                    continue
            claim = self.recovery.claim(flow, run, reason)
            if claim is None:
                continue
            self._count_claim(reason)
            cancel = CancellationToken()
            with self._lock:
                self._running[(flow, run)] = (claim, cancel, self._pool.submit(self._resume, claim, cancel))
            free -= 1

    @property
    def alive(self) -> bool:
        """True while the loop has not been asked to stop."""
        return not self._stop.is_set()

    def _count_claim(self, reason: str) -> None:
        if self.metrics:
            self.metrics.claims.labels(reason).inc()
            self.metrics.running.inc()

    def _count_end(self, outcome: str, started: float) -> None:
        if self.metrics:
            self.metrics.resumes.labels(outcome).inc()
            self.metrics.running.dec()
            self.metrics.resume_seconds.observe(time.monotonic() - started)

    @contextmanager
    def _outcome(self, claim: Claim):
        """Around one resume: log and count how it ended; a failed attempt hands the lease back with a backoff."""
        started, ended = time.monotonic(), ["error"]
        try:
            yield lambda result: ended.__setitem__(0, result.status.value)
            self.resumed += 1
            logger.info("run %s of flow %s ended: %s", claim.run, claim.flow, ended[0])
        except LeaseLostError as lost:
            ended[0] = "handed_back" if self._stop.is_set() else "lease_lost"  # a stop fences the runs it hands back
            logger.warning("run %s stopped: %s", claim.run, lost)
        except Exception:
            logger.exception("recovery of run %s failed (attempt %d)", claim.run, claim.attempt)
            self.recovery.hand_back(claim, failed=True)  # refused harmlessly if already handed back on stop
        finally:
            self._count_end(ended[0], started)

    def _resume(self, claim: Claim, cancel: CancellationToken) -> None:
        try:
            with self._outcome(claim) as record:
                record(self.recovery.resume(claim, self.flow_factory, cancel))
        finally:
            with self._lock:
                self._running.pop((claim.flow, claim.run), None)

    async def run_async(self) -> None:
        """The same loop on an event loop (for services that embed it): claims with ``redis.asyncio`` and resumes
        through ``run_async`` as tasks, at most ``concurrency`` at once. Stop it with :meth:`stop`."""
        tasks: dict[tuple[str, str], asyncio.Task] = {}
        while not self._stop.is_set():
            free = self.concurrency - len(tasks)
            try:
                if free > 0:
                    found = [(f, r, "due") for f, r in await self.recovery.find_due_async(free * 2)]
                    found += [(f, r, "orphan") for f, r in await self.recovery.find_orphans_async(free * 2)]
                    for flow, run, reason in found:
                        if len(tasks) >= self.concurrency or (flow, run) in tasks:
                            continue
                        claim = await self.recovery.claim_async(flow, run, reason)
                        if claim is not None:
                            self._count_claim(reason)
                            cancel = CancellationToken()
                            task = asyncio.create_task(self._resume_task(claim, cancel))
                            tasks[(flow, run)] = task
                            with self._lock:
                                self._running[(flow, run)] = (claim, cancel, task)
            except Exception:
                logger.exception("worker poll failed")
            for key in [k for k, t in tasks.items() if t.done()]:
                del tasks[key]
                with self._lock:
                    self._running.pop(key, None)
            await asyncio.sleep(self.poll_seconds)
        self._hand_back_running()
        if tasks:
            await asyncio.wait(tasks.values(), timeout=30)

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
                logger.exception("hand-back of run %s failed; its lease will run out instead", claim.run)
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
