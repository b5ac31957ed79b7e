"""Sentinel: a redis+sentinel:// url (or options) on a real primary, replica and three sentinels; a failover mid-run."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableStatus

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.config import mask_url, sentinel_config
from dynamiq_redis_ckpt.errors import ConfigurationError
from tests.flows import SLEEP_ENV, chain_flow
from tests.sentinel_proc import SERVICE, SentinelSetup

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Retries that span a failover on this setup (down-after 1 s): see docs/sentinel.md for production values.
FAILOVER_RETRIES = {"retries": 14, "retry_backoff_seconds": 0.1}


@pytest.fixture
def sentinel():
    setup = SentinelSetup().start()
    yield setup
    setup.stop()


def test_mask_sentinel_url():
    url = "redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=t0p"
    masked = mask_url(url)
    assert "s3cret" not in masked and "t0p" not in masked
    assert masked == "redis+sentinel://:***@10.0.0.1:26379,10.0.0.2:26380/mymaster/2?sentinel_password=***"
    assert mask_url("redis+sentinel://app:pw@h1:1,h2:2/m") == "redis+sentinel://app:***@h1:1,h2:2/m"
    assert mask_url("redis+sentinel://h1:1,h2:2/m/0") == "redis+sentinel://h1:1,h2:2/m/0"
    backend = RedisCheckpointBackend(url=url, sentinel_password="other")
    assert "s3cret" not in repr(backend) and "other" not in repr(backend) and "t0p" not in repr(backend)
    assert "s3cret" not in str(backend.to_dict()) and "other" not in str(backend.to_dict())


def test_sentinel_url_and_options_parse():
    conf = sentinel_config("redis+sentinel://u:p%40ss@a:1,b:2/svc/3?sentinel_password=sp", None, None, None)
    assert conf.sentinels == [("a", 1), ("b", 2)] and conf.service == "svc" and conf.db == 3
    assert (conf.username, conf.password, conf.sentinel_password) == ("u", "p@ss", "sp")
    conf = sentinel_config(None, [("x", 5), ("y", "6")], "m", None)
    assert conf.sentinels == [("x", 5), ("y", 6)] and conf.service == "m" and conf.db == 0
    assert conf.url == "redis+sentinel://x:5,y:6/m/0"
    assert sentinel_config("redis+sentinel://a/m", None, None, None).sentinels == [("a", 26379)]
    for bad in ("redis+sentinel://a:1/", "redis+sentinel:///m/0", "redis+sentinel://a:x/m", "redis+sentinel://a:1/m/z"):
        with pytest.raises(ConfigurationError):
            sentinel_config(bad, None, None, None)
    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(url="redis://localhost:6379/0", sentinel_service="m")
    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(url="redis+sentinel://a:1/m", replica_acks=1, replica_ack_timeout_seconds=3)  # > socket timeout


def test_primary_is_the_one_most_sentinels_name():
    from redis.sentinel import MasterNotFoundError

    from dynamiq_redis_ckpt.config import _majority

    new, old = (b"10.0.0.2", 6380), ("10.0.0.1", 6379)
    assert _majority([old, new, new], "m", []) == ("10.0.0.2", 6380)
    assert _majority([new, old], "m", []) == ("10.0.0.2", 6380)  # a tie: the first named
    assert _majority([None, old], "m", []) == old  # a sentinel that does not know the service
    with pytest.raises(MasterNotFoundError, match="down"):
        _majority([None], "m", ["s1 - down"])


def _roundtrip(backend: RedisCheckpointBackend) -> None:
    from tests.test_contract import make

    cps = [make(f"c{i}", "f", "r1", minute=i) for i in range(3)]
    for cp in cps:
        backend.save(cp)
    assert backend.load("c1").original_input == cps[1].original_input
    assert [cp.id for cp in backend.get_list_by_flow("f")] == ["c2", "c1", "c0"]
    assert [cp.id for cp in backend.get_list_by_run("r1", limit=2)] == ["c2", "c1"]

    async def on_async():
        await backend.save_async(make("a0", "g", "r2", minute=9))
        assert (await backend.load_async("c0")).id == "c0"
        assert [cp.id for cp in await backend.get_list_by_flow_async("g")] == ["a0"]
        assert [cp.id for cp in await backend.get_list_by_run_async("r1")] == ["c2", "c1", "c0"]
        await backend.aclose()

    asyncio.run(on_async())


def test_save_load_list_through_sentinel_sync_and_async(sentinel):
    by_url = RedisCheckpointBackend(url=sentinel.url, prefix=f"t{uuid.uuid4().hex[:8]}", replica_acks=1)
    _roundtrip(by_url)
    by_options = RedisCheckpointBackend(sentinels=[("127.0.0.1", port) for port in sentinel.sentinel_ports],
                                        sentinel_service=SERVICE, prefix=by_url.prefix)  # fmt: skip
    assert by_options.namespace == by_url.namespace
    assert by_options.load("c2").id == "c2"
    # the writes are on the primary the sentinels name, and on its replica (WAIT 1 returned before save did)
    primary, replica = redis.Redis(port=sentinel.primary.port), redis.Redis(port=sentinel.replica.port)
    assert primary.dbsize() == replica.dbsize() > 0
    by_url.clear()
    by_url.close()
    by_options.close()


def test_existing_sentinel_client(sentinel):
    from redis.sentinel import Sentinel

    manager = Sentinel([("127.0.0.1", port) for port in sentinel.sentinel_ports], socket_timeout=1)
    backend = RedisCheckpointBackend(client=manager.master_for(SERVICE, socket_timeout=1), prefix="existing")
    _roundtrip(backend)
    backend.clear()


def test_cli_takes_a_sentinel_url(sentinel, tmp_path):
    url = sentinel.url.replace("redis+sentinel://", "redis+sentinel://:not-shown@")  # a password nobody checks
    redis.Redis(port=sentinel.primary.port).config_set("requirepass", "not-shown")
    redis.Redis(port=sentinel.replica.port).config_set("requirepass", "not-shown")
    cmd = [sys.executable, "-m", "dynamiq_redis_ckpt.cli"]
    listed = subprocess.run([*cmd, "dead", "list", "--url", url, "--prefix", "cli"], cwd=HERE, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([*cmd, "worker", "--url", url, "--prefix", "cli", "--flows", "tests.flows:worker_flows",
                                   "--poll", "0.2"], cwd=HERE, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "worker on" not in log.read_text() and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert "worker on redis+sentinel://:***@127.0.0.1:" in text and "not-shown" not in text, text
    finally:
        worker.terminate()  # it may still be importing Dynamiq and warming up (seconds on a loaded machine)
        worker.wait(60)


def _run_through_failover(sentinel, monkeypatch, caplog, trigger, **options) -> float:
    """A 40-node chain (0.1 s per node) on the sentinel url; ``trigger(sentinel)`` about a second in. The run completes,
    no save fails, and every checkpoint listed before the trigger (saved, acknowledged by a replica) is loadable.
    Meanwhile another thread saves distinct checkpoints: every one acknowledged must be on the new primary.
    Returns the stall: the longest time between two saves."""
    from dynamiq.checkpoints.backends.in_memory import InMemory

    chain_flow(InMemory(), 1, flow_id="warm-up").run_sync({"q": "go"})  # Dynamiq's first run imports for seconds
    monkeypatch.setenv(SLEEP_ENV, "0.1")
    caplog.set_level(logging.WARNING)
    backend = RedisCheckpointBackend(url=sentinel.url, prefix=f"t{uuid.uuid4().hex[:8]}",
                                     **{**FAILOVER_RETRIES, **options})  # fmt: skip
    saved_at: list[float] = []
    save = RedisCheckpointBackend.save

    def timed_save(self, checkpoint):
        done = save(self, checkpoint)
        if checkpoint.flow_id == "failover":
            saved_at.append(time.monotonic())
        return done

    monkeypatch.setattr(RedisCheckpointBackend, "save", timed_save)
    old = sentinel.master_port()
    flow = chain_flow(backend, 40, flow_id="failover", words=40)
    outcome = {}

    def run() -> None:
        try:
            outcome["result"] = flow.run_sync({"q": "go"})
        except BaseException as e:  # reported by the assertion below rather than lost in the thread
            outcome["error"] = e

    def probe() -> None:  # distinct checkpoints, one every 20 ms: each acknowledged one must be on the new primary
        from tests.test_contract import make

        while not stop.is_set():
            cp_id = f"probe{len(probes)}"
            try:
                backend.save(make(cp_id, "probe", "probe-run"))
            except BaseException as e:
                outcome["probe error"] = e
                return
            probes.append(cp_id)
            time.sleep(0.02)

    probes: list[str] = []
    stop = threading.Event()
    runner, prober = threading.Thread(target=run), threading.Thread(target=probe, daemon=True)
    runner.start()
    deadline = time.monotonic() + 30
    while len(saved := backend.get_list_by_flow("failover")) < 1 or not saved[0].completed_node_ids[5:]:
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.05)
    before = {cp.id: len(cp.completed_node_ids) for cp in backend.get_list_by_flow("failover")}
    prober.start()
    time.sleep(0.2)
    trigger(sentinel)
    sentinel.wait_switched(old)
    mid_run = backend.get_list_by_flow("failover")[0]
    runner.join(60)
    stop.set()
    prober.join(30)
    assert not runner.is_alive() and not prober.is_alive()
    assert sentinel.master_port() != old
    assert "error" not in outcome and "probe error" not in outcome, outcome
    result = outcome["result"]
    assert result.status == RunnableStatus.SUCCESS
    assert mid_run.status == S.ACTIVE, "the failover was over only after the run: make the run longer"
    latest = backend.get_latest_by_flow("failover")
    assert latest.status == S.COMPLETED and len(latest.completed_node_ids) == 40
    lost = [cp_id for cp_id in probes if backend.load(cp_id) is None]  # the new primary is the one that counts
    assert len(probes) > 20 and not lost, f"{len(lost)} of {len(probes)} acknowledged saves lost: {lost[:5]}..."
    for cp_id, done in before.items():
        kept = backend.load(cp_id)
        assert kept is not None and len(kept.completed_node_ids) >= done, cp_id
    ports = {sentinel.primary.port, *(r.port for r in sentinel.replicas), *sentinel.sentinel_ports}

    def about_this_run(message: str) -> bool:
        """Not the heartbeat's news about leases earlier tests of this process left on servers they have stopped."""
        if "(flow " in message:
            return "(flow failover)" in message
        named = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", message)}
        return not named or bool(named & ports)

    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and about_this_run(r.getMessage())
                and any(word in r.getMessage().lower() for word in ("readonly", "checkpoint", "redis", "lease"))]
    assert not problems, problems
    backend.clear()
    backend.close()
    return max(later - earlier for earlier, later in zip(saved_at, saved_at[1:]))


@pytest.fixture
def one_replica_fast_sync():
    setup = SentinelSetup(diskless_sync_delay=0).start()
    yield setup
    setup.stop()


@pytest.mark.slow
def test_graceful_failover_mid_run(one_replica_fast_sync, monkeypatch, caplog):
    """SENTINEL FAILOVER mid-run with replica_acks=1: the old primary keeps accepting writes until Sentinel demotes it
    (~10 s later) and then drops them; every save it took fails its WAIT (its one replica was promoted), and the new
    primary has no replica to acknowledge until the old one has resynced from it. So saves stall ~11 s, which the
    retries and the lease ttl must span, and nothing acknowledged is lost (docs/sentinel.md)."""
    stall = _run_through_failover(one_replica_fast_sync, monkeypatch, caplog, SentinelSetup.failover, replica_acks=1,
                                  retries=24, lease_ttl_seconds=30)
    print(f"saves stalled {stall:.1f} s at the failover")
    assert stall < 25, stall  # Sentinel demotes the old primary ~10 s after the promotion; then a resync


@pytest.mark.slow
def test_primary_sigkill_mid_run(sentinel, monkeypatch, caplog):
    def kill(setup: SentinelSetup) -> None:
        # what was listed before is on the replica (WAIT), then the primary dies; replica_acks=0: with one replica,
        # the new primary has none left to acknowledge (replica_acks=1 needs two replicas to survive a node loss)
        redis.Redis(port=setup.primary.port).execute_command("WAIT", 1, 2000)
        setup.primary.kill()

    _run_through_failover(sentinel, monkeypatch, caplog, kill, replica_acks=0)
