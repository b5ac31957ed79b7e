"""Leases belong to runs: a plain API call (a script, an operator, a test, another process) never breaks a live run,
never raises LeaseLostError, and never takes, bumps or hands back a lease. Only a running Flow's saves are fenced."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import LeaseLostError, RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.leases import LeaseTicket
from dynamiq_redis_ckpt.registry import process_owner
from tests.flows import PREFIX_ENV, SLEEP_ENV, chain_flow
from tests.test_contract import make

ROOT = Path(__file__).resolve().parent.parent


def lease_of(backend, flow, run) -> dict:
    return {k.decode(): v.decode() for k, v in backend.redis.hgetall(backend.store.keys.lease(flow, run)).items()}


@pytest.fixture
def slow_steps():
    os.environ[SLEEP_ENV] = "0.3"
    yield
    os.environ.pop(SLEEP_ENV, None)


def test_update_of_an_older_run_id_of_a_wf_run_is_a_plain_write(backend):
    """Dynamiq 0.69's own backend test: two run_ids of one wf_run_id, then update() of the older one."""
    first = make("c1", "f", "run-1", "wf", S.ACTIVE, minute=0)
    second = make("c2", "f", "run-2", "wf", S.ACTIVE, minute=1, parent="c1")
    backend.save(first)
    backend.save(second)
    first.metadata = {"note": "changed later"}
    backend.update(first)
    assert backend.load("c1").metadata == {"note": "changed later"}
    assert [c.id for c in backend.get_list_by_flow_and_run("f", "wf")] == ["c2", "c1"], "newest created_at first"
    assert backend.redis.exists(backend.store.keys.lease("f", "wf")) == 0, "plain saves take no lease"


def test_plain_writes_of_a_run_this_process_saw_fenced_still_land(leased_backend):
    """A run_sync fenced here stays fenced, but a script's save of the same run is not that run_sync's write."""
    backend = leased_backend
    with as_running_flow():
        backend.save(make("a", "f", "run-1", "wf", S.ACTIVE))
        ticket = LeaseTicket("take", "elsewhere:1:x", 0, 10_000)
        backend.execute(backend.store.save(make("b", "f", "run-2", "wf", S.ACTIVE, minute=1, parent="a"), ticket=ticket))
        with pytest.raises(LeaseLostError):
            backend.save(make("c", "f", "run-1", "wf", S.ACTIVE, minute=2, parent="a"))
    before = lease_of(backend, "f", "wf")
    patched = make("c", "f", "run-1", "wf", S.FAILED, minute=2, parent="a")
    backend.save(patched)  # plain: an operator recording what happened to run-1
    backend.update(patched)
    assert backend.delete("a") and backend.cleanup_by_flow("f", keep_count=10) == 0
    assert asyncio.run(backend.update_async(patched)) is None
    assert backend.load("c").status == S.FAILED
    assert lease_of(backend, "f", "wf") == before, "owner, token, expiry and head untouched"


@pytest.fixture
def leased_backend(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"lr{uuid.uuid4().hex[:8]}", lease_ttl_seconds=3)
    yield backend
    backend.clear()


def test_a_running_flows_saves_hold_the_lease_and_plain_calls_beside_it_change_nothing(leased_backend, slow_steps):
    """A real Flow runs on a thread; meanwhile this thread updates, re-saves, deletes, cleans up and lists its
    checkpoints, sync and async: the run never sees LeaseLostError and its lease is never taken or bumped."""
    backend = leased_backend
    flow = chain_flow(backend, 8, flow_id="live-chain", words=20)
    results, errors = [], []

    def run():
        try:
            results.append(flow.run_sync({"q": 1}, config=None))
        except BaseException as e:  # noqa: BLE001 - a LeaseLostError must fail this test, not kill the thread quietly
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    seen, tokens = set(), set()
    try:
        while thread.is_alive():
            cps = backend.get_list_by_flow("live-chain", limit=None)
            if not cps:
                time.sleep(0.05)
                continue
            run_key = cps[0].wf_run_id or cps[0].run_id
            lease = lease_of(backend, "live-chain", run_key)
            if lease.get("owner"):
                assert lease["owner"] == process_owner(), "the running flow holds its run's lease"
                tokens.add(lease["token"])
            for cp in cps:
                cp.metadata = {"operator": "me"}
                backend.update(cp)
                seen.add(cp.id)
            backend.save(cps[0])
            asyncio.run(backend.update_async(cps[-1]))
            backend.cleanup_by_flow("live-chain", keep_count=1000)
            time.sleep(0.05)
    finally:
        thread.join(timeout=60)
    assert not errors, errors
    assert results and results[0].status.value == "success"
    assert tokens == {"1"}, "the lease was taken once by the run and never bumped by the plain calls"
    final = backend.get_list_by_flow("live-chain", limit=None)
    assert final[0].status == S.COMPLETED and len(backend.get_chain(final[0].id)) == len(final)
    assert all(backend.load(i).metadata == {"operator": "me"} for i in seen if i != final[0].id)
    lease = lease_of(backend, "live-chain", final[0].wf_run_id or final[0].run_id)
    assert lease["owner"] == "" and lease["token"] == "1", "handed back by the run's COMPLETED save"


def test_clear_beside_a_live_run_keeps_its_lease(leased_backend, slow_steps):
    """clear() empties the namespace but never a lease a run holds right now: the run goes on and completes."""
    backend = leased_backend
    backend.save(make("old", "other-flow", "r", "wf-old", S.COMPLETED))
    with as_running_flow():  # an ended run: its lease goes with clear()
        backend.save(make("e1", "ended", "r", "wf-ended", S.ACTIVE))
        backend.save(make("e2", "ended", "r", "wf-ended", S.COMPLETED, minute=1, parent="e1"))
    flow = chain_flow(backend, 6, flow_id="cleared-chain", words=20)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(flow.run_sync({"q": 1})))
    thread.start()
    lease_key = None
    for _ in range(200):
        found = list(backend.redis.scan_iter(match=f"{backend.prefix}:lease:{{cleared-chain}}:*"))
        if found and backend.redis.hget(found[0], "owner"):
            lease_key = found[0]
            break
        time.sleep(0.02)
    assert lease_key is not None
    backend.clear()
    assert backend.redis.hget(lease_key, "owner") == process_owner().encode(), "the live lease survived clear()"
    shard = backend.store.keys.shard_of("cleared-chain")
    assert backend.redis.zrange(backend.store.keys.wake(shard), 0, -1) == [b"cleared-chain"], "and stays findable"
    assert backend.load("old") is None and backend.redis.exists(backend.store.keys.lease("ended", "wf-ended")) == 0
    thread.join(timeout=60)
    assert outcome and outcome[0].status.value == "success", "the run was not disturbed"
    assert backend.redis.hget(lease_key, "token") == b"1"
    backend.clear()
    assert list(backend.redis.scan_iter(match=f"{backend.prefix}:*")) == [], "with no live run, clear() leaves nothing"


def test_run_async_saves_are_recognised_as_a_running_flows(leased_backend):
    backend = leased_backend
    flow = chain_flow(backend, 3, flow_id="async-chain", words=10)
    result = asyncio.run(flow.run_async({"q": 1}))
    assert result.status.value == "success"
    latest = backend.get_latest_by_flow("async-chain")
    lease = lease_of(backend, "async-chain", latest.wf_run_id or latest.run_id)
    assert lease["token"] == "1" and lease["owner"] == "" and lease["head"] == latest.id


@pytest.mark.slow
def test_an_operator_in_another_process_never_breaks_a_live_run(redis_server, tmp_path):
    """Process A runs a 12-node flow; process B keeps updating and re-saving its checkpoints, listing, deleting an
    older run's snapshots and cleaning up. A completes without LeaseLostError, B's writes stay, the chain is whole."""
    prefix, flow_id = f"op{uuid.uuid4().hex[:6]}", "chain-12-operated"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    for i in range(6):  # an older, finished run of the same flow, for B to delete
        backend.save(make(f"old-{i}", flow_id, "old-run", "wf-old", S.COMPLETED, minute=i, parent=f"old-{i - 1}" if i else None))
    env = os.environ | {"PYTHONPATH": str(ROOT), SLEEP_ENV: "0.3", PREFIX_ENV: prefix, "CKPT_TEST_LEASE_TTL": "3"}
    run = f"wf-{flow_id}"
    a = subprocess.Popen([sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, flow_id, "12"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    out = tmp_path / "operator.json"
    b = subprocess.Popen([sys.executable, "-m", "tests.operator_churn", redis_server.url, prefix, flow_id, run,
                          "wf-old", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    try:
        a_out, a_err = a.communicate(timeout=180)
        b_out, b_err = b.communicate(timeout=180)
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
    assert a.returncode == 0 and a_out.split()[-1] == "success", a_err[-3000:]
    assert "LeaseLostError" not in a_err
    assert b.returncode == 0, b_err[-3000:]
    report = json.loads(out.read_text())
    print(f"\n[operator beside a live run] {report['done']}")
    assert report["done"]["updates"] > 12 and report["done"]["deletes"] == 6
    chain = backend.get_chain(backend.get_latest_by_flow(flow_id).id)
    listed = backend.get_list_by_flow_and_run(flow_id, run)
    assert chain[0].status == S.COMPLETED and len(chain) == len(listed) == 14, "every snapshot of the run, linked"
    assert chain[-1].parent_checkpoint_id is None
    stamped = {cp.id: (cp.metadata or {}).get("stamp") for cp in listed}
    kept = [cp_id for cp_id, stamp in report["stamps"].items() if cp_id in stamped]
    assert kept and all(stamped[cp_id] == report["stamps"][cp_id] for cp_id in kept), "B's last update of each stays"
    assert backend.get_list_by_flow_and_run(flow_id, "wf-old") == []
    lease = lease_of(backend, flow_id, run)
    assert lease["token"] == "1" and lease["owner"] == "", "taken once, by A; handed back at its end"
    backend.clear()


def test_a_save_wrapped_twice_by_a_subclass_is_still_a_running_flows(leased_backend):
    """Review finding: the caller check looked three frames up; two decorators on a subclass's save hid the Flow,
    and its run went without a lease, timer or recovery."""
    import functools

    def passthrough(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            return method(self, *args, **kwargs)

        return wrapper

    class Wrapped(RedisCheckpointBackend):
        @passthrough
        @passthrough
        def save(self, checkpoint):
            return super().save(checkpoint)

    backend = Wrapped(url=leased_backend.url, prefix=leased_backend.prefix, lease_ttl_seconds=3)
    assert chain_flow(backend, 2, flow_id="wrapped", words=5).run_sync({"q": 1}).status.value == "success"
    latest = backend.get_latest_by_flow("wrapped")
    assert lease_of(backend, "wrapped", latest.wf_run_id or latest.run_id)["token"] == "1"
