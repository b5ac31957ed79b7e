"""A running flow's lease when Redis misbehaves: frozen, restarted empty, full. The run stops before its next node
when it cannot prove it holds the run, and the error it raises says why."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import LeaseLostError, RedisCheckpointBackend, as_running_flow
from tests.flows import EFFECTS_ENV, SLEEP_ENV
from tests.test_contract import make
from tests.test_worker import effects, env_for, start_worker, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def saves_of_a_running_flow():
    with as_running_flow():
        yield


def test_redis_restarted_empty_says_the_lease_vanished(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="vanish", lease_ttl_seconds=2)
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    own_redis.restart()  # no persistence: every key is gone, the lease too
    with pytest.raises(LeaseLostError) as lost:
        backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
    assert "vanished" in lost.value.reason and "taken over" not in lost.value.reason, lost.value.reason
    assert backend.load("b") is None


def test_the_heartbeat_also_says_the_lease_vanished(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="vanish2", lease_ttl_seconds=1.5)
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    own_redis.restart()
    time.sleep(1.2)  # a renewal meets the empty server
    with pytest.raises(LeaseLostError) as lost:
        backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
    assert "vanished" in lost.value.reason, lost.value.reason


@contextmanager
def full(raw):
    """Redis with noeviction (the safe policy) and less memory allowed than it uses: every write is refused (OOM)."""
    raw.config_set("maxmemory-policy", "noeviction")
    raw.config_set("maxmemory", str(int(raw.info("memory")["used_memory"]) // 2))
    try:
        yield
    finally:
        raw.config_set("maxmemory", "0")


def test_a_full_redis_fences_the_run_and_the_error_names_the_cause(own_redis):
    """Renewals and saves are refused with OOM. The run stops at its next save with a LeaseLostError that says OOM,
    after trying for as long as its lease could last."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="oom", lease_ttl_seconds=1.5, retries=1)
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    with full(backend.redis):
        started = time.monotonic()
        with pytest.raises(LeaseLostError) as lost:
            backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
        assert time.monotonic() - started < 3, "it gave up when the lease could run out, not later"
    assert "OOM" in lost.value.reason, lost.value.reason
    assert backend.load("b") is None


def test_a_refusal_for_missing_replicas_is_retried_then_stops_the_run(own_redis):
    """Review finding: NOREPLICAS (min-replicas-to-write with no replica in sync) was not retried, so Dynamiq
    swallowed each failed save and the run went on for six nodes without a stored checkpoint."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="norep", lease_ttl_seconds=1.5, retries=1)
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    backend.redis.config_set("min-replicas-to-write", "1")
    try:
        with pytest.raises(LeaseLostError) as lost:
            backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
    finally:
        backend.redis.config_set("min-replicas-to-write", "0")
    assert "NOREPLICAS" in lost.value.reason, lost.value.reason


def test_a_run_whose_first_save_cannot_take_its_lease_stops(own_redis):
    """Redis down when a run starts: its first save (which takes the lease) is tried for a lease's length, then the
    run stops rather than run on without a lease a worker could find."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="down", lease_ttl_seconds=1.5, retries=0,
                                     socket_connect_timeout=0.2)  # fmt: skip
    own_redis.kill()
    started = time.monotonic()
    with pytest.raises(LeaseLostError) as lost:
        backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    assert time.monotonic() - started < 5 and "did not confirm" in lost.value.reason, lost.value.reason
    own_redis.start()


def test_the_self_fence_after_failed_renewals_names_their_error(own_redis):
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="oom2", lease_ttl_seconds=1.5, retries=0)
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    with full(backend.redis):
        time.sleep(2.0)  # renewals refused past the ttl: the heartbeat fences the run itself
    with pytest.raises(LeaseLostError) as lost:
        backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
    reason = lost.value.reason  # fenced by itself, or told by Redis that it ran out once memory was back
    assert ("self-fenced" in reason or "ran out" in reason) and "OOM" in reason, reason


def test_a_save_that_fails_briefly_is_tried_again_while_the_lease_lasts(own_redis):
    """A blip shorter than the lease: the save lands when Redis is back and the run goes on, lease intact."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="blip", lease_ttl_seconds=6, socket_timeout=0.3,
                                     retries=0)  # fmt: skip
    backend.save(make("a", "f", "r", "wf", S.ACTIVE))
    own_redis.pause()
    resumed = []

    def unfreeze():
        time.sleep(1.0)
        own_redis.resume()
        resumed.append(time.monotonic())

    thread = threading.Thread(target=unfreeze)
    thread.start()
    backend.save(make("b", "f", "r", "wf", S.ACTIVE, minute=1, parent="a"))
    thread.join()
    assert backend.load("b") is not None
    backend.save(make("c", "f", "r", "wf", S.COMPLETED, minute=2, parent="b"))
    assert backend.redis.hget(backend.store.keys.lease("f", "wf"), "token") == b"1"


@pytest.mark.slow
def test_a_user_started_run_never_starts_a_node_after_its_lease_may_have_run_out(own_redis, tmp_path):
    """Redis frozen 9 s (lease ttl 4 s) while a 12-node run is in its 8th node, a worker waiting. The 8th node's
    save cannot be confirmed; the run must stop instead of starting the 9th node while the worker resumes it from
    the 7th: only the node in flight runs twice."""
    prefix, flow_id, log = f"frz{uuid.uuid4().hex[:6]}", "chain-12-frozen", tmp_path / "effects"
    backend = RedisCheckpointBackend(url=own_redis.url, prefix=prefix)
    slow = {SLEEP_ENV: "0.8", EFFECTS_ENV: str(log)}
    worker = start_worker(own_redis, prefix, tmp_path / "worker.log", ttl=4.0, **slow)
    holder = None
    try:
        wait_for(lambda: "worker ready" in (tmp_path / "worker.log").read_text())
        run_env = env_for(own_redis, prefix, **slow, CKPT_TEST_LEASE_TTL="4", CKPT_TEST_SOCKET_TIMEOUT="0.5",
                          CKPT_TEST_RETRIES="1")  # fmt: skip
        holder = subprocess.Popen([sys.executable, "-m", "tests.run_chain", own_redis.url, prefix, flow_id, "12"],
                                  cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: effects(log)["s07"] >= 1, every=0.02)
        own_redis.pause()
        time.sleep(9.0)
        own_redis.resume()
        out, err = holder.communicate(timeout=120)
        assert holder.returncode != 0 and "LeaseLostError" in err, (out, err[-3000:])
        done = wait_for(lambda: (cp := backend.get_latest_by_flow(flow_id)) and cp.status == S.COMPLETED and cp)
        counts = effects(log)
        twice = [node for node, n in counts.items() if n > 1]
        assert twice == ["s07"], f"only the node in flight ran twice: {dict(counts)}"
        assert all(counts[f"s{i:02d}"] == 1 for i in range(12) if i != 7)
        assert len(backend.get_chain(done.id)) == len(backend.get_list_by_flow(flow_id, limit=None))
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        own_redis.resume()
        assert stop(worker) == 0
