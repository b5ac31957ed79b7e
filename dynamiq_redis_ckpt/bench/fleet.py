"""The fleet benchmark: one process holding the leases of many live runs, and many runs orphaned at once.

``python3 -m dynamiq_redis_ckpt.bench fleet [--runs 1000] [--workers 2,4] [--parts leases,orphans,million] [--quick]``

* ``leases``: ONE process runs N runs at once, each saving an APPEND chain of realistic checkpoints (built before
  anything is timed) through one shared backend with leases on, inside :func:`~dynamiq_redis_ckpt.as_running_flow`
  (fenced, as a running Flow's saves are): on a pool of threads, then as N asyncio tasks. Once every run has saved
  its active snapshots they all hold their leases, idle, for a few heartbeats, then save their COMPLETED snapshot.
  It prints save latency, saves/s, what the heartbeat costs (round trips and leases renewed per beat, observed on
  the heartbeat thread's own pipelines), whether any lease was lost, and Redis CPU per save and per renewal.
* ``orphans``: N runs of a real Dynamiq Flow in K processes, SIGKILLed together mid-node, recovered by W worker
  processes (:mod:`dynamiq_redis_ckpt.bench.fleet_orphans`).

Numbers are printed and written to ``--out`` (``fleet.md``, ``fleet.json``); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import queue
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt.bench.measure import percentile
from dynamiq_redis_ckpt.bench.workloads import agent_loop, append_chain

QUICK_RUNS = 40
DEFAULT_OUT = "docs/bench"
CHAIN_NODES = 6  # an append chain: 7 snapshots, the last COMPLETED
LOOP_ITERATIONS = 6  # an agent loop: 7 snapshots growing, then a COMPLETED copy
LOOP_SHARE = 4  # every 4th run is an agent mid-loop
FLOWS = 10  # runs are spread over this many flows
HOLD_BEATS = 3  # heartbeats the runs hold their leases idle before they complete
HEARTBEAT_THREAD = "dynamiq-redis-ckpt-heartbeat"


# ---- workload ---------------------------------------------------------------------------------------------------


def build_runs(n: int, prefix: str) -> list[list[FlowCheckpoint]]:
    """N runs' snapshots in save order (the last one COMPLETED): append chains and agent loops, each run its own
    content (the store deduplicates equal content across runs, so no run is a copy of another)."""
    runs = []
    for i in range(n):
        flow = f"{prefix}-flow-{i % FLOWS}"
        if i % LOOP_SHARE == LOOP_SHARE - 1:
            snaps = list(agent_loop(10_000 + i, LOOP_ITERATIONS, flow_id=flow))
            done = snaps[-1].model_copy(update={"id": snaps[-1].id + "-done", "parent_checkpoint_id": snaps[-1].id,
                                                "status": CheckpointStatus.COMPLETED})  # fmt: skip
            snaps.append(done)
        else:
            snaps = list(append_chain(10_000 + i, CHAIN_NODES, flow_id=flow))
        runs.append(snaps)
    return runs


# ---- observing Redis and the heartbeat --------------------------------------------------------------------------


def server_stats(client) -> dict[str, float]:
    """Redis's CPU seconds and per-command calls/usec (``INFO cpu``, ``INFO commandstats``)."""
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    out = {"cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}
    for name, row in stats.items():
        command = name.removeprefix("cmdstat_")
        out[f"{command}.calls"] = float(row["calls"])
        out[f"{command}.usec"] = float(row["usec"])
    return out


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """``after - before`` per field (a field missing before counts as 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def command_usec(delta: dict[str, float]) -> float:
    """Server time spent in every command (usec) in a delta of :func:`server_stats`."""
    return sum(v for k, v in delta.items() if k.endswith(".usec"))


class HeartbeatProbe:
    """Watches the process's lease heartbeat: each beat (one pass of its loop), the pipelines it sent from its own
    thread (round trips and commands), the leases it renewed, and every lease the registry declared lost.

    It wraps methods of the registry instance and of the backend's sync driver (both restored by :meth:`close`);
    the heartbeat itself runs unchanged."""

    def __init__(self, registry, driver) -> None:
        self.registry, self.driver = registry, driver
        self.lock = threading.Lock()
        self.beat = 0
        self.per_beat: dict[int, dict[str, float]] = {}
        self.renew_ms: list[float] = []
        self.lost: list[str] = []
        self.lost_after_end: list[str] = []  # "lost" once the run's terminal save was on its way or done
        self.ending: set[str] = set()  # runs whose terminal save was sent (filled by the savers)
        self._saved = {"renew": registry._renew, "report": registry._report_held_locked, "lose": registry._lose_locked,
                       "pipeline": driver._pipeline}  # fmt: skip
        registry._renew = self._renew
        registry._report_held_locked = self._report
        registry._lose_locked = self._lose
        driver._pipeline = self._pipeline

    def _row(self) -> dict[str, float]:
        return self.per_beat.setdefault(self.beat, {"round_trips": 0, "commands": 0, "leases": 0})

    def _renew(self, leases) -> None:
        started = time.perf_counter()
        self._saved["renew"](leases)
        with self.lock:
            self.renew_ms.append((time.perf_counter() - started) * 1e3)
            self._row()["leases"] += len(leases)

    def _report(self) -> None:
        self._saved["report"]()
        self.beat += 1  # called once at the end of every pass of the heartbeat loop (under the registry's lock)

    def _lose(self, held, reason: str, kind: str) -> None:
        # A renewal that crossed the run's COMPLETED save (which hands the lease back) is answered FENCED, and the
        # registry reports the lease lost though the run has ended: counted apart from real losses.
        with self.lock:
            ended = held.run in self.ending
            (self.lost_after_end if ended else self.lost).append(f"{held.run}: {kind}: {reason}")
        self._saved["lose"](held, reason, kind)

    def _pipeline(self, client, wired):
        if threading.current_thread().name == HEARTBEAT_THREAD:
            with self.lock:
                row = self._row()
                row["round_trips"] += 1
                row["commands"] += len(wired)
        return self._saved["pipeline"](client, wired)

    def end(self, run: str) -> None:
        """The run's terminal save is about to be sent."""
        with self.lock:
            self.ending.add(run)

    def reset(self) -> None:
        with self.lock:
            self.per_beat.clear()
            self.renew_ms.clear()

    def summary(self) -> dict[str, Any]:
        """Beats that renewed something: how many, and per beat the round trips, commands and leases (mean, max)."""
        with self.lock:
            beats = [row for row in self.per_beat.values() if row["leases"]]
            renew_ms = list(self.renew_ms)
        out: dict[str, Any] = {"beats": len(beats), "leases_renewed": sum(r["leases"] for r in beats)}
        for field in ("round_trips", "commands", "leases"):
            values = [r[field] for r in beats]
            out[f"{field}_per_beat_mean"] = sum(values) / len(values) if values else 0.0
            out[f"{field}_per_beat_max"] = max(values, default=0)
        out["renew_round_trip_p50_ms"] = percentile(renew_ms, 50) if renew_ms else math.nan
        out["renew_round_trip_p99_ms"] = percentile(renew_ms, 99) if renew_ms else math.nan
        return out

    def close(self) -> None:
        self.registry._renew = self._saved["renew"]
        self.registry._report_held_locked = self._saved["report"]
        self.registry._lose_locked = self._saved["lose"]
        self.driver._pipeline = self._saved["pipeline"]


# ---- part (a): leases -------------------------------------------------------------------------------------------


class SaveLog:
    """Save latencies (s) and the lease losses the saves met, shared by threads or tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: list[float] = []
        self.final: list[float] = []
        self.refused: list[str] = []

    def add(self, seconds: float, final: bool) -> None:
        with self.lock:
            (self.final if final else self.active).append(seconds)

    def refuse(self, run: str, error: BaseException) -> None:
        with self.lock:
            self.refused.append(f"{run}: {type(error).__name__}: {error}")


def _thread_mode(backend, runs: list[list[FlowCheckpoint]], threads: int, hold: Callable[[], None], log: SaveLog,
                 ending: Callable[[str], None]):
    """Each run's saves in order, all runs at once on ``threads`` threads (a run's next save is queued behind every
    other run's current one); after every run's active saves, ``hold()``, then the COMPLETED saves."""
    from dynamiq_redis_ckpt import as_running_flow
    from dynamiq_redis_ckpt.errors import LeaseLostError

    work: queue.Queue = queue.Queue()
    active_left = [len(runs)]
    all_active = threading.Event()
    lock = threading.Lock()
    stopped: set[int] = set()  # runs whose lease was lost: they save nothing more

    def serve() -> None:
        while (item := work.get()) is not None:
            run, step = item
            snaps = runs[run]
            final = step == len(snaps) - 1
            if final:
                ending(snaps[step].wf_run_id)
            try:
                with as_running_flow():
                    started = time.perf_counter()
                    backend.save(snaps[step])
                    log.add(time.perf_counter() - started, final)
            except LeaseLostError as e:
                log.refuse(snaps[0].wf_run_id, e)
                stopped.add(run)
            if final:
                continue
            if step + 1 < len(snaps) - 1 and run not in stopped:
                work.put((run, step + 1))
                continue
            with lock:  # this run is done with its active snapshots
                active_left[0] -= 1
                if active_left[0] == 0:
                    all_active.set()

    pool = [threading.Thread(target=serve, name=f"fleet-save-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    started = time.perf_counter()
    for run in range(len(runs)):
        work.put((run, 0))
    all_active.wait()
    active_seconds = time.perf_counter() - started
    hold()
    for run in range(len(runs)):
        if run not in stopped:
            work.put((run, len(runs[run]) - 1))
    for _ in pool:
        work.put(None)
    for t in pool:
        t.join()
    return active_seconds


async def _async_mode(backend, runs: list[list[FlowCheckpoint]], in_flight: int, hold: Callable[[], None],
                      log: SaveLog, ending: Callable[[str], None]):
    """N tasks, each saving its run's snapshots with ``save_async``, at most ``in_flight`` saves at a time (the
    connection pool's size: redis.asyncio refuses a request beyond it); after every run's active saves, ``hold()``
    (off the loop, so the event loop keeps running), then each task saves its COMPLETED snapshot. A save's time is
    from the moment it got its turn."""
    from dynamiq_redis_ckpt import as_running_flow
    from dynamiq_redis_ckpt.errors import LeaseLostError

    release = asyncio.Event()
    turns = asyncio.Semaphore(in_flight)

    parked = [0]  # runs done with their active saves (or stopped by a lost lease)

    async def one(snaps: list[FlowCheckpoint]) -> None:
        with as_running_flow():
            try:
                for step, cp in enumerate(snaps):
                    if step == len(snaps) - 1:
                        parked[0] += 1
                        await release.wait()
                    async with turns:
                        if step == len(snaps) - 1:
                            ending(cp.wf_run_id)
                        started = time.perf_counter()
                        await backend.save_async(cp)
                        log.add(time.perf_counter() - started, step == len(snaps) - 1)
            except LeaseLostError as e:
                parked[0] += not release.is_set()
                log.refuse(snaps[0].wf_run_id, e)

    started = time.perf_counter()
    tasks = [asyncio.create_task(one(snaps)) for snaps in runs]
    while parked[0] < len(runs):
        await asyncio.sleep(0.005)
    active_seconds = time.perf_counter() - started
    await asyncio.to_thread(hold)
    release.set()
    await asyncio.gather(*tasks)
    await backend.aclose()
    return active_seconds


def _leases_mode(url: str, mode: str, n: int, threads: int, ttl: float) -> dict[str, Any]:
    """One mode of part (a) on a fresh prefix: its numbers."""
    import redis

    from dynamiq_redis_ckpt import RedisCheckpointBackend
    from dynamiq_redis_ckpt.registry import REGISTRY

    prefix = f"fleet-leases-{mode}"
    runs = build_runs(n, prefix)
    backend = RedisCheckpointBackend(url=url, prefix=prefix, lease_ttl_seconds=ttl, max_connections=threads + 8)
    client = redis.Redis.from_url(url)
    probe = HeartbeatProbe(REGISTRY, backend._sync)
    log = SaveLog()
    interval = backend.heartbeat_interval_seconds
    phases: dict[str, dict[str, float]] = {}

    def hold() -> None:
        """Every run holds its lease, idle: only the heartbeat talks to Redis."""
        phases["active"] = stats_delta(phases.pop("start"), server_stats(client))
        active_beats = probe.summary()
        probe.reset()
        before = server_stats(client)
        time.sleep(HOLD_BEATS * interval + interval / 2)
        phases["hold"] = stats_delta(before, server_stats(client))
        phases["hold_beats"] = probe.summary()
        phases["active_beats"] = active_beats
        phases["final_start"] = server_stats(client)

    try:
        phases["start"] = server_stats(client)
        started = time.perf_counter()
        if mode == "threads":
            active_seconds = _thread_mode(backend, runs, threads, hold, log, probe.end)
        else:
            active_seconds = asyncio.run(_async_mode(backend, runs, threads, hold, log, probe.end))
        total_seconds = time.perf_counter() - started
        phases["final"] = stats_delta(phases.pop("final_start"), server_stats(client))
        held_after = sum(1 for h in list(REGISTRY._leases.values()) if h.namespace == backend.namespace)
    finally:
        probe.close()
        backend.close()
        client.close()
    numbers = _lease_numbers(mode, n, threads, ttl, interval, runs, log, phases, active_seconds, total_seconds,
                             held_after, probe.lost)  # fmt: skip
    numbers["lost_after_terminal_save"] = len(probe.lost_after_end)
    numbers["lost_after_terminal_save_examples"] = probe.lost_after_end[:3]
    return numbers


def _lease_numbers(mode, n, threads, ttl, interval, runs, log, phases, active_seconds, total_seconds, held_after,
                   lost) -> dict[str, Any]:
    saves = log.active + log.final
    active, hold, final = phases["active"], phases["hold"], phases["final"]
    hold_beats, active_beats = phases["hold_beats"], phases["active_beats"]
    n_final = max(len(log.final), 1)
    return {
        "mode": mode,
        "runs": n,
        "concurrency": threads,  # threads, or saves in flight among the N tasks
        "lease_ttl_s": ttl,
        "heartbeat_interval_s": interval,
        "saves": len(saves),
        "snapshots_per_run": sum(len(r) for r in runs) / len(runs),
        "save_p50_ms": percentile(saves, 50) * 1e3,
        "save_p99_ms": percentile(saves, 99) * 1e3,
        "saves_per_s": len(log.active) / active_seconds if active_seconds else math.nan,
        "active_phase_s": active_seconds,
        "total_s": total_seconds,
        "redis_cpu_ms_per_save": (active["cpu_s"] + final["cpu_s"]) * 1e3 / max(len(saves), 1),
        "evalsha_usec_per_save": (active.get("evalsha.usec", 0) + final.get("evalsha.usec", 0)) / max(len(saves), 1),
        "commands_usec_per_save": (command_usec(active) + command_usec(final)) / max(len(saves), 1),
        "final_save_evalsha_usec": final.get("evalsha.usec", 0) / n_final,
        "renewals_during_saves": active_beats["leases_renewed"],
        "hold": {
            **hold_beats,
            "seconds": HOLD_BEATS * interval + interval / 2,
            "beats_per_s": hold_beats["beats"] / (HOLD_BEATS * interval + interval / 2),
            "round_trips_per_s": hold_beats["beats"] * hold_beats["round_trips_per_beat_mean"]
            / (HOLD_BEATS * interval + interval / 2),
            "renewals_per_s": hold_beats["leases_renewed"] / (HOLD_BEATS * interval + interval / 2),
            "evalsha_calls": hold.get("evalsha.calls", 0),
            "evalsha_usec_per_renewal": hold.get("evalsha.usec", 0) / max(hold_beats["leases_renewed"], 1),
            "redis_cpu_ms_per_beat": hold["cpu_s"] * 1e3 / max(hold_beats["beats"], 1),
        },
        "leases_lost": len(lost) + len(log.refused),
        "lost_examples": (lost + log.refused)[:5],
        "leases_held_after": held_after,
    }


def run_leases(url: str, n: int, threads: int, ttl: float) -> dict[str, Any]:
    """Part (a): both modes, one after the other, each on its own prefix."""
    return {"threads": _leases_mode(url, "threads", n, threads, ttl),
            "asyncio": _leases_mode(url, "asyncio", n, threads, ttl)}  # fmt: skip


# ---- report -----------------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def leases_table(section: dict[str, Any]) -> list[str]:
    """Markdown lines for part (a)."""
    modes = [section[m] for m in ("threads", "asyncio") if m in section]
    rows = [
        ("runs holding leases at once", "runs", 0),
        ("saves in flight at most (threads; tasks: pool)", "concurrency", 0),
        ("saves", "saves", 0), ("save p50 (ms)", "save_p50_ms", 2), ("save p99 (ms)", "save_p99_ms", 2),
        ("saves/s (active snapshots)", "saves_per_s", 0),
        ("Redis CPU per save (ms, INFO cpu)", "redis_cpu_ms_per_save", 3),
        ("EVALSHA usec per save (commandstats)", "evalsha_usec_per_save", 1),
        ("all commands usec per save", "commands_usec_per_save", 1),
        ("renewals while saving (leases)", "renewals_during_saves", 0),
    ]  # fmt: skip
    hold_rows = [
        ("beats while idle", "beats", 0), ("beats/s", "beats_per_s", 1), ("renewals/s", "renewals_per_s", 0),
        ("round trips/s", "round_trips_per_s", 1), ("round trips per beat (mean)", "round_trips_per_beat_mean", 2),
        ("round trips per beat (max)", "round_trips_per_beat_max", 0),
        ("leases renewed per beat (mean)", "leases_per_beat_mean", 1),
        ("commands per beat (mean)", "commands_per_beat_mean", 1),
        ("renew round trip p50 (ms)", "renew_round_trip_p50_ms", 2),
        ("renew round trip p99 (ms)", "renew_round_trip_p99_ms", 2),
        ("EVALSHA usec per renewal", "evalsha_usec_per_renewal", 1),
        ("Redis CPU per beat (ms)", "redis_cpu_ms_per_beat", 2),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(m["mode"] for m in modes) + " |", "|---|" + "---:|" * len(modes)]
    lines += [f"| {label} | " + " | ".join(_fmt(m[key], d) for m in modes) + " |" for label, key, d in rows]
    lines += [f"| heartbeat: {label} | " + " | ".join(_fmt(m["hold"][key], d) for m in modes) + " |"
              for label, key, d in hold_rows]  # fmt: skip
    lines += ["| leases lost (LeaseLostError, fenced, self-fenced) | "
              + " | ".join(_fmt(m["leases_lost"]) for m in modes) + " |"]  # fmt: skip
    lines += ["| renewals crossing the run's COMPLETED save, reported lost by the registry | "
              + " | ".join(_fmt(m.get("lost_after_terminal_save", 0)) for m in modes) + " |"]  # fmt: skip
    first = modes[0] if modes else {}
    lines += ["", f"Lease ttl {_fmt(first.get('lease_ttl_s'), 1)} s, heartbeat every "
              f"{_fmt(first.get('heartbeat_interval_s'), 2)} s. Every run saves its active snapshots (append chains "
              "and agent loops, built before timing) fenced by its lease, then all runs hold their leases idle for "
              f"{HOLD_BEATS} beats (the heartbeat rows), then each saves its COMPLETED snapshot (handing the lease "
              "back). One heartbeat thread renews every lease of the process: one pipeline of renew scripts per "
              "200 leases due (a save moves a lease's next renewal later, so runs saving faster than the interval "
              "need no renewal)."]  # fmt: skip
    if any(m.get("lost_after_terminal_save") for m in modes):
        lines += ["", "A renewal sent just before a run's COMPLETED save landed is answered FENCED (the save handed "
                  "the lease back); the registry then logs the lease as lost (taken over) and counts it in the "
                  "leases-lost metric, though the run had ended. No save was refused: these are counted apart."]

    return lines


def render_markdown(sections: dict[str, dict[str, Any]], renderers: dict[str, Callable] | None = None) -> str:
    """The markdown report: one ``##`` section per entry of ``sections`` (leases, orphans, or others given a
    renderer in ``renderers``: name -> (title, section -> lines))."""
    from dynamiq_redis_ckpt.bench.fleet_orphans import orphans_table

    known = {"leases": ("Leases: one process, N live runs", leases_table),
             "orphans": ("Orphans: N runs killed at once, recovered by W workers", orphans_table)}  # fmt: skip
    known.update(renderers or {})
    out = ["# Fleet benchmark", ""]
    for name, section in sections.items():
        if name.startswith("_"):
            continue
        title, render = known.get(name, (name, lambda s: ["```", json.dumps(s, indent=2, default=str), "```"]))
        out += [f"## {title}", "", *render(section), ""]
    meta = sections.get("_meta")
    if meta:
        out += ["## Run", "", *[f"- {k}: {v}" for k, v in meta.items()], ""]
    return "\n".join(out)


def _million_lines(section: dict[str, Any]) -> list[str]:
    from dynamiq_redis_ckpt.bench import million

    lines = million.render(section).splitlines()
    return lines[1:] if lines and lines[0].startswith("## ") else lines  # its own heading: the report gives one


def chart(sections: dict[str, Any], path: str | Path) -> bool:
    """``fleet.png``: save latency of one process's live runs, time until every orphan was completed, and Redis
    memory by key kind at N snapshots, as far as the sections hold them; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("leases", "orphans", "million") if sections.get(name)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, name in zip(axes[0], panels):
        section = sections[name]
        if name == "leases":
            modes = list(section.values())
            xs = range(len(modes))
            ax.bar([x - 0.2 for x in xs], [m["save_p50_ms"] for m in modes], 0.4, label="p50", color="#d62728")
            ax.bar([x + 0.2 for x in xs], [m["save_p99_ms"] for m in modes], 0.4, label="p99", color="#ff9896")
            ax.set_xticks(list(xs), [f"{m['mode']}\n{m['saves_per_s']:,.0f} saves/s" for m in modes])
            ax.set_ylabel("save latency, ms")
            ax.set_title(f"{modes[0]['runs']:,} live runs in one process")
            ax.legend()
        elif name == "orphans":
            rounds = section["rounds"]
            xs = range(len(rounds))
            ax.bar(xs, [r["kill_to_all_completed_s"] for r in rounds], 0.5, color="#1f77b4")
            ax.set_xticks(list(xs), [f"{r['workers']} workers\n{r['claims_per_s']:.0f} claims/s" for r in rounds])
            ax.set_ylabel("SIGKILL -> every run completed, s")
            ax.set_title(f"{rounds[0]['runs']:,} runs orphaned at once")
        else:
            kinds = sorted(section["kinds"].items(), key=lambda kv: -kv[1]["bytes"])
            ax.barh([k for k, _ in kinds][::-1], [v["bytes"] / 2**20 for _, v in kinds][::-1], color="#2ca02c")
            ax.set_xlabel("Redis memory, MiB")
            ax.set_title(f"{section['stored']:,} snapshots: {section['memory']['bytes_per_snapshot']:,.0f} B each")
        ax.grid(axis="y" if name != "million" else "x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(sections: dict[str, dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``fleet.json``, ``fleet.md`` and ``fleet.png`` into ``out_dir``; returns the first two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "fleet.json", out / "fleet.md"
    json_path.write_text(json.dumps(sections, indent=2, default=str) + "\n")
    text = render_markdown(sections, {"million": ("One Redis, N snapshots", _million_lines)})
    if chart(sections, out / "fleet.png"):
        text += "\n![fleet chart](fleet.png)\n"
    md_path.write_text(text)
    return json_path, md_path


# ---- entry point ------------------------------------------------------------------------------------------------


@contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    """The Redis to use: ``given``, else a private redis-server stopped at the end."""
    if given:
        yield given
        return
    from dynamiq_redis_ckpt.embedded import start_embedded_redis

    server = start_embedded_redis()
    try:
        if server.url is None:
            raise SystemExit("the fleet benchmark needs redis-server on PATH (other processes must reach it)")
        yield server.url
    finally:
        server.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``bench fleet``."""
    p = argparse.ArgumentParser(prog="python3 -m dynamiq_redis_ckpt.bench fleet", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="runs (default 1000, --quick 40)")
    p.add_argument("--workers", default="2,4", help="recovery worker processes, one orphans round per value")
    p.add_argument("--parts", default="leases,orphans,million", help="any of leases, orphans, million")
    p.add_argument("--snapshots", type=int, default=None,
                   help="million: snapshots in one Redis (default 1,000,000; --quick 2,000)")
    p.add_argument("--quick", action="store_true", help=f"small N ({QUICK_RUNS}) for a check that it works")
    p.add_argument("--redis-url", help="a Redis to use (its db 0 and 1; default: a private redis-server)")
    p.add_argument("--out", default=DEFAULT_OUT, help="directory for fleet.md and fleet.json")
    p.add_argument("--threads", type=int, default=48, help="leases, threads mode: size of the save pool")
    p.add_argument("--lease-ttl", type=float, default=3.0, help="lease ttl (s) of the runs (heartbeat: a third)")
    p.add_argument("--children", type=int, default=4, help="orphans: processes the runs start in")
    p.add_argument("--concurrency", type=int, default=8, help="orphans: runs each worker resumes at once")
    p.add_argument("--workers-early", action="store_true",
                   help="orphans: start the workers before the runs (killed once they are ready), not after the kill")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else 1000
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.workers = [int(x) for x in str(args.workers).split(",") if x.strip()]
    if args.snapshots is None:
        args.snapshots = 2_000 if args.quick else 1_000_000
    unknown = set(args.parts) - {"leases", "orphans", "million"}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts asked for; the sections of the report."""
    sections: dict[str, Any] = {}
    started = time.time()
    with redis_url(args.redis_url) as url:
        if "leases" in args.parts:
            sections["leases"] = run_leases(url, args.runs, args.threads, args.lease_ttl)
            print("\n".join(leases_table(sections["leases"])), flush=True)
        if "orphans" in args.parts:
            from dynamiq_redis_ckpt.bench.fleet_orphans import orphans_table, run_orphans

            sections["orphans"] = run_orphans(url, args.runs, args.workers, args.children, args.concurrency,
                                              args.lease_ttl, args.workers_early)  # fmt: skip
            print("\n".join(orphans_table(sections["orphans"])), flush=True)
    if "million" in args.parts:  # on a Redis of its own: its memory is what it measures
        from dynamiq_redis_ckpt.bench import million

        sections["million"] = million.run_million(None, args.snapshots, lambda line: print(line, flush=True))
        print(million.render(sections["million"]), flush=True)
    sections["_meta"] = {"runs": args.runs, "quick": args.quick, "wall_s": round(time.time() - started, 1),
                         "python": sys.version.split()[0], "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return sections


def main(argv: list[str] | None = None) -> int:
    """Run the fleet benchmark, print its tables and write ``fleet.md`` / ``fleet.json`` into ``--out``.
    Exits 1 when a correctness check failed (a run not completed exactly once, a node re-run, a lease lost)."""
    args = parse_args(argv)
    sections = run(args)
    json_path, md_path = write_report(sections, args.out)
    print(f"\nwrote {md_path} and {json_path} ({sections['_meta']['wall_s']} s)")
    return 0 if all_correct(sections) else 1


def all_correct(sections: dict[str, Any]) -> bool:
    """Whether every correctness field of the sections holds."""
    ok = all(m["leases_lost"] == 0 for m in sections.get("leases", {}).values())
    ok = ok and all(r["correct"] for r in sections.get("orphans", {}).get("rounds", []))
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
