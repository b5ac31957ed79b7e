"""The recovery worker with real processes: SIGKILL, SIGSTOP past the ttl, SIGTERM, timers across workers."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.redis_proc import free_port
from tests.flows import CRASH_ENV, EFFECTS_ENV, PREFIX_ENV, SLEEP_ENV, timer_flow
from tests.homes import home

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def env_for(redis_server, prefix, **extra) -> dict:
    return os.environ | {"DYNAMIQ_REDIS_CKPT_URL": redis_server.url, PREFIX_ENV: prefix, "PYTHONPATH": str(ROOT)} | extra


def start_worker(redis_server, prefix, log_path, *, ttl=2.0, metrics_port=None, flags=(), **extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", redis_server.url, "--prefix", prefix,
            "--flows", "tests.flows:worker_flows", "--lease-ttl", str(ttl), "--poll", "0.2", *flags]  # fmt: skip
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    return subprocess.Popen(args, cwd=ROOT, env=env_for(redis_server, prefix, **extra),
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)  # fmt: skip


def wait_for(predicate, timeout=90.0, every=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting")


def effects(path: Path) -> collections.Counter:
    return collections.Counter(line.split("@")[0] for line in path.read_text().split()) if path.exists() else collections.Counter()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """A worker's /metrics as {(sample name, sorted labels): value}, parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_worker_resumes_a_killed_run_and_stops_on_sigterm(redis_server, tmp_path):
    prefix, flow_id, log = "wk1", "chain-8-killed", tmp_path / "effects"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    port = free_port()
    worker = start_worker(redis_server, prefix, tmp_path / "worker.log", metrics_port=port, **{EFFECTS_ENV: str(log)})
    wait_for(lambda: "worker ready" in (tmp_path / "worker.log").read_text())
    assert urlopen(f"http://127.0.0.1:{port}/healthz").status == 200
    assert urlopen(f"http://127.0.0.1:{port}/readyz").status == 200
    child = subprocess.run(
        [sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, flow_id, "8"], cwd=ROOT, timeout=240,
        env=env_for(redis_server, prefix, **{CRASH_ENV: "s05", EFFECTS_ENV: str(log), "CKPT_TEST_LEASE_TTL": "2"}),
        capture_output=True,
    )  # fmt: skip
    killed_at = time.monotonic()
    assert child.returncode == -signal.SIGKILL
    try:
        done = wait_for(lambda: (cp := backend.get_latest_by_flow(flow_id)) and cp.status == S.COMPLETED and cp)
        print(f"\n[recovery] kill -> completed by the worker in {time.monotonic() - killed_at:.1f} s (lease ttl 2 s)")
        assert [effects(log)[f"s0{i}"] for i in range(8)] == [1, 1, 1, 1, 1, 2, 1, 1]
        keys = Path(str(log) + ".keys").read_text().split()
        assert len(keys) == 9 and len(set(keys)) == 8, "the node run twice used one idempotency key both times"
        runs = {cp.wf_run_id for cp in backend.get_list_by_flow(flow_id, limit=None)}
        assert runs == {done.wf_run_id}, "the resumed run kept its wf_run_id: one chain"
        assert len(backend.get_chain(done.id)) == len(backend.get_list_by_flow(flow_id, limit=None))
        scraped = wait_for(lambda: (m := scrape(port))
                           and m.get(("dynamiq_ckpt_resumes_total", (("outcome", "success"), ("trigger", "orphan"))))
                           and m)  # fmt: skip
        assert scraped[("dynamiq_ckpt_worker_claims_total", (("outcome", "won"), ("trigger", "orphan")))] == 1
        assert scraped[("dynamiq_ckpt_runs_in_progress", ())] == 0
        # Recovery latency: from the lease running out to the resumed run's first save, one observation. The kill
        # came after a renewal at most, so the lease ran out within a ttl (2 s) of it; the worker polls every 0.2 s.
        assert scraped[("dynamiq_ckpt_recovery_latency_seconds_count", ())] == 1
        latency = scraped[("dynamiq_ckpt_recovery_latency_seconds_sum", ())]
        print(f"[recovery] recovery latency as the worker measured it: {latency:.2f} s")
        assert 0 < latency < 10
        saves = scraped[("dynamiq_ckpt_saves_total", (("outcome", "ok"),))]
        assert saves >= 3, "the resumed run's saves (nodes 5..7 and the end) are counted by the worker's backend"
        assert scraped[("dynamiq_ckpt_operation_duration_seconds_count", (("operation", "save"),))] == saves
        assert scraped[("dynamiq_ckpt_fleet_up", ())] == 1
        assert scraped[("dynamiq_ckpt_fleet_runs", (("state", "orphaned"),))] == 0
        info = [labels for name, labels in scraped if name == "dynamiq_ckpt_build_info"]
        assert dict(info[0])["redis_version"] == backend.redis.info("server")["redis_version"]
    finally:
        code = stop(worker)
        backend.clear()
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_sigstop_past_ttl_then_sigcont_the_woken_process_is_fenced(redis_server, tmp_path):
    prefix, flow_id, log = "wk2", "chain-8-frozen", tmp_path / "effects"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    slow = {SLEEP_ENV: "0.6", EFFECTS_ENV: str(log), "CKPT_TEST_LEASE_TTL": "2"}
    holder = subprocess.Popen([sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, flow_id, "8"],
                              cwd=ROOT, env=env_for(redis_server, prefix, **slow), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    worker = None
    try:
        wait_for(lambda: effects(log)["s02"] >= 1, every=0.05)
        holder.send_signal(signal.SIGSTOP)
        frozen = backend.get_latest_by_flow(flow_id)
        worker = start_worker(redis_server, prefix, tmp_path / "worker.log", **slow)
        done = wait_for(lambda: (cp := backend.get_latest_by_flow(flow_id)) and cp.status == S.COMPLETED and cp)
        holder.send_signal(signal.SIGCONT)
        out, err = holder.communicate(timeout=120)
        assert holder.returncode != 0 and "LeaseLostError" in err, err[-3000:]
        assert backend.get_latest_by_flow(flow_id).id == done.id, "nothing the woken process wrote landed after"
        writes_of_holder = [c for c in backend.get_list_by_flow(flow_id, limit=None) if c.run_id == frozen.run_id]
        assert max(len(c.completed_node_ids) for c in writes_of_holder) <= len(frozen.completed_node_ids) + 1
        counts = effects(log)
        assert all(counts[f"s0{i}"] == 1 for i in range(len(frozen.completed_node_ids))), counts
        assert all(counts[f"s0{i}"] >= 1 for i in range(8)) and sum(counts.values()) <= 8 + 2, counts
    finally:
        if holder.poll() is None:
            holder.send_signal(signal.SIGCONT)
            holder.kill()
        if worker is not None:
            assert stop(worker) == 0
        backend.clear()


def test_timer_fires_once_at_its_time_across_workers(redis_server, tmp_path):
    prefix, log = "wk3", tmp_path / "effects"
    os.environ[EFFECTS_ENV] = str(log)
    try:
        backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
        ports = [free_port() for _ in range(3)]
        workers = [start_worker(redis_server, prefix, tmp_path / f"w{i}.log", metrics_port=ports[i],
                                **{EFFECTS_ENV: str(log)}) for i in range(3)]  # fmt: skip
        try:
            wait_for(lambda: all("worker ready" in (tmp_path / f"w{i}.log").read_text() for i in range(3)))
            first = timer_flow(backend, "timer-1", seconds=3.0).run_sync({"q": 1})
            assert first.status.value == "failure"  # Dynamiq reports a pause as a FAILURE carrying RunPausedException
            paused = backend.get_latest_by_flow("timer-1")
            assert paused.status == S.PENDING_INPUT and paused.resume_at is not None
            done = wait_for(lambda: (cp := backend.get_latest_by_flow("timer-1")) and cp.status == S.COMPLETED and cp)
            scraped = [scrape(port) for port in ports]
        finally:
            codes = [stop(w) for w in workers]
        assert codes == [0, 0, 0]
        lines = [line for line in log.read_text().split() if line.startswith("wait@")]
        assert len(lines) == 1, "the timer fired exactly once"
        woke = float(lines[0].split("@")[1])
        assert woke >= paused.resume_at.timestamp(), "never early"
        print(f"\n[timer] fired {woke - paused.resume_at.timestamp():.2f} s after its due time")
        won = [m[("dynamiq_ckpt_worker_claims_total", (("outcome", "won"), ("trigger", "due")))] for m in scraped]
        assert sorted(won) == [0, 0, 1], "one worker claimed the timer"
        lag = [m[("dynamiq_ckpt_timer_lag_seconds_count", ())] for m in scraped]
        assert sorted(lag) == [0, 0, 1]
        lag_seconds = sum(m[("dynamiq_ckpt_timer_lag_seconds_sum", ())] for m in scraped)
        assert 0 <= lag_seconds < 10, lag_seconds
        assert done.wf_run_id == paused.wf_run_id
        assert backend.redis.zcard(backend._core.keys.due_index(home(backend, "timer-1", done.wf_run_id))) == 0
    finally:
        os.environ.pop(EFFECTS_ENV, None)
        RedisCheckpointBackend(url=redis_server.url, prefix=prefix).clear()


def test_sigterm_hands_running_runs_back_at_once(redis_server, tmp_path):
    """A worker stopped mid-run hands the lease back: a second worker continues well before the ttl would end."""
    prefix, flow_id, log = "wk4", "chain-6-handback", tmp_path / "effects"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    slow = {SLEEP_ENV: "1.0", EFFECTS_ENV: str(log)}
    first = start_worker(redis_server, prefix, tmp_path / "first.log", ttl=30.0, **slow)
    second = None
    try:
        wait_for(lambda: "worker ready" in (tmp_path / "first.log").read_text())
        child = subprocess.run(
            [sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, flow_id, "6"], cwd=ROOT, timeout=240,
            env=env_for(redis_server, prefix, **{CRASH_ENV: "s01", EFFECTS_ENV: str(log), "CKPT_TEST_LEASE_TTL": "1"}),
            capture_output=True,
        )  # fmt: skip
        assert child.returncode == -signal.SIGKILL
        wait_for(lambda: effects(log)["s02"] >= 1, every=0.05)  # the first worker is running the run
        assert stop(first) == 0
        stopped_at = time.monotonic()
        second = start_worker(redis_server, prefix, tmp_path / "second.log", ttl=30.0, **slow)
        wait_for(lambda: (cp := backend.get_latest_by_flow(flow_id)) and cp.status == S.COMPLETED and cp, timeout=120)
        waited = time.monotonic() - stopped_at
        assert waited < 30, f"continued after {waited:.1f} s: the 30 s lease was handed back, not left to expire"
        counts = effects(log)
        assert counts["s00"] == 1 and all(counts[f"s0{i}"] >= 1 for i in range(6)), counts
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        backend.clear()


def test_flow_registries_from_dict_and_yaml(tmp_path):
    from dynamiq_redis_ckpt.worker import load_flow_factory

    factory = load_flow_factory(flows="tests.test_worker:FACTORIES")
    assert factory("chain-3-x").id == "chain-3-x" and len(factory("chain-3-x").nodes) == 3
    path = tmp_path / "flows.yaml"
    path.write_text(
        "nodes:\n  a:\n    type: tests.flows.Step\n  b:\n    type: tests.flows.Step\n    depends:\n      - node: a\n"
        "flows:\n  from-yaml:\n    nodes: [a, b]\n    checkpoint:\n      enabled: true\n"
    )
    built = load_flow_factory(yaml_path=str(path))
    first, second = built("from-yaml"), built("from-yaml")
    assert first.id == "from-yaml" and {n.id for n in first.nodes} == {"a", "b"}
    assert first is not second, "a fresh Flow per resume"
    with pytest.raises(KeyError):
        built("missing")


def _chain3():
    from dynamiq.checkpoints.backends.in_memory import InMemory

    from tests.flows import chain_flow

    return chain_flow(InMemory(), 3, flow_id="chain-3-x")


FACTORIES = {"chain-3-x": _chain3}
