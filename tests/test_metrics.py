"""Metrics: what a backend with metrics on records, on real Redis and real Dynamiq flows; nothing when off; the
multiprocess mode of prometheus-client across real processes; the fleet read; JSON logs without secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S
from prometheus_client import CollectorRegistry

from dynamiq_redis_ckpt import LeaseLostError, RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.leases import claim_op, fleet_op
from dynamiq_redis_ckpt.metrics import LATENCY_BUCKETS, StoreMetrics
from dynamiq_redis_ckpt.registry import REGISTRY
from dynamiq_redis_ckpt.requests import cmd
from tests.flows import chain_flow
from tests.redis_proc import free_port

ROOT = Path(__file__).resolve().parent.parent


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def measured(redis_server):
    registry = CollectorRegistry()
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"m{uuid.uuid4().hex[:8]}", metrics=registry)
    yield backend, registry
    backend.clear()


def test_a_flow_run_is_measured_save_by_save(measured):
    backend, registry = measured
    result = chain_flow(backend, 6, flow_id="measured").run_sync({"q": 1})
    assert result.status.value == "success"
    stored = backend.get_list_by_flow("measured", limit=None)
    saves = sample(registry, "dynamiq_ckpt_saves_total", outcome="ok")
    assert saves >= len(stored) >= 7  # APPEND: one snapshot per node and the first; updates are saves too
    assert sample(registry, "dynamiq_ckpt_operation_duration_seconds_count", operation="save") == saves
    assert sample(registry, "dynamiq_ckpt_operation_duration_seconds_count", operation="list") == 1
    # The histogram resolves a loopback save: the smallest bucket is 50 µs, and no save took 5 s.
    assert LATENCY_BUCKETS[0] == 0.00005
    assert sample(registry, "dynamiq_ckpt_operation_duration_seconds_bucket", operation="save", le="5.0") == saves
    assert sample(registry, "dynamiq_ckpt_operation_duration_seconds_bucket", operation="save", le="0.00005") < saves
    assert sample(registry, "dynamiq_ckpt_checkpoint_encoded_bytes_count") == saves
    raw = sample(registry, "dynamiq_ckpt_content_bytes_total", stage="raw")
    compressed = sample(registry, "dynamiq_ckpt_content_bytes_total", stage="compressed")
    assert 0 < compressed < raw, "prose compresses"
    encoded = sample(registry, "dynamiq_ckpt_checkpoint_encoded_bytes_sum")
    added = sample(registry, "dynamiq_ckpt_save_added_bytes_sum")
    assert added == compressed and added < encoded / 3, "a save adds what changed, compressed"
    backend.load(stored[0].id)
    assert sample(registry, "dynamiq_ckpt_operation_duration_seconds_count", operation="load") == 1


def test_labels_stay_bounded_unless_a_flow_label_is_asked_for(redis_server):
    plain, labelled = CollectorRegistry(), CollectorRegistry()
    a = RedisCheckpointBackend(url=redis_server.url, prefix="m-lab-a", metrics=plain)
    b = RedisCheckpointBackend(url=redis_server.url, prefix="m-lab-b", metrics=labelled, metrics_flow_label=True)
    try:
        for backend in (a, b):
            chain_flow(backend, 2, flow_id="flow-x").run_sync({"q": 1})
        names = {s.labels.get("flow") for m in plain.collect() for s in m.samples}
        assert names == {None}, "no flow label by default"
        assert sample(labelled, "dynamiq_ckpt_saves_total", outcome="ok", flow="flow-x") >= 3
        every = [s.labels for m in plain.collect() for s in m.samples]
        assert not any(k in labels for labels in every for k in ("run", "run_id", "checkpoint", "wf_run_id"))
        with pytest.raises(Exception, match="flow_label"):
            RedisCheckpointBackend(url=redis_server.url, prefix="m-lab-c", metrics=labelled)
    finally:
        a.clear()
        b.clear()


def test_fencing_and_lost_leases_are_counted(measured):
    backend, registry = measured
    flow = chain_flow(backend, 3, flow_id="fenced")
    first = flow.run_sync({"q": 1})
    assert first.status.value == "success"
    done = backend.get_latest_by_flow("fenced")
    # A second writer of the run: take its lease under another owner, then let the first "running flow" save again.
    ticket_owner = "someone-else"
    with as_running_flow():
        backend.save(done.model_copy(update={"id": "restart", "status": S.ACTIVE, "parent_checkpoint_id": done.id}))
    backend.execute(_expire_and_claim(backend, "fenced", done.wf_run_id, ticket_owner))
    with pytest.raises(LeaseLostError), as_running_flow():
        backend.save(done.model_copy(update={"id": "late", "status": S.ACTIVE, "parent_checkpoint_id": "restart"}))
    assert sample(registry, "dynamiq_ckpt_saves_total", outcome="fenced") == 1
    assert sample(registry, "dynamiq_ckpt_fenced_writes_total") == 1
    assert sample(registry, "dynamiq_ckpt_leases_lost_total", reason="taken_over") == 1
    assert backend.load("late") is None


def _expire_and_claim(backend, flow, run, owner):
    keys = backend.store.keys
    yield cmd("HSET", keys.lease(flow, run), "exp", 1)
    yield cmd("ZADD", keys.lease_index(flow), 1, run)
    claim = yield from claim_op(keys, flow, run, owner, 60_000, "orphan", 5)
    assert claim is not None and claim.waited_ms > 0
    return claim


def test_redis_errors_are_counted_by_kind(own_redis):
    registry = CollectorRegistry()
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="m-err", metrics=registry, retries=1,
                                     retry_backoff_seconds=0.01, socket_timeout=0.3)  # fmt: skip
    raw = backend.redis
    raw.script_flush()
    chain_flow(backend, 1, flow_id="errs").run_sync({"q": 1})
    assert sample(registry, "dynamiq_ckpt_redis_errors_total", kind="noscript") >= 1, "scripts reloaded after a flush"
    raw.hset(backend.store.keys.locator("cp-wrong"), "x", "y")
    with pytest.raises(Exception):
        backend.load("cp-wrong")
    assert sample(registry, "dynamiq_ckpt_redis_errors_total", kind="wrongtype") == 1
    saved = backend.get_latest_by_flow("errs")
    raw.replicaof("127.0.0.1", free_port())  # a replica of nobody: read-only
    try:
        with pytest.raises(Exception, match="READONLY"):
            backend.save(saved.model_copy(update={"id": "refused"}))
        assert sample(registry, "dynamiq_ckpt_redis_errors_total", kind="readonly") == 2, "attempt and retry"
    finally:
        raw.replicaof("NO", "ONE")
    own_redis.pause()
    try:
        with pytest.raises(Exception):
            backend.load("x")
        assert sample(registry, "dynamiq_ckpt_redis_errors_total", kind="timeout") == 2
    finally:
        own_redis.resume()
    own_redis.kill()
    with pytest.raises(Exception):
        backend.load("x")
    assert sample(registry, "dynamiq_ckpt_redis_errors_total", kind="connection") == 2


def test_nothing_is_measured_or_imported_when_metrics_are_off(redis_server):
    code = f"""
import sys
from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import chain_flow
backend = RedisCheckpointBackend(url={redis_server.url!r}, prefix="m-off")
chain_flow(backend, 2, flow_id="off").run_sync({{"q": 1}})
backend.load(backend.get_latest_by_flow("off").id)
backend.clear()
assert backend._sync.observer is None and backend.store.observer is None
assert "dynamiq_redis_ckpt.metrics" not in sys.modules, "metrics are imported only when asked for"
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]


def test_multiprocess_mode_adds_up_every_process(redis_server, tmp_path):
    """prometheus-client's multiprocess mode: each of three real processes saves; one collector sees the sum."""
    directory = tmp_path / "prom"
    directory.mkdir()
    code = f"""
import sys
from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import chain_flow
backend = RedisCheckpointBackend(url={redis_server.url!r}, prefix="m-mp-" + sys.argv[1], metrics=True)
chain_flow(backend, 3, flow_id="mp").run_sync({{"q": 1}})
print(len(backend.get_list_by_flow("mp", limit=None)))
backend.clear()
"""
    env = os.environ | {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outs]
    from prometheus_client.multiprocess import MultiProcessCollector

    combined = CollectorRegistry()
    MultiProcessCollector(combined, path=str(directory))
    stored = sum(int(out.split()[-1]) for out, _ in outs)
    saves = sample(combined, "dynamiq_ckpt_saves_total", outcome="ok")
    assert saves >= stored >= 12 and saves % 3 == 0, (saves, stored)
    assert sample(combined, "dynamiq_ckpt_operation_duration_seconds_count", operation="save") == saves
    assert sample(combined, "dynamiq_ckpt_operation_duration_seconds_count", operation="list") == 3


def test_a_library_user_mounts_the_collectors_on_their_own_registry(redis_server):
    mine = CollectorRegistry()
    metrics = StoreMetrics.on(mine)
    one = RedisCheckpointBackend(url=redis_server.url, prefix="m-own-1", metrics=metrics)
    two = RedisCheckpointBackend(url=redis_server.url, prefix="m-own-2", metrics=mine)
    try:
        for backend in (one, two):
            chain_flow(backend, 1, flow_id="own").run_sync({"q": 1})
        per_backend = len(one.get_list_by_flow("own", limit=None))
        assert sample(mine, "dynamiq_ckpt_saves_total", outcome="ok") >= 2 * per_backend, "both share one set"
        from prometheus_client import generate_latest

        assert b"dynamiq_ckpt_operation_duration_seconds_bucket" in generate_latest(mine)
    finally:
        one.clear()
        two.clear()


def test_fleet_read_counts_runs_by_state_without_a_scan(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="m-fleet")
    keys = backend.store.keys
    raw = backend.redis
    now_ms = int(time.time() * 1000)
    # Two live leases, one orphan (ran out 5 s ago), a timer due in an hour, one due now, one dead letter: written as
    # the scripts leave them, then announced as a save announces them.
    raw.zadd(keys.lease_index("fleet-0"), {"live-a": now_ms + 60_000, "live-b": now_ms + 60_000, "orphan": now_ms - 5000})
    raw.zadd(keys.due_index("fleet-1"), {"later": now_ms + 3_600_000, "now": now_ms - 10})
    raw.zadd(keys.dead_index("fleet-2"), {"dead": now_ms})
    raw.sadd(keys.dead_flows(keys.shard_of("fleet-2")), "fleet-2")
    for flow in ("fleet-0", "fleet-1"):
        raw.zadd(keys.wake(keys.shard_of(flow)), {flow: now_ms})
    raw.config_resetstat()
    fleet = backend.execute(fleet_op(keys))
    assert fleet.runs == {"leased": 2, "orphaned": 1, "scheduled": 1, "due": 1, "dead": 1}
    assert 4.0 <= fleet.oldest_orphan_seconds < 60 and fleet.flows == 2
    raw.zadd(keys.lease_index("fleet-0"), {"retried": 0})  # put back by `dead retry`: claimable, but no age
    again = backend.execute(fleet_op(keys))
    assert again.runs["orphaned"] == 2 and 4.0 <= again.oldest_orphan_seconds < 60, again
    raw.zrem(keys.lease_index("fleet-0"), "retried")
    stats = raw.info("commandstats")
    assert not any(name in stats for name in ("cmdstat_scan", "cmdstat_keys")), "bounded reads only"
    assert not fleet.truncated
    shard = keys.shard_of("fleet-0")
    crowd = [f for f in (f"crowd-{i}" for i in range(200)) if keys.shard_of(f) == shard][:2]
    raw.zadd(keys.wake(shard), {f: now_ms for f in crowd})
    assert backend.execute(fleet_op(keys, flows_per_shard=2)).truncated, "a shard with more flows than a read looks at"
    backend.clear()


def test_worker_logs_json_lines_with_run_ids_and_no_password(own_redis, tmp_path):
    own_redis_client = RedisCheckpointBackend(url=own_redis.url, prefix="m-log").redis
    own_redis_client.config_set("requirepass", "s3cret-pw")
    url = f"redis://:s3cret-pw@127.0.0.1:{own_redis.port}/0"
    backend = RedisCheckpointBackend(url=url, prefix="m-log", lease_ttl_seconds=1.0)
    flow = chain_flow(backend, 2, flow_id="logged")
    with as_running_flow():  # a run that took its lease and then died: an orphan once a second has passed
        from tests.test_human_input import make_first_checkpoint

        cp = make_first_checkpoint(flow, "wf-logged")
        backend.save(cp)
    REGISTRY.fence(backend.namespace, "logged", "wf-logged", REGISTRY.get((backend.namespace, "logged", "wf-logged")).token,
                   "the test stops renewing it")  # fmt: skip
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", url, "--prefix", "m-log", "--flows",
         "tests.test_metrics:logged_flows", "--lease-ttl", "1", "--poll", "0.1", "--log-format", "json"],
        cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=os.environ | {"DYNAMIQ_REDIS_CKPT_URL": url},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            latest = backend.get_latest_by_flow("logged")
            if latest is not None and latest.status == S.COMPLETED:
                break
            time.sleep(0.2)
        assert latest.status == S.COMPLETED
    finally:
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    text = log.read_text()
    assert "s3cret-pw" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is one JSON object
    about = [line for line in lines if "wf-logged" in line["message"]]
    assert about and all(line["run"] == "wf-logged" and line["flow"] == "logged" for line in about)
    assert any(line["message"].startswith("resuming run") and line["checkpoint"] == cp.id for line in about)
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    backend.clear()


def logged_flows(flow_id: str):
    """The worker's registry for the JSON-log test."""
    url = os.environ.get("DYNAMIQ_REDIS_CKPT_URL")
    return chain_flow(RedisCheckpointBackend(url=url, prefix="m-log"), 2, flow_id=flow_id)


def test_claims_are_counted_won_lost_and_dead_lettered(redis_server):
    from dynamiq_redis_ckpt.metrics import WorkerMetrics
    from dynamiq_redis_ckpt.worker import Recovery
    from tests.test_human_input import make_first_checkpoint

    backend = RedisCheckpointBackend(url=redis_server.url, prefix="m-claims", lease_ttl_seconds=0.6)
    metrics = WorkerMetrics(CollectorRegistry())
    first, second = Recovery(backend, metrics=metrics), Recovery(backend, metrics=metrics, max_attempts=1)
    try:
        flow = chain_flow(backend, 2, flow_id="claimed")
        for run in ("wf-race", "wf-dead"):
            with as_running_flow():  # a run that took its lease, then died (this process stops renewing it)
                backend.save(make_first_checkpoint(flow, run))
            held = REGISTRY.get((backend.namespace, "claimed", run))
            REGISTRY.fence(backend.namespace, "claimed", run, held.token, "the test stops renewing it")
        time.sleep(0.8)
        assert first.claim("claimed", "wf-race") is not None
        assert second.claim("claimed", "wf-race") is None, "taken already"
        backend.redis.hset(backend.store.keys.lease("claimed", "wf-dead"), "attempts", 1)
        assert second.claim("claimed", "wf-dead") is None
        count = metrics.registry.get_sample_value
        assert count("dynamiq_ckpt_worker_claims_total", {"trigger": "orphan", "outcome": "won"}) == 1
        assert count("dynamiq_ckpt_worker_claims_total", {"trigger": "orphan", "outcome": "lost_race"}) == 1
        assert count("dynamiq_ckpt_worker_claims_total", {"trigger": "orphan", "outcome": "dead_lettered"}) == 1
        assert count("dynamiq_ckpt_dead_letters_total") == 1
        assert [d.run for d in first.dead_letters()] == ["wf-dead"]
    finally:
        backend.clear()


def test_a_pause_resumed_by_a_worker_of_the_same_process_is_no_lost_lease(measured):
    from dynamiq_redis_ckpt.worker import Recovery
    from tests.flows import timer_flow

    backend, registry = measured
    assert timer_flow(backend, "paused", seconds=0.5).run_sync({"q": 1}).status.value == "failure"  # paused
    time.sleep(0.7)
    recovery = Recovery(backend)
    claim = recovery.claim("paused", backend.get_latest_by_flow("paused").wf_run_id, "due")
    assert claim is not None
    assert recovery.resume(claim, lambda f: timer_flow(backend, f, seconds=0.5)).status.value == "success"
    lost = {s.labels["reason"]: s.value for m in registry.collect() for s in m.samples
            if s.name == "dynamiq_ckpt_leases_lost_total"}  # fmt: skip
    assert lost and not any(lost.values()), lost
