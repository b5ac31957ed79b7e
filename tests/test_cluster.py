"""Redis Cluster (docs/cluster.md): a real local cluster of 3 masters and 3 replicas (tests/cluster_proc.py).

In this module: flows spread over every master while listing, loading, ``clear()`` and the lease scans work across
them; a reshard and a half-finished slot migration (MOVED, ASK) while saves go on; a master SIGKILLed while real
Dynamiq runs save (its replica takes over; the runs finish, by themselves or through a worker); ``replica_acks``
(WAIT) on a cluster and what it costs. The rest of the suite runs on a cluster too, in a pytest subprocess with
``CKPT_TEST_SERVER=cluster``: the contract and lease suites, a flow resumed after an interruption and after
SIGKILL, the worker recovering a SIGKILLed run, a short chaos run. Dynamiq's own checkpoint tests run on a cluster in
tests/test_upstream_suite.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from dynamiq.checkpoints.types import CheckpointStatus as S
from redis.crc import key_slot

from dynamiq_redis_ckpt import RedisCheckpointBackend, StoreUnavailableError
from dynamiq_redis_ckpt.worker import Recovery
from dynamiq_redis_ckpt.acl import acl_args
from dynamiq_redis_ckpt.backend import DEFAULT_CLUSTER_BUCKETS
from dynamiq_redis_ckpt.keys import new_run_home, tag
from tests.cluster_fixtures import redis_cluster  # noqa: F401  (the fixture)
from tests.cluster_proc import ClusterSetup
from tests.flows import SLEEP_ENV
from tests.redis_proc import CLUSTER, SERVER_ENV
from tests.test_contract import make
from tests.test_leases import orphan
from tests.test_worker import ROOT, env_for, start_worker, stop, wait_for

HERE = Path(__file__).resolve().parent


def flows_on_every_master(cluster, per_master: int = 2, run=None, name="flow-{}") -> dict[tuple[str, int], list[str]]:
    """Flow ids whose keys live on each master: with one bucket per flow a flow's keys share its own slot; given
    ``run`` (flow id -> run id), the run's home with the default 48 buckets is what counts."""
    found: dict[tuple[str, int], list[str]] = {master: [] for master in cluster.masters()}
    i = 0
    while any(len(flows) < per_master for flows in found.values()):
        flow = name.format(i)
        where = flow if run is None else new_run_home(flow, run(flow), DEFAULT_CLUSTER_BUCKETS)
        master = cluster.master_for_slot(key_slot(tag(where).encode()))
        if len(found[master]) < per_master:
            found[master].append(flow)
        i += 1
    return found


def namespace_keys(cluster, prefix: str) -> dict[tuple[str, int], int]:
    """How many keys of ``prefix`` each master holds (SCAN on each)."""
    return {(host, port): sum(1 for _ in redis.Redis(host=host, port=port).scan_iter(match=f"{prefix}:*", count=1000))
            for host, port in cluster.masters()}  # fmt: skip


def backend_on(cluster, prefix: str, **options) -> RedisCheckpointBackend:
    return RedisCheckpointBackend(url=cluster.ckpt_url, prefix=prefix, **options)


def test_flows_spread_over_every_master_and_every_read_spans_them(redis_cluster):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    backend = backend_on(redis_cluster, prefix)
    by_master = flows_on_every_master(redis_cluster)
    saved = []
    for flows in by_master.values():
        for flow in flows:
            parent = None
            for step in range(3):
                cp = make(f"{flow}-{step}", flow, f"run-{flow}", "wf-shared", S.COMPLETED, step, parent, text=flow)
                backend.save(cp)
                saved.append(cp)
                parent = cp.id
    held = namespace_keys(redis_cluster, prefix)
    assert all(count > 0 for count in held.values()), f"some master holds nothing: {held}"

    for cp in saved:
        loaded = backend.load(cp.id)
        assert loaded is not None and loaded.model_dump() == cp.model_dump()
    for flows in by_master.values():
        for flow in flows:
            assert [c.id for c in backend.get_list_by_flow(flow)] == [f"{flow}-2", f"{flow}-1", f"{flow}-0"]
    # one workflow run across flows on every master: the run's flows are found from any of them
    across = backend.get_list_by_run("wf-shared")
    assert {c.id for c in across} == {c.id for c in saved}

    backend.clear()
    assert sum(namespace_keys(redis_cluster, prefix).values()) == 0, "clear() left keys on some master"
    assert backend.load(saved[0].id) is None


def test_orphans_and_dead_letters_on_every_master_are_found(redis_cluster):
    """The worker's scans (wake shards, lease indexes) and the dead letters span the masters."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    backend = backend_on(redis_cluster, prefix)
    flows = sorted(flow for group in flows_on_every_master(redis_cluster, 1).values() for flow in group)
    for flow in flows:
        orphan(backend, flow=flow, run=f"wf-{flow}")
    recovery = Recovery(backend, max_attempts=1)
    assert sorted(recovery.find_orphans()) == [(flow, f"wf-{flow}") for flow in flows]
    for flow in flows:
        claim = recovery.claim(flow, f"wf-{flow}")
        assert claim is not None and recovery.hand_back(claim, failed=True)
    time.sleep(2.2)  # the failed recovery's back-off
    for flow in flows:
        assert recovery.claim(flow, f"wf-{flow}") is None, "the second failure dead-letters the run"
    assert sorted((d.flow, d.run) for d in recovery.dead_letters()) == [(flow, f"wf-{flow}") for flow in flows]
    assert recovery.find_orphans() == []
    backend.clear()
    assert sum(namespace_keys(redis_cluster, prefix).values()) == 0


def _saver(backend, flow: str, name: str, saved: list, errors: list, stop_at: threading.Event, chain: int = 20):
    """Saves chains of ``chain`` checkpoints (runs ``<name>-0``, ``<name>-1``, ...) until ``stop_at`` is set."""
    run_no = 0
    while not stop_at.is_set():
        run, parent = f"{name}-{run_no}", None
        for step in range(chain):
            cp = make(f"{run}-{step}", flow, run, run, S.ACTIVE if step < chain - 1 else S.COMPLETED, step, parent,
                      text=f"{run} {step}")  # fmt: skip
            try:
                backend.save(cp)
            except Exception as e:  # noqa: BLE001 - reported by the test: no save may fail
                errors.append(f"{cp.id}: {type(e).__name__}: {e}")
                return
            saved.append(cp)
            parent = cp.id
        run_no += 1


def _check_all(backend, saved: list) -> list:
    """The acknowledged saves that are gone; every one still there must load exactly as saved (a fresh backend: an
    empty cache, everything read from Redis)."""
    fresh = RedisCheckpointBackend(url=backend.url, prefix=backend.prefix, retries=8, flow_buckets=backend.flow_buckets)
    lost = []
    for cp in saved:
        loaded = fresh.load(cp.id)
        if loaded is None:
            lost.append(cp.id)
        else:
            assert loaded.model_dump() == cp.model_dump(), f"{cp.id} came back different"
    return lost


@pytest.mark.slow
def test_reshard_and_a_half_done_migration_while_runs_save(redis_cluster):
    """Slots move under the savers (redis-cli reshard, then one slot left migrating: ASK), nothing is lost."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    registry = CollectorRegistry()
    # one bucket per flow, so a flow's keys are in its own slot and moving that slot moves all of them (the routing
    # under moving slots does not depend on how keys spread)
    backend = backend_on(redis_cluster, prefix, retries=8, metrics=registry, flow_buckets=1)
    by_master = flows_on_every_master(redis_cluster, 2)
    source, target = list(by_master)[:2]
    saved, errors, done = [], [], threading.Event()
    threads = [threading.Thread(target=_saver, args=(backend, flow, f"run-{flow}-{i}", saved, errors, done))
               for flows in by_master.values() for flow in flows for i in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    # the source's lowest slots, with its first flow's, move to the target while it saves (not all of them: a master
    # emptied of slots turns into a replica)
    hot = by_master[source][0]
    hot_slot = key_slot(tag(hot).encode())
    count = sum(1 for slot in redis_cluster.slots_of(source) if slot <= hot_slot)
    moved, seconds = redis_cluster.reshard(count, source[1], target[1])
    assert hot_slot in moved and len(redis_cluster.slots_of(source)) > 0
    # a flow of the target: its slot left migrating back to the source for a while, its keys moved: every save of the
    # flow meets ASK (or TRYAGAIN for a script whose keys are split between the nodes)
    slow = by_master[target][0]
    slow_slot = key_slot(tag(slow).encode())
    redis_cluster.begin_migration(slow_slot, source[1], keys=None)
    time.sleep(1.0)
    redis_cluster.finish_migration(slow_slot)
    time.sleep(0.3)
    done.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert _check_all(backend, saved) == []
    followed = {kind: registry.get_sample_value("dynamiq_ckpt_redis_errors_total", {"kind": kind})
                for kind in ("moved", "ask", "tryagain")}  # fmt: skip
    print(f"\nreshard of {len(moved)} slots took {seconds:.2f} s; {len(saved)} saves went on meanwhile, "
          f"redirections followed: {followed}")
    # in the half-done migration a save whose keys are partly moved is answered TRYAGAIN, one whose keys all moved
    # ASK: either way the savers must have met the migrating slot, and the reshard must have redirected them
    assert followed["moved"] > 0 and followed["ask"] + followed["tryagain"] > 0, followed
    assert redis_cluster.master_for_slot(hot_slot) == target
    backend.clear()


@pytest.mark.slow
@pytest.mark.parametrize("acks", [1, 0])
def test_a_master_killed_under_saving_runs(redis_cluster, acks):
    """With replica_acks=1 no acknowledged save is lost; without it, the saves a master acknowledged but had not yet
    sent to its replica when it died are gone (counted and printed: docs/cluster.md), never damaged."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    # a failover takes ~2-3 s here: retries must span it (the default retries give up after ~0.4 s)
    backend = backend_on(redis_cluster, prefix, retries=12, replica_acks=acks, replica_ack_timeout_seconds=1.0)
    by_master = flows_on_every_master(redis_cluster, 1)
    victim = list(by_master)[0]
    saved, errors, done = [], [], threading.Event()
    threads = [threading.Thread(target=_saver, args=(backend, flows[0], f"run-{flows[0]}", saved, errors, done))
               for flows in by_master.values()]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    new_master, seconds = redis_cluster.kill_master(victim[1])
    # the promoted replica has no replica of its own until the killed node is back (as its replica): with
    # replica_acks=1 saves to its slots are refused meanwhile (NOREPLICAS, retried)
    back = redis_cluster.restart(victim[1])
    time.sleep(1.0)
    done.set()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert len({cp.flow_id for cp in saved[-len(saved) // 4 :]}) == len(threads), "every flow saved after the failover"
    lost = _check_all(backend, saved)
    print(f"\nreplica_acks={acks}: failover of {victim[1]} -> {new_master} took {seconds:.2f} s, the old master was "
          f"back as a replica {back:.2f} s later; {len(saved)} acknowledged saves, {len(lost)} lost {lost[:5]}")
    if acks:
        assert lost == []
    backend.clear()


@pytest.mark.slow
def test_a_master_killed_mid_run_the_runs_finish(redis_cluster, tmp_path):
    """Real Dynamiq runs in their own processes; the master holding one of them is SIGKILLed mid-run. Each run
    finishes: its save retries across the failover while its lease lasts, or the worker recovers it."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    server = type("Server", (), {"url": redis_cluster.ckpt_url})()
    # tests.run_chain runs flow F as wf_run_id "wf-F": one run's home on each master
    by_master = flows_on_every_master(redis_cluster, 1, run=lambda f: f"wf-{f}", name="chain-6-flow-{}")
    flows = [group[0] for group in by_master.values()]
    victim = list(by_master)[0]
    worker = start_worker(server, prefix, tmp_path / "worker.log", ttl=6.0)
    extra = {SLEEP_ENV: "0.5", "CKPT_TEST_RETRIES": "12", "CKPT_TEST_LEASE_TTL": "6"}
    runs = [subprocess.Popen([sys.executable, "-m", "tests.run_chain", server.url, prefix, flow, "6"], cwd=ROOT,
                             env=env_for(server, prefix, **extra), stdout=open(tmp_path / f"{flow}.log", "w"),
                             stderr=subprocess.STDOUT) for flow in flows]  # fmt: skip
    try:
        backend = backend_on(redis_cluster, prefix)
        wait_for(lambda: backend.get_latest_by_flow(flows[0]) is not None, timeout=120)
        new_master, seconds = redis_cluster.kill_master(victim[1])
        for proc in runs:
            proc.wait(timeout=180)
        ended = {flow: wait_for(lambda f=flow: _completed(backend, f), timeout=180) for flow in flows}
        print(f"\nmaster {victim[1]} killed mid-run, {new_master} took over in {seconds:.2f} s; "
              f"processes exited {[p.returncode for p in runs]}")
        assert all(ended.values())
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
        stop(worker)
        redis_cluster.restart(victim[1])


def _completed(backend, flow: str) -> bool:
    latest = backend.get_latest_by_flow(flow)
    return latest is not None and latest.status == S.COMPLETED and len(latest.completed_node_ids) == 6


def test_replica_acks_on_a_cluster_and_what_it_costs(redis_cluster):
    prefix = f"c{uuid.uuid4().hex[:8]}"
    flow = flows_on_every_master(redis_cluster, 1)[redis_cluster.masters()[0]][0]
    timings = {}
    for acks in (0, 1):
        backend = backend_on(redis_cluster, prefix, replica_acks=acks)
        took = []
        parent = None
        for step in range(200):
            cp = make(f"w{acks}-{step}", flow, f"r{acks}", f"r{acks}", S.ACTIVE, step, parent, text="x")
            started = time.perf_counter()
            backend.save(cp)
            took.append(time.perf_counter() - started)
            parent = cp.id
        timings[acks] = statistics.median(took[20:]) * 1000
    print(f"\nsave p50 on a cluster: {timings[0]:.3f} ms without WAIT, {timings[1]:.3f} ms with replica_acks=1")
    assert timings[1] > 0 and timings[0] > 0
    # two replicas asked of a cluster whose masters have one each: every save is refused, and says why
    impossible = backend_on(redis_cluster, prefix, replica_acks=2, replica_ack_timeout_seconds=0.1, retries=1)
    with pytest.raises(StoreUnavailableError, match="NOREPLICAS"):
        impossible.save(make("never", flow, "r9", "r9", S.ACTIVE))
    backend.clear()


# On a cluster a flow's runs spread over 48 buckets by default: these suites run so.
SUBSET = [
    "tests/test_contract.py", "tests/test_leases.py", "tests/test_human_input.py", "tests/test_buckets.py",
    "tests/test_flows.py::test_interrupted_run_resumes_on_new_flow_and_backend[redis]",
    "tests/test_flows.py::test_killed_process_resumes_elsewhere",
    "tests/test_worker.py::test_worker_resumes_a_killed_run_and_stops_on_sigterm",
    "tests/test_chaos.py", "-k", "not fakeredis",
]  # fmt: skip
# These read and damage a flow's keys by its flow id, so they run with one bucket per flow (every key of a flow in
# its own slot, as on one server): what they check (packs, retention, damage) does not depend on buckets.
ONE_BUCKET_SUBSET = ["tests/test_retention.py", "tests/test_packs.py", "tests/test_store_defects.py",
                     "-k", "not fakeredis"]  # fmt: skip


def _suite_on_a_cluster(args: list[str], fewest: int, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-q", "-x", "-p", "no:cacheprovider"], cwd=ROOT,
        env=os.environ | {SERVER_ENV: CLUSTER, "CKPT_CHAOS_SECONDS": "10"} | env, capture_output=True, text=True,
        timeout=880,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    tested_on = re.search(r"server under test: (.*)", out)
    assert tested_on and tested_on.group(1).endswith(" cluster"), out[-2000:]
    passed = re.search(r"(\d+) passed.*", out)
    assert passed and int(passed.group(1)) >= fewest and " skipped" not in passed.group(0), out[-2000:]
    return passed.group(0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_suite_on_a_cluster():
    """The contract, lease, pause/answer and bucket suites, flows resumed after an interruption and after SIGKILL,
    the worker recovering a SIGKILLed run and a 10 s chaos run, on a cluster with 48 buckets per flow; the pack,
    retention and store-defect suites with one (CKPT_TEST_SERVER=cluster)."""
    print(f"\non a cluster, 48 buckets: {_suite_on_a_cluster(SUBSET, fewest=100)}")
    one = _suite_on_a_cluster(ONE_BUCKET_SUBSET, fewest=40, DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS="1")
    print(f"on a cluster, 1 bucket: {one}")


def test_one_hot_flow_spreads_evenly_over_the_masters():
    """One flow, 600 runs (the default 48 buckets): every master holds and serves its share, within 15% of even;
    with one bucket, one master takes every save. The full measurement: python3 -m dynamiq_redis_ckpt.bench.cluster.
    A cluster of its own: the module's shared one has had slots moved by the reshard test."""
    from dynamiq_redis_ckpt.bench.cluster import spread

    with ClusterSetup() as redis_cluster:
        _spread_is_even(redis_cluster, spread)


def _spread_is_even(redis_cluster, spread) -> None:
    even = spread(redis_cluster.ckpt_url, runs=600, steps=2, samples=20, buckets=48, wait=False)
    offs = {name: {k: f"{v:+.0%}" for k, v in node["off_even"].items()} for name, node in even["masters"].items()}
    print(f"\n48 buckets, each master's share vs an even one: {offs}")
    for node in even["masters"].values():
        for measure in ("keys", "memory", "scripts"):
            assert abs(node["off_even"][measure]) <= 0.15, (measure, even["masters"])
    one = spread(redis_cluster.ckpt_url, runs=100, steps=2, samples=20, buckets=1, wait=False)
    assert sorted(node["share"]["scripts"] for node in one["masters"].values()) == [0, 0, 1]


def test_acl_user_on_a_cluster(redis_cluster):
    """The least-privilege user (acl_rule(..., cluster=True), set on every node) runs the backend, its async side
    and the worker's scans and claims on a cluster; other prefixes and admin commands stay out of its reach."""
    prefix = f"a{uuid.uuid4().hex[:6]}"
    for node in redis_cluster.nodes:
        redis.Redis(port=node.port).execute_command("ACL", "SETUSER", "ckpt", *acl_args(prefix, "pw", cluster=True))
    url = redis_cluster.ckpt_url.replace("redis+cluster://", "redis+cluster://ckpt:pw@")
    backend = RedisCheckpointBackend(url=url, prefix=prefix)
    flows = [flow for group in flows_on_every_master(redis_cluster, 1).values() for flow in group]
    for flow in flows:
        backend.save(make(f"{flow}-1", flow, "r", "wf", S.COMPLETED, text=flow))
        orphan(backend, flow=flow, run=f"wf-{flow}")
    assert {c.id for c in backend.get_list_by_run("wf")} == {f"{flow}-1" for flow in flows}
    assert asyncio.run(backend.load_async(f"{flows[0]}-1")).flow_id == flows[0]
    recovery = Recovery(backend)
    assert sorted(recovery.find_orphans()) == sorted((flow, f"wf-{flow}") for flow in flows)
    claim = recovery.claim(flows[0], f"wf-{flows[0]}")
    assert claim is not None and recovery.hand_back(claim, failed=False)
    user = redis_cluster.client(username="ckpt", password="pw")
    for refused in (lambda: user.get("other:cp:{f}:x"), lambda: user.flushall(), lambda: user.keys("*"),
                    lambda: user.config_get("requirepass")):  # fmt: skip
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    backend.clear()
    assert sum(namespace_keys(redis_cluster, prefix).values()) == 0


def test_an_evicting_policy_on_one_master_is_refused(redis_cluster):
    """The eviction check reads every primary's maxmemory-policy: one unsafe master is enough to refuse."""
    from dynamiq_redis_ckpt import ConfigurationError

    host, port = redis_cluster.masters()[-1]
    node = redis.Redis(host=host, port=port)
    node.config_set("maxmemory-policy", "allkeys-lru")
    try:
        with pytest.raises(ConfigurationError, match="allkeys-lru"):
            backend_on(redis_cluster, f"e{uuid.uuid4().hex[:6]}").load("x")
    finally:
        node.config_set("maxmemory-policy", "noeviction")
    assert backend_on(redis_cluster, f"e{uuid.uuid4().hex[:6]}").load("x") is None


@pytest.mark.parametrize("hosts, expected", [
    ("10.0.0.1:7000,10.0.0.2", [("10.0.0.1", 7000), ("10.0.0.2", 6379)]),
    ("[::1]:7000,[fe80::2]", [("::1", 7000), ("fe80::2", 6379)]),
])  # fmt: skip
def test_cluster_url_node_addresses(hosts, expected):
    from dynamiq_redis_ckpt import ConfigurationError, config

    assert config._addresses(hosts, 6379, "cluster node", f"redis+cluster://{hosts}") == expected
    with pytest.raises(ConfigurationError, match="bad cluster node address 'h:x'"):
        config._addresses("h:x", 6379, "cluster node", "redis+cluster://h:x")


def test_a_backend_is_built_without_reaching_the_cluster_and_fails_typed_when_it_cannot():
    backend = RedisCheckpointBackend(url="redis+cluster://127.0.0.1:1,127.0.0.1:2", prefix="p", retries=1)
    with pytest.raises(StoreUnavailableError, match="Redis Cluster cannot be connected"):
        backend.load("x")
    with pytest.raises(StoreUnavailableError):
        asyncio.run(backend.load_async("x"))
    backend.close()
