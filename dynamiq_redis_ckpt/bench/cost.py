"""What a save and a load cost as runs grow, and what they cost the Redis server (redis target only).

* **Growth**: the p50 of an incremental save at iteration 20 and 199 of an agent loop (one node whose message
  history grows), and at node 5 and 50 of a 50-node APPEND chain, measured in the same runs; their ratio is how a
  save's cost grows with what did not change.
* **Redis CPU**: per incremental save (10-node chains, leases on), per first save and per cold load of a 10-node
  checkpoint (a process that holds nothing of it), two ways: ``INFO commandstats`` (the scripts: EVAL/EVALSHA time,
  which includes the commands they run, plus the commands sent outside scripts, counted from the client's own
  requests), and the server's main-thread CPU (``INFO cpu``: parsing, replies and networking too).
* **Saturation**: saves/s of N client processes against one Redis, with the share of a core the server's main
  thread used, and the saves/s one shard would sustain at its measured CPU per save.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from dynamiq_redis_ckpt.bench import measure
from dynamiq_redis_ckpt.bench.targets import RedisTarget, close_backend
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain

SEEDS_GROWTH_LOOP, SEEDS_GROWTH_CHAIN, SEEDS_CPU = 500_000, 510_000, 520_000
LOOP_AT, CHAIN_AT = (20, 199), (5, 50)
WINDOW = 5  # the saves up to and including the iteration (node) measured count: more samples, about the same size
_META = {"info", "config|resetstat", "config", "ping", "client|setinfo", "hello", "select"}


def growth(target: RedisTarget, runs: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Save ``runs`` agent loops of 200 iterations and ``runs`` 50-node chains, in alternation, timing every save;
    the p50 of the ``WINDOW`` saves up to each iteration (node) of ``LOOP_AT`` (``CHAIN_AT``), and the ratio of
    the larger to the smaller."""
    backend = target.make("growth")
    loops: dict[int, list[float]] = {at: [] for at in LOOP_AT}
    chains: dict[int, list[float]] = {at: [] for at in CHAIN_AT}
    try:
        for run in range(runs + 1):  # the first of each is a warm-up
            for kind, snapshots, picks, out in (
                ("loop", list(agent_loop(SEEDS_GROWTH_LOOP + run, max(LOOP_AT))), LOOP_AT, loops),
                ("chain", list(append_chain(SEEDS_GROWTH_CHAIN + run, max(CHAIN_AT))), CHAIN_AT, chains),
            ):
                took = measure.save_chain(backend, snapshots)  # took[i] is the save of snapshots[i + 1]
                if run:
                    for at in picks:
                        out[at] += took[at - WINDOW : at]
    finally:
        close_backend(backend)
    target.teardown("growth")

    def side(samples: dict[int, list[float]], name: str) -> dict[str, Any]:
        small, large = (measure.summary(samples[at]) for at in sorted(samples))
        ratio = large["p50_ms"] / small["p50_ms"] if small["p50_ms"] else None
        at_small, at_large = sorted(samples)
        say(f"  {name}: p50 {small['p50_ms']:.3f} ms at {at_small}, {large['p50_ms']:.3f} ms at {at_large}: "
            f"{ratio:.2f}x")
        return {"at": [at_small, at_large], "small": small, "large": large, "ratio": ratio}

    return {"agent_loop": side(loops, "agent loop iteration"), "chain_50": side(chains, "50-node chain node"),
            "runs": runs}  # fmt: skip


class ServerMeter:
    """Redis's own accounting between two readings: command time by command, and main-thread CPU."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._stats: dict[str, tuple[int, int]] = {}
        self._cpu = 0.0

    def _read(self) -> tuple[dict[str, tuple[int, int]], float]:
        stats = {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in
                 self.client.info("commandstats").items()}  # fmt: skip
        cpu = self.client.info("cpu")
        main = cpu.get("used_cpu_user_main_thread")
        if main is not None:
            used = main + cpu["used_cpu_sys_main_thread"]
        else:  # before Redis 6.2: the whole process
            used = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        return stats, float(used)

    def start(self) -> None:
        self._stats, self._cpu = self._read()

    def stop(self) -> dict[str, Any]:
        """Calls and µs per command since :meth:`start`, and main-thread CPU seconds."""
        stats, cpu = self._read()
        delta = {name: (calls - self._stats.get(name, (0, 0))[0], usec - self._stats.get(name, (0, 0))[1])
                 for name, (calls, usec) in stats.items() if name not in _META}  # fmt: skip
        return {"commands": {k: v for k, v in delta.items() if v[0]}, "main_thread_cpu_s": cpu - self._cpu}


class _Counting:
    """Counts the commands a redis-py client sends itself (not those its scripts run), by name: every command a
    connection sends, alone or in a pipeline, goes through its command packer."""

    def __init__(self, client: Any) -> None:
        self.sent: dict[str, int] = {}
        original = client.connection_pool.get_connection

        def get_connection(*args: Any, **kwargs: Any) -> Any:
            conn = original(*args, **kwargs)
            packer = conn._command_packer
            if not getattr(packer, "_counted", False):
                pack = packer.pack

                def counted(*command: Any) -> Any:
                    self.count(command)
                    return pack(*command)

                packer.pack, packer._counted = counted, True
            return conn

        client.connection_pool.get_connection = get_connection

    def count(self, command: Sequence) -> None:
        name = command[0].decode() if isinstance(command[0], bytes) else str(command[0])
        name = name.lower()
        self.sent[name] = self.sent.get(name, 0) + 1


def _split(server: dict[str, Any], sent: dict[str, int], ops: int) -> dict[str, Any]:
    """Per-op µs: the scripts (EVAL/EVALSHA, commands inside included) and the commands sent outside them, each
    outside command charged at its average µs per call."""
    commands = server["commands"]
    scripts = sum(usec for name, (calls, usec) in commands.items() if name in ("evalsha", "eval"))
    outside = 0.0
    for name, count in sent.items():
        if name in ("evalsha", "eval", "script|load", "script"):
            continue
        calls, usec = commands.get(name, (0, 0))
        outside += count * (usec / calls) if calls else 0
    return {
        "ops": ops,
        "script_us": scripts / ops,
        "outside_us": outside / ops,
        "commandstats_us": (scripts + outside) / ops,
        "main_thread_us": server["main_thread_cpu_s"] * 1e6 / ops,
        "scripts_per_op": sum(calls for name, (calls, _) in commands.items() if name in ("evalsha", "eval")) / ops,
        "sent_per_op": {k: v / ops for k, v in sorted(sent.items())},
    }


def redis_cpu(target: RedisTarget, chains: int, loads: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Redis CPU per incremental save, per first save and per cold load of 10-node checkpoints (leases on)."""
    backend = target.make("cpu")
    counting = _Counting(backend.redis)
    meter = ServerMeter(target.client)
    out: dict[str, Any] = {}
    try:
        snapshots = [list(append_chain(SEEDS_CPU + i, 10)) for i in range(chains + 2)]
        for chain in snapshots[:2]:
            measure.save_chain(backend, chain, timed=False)  # warm: scripts loaded, connections open
        firsts, rest = [c[0] for c in snapshots[2:]], [c[1:] for c in snapshots[2:]]
        counting.sent.clear()
        meter.start()
        for cp in firsts:
            backend.save(cp)
        out["save_first"] = _split(meter.stop(), dict(counting.sent), len(firsts))
        counting.sent.clear()
        meter.start()
        saved = 0
        for chain in rest:
            for cp in chain:
                backend.save(cp)
                saved += 1
        out["save_incremental"] = _split(meter.stop(), dict(counting.sent), saved)
        for chain in snapshots:
            end = measure.closing(chain[-1])
            if end is not None:
                backend.save(end)
        finals = [c[-1].id for c in snapshots[2:]][:loads]
        reader = target.make("cpu")
        counting_reader = _Counting(reader.redis)
        try:
            reader.load(finals[0])  # scripts loaded
            counting_reader.sent.clear()
            meter.start()
            for cp_id in finals:
                reader._core.cache.clear()  # a process that holds nothing of it
                if reader.load(cp_id) is None:
                    raise RuntimeError(f"checkpoint {cp_id} was not found")
            out["load_cold"] = _split(meter.stop(), dict(counting_reader.sent), len(finals))
        finally:
            close_backend(reader)
    finally:
        close_backend(backend)
        target.teardown("cpu")
    for name, row in out.items():
        say(f"  {name}: {row['commandstats_us']:.1f} µs (commandstats: scripts {row['script_us']:.1f} + outside "
            f"{row['outside_us']:.1f}), main thread {row['main_thread_us']:.1f} µs")
    return out


def saturation(target: RedisTarget, clients: Sequence[int], seconds: float, pool: Sequence[Sequence[Any]],
               say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Saves/s of N client processes saving APPEND chains against one Redis, with the server's main-thread CPU."""
    meter = ServerMeter(target.client)
    rows = []
    for n in clients:
        space = f"sat{n}"
        close_backend(target.make(space))
        meter.start()
        started = time.perf_counter()
        rate = measure.throughput(lambda space=space: target.make(space), pool, n, seconds, "processes", f"s{n}")
        wall = time.perf_counter() - started
        server = meter.stop()
        saves = rate * seconds
        busy = server["main_thread_cpu_s"] / wall
        per_save = server["main_thread_cpu_s"] * 1e6 / saves if saves else None
        rows.append({"clients": n, "saves_per_s": rate, "server_busy": busy, "server_us_per_save": per_save,
                     "shard_ceiling_saves_per_s": 1e6 / per_save if per_save else None})  # fmt: skip
        say(f"  {n:>3} clients: {rate:,.0f} saves/s, Redis main thread {busy:.0%} busy, {per_save or 0:.1f} µs/save")
        target.teardown(space)
    return rows


def run(target: RedisTarget, args: Any, pool: Sequence[Sequence[Any]], say: Callable[[str], None]) -> dict[str, Any]:
    """Every cost measurement, each in its own namespace; a failure is recorded, not raised."""
    out: dict[str, Any] = {}
    for name, fn in (
        ("growth", lambda: growth(target, args.growth_runs, say)),
        ("redis_cpu", lambda: redis_cpu(target, args.cpu_chains, args.cpu_chains, say)),
        ("saturation", lambda: saturation(target, args.saturation_clients, args.seconds, pool, say)),
    ):
        say(f"\n== cost: {name.replace('_', ' ')}")
        try:
            out[name] = fn()
        except Exception as e:  # recorded in the results; the other measurements go on
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            say(f"  FAILED {out[name]['error']}")
    return out
