"""Chaos: SIGKILL run holders and recovery workers at random while runs go on; nothing is lost or done twice.

Real processes on the real redis-server: three ``dynamiq-redis-ckpt worker`` processes (lease ttl 2 s) and six
runs of ``chain-6-r<i>``, each started in its own ``python -m tests.run_chain`` child. For ~20 s a random process
(preferably one holding a run's lease) is SIGKILLed every 1-2 s; a killed worker is restarted at once, so a worker
is always eventually alive. Then every run must complete, as one chain, with the output of an uninterrupted run,
with writers that never interleaved (fencing), and with no node run more often than the takeovers allow.
Kills go mostly to processes holding a run's lease; a worker is killed only once it is ready and while another
ready worker stays alive (a worker's start-up costs ~8 s of CPU on a small machine, so killing starting workers
only measures the machine). A run's first process is cold: Dynamiq imports ~4300 modules lazily when the run's
second node starts, which under load can starve the lease heartbeat, so a lease may also be lost without a kill;
the properties allow that (it is a takeover like any other), and the report line counts such losses.

Counting node executions per run. ``Step`` logs only its node id (s00..s05), to ``Step.effects_path`` or else to
``$CKPT_TEST_EFFECTS``; a worker has one environment for every run it resumes, so a shared file cannot tell runs
apart. Counting from the checkpoints instead is not enough: ``completed_at`` is stamped in ``_update_checkpoint``
(when the completion is *saved*), so a node that ran but whose completion never landed (its process was killed
after the side effect, or its save was fenced) leaves no trace there - exactly the executions we must count. So
each run gets its own effects file: the run's first process writes to it through ``$CKPT_TEST_EFFECTS`` (set per
child), and the workers build their flows with :func:`chaos_flows` below (``--flows tests.test_chaos:chaos_flows``),
which is ``tests.flows.worker_flows`` plus ``effects_path=<dir>/<flow id>``. The checkpoints are still checked too:
a node's completion must be recorded with a single ``completed_at`` across all of a run's checkpoints (two
different values would mean two landed completions of one node: a re-run of a completed node, or two writers).
"""

from __future__ import annotations

import collections
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import EFFECTS_ENV, PREFIX_ENV, SLEEP_ENV, chain_flow, final_output
from tests.test_worker import ROOT, effects, env_for, stop, wait_for
from tests.homes import home

pytestmark = pytest.mark.slow

CHAOS_DIR_ENV = "CKPT_TEST_CHAOS_EFFECTS_DIR"
NODES = 6
RUNS = 6
WORKERS = 3
TTL = 2.0
STEP_SLEEP = "0.4"
CHAOS_SECONDS = float(os.environ.get("CKPT_CHAOS_SECONDS", "20"))  # shorter in the cluster run (test_cluster.py)
RUN_EVERY = 2.0  # run i starts i * RUN_EVERY s into the chaos, so kills find runs in flight all along
QUESTION = {"question": "where is my order?"}  # what tests.run_chain sends


def chaos_flows(flow_id: str):
    """The workers' flow registry: ``chain-<n>-<x>`` chains logging to ``$CKPT_TEST_CHAOS_EFFECTS_DIR/<flow_id>``."""
    backend = RedisCheckpointBackend(url=os.environ["DYNAMIQ_REDIS_CKPT_URL"], prefix=os.environ[PREFIX_ENV])
    path = os.path.join(os.environ[CHAOS_DIR_ENV], flow_id)
    return chain_flow(backend, int(flow_id.split("-")[1]), flow_id=flow_id, words=60, effects_path=path)


def start_chaos_worker(redis_server, prefix, log_path, effects_dir) -> subprocess.Popen:
    """Like tests.test_worker.start_worker, with the per-run effects registry above. ``--max-attempts`` is high:
    a recovery that completes a node resets the count, but chaos may kill a run's worker five times before its
    next node completes, which the default would (rightly) dead-letter; this test is about the rest."""
    args = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", redis_server.url, "--prefix", prefix,
            "--flows", "tests.test_chaos:chaos_flows", "--lease-ttl", str(TTL), "--poll", "0.2",
            "--max-attempts", "1000"]  # fmt: skip
    env = env_for(redis_server, prefix, **{CHAOS_DIR_ENV: str(effects_dir), SLEEP_ENV: STEP_SLEEP})
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def start_run(redis_server, prefix, flow_id, effects_path, log_path) -> subprocess.Popen:
    env = env_for(redis_server, prefix, **{EFFECTS_ENV: str(effects_path), SLEEP_ENV: STEP_SLEEP,
                                           "CKPT_TEST_LEASE_TTL": str(TTL)})  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, flow_id, str(NODES)],
                            cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)  # fmt: skip


def owner_pid(owner: bytes | str | None) -> int | None:
    """The pid in a lease owner id ``host:pid:random``."""
    text = owner.decode() if isinstance(owner, bytes) else (owner or "")
    parts = text.split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)] if ordered else float("nan")


def check_run(flow: str, cps: list, sv: dict[str, int], chain: list, counts: collections.Counter, tokens: list[int],
              reference: dict) -> dict:  # fmt: skip
    """Every property of one finished run. ``cps``: all its checkpoints; ``sv``: id -> server time of the save (µs);
    ``chain``: get_chain of the latest; ``counts``: node executions from its effects file; ``tokens``: lease tokens
    sampled over time. Returns the run's segments (one per writer run_id, in server order) for reporting."""
    by_sv = sorted(cps, key=lambda c: sv[c.id])
    final = by_sv[-1]
    assert final.status == S.COMPLETED, f"{flow}: latest checkpoint is {final.status}"
    assert final.completed_node_ids == [f"s{i:02d}" for i in range(NODES)], (flow, final.completed_node_ids)
    assert final.node_states[f"s{NODES - 1:02d}"].output_data == reference, f"{flow}: output differs from reference"

    # One chain: one wf_run_id, and the parent links walk every checkpoint, in exactly the server's save order.
    assert {c.wf_run_id for c in cps} == {final.wf_run_id}, f"{flow}: more than one wf_run_id"
    assert [c.id for c in reversed(chain)] == [c.id for c in by_sv], f"{flow}: the chain is not the save order"

    # Writers never interleave: once a later run_id (a takeover) wrote, an earlier one never writes again.
    segments: list[tuple[str, list]] = []
    for c in by_sv:
        if segments and segments[-1][0] == c.run_id:
            segments[-1][1].append(c)
        else:
            assert c.run_id not in [r for r, _ in segments], (
                f"{flow}: run_id {c.run_id} wrote again after a takeover: "
                f"{[(x.run_id[:8], sv[x.id]) for x in by_sv]}"
            )
            segments.append((c.run_id, [c]))

    # Fencing tokens only grew, and every writer took or claimed the lease (a new token) before it wrote.
    assert tokens == sorted(tokens), f"{flow}: the lease token went back: {tokens}"
    assert tokens and tokens[-1] >= len(segments), f"{flow}: token {tokens[-1:]} < {len(segments)} writers"

    # Each node's completion landed once: a single completed_at for it across all the run's checkpoints.
    for i in range(NODES):
        node = f"s{i:02d}"
        stamps = {c.node_states[node].completed_at for c in cps if node in c.node_states}
        assert len(stamps) == 1, f"{flow}: completion of {node} landed {len(stamps)} times: {sorted(stamps)}"

    # Executions: every node at least once; a node runs again only where a writer stopped while it was in flight
    # (the node after the last one that writer's checkpoints recorded complete), at most once per such stop.
    in_flight = collections.Counter()
    for _, writes in segments[:-1]:
        done = len(writes[-1].completed_node_ids)
        if done < NODES:
            in_flight[f"s{done:02d}"] += 1
    for i in range(NODES):
        node = f"s{i:02d}"
        assert 1 <= counts[node] <= 1 + in_flight[node], (
            f"{flow}: {node} ran {counts[node]} times; writers stopped while it was in flight "
            f"{in_flight[node]} times; executions {dict(counts)}"
        )
    assert sum(counts.values()) == sum(counts[f"s{i:02d}"] for i in range(NODES)), f"{flow}: unknown nodes: {counts}"
    return {"segments": segments, "extra": sum(counts.values()) - NODES}


@pytest.mark.timeout(300)
def test_chaos_sigkill_holders_and_workers(redis_server, tmp_path):
    prefix = "chaos"
    seed = int(os.environ.get("CKPT_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"\n[chaos] seed {seed} (CKPT_CHAOS_SEED to replay)")
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    backend.clear()
    keys, r = backend._core.keys, backend.redis
    flows = [f"chain-{NODES}-r{i}" for i in range(RUNS)]
    effects_dir = tmp_path / "effects"
    effects_dir.mkdir()
    reference = final_output(chain_flow(InMemory(), NODES, flow_id="reference", words=60).run_sync(QUESTION))

    workers: list[subprocess.Popen] = []
    log_of: dict[int, Path] = {}  # worker pid -> its log
    holders: dict[str, subprocess.Popen] = {}
    everything: list[subprocess.Popen] = []
    kills: list[dict] = []
    tokens: dict[str, list[int]] = {f: [] for f in flows}

    def new_worker(slot: int) -> subprocess.Popen:
        log = tmp_path / f"worker{slot}-{len(log_of)}.log"
        proc = start_chaos_worker(redis_server, prefix, log, effects_dir)
        everything.append(proc)
        log_of[proc.pid] = log
        return proc

    def is_ready(proc: subprocess.Popen) -> bool:
        return proc.poll() is None and "worker ready" in log_of[proc.pid].read_text()

    def leases() -> dict[str, dict]:
        known = [f for f in flows if _run_of(f)]
        pipe = r.pipeline(transaction=False)
        for f in known:
            pipe.hgetall(keys.lease(home(backend, f, _run_of(f)), _run_of(f)))
        return {f: {k.decode(): v.decode() for k, v in found.items()} for f, found in zip(known, pipe.execute())}

    wf_runs: dict[str, str] = {}

    def _run_of(flow: str) -> str | None:
        """The run's wf_run_id (its lease key), known from its first checkpoint."""
        if flow not in wf_runs:
            first = backend.get_latest_by_flow(flow)
            if first is not None:
                wf_runs[flow] = first.wf_run_id or first.run_id
        return wf_runs.get(flow)

    def sample_tokens() -> dict[str, dict]:
        found = leases()
        for f, lease in found.items():
            if "token" in lease:
                tokens[f].append(int(lease["token"]))
        return found

    def all_completed() -> bool:
        sample_tokens()
        return all((cp := backend.get_latest_by_flow(f)) is not None and cp.status == S.COMPLETED for f in flows)

    def logs_tail() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))

    try:
        workers = [new_worker(i) for i in range(WORKERS)]
        wait_for(lambda: all(is_ready(w) for w in workers), timeout=120)
        started = time.time()
        next_kill = started + rng.uniform(1.0, 2.0)
        while time.time() - started < CHAOS_SECONDS:
            now = time.time()
            for i, f in enumerate(flows):
                if f not in holders and now - started >= i * RUN_EVERY:
                    holders[f] = start_run(redis_server, prefix, f, effects_dir / f, tmp_path / f"run-{f}.log")
                    everything.append(holders[f])
            lease_now = sample_tokens()
            if now >= next_kill:
                next_kill = now + rng.uniform(1.0, 2.0)
                # Targets: a run holder once its run exists in Redis (killed earlier, the run would never exist);
                # a worker once it is ready, and only while another ready one stays alive to recover its runs.
                live_holders = [(f, p) for f, p in holders.items() if p.poll() is None and _run_of(f)]
                ready = [(slot, p) for slot, p in enumerate(workers) if is_ready(p)]
                server_ms = int(r.time()[0]) * 1000
                holding = {owner_pid(lz.get("owner")) for lz in lease_now.values()
                           if lz.get("owner") and int(lz.get("exp", 0)) > server_ms}  # fmt: skip
                candidates = [("holder", f, p) for f, p in live_holders]
                candidates += [("worker", s, p) for s, p in ready] if len(ready) >= 2 else []
                busy = [c for c in candidates if c[2].pid in holding]  # holding a run's live lease
                pool = busy if busy and rng.random() < 0.85 else candidates if rng.random() < 0.3 else []
                if not pool:
                    next_kill = now + 0.3  # nothing worth killing now: look again soon
                else:
                    kind, which, proc = rng.choice(pool)
                    hit = [f for f, lz in lease_now.items() if owner_pid(lz.get("owner")) == proc.pid
                           and int(lz.get("exp", 0)) > server_ms]  # fmt: skip
                    proc.send_signal(signal.SIGKILL)
                    killed_at = time.time()
                    proc.wait(timeout=30)
                    kills.append({"at": killed_at, "kind": kind, "pid": proc.pid, "hit": hit})
                    if kind == "worker":
                        workers[which] = new_worker(which)
            time.sleep(0.1)
        for i, f in enumerate(flows):  # (CHAOS_SECONDS covers every start; this keeps a shorter chaos correct)
            if f not in holders:
                holders[f] = start_run(redis_server, prefix, f, effects_dir / f, tmp_path / f"run-{f}.log")
                everything.append(holders[f])
        chaos_end = time.time()
        try:
            wait_for(all_completed, timeout=150, every=0.2)
        except AssertionError:
            raise AssertionError(f"runs did not all complete; leases {leases()}\n{logs_tail()}") from None
        print(f"[chaos] all {RUNS} runs completed {time.time() - chaos_end:.1f} s after the chaos ended; "
              f"{len(kills)} kills ({sum(k['kind'] == 'worker' for k in kills)} of workers, "
              f"{sum(bool(k['hit']) for k in kills)} hit a process holding a run)")  # fmt: skip
        sample_tokens()

        # ---- properties ---------------------------------------------------------------------------------------
        homes = {f: home(backend, f, _run_of(f)) for f in flows}
        assert not any(r.zcard(keys.dead_index(homes[f])) for f in flows), "a run was dead-lettered"
        assert not any(r.zcard(keys.lease_index(homes[f])) for f in flows), "a completed run still holds a lease"
        latencies, report, takeovers = [], [], 0
        for f in flows:
            cps = backend.get_list_by_flow(f, limit=None)
            pipe = r.pipeline(transaction=False)
            for c in cps:
                pipe.hget(keys.checkpoint(homes[f], c.id), "sv")
            sv = {c.id: int(v) for c, v in zip(cps, pipe.execute())}
            chain = backend.get_chain(max(cps, key=lambda c: sv[c.id]).id)
            counts = effects(effects_dir / f)
            try:
                found = check_run(f, cps, sv, chain, counts, tokens[f], reference)
            except AssertionError as failed:
                raise AssertionError(f"{failed}\nkills {kills}\n{logs_tail()}") from None
            hits = [k for k in kills if f in k["hit"]]
            takeovers += len(found["segments"]) - 1
            report.append(f"{f}: {len(found['segments'])} writers, {len(hits)} kills hit it, {found['extra']} extra "
                          f"node executions, executions {dict(sorted(counts.items()))}")  # fmt: skip
            # Recovery latency: kill -> the first checkpoint (by server time) of a writer that had not written yet.
            for k in hits:
                kill_us = int(k["at"] * 1e6)
                before = {c.run_id for c in cps if sv[c.id] <= kill_us}
                after = [sv[c.id] for c in cps if sv[c.id] > kill_us and c.run_id not in before]
                assert after, f"{f}: no writer took over after the kill at {k}"
                latencies.append((min(after) - kill_us) / 1e6)
        print("[chaos] kills: " + ", ".join(f"{k['at'] - started:.1f}s {k['kind']} {k['pid']}"
                                            + (f" ({'+'.join(k['hit'])})" if k["hit"] else "") for k in kills))
        print("\n".join(f"[chaos] {line}" for line in report))
        hit_count = sum(len(k["hit"]) for k in kills)
        print(f"[chaos] {takeovers} takeovers for {hit_count} (kill, held run) pairs"
              + (f": {takeovers - hit_count} leases lost without a kill" if takeovers > hit_count else ""))
        print(f"[chaos] recovery latency p50={percentile(latencies, 50):.2f} s p99={percentile(latencies, 99):.2f} s "
              f"over {len(latencies)} kills (lease ttl {TTL:g} s)")  # fmt: skip
        wait_for(lambda: all(is_ready(w) for w in workers), timeout=120)  # SIGTERM before that is no clean stop
        # A run holder that was not killed either finished its run or was fenced (its lease was taken over).
        killed = {k["pid"] for k in kills}
        for f, proc in holders.items():
            if proc.pid not in killed:
                code = proc.wait(timeout=120)
                text = (tmp_path / f"run-{f}.log").read_text()
                assert code == 0 or "LeaseLostError" in text, f"{f}: holder exited {code}:\n{text[-3000:]}"
        codes = [stop(w) for w in workers]
        assert codes == [0] * WORKERS, f"workers did not stop cleanly: {codes}\n{logs_tail()}"
    finally:
        for proc in everything:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        backend.clear()
