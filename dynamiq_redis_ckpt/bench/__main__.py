"""``python3 -m dynamiq_redis_ckpt.bench``: measure this backend against Dynamiq's own, in one run.

Every metric runs on every target, in its own namespace, and is printed (stderr) as it completes; save, load and
list latencies are sampled from all targets in alternating blocks (A B C, C B A, ...), the other metrics one target
after another. The tables go to stdout and, with the raw numbers and a chart, to ``--out``. ``--quick`` is a fast smoke
run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # dynamiq's node modules import litellm: no fetch

from dynamiq_redis_ckpt import as_running_flow  # noqa: E402
from dynamiq_redis_ckpt.bench import cost, measure, report  # noqa: E402
from dynamiq_redis_ckpt.bench.targets import ORDER, RedisTarget, Target, build_targets  # noqa: E402
from dynamiq_redis_ckpt.bench.targets import close_backend  # noqa: E402
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain, tiny  # noqa: E402
from dynamiq_redis_ckpt.config import mask_url  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PROFILES = {  # option: (full run, --quick)
    "samples": (200, 20),
    "samples_50": (60, 8),
    "warmup": (20, 3),
    "chains": (30, 4),
    "list_sizes": ("1000,10000,100000", "1000,10000"),
    "list_samples": (100, 5),
    "clients": ("1,4,16", "1,4,16"),
    "seconds": (3.0, 1.0),
    "flow_runs": (15, 3),
    "cell_budget": (10.0, 3.0),
    "growth_runs": (6, 1),
    "cpu_chains": (100, 10),
    "saturation_clients": ("1,2,4,8,16", "1,4"),
}
SEEDS_50, SEEDS_LOOP, SEED_BYTES = 200_000, 300_000, 400_000
CHAIN_WARMUP = 3
ROUNDS = 4  # blocks in which the targets of a latency metric take turns (A B C, C B A, ...)
BLOCK = 20  # fewest calls in a block whose first call is not counted
LIST_FLOW = "bench-list"


def say(message: str) -> None:
    """Progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with unset options filled from the full or the ``--quick`` profile."""
    p = argparse.ArgumentParser(
        prog="python3 -m dynamiq_redis_ckpt.bench",
        description="Benchmark RedisCheckpointBackend against Dynamiq's InMemory, FileSystem and PostgreSQL "
        "backends and a raw redis SET floor. Options left unset take the full-run default (or --quick's).",
    )
    p.add_argument("--quick", action="store_true", help="small sample counts and list sizes 1000,10000: a smoke run")
    p.add_argument("--out", default="bench-results", help="directory for results.md, results.json, chart.png")
    p.add_argument("--targets", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    p.add_argument("--pg-dsn", default=DEFAULT_DSN, help=f"PostgreSQL to compare with (default {DEFAULT_DSN})")
    p.add_argument("--samples", type=int, help="timed first saves and loads of 10-node checkpoints (200; quick 20)")
    p.add_argument("--samples-50", type=int, help="timed first saves and loads of 50-node checkpoints (60; quick 8)")
    p.add_argument("--warmup", type=int, help="untimed warm-up saves/loads before those (20; quick 3)")
    p.add_argument("--chains", type=int, help="timed chains/agent loops per incremental-save metric (30; quick 4)")
    p.add_argument("--list-sizes", help="checkpoints in the flow at each listing level (1000,10000,100000)")
    p.add_argument("--list-samples", type=int, help="timed listings per level (30; quick 5)")
    p.add_argument("--clients", help="concurrent clients for the throughput metric (1,4,16)")
    p.add_argument("--seconds", type=float, help="length of each throughput run, in seconds (3; quick 1)")
    p.add_argument("--flow-runs", type=int, help="real-Flow runs with checkpointing off and on, each (15; quick 3)")
    p.add_argument("--cell-budget", type=float, help="stop sampling one slow cell after this many seconds (10)")
    p.add_argument("--growth-runs", type=int, help="agent loops (200 iterations) and 50-node chains timed (6; quick 1)")
    p.add_argument("--cpu-chains", type=int, help="10-node chains saved, and loads, for Redis CPU (100; quick 10)")
    p.add_argument("--saturation-clients", help="client processes against one Redis (1,2,4,8,16; quick 1,4)")
    p.add_argument("--no-chart", action="store_true", help="do not draw chart.png")
    args = p.parse_args(argv)
    for name, (full, quick) in PROFILES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.list_sizes = sorted(int(x) for x in str(args.list_sizes).split(",") if x.strip())
    args.clients = [int(x) for x in str(args.clients).split(",") if x.strip()]
    args.saturation_clients = [int(x) for x in str(args.saturation_clients).split(",") if x.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(ORDER)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    return args


def machine_info(targets: dict[str, Target]) -> dict[str, Any]:
    """CPU, cores, Python, server and library versions, date."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass

    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "redis_server": targets["redis"].version() if "redis" in targets else None,
        "postgresql_server": targets["postgresql"].version() if "postgresql" in targets else None,
        "dynamiq": pkg("dynamiq"),
        "redis_py": pkg("redis"),
        "dynamiq_redis_ckpt": pkg("dynamiq-redis-ckpt") or pkg("dynamiq_redis_ckpt"),
        "git_commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all CPUs busy (steal included) over ``seconds`` while this process sleeps: other work's load."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(1 - (idle1 - idle0) / max(1, total1 - total0), 3)


def json_size(cp: Any) -> int:
    """Bytes of the checkpoint as Dynamiq's own backends serialize it (JSON, reversible markers)."""
    from dynamiq.utils import encode_reversible

    return len(json.dumps(cp.to_dict(), default=encode_reversible).encode())


@contextmanager
def closed_on_error(backend: Any) -> Iterator[None]:
    """Close ``backend`` if the block raises (a set-up that fails leaves no connections or leases behind)."""
    try:
        yield
    except BaseException:
        close_backend(backend)
        raise


class Bench:
    """One benchmark run: the targets, the prebuilt workloads, and the results as they accumulate."""

    def __init__(self, args: argparse.Namespace, targets: dict[str, Target]) -> None:
        self.args = args
        self.targets = targets
        self.metrics: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.context: dict[str, Any] = {}
        self.cost: dict[str, Any] = {}

    # ---- bookkeeping ------------------------------------------------------------------------------------------

    def metric(self, key: str, label: str, kind: str, unit: str, announce: bool = True) -> dict[str, Any]:
        """A new row of the results (``kind``: latency, list, bytes, throughput or overhead)."""
        entry = {"key": key, "label": label, "kind": kind, "unit": unit, "values": {}, "raw_set": None}
        self.metrics.append(entry)
        if announce:
            say(f"\n== {label}")
        return entry

    def cell(self, entry: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one target's measurement, record and print it; a failure is recorded and printed, not raised."""
        try:
            value = fn()
        except Exception as e:
            value = {"error": f"{type(e).__name__}: {e}"}
            say(f"  {name:<11} FAILED {value['error']}")
            say("    " + "".join(traceback.format_exception(e)[-3:]).strip().replace("\n", "\n    "))
        else:
            say(f"  {name:<11} {report.describe(entry, value)}")
        entry["values"][name] = value
        return value

    def note(self, text: str) -> None:
        """Record (and print) something a reader of the results should know."""
        self.notes.append(text)
        say(f"  note: {text}")

    def each(self, space: str, entry: dict[str, Any], body: Callable[[str, Target, str], dict[str, Any]],
             only: tuple[str, ...] | None = None, after: Callable[[Target, str], None] | None = None) -> None:
        """Run ``body(name, target, space)`` for each target (or ``only`` those), then ``after(target, space)`` if
        the cell succeeded, then tear the space down."""
        for name, target in self.targets.items():
            if only is not None and name not in only:
                continue
            try:
                value = self.cell(entry, name, lambda: body(name, target, space))
                if after is not None and "error" not in value:
                    after(target, space)
            finally:
                try:
                    target.teardown(space)
                except Exception as e:
                    say(f"  {name}: teardown of {space} failed: {e}")

    # ---- workloads --------------------------------------------------------------------------------------------

    def build_workloads(self) -> None:
        """Build every checkpoint the latency and throughput metrics save, before anything is timed."""
        a = self.args
        started = time.perf_counter()
        n10 = max(a.warmup + a.samples, CHAIN_WARMUP + a.chains, 48 if a.quick else 160)
        self.chains10 = [list(append_chain(seed, 10)) for seed in range(1, n10 + 1)]
        self.finals50 = [list(append_chain(SEEDS_50 + i, 50))[-1] for i in range(a.warmup + a.samples_50)]
        self.loops = [list(agent_loop(SEEDS_LOOP + i, 20)) for i in range(CHAIN_WARMUP + a.chains)]
        self.context.update({
            "JSON bytes, final snapshot, 10 nodes": json_size(self.chains10[0][-1]),
            "JSON bytes, final snapshot, 50 nodes": json_size(self.finals50[0]),
            "JSON bytes, agent loop after 20 iterations": json_size(self.loops[0][-1]),
        })  # fmt: skip
        say(f"built workloads in {time.perf_counter() - started:.1f} s: {n10} 10-node chains, "
            f"{len(self.finals50)} 50-node checkpoints, {len(self.loops)} agent loops")

    # ---- metrics ----------------------------------------------------------------------------------------------

    def interleave(self, space: str, entry: dict[str, Any], prepare: Callable[[str, Target, str], tuple],
                   floor: Callable[[RedisTarget, str], tuple] | None = None, warm_first: bool = True,
                   floor_op: str = "SET") -> None:
        """Measure a latency on every target at once, their calls taking turns (see
        :func:`measure.interleaved`). ``prepare(name, target, space)`` does the untimed set-up and returns the
        timed calls and the backends to close. ``floor(target, space)`` gives the redis target's raw ``floor_op``
        (SET or GET) calls and a function describing their bytes; they run right after redis's calls in each round.
        ``warm_first``: each block's first call is untimed (calls that begin with an untimed save need not)."""
        runs: dict[str, measure.Calls] = {}
        opened: list[Any] = []
        raw_describe = None
        try:
            for name, target in self.targets.items():
                try:
                    calls, backends = prepare(name, target, space)
                except Exception as e:
                    self._failed(entry, name, e)
                    continue
                opened += backends
                runs[name] = calls
                if floor is not None and isinstance(target, RedisTarget):
                    runs["raw SET"], raw_describe = floor(target, space)
            fewest = min((len(c) for c in runs.values()), default=1)
            rounds = max(1, min(ROUNDS, fewest // BLOCK if warm_first else fewest))
            errors: dict[str, Exception] = {}
            samples = measure.interleaved(runs, rounds, self.args.cell_budget, lambda n, e: errors.setdefault(n, e),
                                          warm_first, follows={"raw SET": "redis"})  # fmt: skip
            for name in runs:
                if name == "raw SET":
                    self._raw_set(entry, samples.get(name), errors.get(name), raw_describe)
                    entry["raw_set"]["op"] = floor_op
                elif name in errors:
                    self._failed(entry, name, errors[name])
                else:
                    self.cell(entry, name, lambda name=name: self._latency(samples[name]))
        finally:
            for backend in opened:
                close_backend(backend)
            for name, target in self.targets.items():
                try:
                    target.teardown(space)
                except Exception as e:
                    say(f"  {name}: teardown of {space} failed: {e}")

    def _failed(self, entry: dict[str, Any], name: str, error: Exception) -> None:
        def fail() -> dict[str, Any]:
            raise error

        self.cell(entry, name, fail)

    def _raw_set(self, entry: dict[str, Any], samples: list[float] | None, error: Exception | None,
                 describe: Callable[[], tuple[int, dict]] | None) -> None:
        if error is not None or not samples or describe is None:
            entry["raw_set"] = {"error": f"{type(error).__name__}: {error}" if error else "no samples"}
            say(f"  raw SET     FAILED {entry['raw_set']['error']}")
            return
        entry["raw_set"] = self._latency(samples)
        entry["raw_set"]["blob_bytes_p50"], entry["raw_set"]["fields"] = describe()
        say(f"  {'raw SET':<11} {report.describe(entry, entry['raw_set'])} "
            f"(blob p50 {entry['raw_set']['blob_bytes_p50']:,} B from fields {entry['raw_set']['fields']})")

    @staticmethod
    def _floor(target: RedisTarget, space: str, checkpoints: list[list[Any]]) -> tuple[measure.Calls, Callable]:
        """Raw SET calls, one per group of checkpoints (a chain's timed snapshots, or one checkpoint), of exactly
        the bytes the redis target stored for each; read back (untimed) when the call runs, after redis saved it."""
        sizes: list[int] = []
        where: dict[str, list[str]] = {}
        key_prefix = f"{target.prefix(space)}:rawset"

        def call(group: int) -> list[float]:
            took = []
            for i, cp in enumerate(checkpoints[group]):
                blob, fields = target.stored_blobs(space, cp)
                sizes.append(len(blob))
                where.update(fields)
                start = time.perf_counter()
                target.client.set(f"{key_prefix}:{group}:{i}", blob)
                took.append(time.perf_counter() - start)
            return took

        calls = [lambda g=g: call(g) for g in range(len(checkpoints))]
        return calls, lambda: (int(measure.percentile(sizes, 50)), where)

    @staticmethod
    def _get_floor(target: RedisTarget, space: str, checkpoints: list[Any]) -> tuple[measure.Calls, Callable]:
        """Raw GET calls, one per checkpoint, of a string holding exactly the bytes a cold load of it reads (its
        hash's fields and every pack down its chains), written untimed when the call runs."""
        sizes: list[int] = []
        key_prefix = f"{target.prefix(space)}:rawget"

        def call(index: int) -> list[float]:
            blob = target.loaded_bytes(space, checkpoints[index])
            sizes.append(len(blob))
            target.client.set(f"{key_prefix}:{index}", blob)
            start = time.perf_counter()
            target.client.get(f"{key_prefix}:{index}")
            return [time.perf_counter() - start]

        calls = [lambda i=i: call(i) for i in range(len(checkpoints))]
        return calls, lambda: (int(measure.percentile(sizes, 50)), {"hash fields and packs": ["all"]})

    def save_first(self, key: str, label: str, finals: list[Any], samples: int, space: str) -> None:
        """Save final snapshots as brand-new checkpoints, one run each; and the raw SET floor of the same bytes."""
        entry = self.metric(key, label, "latency", "ms")
        warm, timed = finals[: self.args.warmup], finals[self.args.warmup : self.args.warmup + samples]

        def prepare(name: str, target: Target, space: str) -> tuple:
            backend = target.make(space)
            with closed_on_error(backend):
                for cp in warm:
                    backend.save(cp)
            return measure.save_calls(backend, timed), [backend]

        def floor(target: RedisTarget, space: str) -> tuple:
            return self._floor(target, space, [[cp] for cp in timed])

        self.interleave(space, entry, prepare, floor=floor)

    def save_incremental(self, key: str, label: str, chains: list[list], space: str, asynchronous: bool = False
                         ) -> None:
        """Save each chain's snapshots in order (APPEND); time every save but the chain's first. The first
        ``CHAIN_WARMUP`` chains are saved untimed."""
        entry = self.metric(key, label, "latency", "ms")
        warm, timed = chains[:CHAIN_WARMUP], chains[CHAIN_WARMUP:]
        if asynchronous:

            def body(name: str, target: Target, space: str) -> dict[str, Any]:
                backend = target.make(space)
                try:
                    return self._latency(measure.save_chains_async(backend, chains, CHAIN_WARMUP))
                finally:
                    close_backend(backend)

            self.each(space, entry, body, only=("redis",))
            return

        def prepare(name: str, target: Target, space: str) -> tuple:
            backend = target.make(space)
            with closed_on_error(backend):
                for chain in warm:
                    measure.save_chain(backend, chain, timed=False)
            return measure.chain_calls(backend, timed), [backend]

        def floor(target: RedisTarget, space: str) -> tuple:
            return self._floor(target, space, [list(chain[1:]) for chain in timed])

        self.interleave(space, entry, prepare, floor=floor, warm_first=False)  # a chain's first save is untimed

    def load(self, key: str, label: str, finals: list[Any], samples: int, space: str) -> None:
        """Load checkpoints written by another backend instance (a cold process cache; InMemory: same instance)."""
        entry = self.metric(key, label, "latency", "ms")
        written = finals[: self.args.warmup + samples]

        def prepare(name: str, target: Target, space: str) -> tuple:
            writer = target.make(space)
            with closed_on_error(writer):
                for cp in written:
                    writer.save(cp)
                reader = target.make(space)  # a second instance: nothing cached (InMemory: the same instance)
                with closed_on_error(reader):
                    ids = [cp.id for cp in written]
                    for cp_id in ids[: self.args.warmup]:
                        reader.load(cp_id)
            backends = [writer] if reader is writer else [writer, reader]
            return measure.load_calls(reader, ids[self.args.warmup :]), backends

        def floor(target: RedisTarget, space: str) -> tuple:
            return self._get_floor(target, space, written[self.args.warmup :])

        self.interleave(space, entry, prepare, floor=floor, floor_op="GET")

    def listing(self) -> None:
        """``get_list_by_flow(flow, limit=10)`` on one flow per ``--list-sizes`` size, filled with that many tiny
        checkpoints; then every (target, size) is sampled in alternating blocks, so the growth from the smallest to
        the largest flow is not a minute's noise."""
        a = self.args
        entries = {n: self.metric(f"list_{n}", f"list newest 10 (N={n:,})", "list", "ms", announce=False)
                   for n in a.list_sizes}  # fmt: skip
        space = "list"
        backends = {name: target.make(space) for name, target in self.targets.items()}
        say("\n== list newest 10: get_list_by_flow(flow, limit=10), one flow per size")
        for name, target in self.targets.items():
            self.note(f"listing fill, {name}: {target.fill_method()}")
        runs: dict[str, measure.Calls] = {}
        fills: dict[str, float] = {}
        failed: set[str] = set()
        first_seed = 0
        try:
            for level in a.list_sizes:
                flow = f"{LIST_FLOW}-{level}"
                started = time.perf_counter()
                batch = [tiny(seed, i, flow_id=flow) for seed in range(first_seed, first_seed + level // 10)
                         for i in range(10)]  # fmt: skip
                first_seed += level // 10
                say(f"-- N={level:,}: built {len(batch):,} checkpoints in {time.perf_counter() - started:.1f} s")
                for name, target in self.targets.items():
                    if target.list_max is not None and level > target.list_max:
                        entries[level]["values"][name] = {"skipped": "fill too slow"}
                        say(f"  {name:<11} skipped (fill too slow: its save globs every run directory, O(N^2))")
                        continue
                    if name in failed:
                        continue
                    try:
                        started = time.perf_counter()
                        target.fill(space, batch, backends[name])
                        fills[f"{name}@{level}"] = round(time.perf_counter() - started, 2)
                        runs[f"{name}@{level}"] = measure.list_calls(backends[name], flow, a.list_samples)
                        say(f"  {name:<11} filled in {fills[f'{name}@{level}']} s")
                    except Exception as e:
                        failed.add(name)
                        self._failed(entries[level], name, e)
                del batch
            errors: dict[str, Exception] = {}
            samples = measure.interleaved(runs, max(1, min(ROUNDS, a.list_samples // BLOCK)), a.cell_budget,
                                          lambda n, e: errors.setdefault(n, e))  # fmt: skip
            for level in a.list_sizes:
                say(f"-- N={level:,}")
                for name in self.targets:
                    pair = f"{name}@{level}"
                    if pair in errors:
                        self._failed(entries[level], name, errors[pair])
                    elif pair in samples:
                        value = {**self._latency(samples[pair]), "fill_seconds": fills[pair]}
                        self.cell(entries[level], name, lambda value=value: value)
        finally:
            for name, target in self.targets.items():
                close_backend(backends[name])
                try:
                    target.teardown(space)
                except Exception as e:
                    say(f"  {name}: teardown of {space} failed: {e}")

    def bytes_per_run(self, key: str, label: str, chain: list[Any], what: str) -> None:
        """What the snapshots of one run occupy in each store."""
        entry = self.metric(key, label, "bytes", "bytes")
        final, total = json_size(chain[-1]), sum(json_size(cp) for cp in chain)
        self.context[f"JSON bytes, {what}, final snapshot"] = final
        self.context[f"JSON bytes, {what}, all {len(chain)} snapshots"] = total
        say(f"  context: JSON of the final snapshot {final:,} B, of all {len(chain)} snapshots {total:,} B")

        def body(name: str, target: Target, space: str) -> dict[str, Any]:
            backend = target.make(space)
            try:
                before = target.storage(space)
                for cp in chain:
                    backend.save(cp)
                after = target.storage(space)
                end = measure.closing(chain[-1])
                if end is not None:  # end a run left active, so no lease of it outlives this cell (not counted)
                    backend.save(end)
            finally:
                close_backend(backend)
            if after is None:
                return {"na": "objects in process memory: no byte size"}
            grown = {k: after[k] - (before or {}).get(k, 0) for k in after}
            main = {"redis": "memory_usage", "filesystem": "files", "postgresql": "total_relation_size"}[name]
            return {"bytes": grown[main], "measure": main, **{k: v for k, v in grown.items() if k != main}}

        self.each(key, entry, body)

    def throughput(self) -> None:
        """Total saves/s of 1, 4, 16... concurrent clients saving APPEND chains."""
        a = self.args
        for clients in a.clients:
            entry = self.metric(f"throughput_{clients}", f"throughput, {clients} client{'s' * (clients > 1)}",
                                "throughput", "saves/s")  # fmt: skip

            def body(name: str, target: Target, space: str, clients=clients) -> dict[str, Any]:
                close_backend(target.make(space))  # create the table/dir once, before the clients race to
                rate = measure.throughput(lambda: target.make(space), self.chains10, clients, a.seconds,
                                          target.parallel, f"n{clients}")  # fmt: skip
                return {"saves_per_s": rate, "mode": target.parallel, "seconds": a.seconds}

            self.each(f"tp{clients}", entry, body)
        if "inmemory" in self.targets:
            self.note("throughput, inmemory: clients are threads sharing one InMemory (it lives in one process); "
                      "other targets: one forked process per client, each with its own backend")  # fmt: skip

    def flow_overhead(self) -> None:
        """Per-node cost of checkpointing a real 10-node Flow: run time with checkpointing on minus off."""
        from dynamiq_redis_ckpt.bench.flow import agent_flow, runner

        entry = self.metric("flow_overhead", "per-node overhead of a real Flow", "overhead", "ms/node")
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import dynamiq.nodes.tools  # noqa: F401  (a Flow run imports it on first use; seconds, not timed)

        say(f"  (loaded dynamiq's node modules in {time.perf_counter() - started:.1f} s, untimed)")
        query = "Summarise the open invoices of the customer and draft a reply."

        def body(name: str, target: Target, space: str) -> dict[str, Any]:
            backend = target.make(space)
            try:
                on = runner(agent_flow(backend), query)
                off = runner(agent_flow(None), query)
                return measure.flow_overhead(off, on, self.args.flow_runs, nodes=10)
            finally:
                close_backend(backend)

        self.each("flow", entry, body)

    # ---- helpers ----------------------------------------------------------------------------------------------

    @staticmethod
    def _latency(samples: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = measure.summary(samples)
        out["samples_ms"] = [round(s * 1e3, 4) for s in samples]
        return out

    def run(self) -> None:
        """Every metric, in order."""
        a = self.args
        self.build_workloads()
        finals10 = [chain[-1] for chain in self.chains10]
        self.save_first("save_first_10", "save, first (10 nodes)", finals10, a.samples, "sf10")
        self.save_first("save_first_50", "save, first (50 nodes)", self.finals50, a.samples_50, "sf50")
        chains = self.chains10[: CHAIN_WARMUP + a.chains]
        self.save_incremental("incr_10", "save, incremental APPEND (10 nodes)", chains, "inc10")
        self.save_incremental("incr_loop", "save, incremental APPEND (agent loop, 20 iterations)", self.loops, "incag")
        if "redis" in self.targets:
            self.save_incremental("incr_10_async", "save, incremental APPEND (10 nodes), async", chains, "inc10a",
                                  asynchronous=True)  # fmt: skip
        self.load("load_10", "load (10 nodes)", finals10, a.samples, "ld10")
        self.load("load_50", "load (50 nodes)", self.finals50, a.samples_50, "ld50")
        self.listing()
        self.bytes_per_run("bytes_20", "bytes per 20-node APPEND run", list(append_chain(SEED_BYTES, 20)),
                           "20-node run")  # fmt: skip
        self.bytes_per_run("bytes_loop", "bytes per agent loop (20 iterations)", list(agent_loop(SEED_BYTES, 20)),
                           "agent loop")  # fmt: skip
        self.throughput()
        if "redis" in self.targets:
            self.cost = cost.run(self.targets["redis"], a, self.chains10, say)
        self.flow_overhead()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``fleet ...``: the fleet benchmark instead); returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fleet"]:
        from dynamiq_redis_ckpt.bench.fleet import main as fleet

        return fleet(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    logging.getLogger("dynamiq.utils.logger").setLevel(logging.WARNING)  # no per-node INFO lines in timed runs
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    tag = secrets.token_hex(3)
    try:
        targets = build_targets(args.targets, redis_url=args.redis_url, pg_dsn=args.pg_dsn, tag=tag, say=say)
    except Exception as e:
        say(f"cannot set up the benchmark: {type(e).__name__}: {e}")
        return 2
    if not targets:
        say("no target is available")
        return 2
    bench = Bench(args, targets)
    results: dict[str, Any] = {}
    try:
        results["machine"] = machine_info(targets)
        say(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
            f"Python {results['machine']['python']}, dynamiq {results['machine']['dynamiq']}")  # fmt: skip
        busy = results["machine"]["cpu_busy_before_start"] = cpu_busy()
        if busy is not None and busy > 0.2:
            bench.note(f"{busy:.0%} of the CPUs were busy with other work just before the start: the numbers will "
                       "be noisy")  # fmt: skip
        with as_running_flow():  # saves fenced by their run's lease, as a running Flow's are (plain calls are not)
            bench.run()
    except KeyboardInterrupt:
        say("interrupted: writing what was measured")
    finally:
        for target in targets.values():
            try:
                target.close()
            except Exception as e:
                say(f"{target.name}: cleanup failed: {e}")
    wall = time.perf_counter() - started
    if "machine" in results:
        results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    config = {k: v for k, v in vars(args).items() if k not in ("pg_dsn", "redis_url")}
    config["pg_dsn"] = mask_url(args.pg_dsn)
    config["redis_url"] = mask_url(args.redis_url)
    results.update({
        "config": config, "targets": list(targets), "metrics": bench.metrics, "notes": bench.notes,
        "context": bench.context, "cost": bench.cost, "wall_seconds": round(wall, 1),
    })  # fmt: skip
    results["checks"] = report.checks(results)
    text = report.markdown(results)
    print(text)
    written = report.write(results, text, args.out, draw_chart=not args.no_chart, say=say)
    say(f"\nwrote {', '.join(written)}; wall time {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
