"""One Redis holding a million snapshots: fill, memory, reads, retention and expiry at that size.

``python3 -m dynamiq_redis_ckpt.bench.million --snapshots 1000000 --out bench-results`` starts a private
redis-server (or takes ``--redis-url``), fills it through ``RedisCheckpointBackend.save`` from forked processes,
prints a table and writes ``million.json`` and ``million.md``. Nothing here asserts a speed; it prints numbers.

The workload is :mod:`~dynamiq_redis_ckpt.bench.workloads`' agent-like runs of ``SNAPSHOTS_PER_RUN`` APPEND
snapshots each, spread round-robin over up to ``FLOWS`` flows: four flows in five hold 9-node agent flows
(``append_chain``: a snapshot before the first node and one per node, the last one completed), every fifth holds
one agent checkpointing each loop iteration (``agent_loop``, 8 iterations, then the snapshot that ends its run).
A run's id picks its seed, so the content of every snapshot is deterministic and a measurement can rebuild any of
them (its id, its run) without reading it back.

Measured, in this order: the fill (seconds, saves/s); ``INFO memory`` before and after, ``DBSIZE`` and a breakdown
by key kind (every key of the namespace counted by ``SCAN``, ``MEMORY USAGE`` of a sample of each kind); list and
load latencies at that size (warm: one backend; cold: a fresh backend per load); one ``cleanup_by_flow`` as Dynamiq
calls it (keep 10, its default window of 1,000 newest); deleting a whole flow's history; and, in a second namespace
with ``ttl_seconds``, how long after the ttl Redis's active expiry takes to remove every key of a tenth as many
snapshots, and how much memory comes back.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt.bench import workloads
from dynamiq_redis_ckpt.bench.measure import closing, summary
from dynamiq_redis_ckpt.keys import glob_escape, tag

SNAPSHOTS_PER_RUN = 10
FLOWS = 100
RUNS_PER_FLOW_MIN = 10  # small counts get fewer flows, not fewer runs per flow
AGENT_EVERY = 5  # flow i holds agent loops when i % AGENT_EVERY == AGENT_EVERY - 1
FILL_PROCESSES = 2
MAXMEMORY = 12 << 30  # a private server's cap (the machine has 24 GiB); noeviction, as production runs it
READ_SAMPLES = 200
KIND_SAMPLES = 1000  # MEMORY USAGE calls per key kind
JSON_SAMPLE_RUNS = 100
CLEANUP_KEEP = 10
TTL_SHARE = 10  # the expiry namespace holds snapshots / TTL_SHARE snapshots
EXPIRY_WAIT_MAX = 300.0  # give up waiting for active expiry this long after the ttl
SCAN_COUNT = 10_000

Say = Callable[[str], None]


# ---- the workload -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Which runs make up ``snapshots`` snapshots, and in which flows: run ``r`` (its seed) lives in flow
    ``r % flows``; the last run is cut short so the total is exact."""

    snapshots: int

    @property
    def runs(self) -> int:
        """How many runs (the last may hold fewer snapshots)."""
        return math.ceil(self.snapshots / SNAPSHOTS_PER_RUN)

    @property
    def flows(self) -> int:
        """How many flows the runs spread over."""
        return max(1, min(FLOWS, self.runs // RUNS_PER_FLOW_MIN))

    def flow_id(self, index: int) -> str:
        """The id of flow ``index``."""
        return f"flow-{index:03d}"

    def flow_of(self, run: int) -> str:
        """The flow of run ``run``."""
        return self.flow_id(run % self.flows)

    def is_agent_flow(self, index: int) -> bool:
        """Whether flow ``index`` holds agent loops (else agent flows' APPEND chains)."""
        return index % AGENT_EVERY == AGENT_EVERY - 1

    def snapshots_of(self, run: int) -> list[FlowCheckpoint]:
        """The snapshots run ``run`` saves, in order."""
        flow = self.flow_of(run)
        if self.is_agent_flow(run % self.flows):
            loop = list(workloads.agent_loop(run, SNAPSHOTS_PER_RUN - 2, flow_id=flow))
            snaps = loop + [closing(loop[-1])]
        else:
            snaps = list(workloads.append_chain(run, SNAPSHOTS_PER_RUN - 1, flow_id=flow))
        return snaps[: self.snapshots - run * SNAPSHOTS_PER_RUN]

    def describe(self) -> str:
        """One line saying what the snapshots are."""
        agents = sum(self.is_agent_flow(i) for i in range(self.flows))
        return (f"{self.runs:,} runs of {SNAPSHOTS_PER_RUN} APPEND snapshots in {self.flows} flows: "
                f"{self.flows - agents} flows of 9-node agent flows (append_chain), {agents} of one agent "
                f"checkpointing each of 8 loop iterations and its end (agent_loop)")  # fmt: skip


def json_bytes(plan: Plan) -> dict[str, float]:
    """Dynamiq's JSON of the snapshots of the first runs (every kind of flow): what FileSystem or PostgreSQL
    would store per snapshot."""
    from dynamiq.utils import encode_reversible

    sizes = [len(json.dumps(cp.to_dict(), default=encode_reversible).encode())
             for run in range(min(plan.runs, JSON_SAMPLE_RUNS)) for cp in plan.snapshots_of(run)]  # fmt: skip
    return {"mean": sum(sizes) / len(sizes), "min": min(sizes), "max": max(sizes), "sampled": len(sizes)}


# ---- Redis helpers ----------------------------------------------------------------------------------------------


def _backend(url: str, prefix: str, **options: Any) -> Any:
    from dynamiq_redis_ckpt.backend import RedisCheckpointBackend

    return RedisCheckpointBackend(url=url, prefix=prefix, leases=False, socket_timeout=60, **options)


def _used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def _keyspace(client: Any) -> dict[str, int]:
    db = client.info("keyspace").get(f"db{client.connection_pool.connection_kwargs.get('db', 0)}") or {}
    return {"keys": int(db.get("keys", 0)), "expires": int(db.get("expires", 0))}


def _scan(client: Any, prefix: str) -> Iterator[bytes]:
    return client.scan_iter(match=glob_escape(prefix) + ":*", count=SCAN_COUNT)


def key_kind(prefix: str, key: str) -> str:
    """What a key of namespace ``prefix`` is: its kind (``cp``, ``pack``, ``id``...), a flow's sorted sets told
    apart (``flow`` every checkpoint, ``flow:st`` by status, ``flow:run`` by run, ``flow:leases``...)."""
    kind, _, rest = key[len(prefix) + 1 :].partition(":")
    if kind != "flow":
        return kind
    tail = rest[rest.find("}") + 1 :]
    return "flow" + (":" + tail.split(":")[1] if tail else "")


def key_kinds(client: Any, prefix: str, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every key of the namespace counted by kind (SCAN), and ``MEMORY USAGE`` of a random sample of each kind
    (up to ``KIND_SAMPLES``) extrapolated to the kind's count."""
    rng, counts, samples = random.Random(seed), {}, {}
    for raw in _scan(client, prefix):
        kind = key_kind(prefix, raw.decode())
        counts[kind] = seen = counts.get(kind, 0) + 1
        pool = samples.setdefault(kind, [])
        if len(pool) < KIND_SAMPLES:
            pool.append(raw)
        elif (slot := rng.randrange(seen)) < KIND_SAMPLES:  # reservoir sampling: a uniform sample of the kind
            pool[slot] = raw
    kinds = {}
    for kind in sorted(counts, key=lambda k: -counts[k]):
        pipe = client.pipeline(transaction=False)
        for key in samples[kind]:
            pipe.memory_usage(key, samples=0)
        sizes = [s for s in pipe.execute() if s]
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        kinds[kind] = {"keys": counts[kind], "sampled": len(sizes), "mean_bytes": mean,
                       "bytes": mean * counts[kind]}  # fmt: skip
    return kinds


def unlink_namespace(client: Any, prefix: str) -> int:
    """Remove every key of the namespace (SCAN + UNLINK); how many."""
    removed, batch = 0, []
    for key in _scan(client, prefix):
        batch.append(key)
        if len(batch) >= 1000:
            removed += client.unlink(*batch)
            batch = []
    return removed + (client.unlink(*batch) if batch else 0)


# ---- fill -------------------------------------------------------------------------------------------------------


def _fill_child(url: str, prefix: str, plan: Plan, part: int, parts: int, ttl: float | None, done: Any,
                errors: Any) -> None:  # fmt: skip
    try:
        backend = _backend(url, prefix, ttl_seconds=ttl)
        for run in range(part, plan.runs, parts):
            snaps = plan.snapshots_of(run)
            for cp in snaps:
                backend.save(cp)
            with done.get_lock():
                done.value += len(snaps)
        backend.close()
    except BaseException as e:
        errors.put(f"{type(e).__name__}: {e}")
        raise


def fill(url: str, prefix: str, plan: Plan, say: Say, *, ttl: float | None = None,
         processes: int = FILL_PROCESSES) -> dict[str, Any]:  # fmt: skip
    """Save every snapshot of ``plan`` through ``backend.save`` from ``processes`` forked processes (each its own
    backend, leases off: these runs are not live), saying progress every 15 s; seconds and saves/s."""
    ctx = multiprocessing.get_context("fork")
    done, errors = ctx.Value("q", 0), ctx.Queue()
    n = max(1, min(processes, plan.runs))
    started = time.perf_counter()
    procs = [ctx.Process(target=_fill_child, args=(url, prefix, plan, i, n, ttl, done, errors)) for i in range(n)]
    for p in procs:
        p.start()
    while alive := [p.sentinel for p in procs if p.is_alive()]:
        if not multiprocessing.connection.wait(alive, timeout=15):
            took = time.perf_counter() - started
            say(f"  {done.value:,} / {plan.snapshots:,} saved in {took:.0f} s ({done.value / took:,.0f}/s)")
    for p in procs:
        p.join()
    seconds = time.perf_counter() - started
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"fill: {errors.get() if not errors.empty() else 'a filler process failed'}")
    return {"seconds": seconds, "saves_per_s": plan.snapshots / seconds, "processes": n}


# ---- reads ------------------------------------------------------------------------------------------------------


def _timed(samples: list[float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    samples.append(time.perf_counter() - start)
    return result


def _latency(samples: list[float], **extra: Any) -> dict[str, Any]:
    return {**summary(samples), **extra}


def reads(url: str, prefix: str, plan: Plan, rng: random.Random, samples: int = READ_SAMPLES) -> dict[str, Any]:
    """Lists and loads at this size: newest 10 of a flow, a run's snapshots (by flow and run, and by run alone),
    loads of random snapshots by a warm backend and by a fresh backend per load."""
    backend = _backend(url, prefix)
    runs = [rng.randrange(plan.runs) for _ in range(samples)]
    picks = [(run, rng.randrange(len(plan.snapshots_of(run)))) for run in runs]
    for run in runs[:5]:  # connections, scripts: not what is measured
        backend.get_list_by_flow(plan.flow_of(run), limit=10)
    newest, by_flow_run, by_run, warm, cold, ids = [], [], [], [], [], []
    got = {"newest": 0, "flow_run": 0, "run": 0, "warm": 0, "cold": 0}
    for run, step in picks:
        flow, snaps = plan.flow_of(run), plan.snapshots_of(run)
        got["newest"] += len(_timed(newest, lambda: backend.get_list_by_flow(flow, limit=10)))
        got["flow_run"] += len(_timed(by_flow_run, lambda: backend.get_list_by_flow_and_run(flow, snaps[0].run_id)))
        got["run"] += len(_timed(by_run, lambda: backend.get_list_by_run(snaps[0].run_id)))
        got["warm"] += _timed(warm, lambda: backend.load(snaps[step].id)) is not None
        ids.append(snaps[step].id)
    backend.close()
    for cp_id in ids:
        fresh = _backend(url, prefix)
        got["cold"] += _timed(cold, lambda: fresh.load(cp_id)) is not None
        fresh.close()
    expected_run = sum(len(plan.snapshots_of(run)) for run in runs)
    return {
        "list_newest_10": _latency(newest, returned=got["newest"], expected=10 * samples),
        "list_flow_and_run": _latency(by_flow_run, returned=got["flow_run"], expected=expected_run),
        "list_run": _latency(by_run, returned=got["run"], expected=expected_run),
        "load_warm": _latency(warm, found=got["warm"]),
        "load_cold": _latency(cold, found=got["cold"]),
    }


# ---- retention --------------------------------------------------------------------------------------------------


def _flow_size(client: Any, prefix: str, flow: str) -> int:
    return int(client.zcard(f"{prefix}:flow:{tag(flow)}"))


def stored_checkpoints(client: Any, prefix: str, plan: Plan) -> int:
    """Checkpoints in the flows' indexes."""
    pipe = client.pipeline(transaction=False)
    for i in range(plan.flows):
        pipe.zcard(f"{prefix}:flow:{tag(plan.flow_id(i))}")
    return sum(pipe.execute())


def flow_keys_left(client: Any, prefix: str, flow: str) -> dict[str, int]:
    """Keys left in the home of ``flow`` (its checkpoints, indexes, packs, leases), by kind (one SCAN)."""
    left: dict[str, int] = {}
    for raw in client.scan_iter(match=f"{glob_escape(prefix)}:*:{glob_escape(tag(flow))}*", count=SCAN_COUNT):
        kind = key_kind(prefix, raw.decode())
        left[kind] = left.get(kind, 0) + 1
    return left


def cleanup(url: str, client: Any, prefix: str, flow: str) -> dict[str, Any]:
    """One ``cleanup_by_flow(flow, keep_count=10)`` as Dynamiq calls it (its default window of newest checkpoints)."""
    backend = _backend(url, prefix)
    before = _flow_size(client, prefix, flow)
    start = time.perf_counter()
    removed = backend.cleanup_by_flow(flow, keep_count=CLEANUP_KEEP)
    seconds = time.perf_counter() - start
    window = backend.max_cleanup_results
    backend.close()
    return {"flow": flow, "before": before, "keep_count": CLEANUP_KEEP, "window": window, "removed": removed,
            "expected": max(0, min(before, window) - CLEANUP_KEEP), "after": _flow_size(client, prefix, flow),
            "seconds": seconds}  # fmt: skip


def delete_flow(url: str, client: Any, prefix: str, flow: str) -> dict[str, Any]:
    """A whole flow's history deleted: ``cleanup_by_flow(flow, keep_count=0)`` with a window as large as the flow;
    the memory it gave back and the keys of the flow's home left."""
    before = _flow_size(client, prefix, flow)
    backend = _backend(url, prefix, max_cleanup_results=before + 1)
    memory = _used_memory(client)
    start = time.perf_counter()
    removed = backend.cleanup_by_flow(flow, keep_count=0)
    seconds = time.perf_counter() - start
    backend.close()
    freed = memory - _used_memory(client)
    return {"flow": flow, "before": before, "removed": removed, "seconds": seconds,
            "per_checkpoint_ms": seconds * 1e3 / max(1, removed), "memory_freed": freed,
            "keys_left": flow_keys_left(client, prefix, flow)}  # fmt: skip


# ---- expiry -----------------------------------------------------------------------------------------------------


def _wait_expired(client: Any, baseline: int, deadline: float, poll: float = 0.1) -> tuple[float, list]:
    """Poll ``INFO keyspace`` until no more keys than ``baseline`` carry an expiry, or ``deadline`` passes; when it
    emptied (monotonic) and (seconds, keys with expiry) points along the way."""
    trace = []
    while True:
        now, expires = time.monotonic(), _keyspace(client)["expires"]
        if not trace or trace[-1][1] != expires:
            trace.append((now, expires))
        if expires <= baseline or now > deadline:
            return now, trace
        time.sleep(poll)


def expiry(url: str, client: Any, prefix: str, snapshots: int, rate: float, say: Say) -> dict[str, Any]:
    """Fill namespace ``prefix`` with ``snapshots`` snapshots saved with a ttl a bit longer than the fill should
    take (estimated from ``rate`` saves/s), then measure how long after the last snapshot's ttl Redis's active
    expiry has removed every expiring key, and the memory that came back."""
    plan = Plan(snapshots)
    ttl = max(3.0, math.ceil(snapshots / rate * 2) + 2.0)  # twice the estimate: a busy machine slows fills
    baseline, memory = _keyspace(client)["expires"], _used_memory(client)
    say(f"expiry: {snapshots:,} snapshots with ttl_seconds={ttl:g}")
    filled = fill(url, prefix, plan, say, ttl=ttl)
    end = time.monotonic()
    alive, peak = _keyspace(client)["expires"] - baseline, _used_memory(client)
    due = end + ttl
    say(f"  filled in {filled['seconds']:.1f} s, {alive:,} keys with a ttl; waiting for active expiry")
    emptied, trace = _wait_expired(client, baseline, due + EXPIRY_WAIT_MAX)
    at_due = next((n for t, n in reversed(trace) if t <= due), alive) - baseline
    left = _keyspace(client)["expires"] - baseline
    after = _used_memory(client)
    keys_left: dict[str, int] = {}
    examples: list[str] = []  # keys that outlived the ttl, but the catalog's (which never expires)
    for raw in _scan(client, prefix):
        kind = key_kind(prefix, raw.decode())
        keys_left[kind] = keys_left.get(kind, 0) + 1
        if kind != "catalog" and len(examples) < 10:
            examples.append(raw.decode())
    return {"snapshots": snapshots, "ttl_seconds": ttl, "fill_seconds": filled["seconds"],
            "fill_longer_than_ttl": filled["seconds"] > ttl, "keys_with_ttl": alive,
            "keys_with_ttl_at_ttl": at_due, "emptied": left <= 0, "expiring_keys_left": max(0, left),
            "seconds_after_ttl": emptied - due, "seconds_after_fill": emptied - end,
            "memory_added": peak - memory, "memory_returned": peak - after,
            "bytes_per_snapshot": (peak - memory) / snapshots, "keys_left": keys_left,
            "examples_left": examples}  # fmt: skip


# ---- the whole benchmark ----------------------------------------------------------------------------------------


def _start_server(say: Say) -> tuple[Any, str]:
    from dynamiq_redis_ckpt.embedded import start_embedded_redis

    server = start_embedded_redis()
    if server.url is None:
        server.close()
        raise RuntimeError("the million benchmark needs a redis-server binary on PATH, or a redis url")
    import redis

    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory", MAXMEMORY)
    client.config_set("maxmemory-policy", "noeviction")
    client.close()
    say(f"private redis-server at {server.url}, maxmemory {MAXMEMORY >> 30} GiB, noeviction")
    return server, server.url


def _memory(client: Any, before: int, snapshots: int) -> dict[str, Any]:
    info = client.info("memory")
    used = int(info["used_memory"])
    return {"before": before, "after": used, "added": used - before, "bytes_per_snapshot": (used - before) / snapshots,
            "rss_after": int(info["used_memory_rss"]), "dataset_after": int(info.get("used_memory_dataset", 0))}


def run_million(redis_url: str | None, snapshots: int, say: Say) -> dict[str, Any]:
    """Fill one Redis with ``snapshots`` snapshots and measure it (see the module's docstring); returns a
    JSON-serialisable dict. With no ``redis_url`` a private redis-server is started and stopped; with one, only
    this run's namespaces are written, and removed at the end."""
    import redis

    wall = time.perf_counter()
    server, url = _start_server(say) if redis_url is None else (None, redis_url)
    prefix = f"bench-million-{os.getpid()}"
    client = redis.Redis.from_url(url, socket_timeout=120)
    try:
        plan = Plan(snapshots)
        result: dict[str, Any] = {"snapshots": snapshots, "started": datetime.now(timezone.utc).isoformat(
            timespec="seconds"), "redis_version": client.info("server")["redis_version"], "private_server":
            server is not None, "workload": plan.describe(), "runs": plan.runs, "flows": plan.flows,
            "snapshots_per_run": SNAPSHOTS_PER_RUN}  # fmt: skip
        result["json_bytes_per_snapshot"] = json_bytes(plan)
        say(f"{snapshots:,} snapshots: {plan.describe()}; Dynamiq JSON "
            f"{result['json_bytes_per_snapshot']['mean']:,.0f} B per snapshot on average")
        result.update(_measure(url, client, prefix, plan, say))
    finally:
        for space in (prefix, prefix + "-ttl"):
            if server is None:
                unlink_namespace(client, space)
        client.close()
        if server is not None:
            server.close()
    result["wall_seconds"] = time.perf_counter() - wall
    say(f"done in {result['wall_seconds']:.0f} s")
    return result


def _measure(url: str, client: Any, prefix: str, plan: Plan, say: Say) -> dict[str, Any]:
    out: dict[str, Any] = {}
    before = _used_memory(client)
    out["fill"] = fill(url, prefix, plan, say)
    say(f"fill: {out['fill']['seconds']:.1f} s, {out['fill']['saves_per_s']:,.0f} saves/s")
    out["stored"] = stored_checkpoints(client, prefix, plan)
    out["dbsize"] = int(client.dbsize())
    out["memory"] = _memory(client, before, plan.snapshots)
    say(f"memory: {out['memory']['added']:,} B added, {out['memory']['bytes_per_snapshot']:,.0f} B per snapshot; "
        f"{out['stored']:,} stored, {out['dbsize']:,} keys; counting keys by kind")
    out["kinds"] = key_kinds(client, prefix)
    say("reads: lists and loads")
    out["reads"] = reads(url, prefix, plan, random.Random(1))
    say("retention: cleanup_by_flow, then a whole flow deleted")
    out["cleanup"] = cleanup(url, client, prefix, plan.flow_id(0))
    if plan.flows > 1:
        out["delete_flow"] = delete_flow(url, client, prefix, plan.flow_id(1))
    out["expiry"] = expiry(url, client, prefix + "-ttl", max(SNAPSHOTS_PER_RUN, plan.snapshots // TTL_SHARE),
                           out["fill"]["saves_per_s"], say)  # fmt: skip
    return out


# ---- presenting ---------------------------------------------------------------------------------------------------


def _ms(lat: dict[str, Any]) -> str:
    return f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} ms (n={lat['n']})"


def _mib(value: float) -> str:
    return f"{value / (1 << 20):,.1f} MiB"


def _kinds_table(kinds: dict[str, dict[str, Any]]) -> list[str]:
    total = sum(k["bytes"] for k in kinds.values()) or 1
    lines = ["| key kind | keys | mean `MEMORY USAGE` (sampled) | est. total | share |", "|---|---:|---:|---:|---:|"]
    for name, k in kinds.items():
        lines.append(f"| `{name}` | {k['keys']:,} | {k['mean_bytes']:,.0f} B ({k['sampled']:,}) | "
                     f"{_mib(k['bytes'])} | {k['bytes'] / total:.1%} |")  # fmt: skip
    return lines


def render(section: dict[str, Any]) -> str:
    """The results of :func:`run_million` as a markdown section."""
    s, fill_, mem, rd = section, section["fill"], section["memory"], section["reads"]
    js, cl, ex = s["json_bytes_per_snapshot"], s["cleanup"], s["expiry"]
    rows = [
        ("snapshots stored (flow indexes) / keys (`DBSIZE`)", f"{s['stored']:,} / {s['dbsize']:,}"),
        ("fill", f"{fill_['seconds']:,.1f} s, {fill_['saves_per_s']:,.0f} saves/s "
                 f"(`backend.save` from {fill_['processes']} forked processes, leases off)"),
        ("`used_memory` before / after",
         f"{_mib(mem['before'])} / {_mib(mem['after'])} (rss {_mib(mem['rss_after'])})"),
        ("bytes per snapshot in Redis", f"{mem['bytes_per_snapshot']:,.0f} B "
                                        f"({mem['bytes_per_snapshot'] / js['mean']:.1%} of its Dynamiq JSON)"),
        ("`get_list_by_flow(limit=10)` p50 / p99", _ms(rd["list_newest_10"])),
        ("`get_list_by_flow_and_run` (a run's snapshots) p50 / p99", _ms(rd["list_flow_and_run"])),
        ("`get_list_by_run` p50 / p99", _ms(rd["list_run"])),
        ("`load`, warm backend, random snapshot p50 / p99", _ms(rd["load_warm"])),
        ("`load`, fresh backend per load p50 / p99", _ms(rd["load_cold"])),
        (f"`cleanup_by_flow(keep_count={cl['keep_count']})`, window {cl['window']:,}",
         f"{cl['removed']:,} of {cl['before']:,} removed in {cl['seconds']:.2f} s"),
    ]  # fmt: skip
    if "delete_flow" in s:
        df = s["delete_flow"]
        rows.append(("a whole flow's history deleted (`keep_count=0`)",
                     f"{df['removed']:,} checkpoints in {df['seconds']:.2f} s ({df['per_checkpoint_ms']:.3f} ms "
                     f"each), {_mib(df['memory_freed'])} freed"))  # fmt: skip
    rows += [
        (f"expiry: {ex['snapshots']:,} snapshots, `ttl_seconds={ex['ttl_seconds']:g}`",
         f"{ex['keys_with_ttl']:,} keys with a ttl (fill {ex['fill_seconds']:.0f} s); "
         + (f"{ex['keys_with_ttl_at_ttl']:,} not yet removed when the last ttl ran out, all gone "
            f"{ex['seconds_after_ttl']:.2f} s later (`INFO keyspace` polled every 0.1 s)" if ex["emptied"] else
            f"{ex['expiring_keys_left']:,} still there {ex['seconds_after_ttl']:.0f} s after the last ttl")),
        ("expiry: memory added / returned", f"{_mib(ex['memory_added'])} / {_mib(ex['memory_returned'])}"
         + (" (the fill took longer than the ttl: its first keys expired before the peak)"
            if ex["fill_longer_than_ttl"] else "")),
        ("expiry: keys of that namespace left with no ttl",
         ", ".join(f"`{kind}` {n:,}" for kind, n in sorted(ex["keys_left"].items())) or "none"),
        ("wall time", f"{s['wall_seconds']:,.0f} s"),
    ]  # fmt: skip
    lines = [f"## One Redis, {s['snapshots']:,} snapshots", "",
             f"{s['started']} · redis-server {s['redis_version']} · {s['workload']}. Each snapshot's Dynamiq JSON "
             f"(what FileSystem or PostgreSQL store): {js['mean']:,.0f} B on average ({js['min']:,}–{js['max']:,} B, "
             f"{js['sampled']:,} sampled).", "", "| measurement | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {label} | {value} |" for label, value in rows]
    lines += ["", "Keys by kind (every key counted by `SCAN`, `MEMORY USAGE ... SAMPLES 0` of a random sample):", ""]
    lines += _kinds_table(s["kinds"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python3 -m dynamiq_redis_ckpt.bench.million``: run, print the table, write million.json and million.md."""
    p = argparse.ArgumentParser(prog="python3 -m dynamiq_redis_ckpt.bench.million", description=__doc__.split("\n")[0])
    p.add_argument("--snapshots", type=int, default=1_000_000, help="snapshots to store (default 1,000,000)")
    p.add_argument("--out", default="bench-results", help="directory for million.json and million.md")
    p.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    args = p.parse_args(argv)

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    result = run_million(args.redis_url, args.snapshots, say)
    text = render(result)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "million.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out, "million.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
