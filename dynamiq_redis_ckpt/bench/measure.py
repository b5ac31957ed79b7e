"""Measurement routines: each times one operation on one backend and returns raw samples (seconds) or a number.

Checkpoints are built before anything is timed; only the backend call sits between the two ``perf_counter`` reads.
A ``budget`` (seconds) caps the slow cells: sampling stops once it is spent, after at least ``MIN_SAMPLES`` (or
one sample, when a single call takes more than half the budget).
"""

from __future__ import annotations

import asyncio
import gc
import math
import multiprocessing
import queue
import statistics
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Sequence

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

MIN_SAMPLES = 3
_TERMINAL = {CheckpointStatus.COMPLETED, CheckpointStatus.FAILED, CheckpointStatus.CANCELED}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; with few samples p99 is the maximum."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summary(samples: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean in milliseconds, and the sample count, of durations in seconds."""
    return {
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3 if samples else math.nan,
        "n": len(samples),
    }


def _timed(calls: Iterable[Callable[[], Any]], budget: float | None) -> list[float]:
    gc.collect()
    samples: list[float] = []
    deadline = time.perf_counter() + budget if budget else math.inf
    for call in calls:
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and (len(samples) >= MIN_SAMPLES or samples[-1] > budget / 2):
            break  # a call that takes half the budget is sampled once: its p50 is clear enough
    return samples


def save_each(backend: Any, warmup: Sequence[FlowCheckpoint], checkpoints: Sequence[FlowCheckpoint],
              budget: float | None = None) -> list[float]:
    """Time ``backend.save`` of each checkpoint as a new one, after untimed warm-up saves."""
    for cp in warmup:
        backend.save(cp)
    return _timed(((lambda cp=cp: backend.save(cp)) for cp in checkpoints), budget)


def closing(cp: FlowCheckpoint) -> FlowCheckpoint | None:
    """The snapshot that ends a run left active (a Flow saves one when the run completes); None if it ended."""
    if cp.status in _TERMINAL:
        return None
    moment = cp.updated_at + timedelta(seconds=1)
    return cp.model_copy(update={"id": cp.id + "-end", "parent_checkpoint_id": cp.id, "status":
                                 CheckpointStatus.COMPLETED, "created_at": moment, "updated_at": moment})


def save_chains(backend: Any, chains: Sequence[Sequence[FlowCheckpoint]], warmup: int = 0,
                budget: float | None = None) -> list[float]:
    """Save every snapshot of each chain in order, as a Flow in APPEND mode does; time all saves but the first.

    The first ``warmup`` chains are not timed. A chain whose last snapshot is still active gets an untimed closing
    snapshot, as its run would, so no run is left holding a lease.
    """
    samples: list[float] = []
    deadline = time.perf_counter() + budget if budget else math.inf
    gc.collect()
    for index, chain in enumerate(chains):
        backend.save(chain[0])
        for cp in chain[1:]:
            start = time.perf_counter()
            backend.save(cp)
            if index >= warmup:
                samples.append(time.perf_counter() - start)
        end = closing(chain[-1])
        if end is not None:
            backend.save(end)
        if len(samples) >= MIN_SAMPLES and time.perf_counter() > deadline:
            break
    return samples


def save_chains_async(backend: Any, chains: Sequence[Sequence[FlowCheckpoint]], warmup: int = 0) -> list[float]:
    """:func:`save_chains` through ``save_async``, every save awaited in turn in one event loop."""

    async def run() -> list[float]:
        samples: list[float] = []
        for index, chain in enumerate(chains):
            await backend.save_async(chain[0])
            for cp in chain[1:]:
                start = time.perf_counter()
                await backend.save_async(cp)
                if index >= warmup:
                    samples.append(time.perf_counter() - start)
            end = closing(chain[-1])
            if end is not None:
                await backend.save_async(end)
        aclose = getattr(backend, "aclose", None)
        if aclose is not None:
            await aclose()
        return samples

    gc.collect()
    return asyncio.run(run())


def load_each(backend: Any, ids: Sequence[str], warmup: int, budget: float | None = None) -> list[float]:
    """Time ``backend.load`` of each id after ``warmup`` untimed loads (of the first ids); checks each is found."""

    def load(cp_id: str) -> None:
        if backend.load(cp_id) is None:
            raise RuntimeError(f"{type(backend).__name__}: checkpoint {cp_id} was not found")

    for cp_id in ids[:warmup]:
        load(cp_id)
    return _timed(((lambda i=i: load(i)) for i in ids[warmup:]), budget)


def list_newest(backend: Any, flow_id: str, samples: int, budget: float | None) -> list[float]:
    """Time ``get_list_by_flow(flow_id, limit=10)`` ``samples`` times (one untimed call first)."""
    found = backend.get_list_by_flow(flow_id, limit=10)
    if len(found) != 10:
        raise RuntimeError(f"{type(backend).__name__}: listing returned {len(found)} checkpoints, expected 10")
    return _timed((lambda: backend.get_list_by_flow(flow_id, limit=10) for _ in range(samples)), budget)


def raw_set(client: Any, key_prefix: str, blobs: Sequence[bytes], warmup: int) -> list[float]:
    """Time redis-py ``SET key blob`` of each blob under its own key (the first ``warmup`` untimed)."""
    for i, blob in enumerate(blobs[:warmup]):
        client.set(f"{key_prefix}:warm:{i}", blob)
    return _timed(((lambda i=i, b=b: client.set(f"{key_prefix}:{i}", b)) for i, b in enumerate(blobs[warmup:])), None)


# ---- throughput -------------------------------------------------------------------------------------------------


def relabel(chain: Sequence[FlowCheckpoint], tag: str) -> list[FlowCheckpoint]:
    """A copy of a chain as another run: ids, run ids and parent links suffixed with ``tag``, content shared."""
    out = []
    for cp in chain:
        update = {"id": f"{cp.id}-{tag}", "run_id": f"{cp.run_id}-{tag}", "wf_run_id": f"{cp.wf_run_id}-{tag}"}
        if cp.parent_checkpoint_id:
            update["parent_checkpoint_id"] = f"{cp.parent_checkpoint_id}-{tag}"
        out.append(cp.model_copy(update=update))
    return out


def _worker_chains(pool: Sequence[Sequence[FlowCheckpoint]], worker: int, clients: int, tag: str
                   ) -> Iterator[list[FlowCheckpoint]]:
    share = list(pool[worker::clients]) or list(pool)
    first = [relabel(c, f"{tag}w{worker}p0") for c in share]  # built before the start signal
    yield from first
    passes = 1
    while True:
        for chain in share:
            yield relabel(chain, f"{tag}w{worker}p{passes}")
        passes += 1


def _client_loop(make: Callable[[], Any], pool, worker: int, clients: int, tag: str, seconds: float,
                 ready: Any, results: Any, own: bool) -> None:
    backend = None
    try:
        backend = make()
        chains = _worker_chains(pool, worker, clients, tag)
        first = next(chains)
        ready.wait()
        saves = 0
        deadline = time.perf_counter() + seconds
        chain = first
        while True:
            for cp in chain:
                backend.save(cp)
                saves += 1
                if time.perf_counter() >= deadline:
                    break
            else:
                chain = next(chains)
                continue
            break
        results.put((worker, saves, None))
    except BaseException as e:  # reported to the parent, which raises
        results.put((worker, 0, f"{type(e).__name__}: {e}"))
    finally:
        close = getattr(backend, "close", None) if own else None
        if callable(close):
            close()


def throughput(make: Callable[[], Any], pool: Sequence[Sequence[FlowCheckpoint]], clients: int, seconds: float,
               mode: str, tag: str) -> float:
    """Total saves per second of ``clients`` concurrent clients each saving APPEND chains for ``seconds``.

    ``mode="processes"``: each client is a forked process building its own backend with ``make`` after the fork;
    ``"threads"``: clients are threads sharing one backend (for backends that live in one process).
    All clients start together on a barrier; every save completed before a client's deadline counts.
    """
    if mode == "threads":
        shared = make()
        ready, results, spawn = threading.Barrier(clients), queue.Queue(), threading.Thread
        make, own = (lambda: shared), False
    else:
        ctx = multiprocessing.get_context("fork")
        ready, results, spawn, own = ctx.Barrier(clients), ctx.Queue(), ctx.Process, True
    workers = [spawn(target=_client_loop, args=(make, pool, w, clients, tag, seconds, ready, results, own))
               for w in range(clients)]  # fmt: skip
    for w in workers:
        w.start()
    reports = [results.get(timeout=120 + seconds) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    errors = [e for _, _, e in reports if e]
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} clients failed: {errors[0]}")
    return sum(saves for _, saves, _ in reports) / seconds


# ---- a real Flow ------------------------------------------------------------------------------------------------


def flow_overhead(run_off: Callable[[], Any], run_on: Callable[[], Any], runs: int, nodes: int,
                  warmup: int = 2) -> dict[str, float]:
    """Per-node cost of checkpointing in a real Flow: (median run time on - median off) / ``nodes``, in ms.

    Runs alternate off/on so drift affects both alike.
    """
    for _ in range(warmup):
        run_off()
        run_on()
    off: list[float] = []
    on: list[float] = []
    gc.collect()
    for _ in range(runs):
        for fn, out in ((run_off, off), (run_on, on)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    median_off, median_on = statistics.median(off), statistics.median(on)
    return {"per_node_ms": (median_on - median_off) / nodes * 1e3, "run_off_ms": median_off * 1e3,
            "run_on_ms": median_on * 1e3, "n": runs}  # fmt: skip
