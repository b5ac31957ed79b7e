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
from typing import Any, Callable, Iterator, Sequence

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


Calls = Sequence[Callable[[], list[float]]]  # each call does some work and returns the durations it timed


def interleaved(runs: dict[str, Calls], rounds: int, budget: float | None,
                failed: Callable[[str, Exception], None], warm_first: bool = False,
                follows: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Run each target's calls in ``rounds`` blocks, the targets taking turns block by block, in the order given
    and then reversed (A B C, C B A, A B C, ...); a target named in ``follows`` always runs right after the one it
    follows.

    Minutes in which the VM's neighbours take its CPU then slow every target alike, and a steady drift cancels,
    instead of landing on whichever target was being measured: the ratios hold still between runs. Blocks are
    kept long because a turn leaves traces on the next one: a server that sat idle answers its first request late
    (a Redis SET after 20 ms idle took 0.4-0.55 ms on a 2-vCPU VM, 0.1 ms back to back), so with ``warm_first``
    the first call of each block is not counted. A target whose call raises is dropped and ``failed`` is told; one
    whose calls have taken ``budget`` seconds stops once it has ``MIN_SAMPLES`` (or a call took half the budget).
    """
    follows = follows or {}
    ran: dict[str, int] = {}  # calls each target made in the current round: a follower makes no more than its leader
    samples: dict[str, list[float]] = {name: [] for name in runs}
    spent = dict.fromkeys(runs, 0.0)
    slowest = dict.fromkeys(runs, 0.0)
    live = list(runs)
    leaders = [name for name in runs if name not in follows]
    for r in range(rounds):
        gc.collect()
        order = []
        for leader in leaders if r % 2 == 0 else leaders[::-1]:
            order += [leader, *(name for name in runs if follows.get(name) == leader)]
        for name in order:
            calls, ran[name] = runs[name], 0
            if name not in live:
                continue
            block = calls[len(calls) * r // rounds : len(calls) * (r + 1) // rounds]
            if name in follows:
                block = block[: ran[follows[name]]]
            started = time.perf_counter()
            try:
                for index, call in enumerate(block):
                    over = budget is not None and spent[name] + time.perf_counter() - started > budget
                    if over and (len(samples[name]) >= MIN_SAMPLES or (slowest[name] > budget / 2 and samples[name])):
                        break  # a call that takes half the budget is sampled once or twice: its p50 is clear enough
                    took = call()
                    ran[name] += 1
                    slowest[name] = max(slowest[name], *took, 0.0)
                    if index or not warm_first:
                        samples[name] += took
            except Exception as e:
                live.remove(name)
                failed(name, e)
            spent[name] += time.perf_counter() - started
    return {name: samples[name] for name in live}


def _once(fn: Callable[[], Any]) -> list[float]:
    start = time.perf_counter()
    fn()
    return [time.perf_counter() - start]


def save_calls(backend: Any, checkpoints: Sequence[FlowCheckpoint]) -> list[Callable[[], list[float]]]:
    """One timed ``backend.save`` per checkpoint, each saved as a new one."""
    return [lambda cp=cp: _once(lambda: backend.save(cp)) for cp in checkpoints]


def closing(cp: FlowCheckpoint) -> FlowCheckpoint | None:
    """The snapshot that ends a run left active (a Flow saves one when the run completes); None if it ended."""
    if cp.status in _TERMINAL:
        return None
    moment = cp.updated_at + timedelta(seconds=1)
    return cp.model_copy(update={"id": cp.id + "-end", "parent_checkpoint_id": cp.id, "status":
                                 CheckpointStatus.COMPLETED, "created_at": moment, "updated_at": moment})


def save_chain(backend: Any, chain: Sequence[FlowCheckpoint], timed: bool = True) -> list[float]:
    """Save every snapshot of a chain in order, as a Flow in APPEND mode does; time all saves but the first.

    A chain whose last snapshot is still active gets an untimed closing snapshot, as its run would, so no run is
    left holding a lease.
    """
    samples: list[float] = []
    backend.save(chain[0])
    for cp in chain[1:]:
        start = time.perf_counter()
        backend.save(cp)
        samples.append(time.perf_counter() - start)
    end = closing(chain[-1])
    if end is not None:
        backend.save(end)
    return samples if timed else []


def chain_calls(backend: Any, chains: Sequence[Sequence[FlowCheckpoint]]) -> list[Callable[[], list[float]]]:
    """One call per chain: :func:`save_chain`."""
    return [lambda chain=chain: save_chain(backend, chain) for chain in chains]


def save_chains_async(backend: Any, chains: Sequence[Sequence[FlowCheckpoint]], warmup: int = 0) -> list[float]:
    """:func:`save_chain` for each chain through ``save_async``, every save awaited in turn in one event loop; the
    first ``warmup`` chains are not timed."""

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


def load_calls(backend: Any, ids: Sequence[str]) -> list[Callable[[], list[float]]]:
    """One timed ``backend.load`` per id; each checks that the checkpoint was found."""

    def load(cp_id: str) -> list[float]:
        start = time.perf_counter()
        found = backend.load(cp_id)
        took = time.perf_counter() - start
        if found is None:
            raise RuntimeError(f"{type(backend).__name__}: checkpoint {cp_id} was not found")
        return [took]

    return [lambda i=i: load(i) for i in ids]


def list_calls(backend: Any, flow_id: str, samples: int) -> list[Callable[[], list[float]]]:
    """``samples`` timed ``get_list_by_flow(flow_id, limit=10)`` calls, after one untimed call that checks it
    returns 10 checkpoints."""
    found = backend.get_list_by_flow(flow_id, limit=10)
    if len(found) != 10:
        raise RuntimeError(f"{type(backend).__name__}: listing returned {len(found)} checkpoints, expected 10")
    return [lambda: _once(lambda: backend.get_list_by_flow(flow_id, limit=10)) for _ in range(samples)]


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
