"""The least-privilege ACL user of docs/security.md, on a real redis-server: the backend, Recovery and the worker
process run as it without one refused command, and other namespaces and server administration are out of reach."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.request import urlopen

import pytest
import redis
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableConfig
from redis.exceptions import NoPermissionError

from dynamiq_redis_ckpt import catalog, CheckpointStoreError, RedisCheckpointBackend, as_running_flow, scripts
from dynamiq_redis_ckpt.acl import COMMANDS, acl_args, acl_rule
from dynamiq_redis_ckpt.leases import fleet_op
from dynamiq_redis_ckpt.registry import REGISTRY
from dynamiq_redis_ckpt.worker import Recovery
from tests import test_contract as contract
from tests.flows import PREFIX_ENV, ask_flow, chain_flow, timer_flow
from tests.redis_proc import free_port
from tests.test_human_input import make_first_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dynamiq_redis_ckpt"
PASSWORD = "ckpt-pw-1"


def user_url(server, user: str = "ckpt", password: str = PASSWORD) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def add_user(admin: redis.Redis, prefix: str, user: str = "ckpt") -> None:
    admin.execute_command("ACL", "SETUSER", user, *acl_args(prefix, PASSWORD))


def refusals(admin: redis.Redis) -> list[str]:
    """What ACL LOG recorded as refused: 'reason object (context)'.

    Not redis-py's: on connect it sends CLIENT SETINFO (Redis 7.2) and ignores the error. Redis 7.0 answers "unknown
    subcommand" before checking ACL; Redis 7.2+ and Valkey refuse and log ``client|setinfo``, Redis 6.2 (no
    subcommands of CLIENT in its ACL) ``client`` (docs/servers.md)."""
    handshake = ("command client|setinfo (toplevel)", "command client (toplevel)")
    return [f"{e['reason']} {e['object']} ({e['context']})" for e in admin.acl_log()
            if f"{e['reason']} {e['object']} ({e['context']})" not in handshake]  # fmt: skip


def orphan(backend: RedisCheckpointBackend, flow, run: str) -> None:
    """A run that took its lease and died: its first checkpoint saved, this process stops renewing the lease."""
    with as_running_flow():
        backend.save(make_first_checkpoint(flow, run))
    held = REGISTRY.get((backend.namespace, flow.id, run))
    REGISTRY.fence(backend.namespace, flow.id, run, held.token, "the test stops renewing it")


# ---- the rule: one source, the doc shows it, the package's commands are all in it -------------------------------


@pytest.mark.parametrize("doc", ["docs/security.md", "README.md"])
def test_the_doc_shows_the_rule_the_package_builds(doc):
    blocks = re.findall(r"```(?:\w*)\n(ACL SETUSER .*?)\n```", (ROOT / doc).read_text())
    assert acl_rule("PREFIX", "PASSWORD") in blocks


def test_every_command_the_package_sends_is_in_the_rule():
    """A new cmd("...") or redis.call('...') without its ACL permission fails here, not in a user's production."""
    sent = set()
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name != "bench" and path.name not in ("demo.py", "demo_flows.py", "acl.py"):
            sent |= set(re.findall(r'\bcmd\("([A-Z]+)"', path.read_text()))
    for path in (PACKAGE / "scripts").glob("*.lua"):
        sent |= set(re.findall(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]", path.read_text()))
    assert len(sent) > 25
    sent.discard("CONFIG")  # the eviction check's fallback where INFO memory is refused; the rule grants INFO memory
    granted = {c.split("|")[0] for c in COMMANDS}
    assert {c.lower() for c in sent} <= granted, {c.lower() for c in sent} - granted
    assert {"evalsha", "script|load", "info|server"} <= set(COMMANDS), "sent by the drivers and the worker's /metrics"


def test_the_rule_for_a_prefix_with_glob_characters_is_escaped():
    rule = acl_rule("t[1]*", "pw")
    assert "~t\\[1\\]\\*:cp:{*" in rule.split() and " ~t[" not in rule


# ---- the backend, Dynamiq flows and Recovery as the user --------------------------------------------------------


def test_backend_flows_and_recovery_run_as_the_least_privilege_user(own_redis):
    admin = redis.Redis(port=own_redis.port)
    add_user(admin, "app")
    admin.set("app:eu:cp:{fa}:fa-0-0", "a nested namespace's key")  # "~app:*" would grant it; the rule does not
    backend = RedisCheckpointBackend(url=user_url(own_redis), prefix="app")
    short = RedisCheckpointBackend(url=user_url(own_redis), prefix="app", lease_ttl_seconds=0.6)  # for orphans
    assert backend.ping()

    # The contract suite's core scenarios, sync and async, compared with Dynamiq's InMemory backend.
    for name, query in contract.QUERIES:
        contract.test_queries_match_inmemory(backend, name, query)
        backend.clear()
    for scenario in (contract.test_load_update_delete_match_inmemory, contract.test_replace_mode_relabels_every_index,
                     contract.test_relabel_seen_by_another_backend_object, contract.test_async_variants_match_sync):
        scenario(backend)
        backend.clear()
    contract.test_cleanup_matches_inmemory_for_finished_runs(backend, 3, 30)
    backend.save(contract.make("stays", "fa", "r"))
    cp = contract.make("expiring", "fa", "r")
    RedisCheckpointBackend(url=user_url(own_redis), prefix="app", ttl_seconds=0.05).save(cp)
    time.sleep(0.1)
    assert backend.cleanup_by_flow("fa", keep_count=0) >= 0 and backend.load("expiring") is None

    # Real Dynamiq flows holding leases (renewed by the heartbeat), a timer, a person's answer.
    assert chain_flow(backend, 3, flow_id="chain-3-acl", words=20).run_sync({"q": 1}).status.value == "success"
    timer_flow(backend, "timer-acl", seconds=600).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-timer"))
    ask_flow(backend, "ask-acl").run_sync({"input": "ok?"}, config=RunnableConfig(run_id="wf-ask"))
    recovery = Recovery(backend)
    assert recovery.deliver_input("wf-ask", {"choice": "yes"}) == "ask"

    # Recovery: an orphan and the answered run are found, claimed and resumed; another run goes to dead letters.
    flow = chain_flow(backend, 2, flow_id="chain-2-acl")
    orphan(short, flow, "wf-orphan")
    orphan(short, flow, "wf-dead")
    time.sleep(0.8)
    found = set(recovery.find_work())
    expected = {("chain-2-acl", "wf-orphan", "orphan"), ("chain-2-acl", "wf-dead", "orphan"),
                ("ask-acl", "wf-ask", "due")}
    assert expected <= found
    factory = {"chain-2-acl": lambda f: chain_flow(backend, 2, flow_id=f), "ask-acl": lambda f: ask_flow(backend, f)}
    for flow_id, run, reason in [("chain-2-acl", "wf-orphan", "orphan"), ("ask-acl", "wf-ask", "due")]:
        claim = recovery.claim(flow_id, run, reason)
        assert claim is not None and recovery.resume(claim, factory[flow_id]).status.value == "success"
        assert backend.get_latest_by_flow_and_run(flow_id, run).status == S.COMPLETED
    admin.hset(backend.store.keys.lease("chain-2-acl", "wf-dead"), "attempts", 1)
    assert Recovery(backend, max_attempts=1).claim("chain-2-acl", "wf-dead") is None
    assert [d.run for d in recovery.dead_letters()] == ["wf-dead"]
    assert recovery.retry_dead("chain-2-acl", "wf-dead") is True
    claim = recovery.claim("chain-2-acl", "wf-dead")
    assert claim is not None and recovery.hand_back(claim)
    admin.hset(backend.store.keys.lease("chain-2-acl", "wf-dead"), "attempts", 1)
    assert Recovery(backend, max_attempts=1).claim("chain-2-acl", "wf-dead") is None
    assert recovery.drop_dead("chain-2-acl", "wf-dead") is True and recovery.dead_letters() == []
    fleet = backend.execute(fleet_op(backend.store.keys))
    assert fleet.flows >= 1
    assert backend.redis.info("server")["redis_version"]  # the worker's build info
    assert "chain-2-acl" in backend.execute(catalog.all_flows_op(backend.store.keys))  # the operator commands' reads
    assert backend.execute(catalog.forget_op(backend.store.keys, "chain-2-acl", 0)) is False
    backend.clear()

    assert refusals(admin) == [], "nothing the package sent was refused"
    # Every script ran as the user; renew only if the heartbeat's timer came round during the test (its commands are
    # checked by test_every_command_the_package_sends_is_in_the_rule, and a live worker renews in the worker test).
    names = [n for n in scripts.NAMES if n != "renew"]
    loaded = admin.script_exists(*(scripts.sha(name) for name in names))
    assert all(loaded), [n for n, ok in zip(names, loaded) if not ok]
    assert admin.get("app:eu:cp:{fa}:fa-0-0") == b"a nested namespace's key"


def test_other_namespaces_and_administration_are_out_of_reach(own_redis):
    admin = redis.Redis(port=own_redis.port)
    add_user(admin, "app")
    neighbours = {"app:eu": RedisCheckpointBackend(url=own_redis.url, prefix="app:eu"),
                  "other": RedisCheckpointBackend(url=own_redis.url, prefix="other"),
                  "ap": RedisCheckpointBackend(url=own_redis.url, prefix="ap")}  # fmt: skip
    for b in neighbours.values():
        b.save(contract.make("theirs", "fa", "r"))
    user = redis.Redis.from_url(user_url(own_redis))
    theirs = [k.decode() for k in admin.keys("*")]
    assert len(theirs) >= 3 * 4
    for key in theirs:
        for command in (("TYPE", key), ("GET", key), ("DEL", key), ("HGETALL", key), ("ZRANGE", key, 0, -1)):
            with pytest.raises(NoPermissionError):
                user.execute_command(*command)
    for command in (("FLUSHALL",), ("FLUSHDB",), ("KEYS", "*"), ("CONFIG", "GET", "maxmemory-policy"),
                    ("CONFIG", "SET", "maxmemory", "1"), ("EVAL", "return 1", 0), ("ACL", "WHOAMI"),
                    ("SCRIPT", "FLUSH"), ("SHUTDOWN",), ("MONITOR",), ("SELECT", 1),
                    ("SUBSCRIBE", "app:cp:{x}"), ("INFO", "keyspace"), ("INFO",), ("CLIENT", "LIST"),
                    ("MIGRATE", "127.0.0.1", 1, "app:cp:{x}", 0, 1), ("OBJECT", "ENCODING", "app:cp:{x}")):  # fmt: skip
        with pytest.raises(NoPermissionError):
            user.execute_command(*command)
    # SCRIPT LOAD is granted, but a script runs with the caller's permissions: it cannot reach a neighbour either.
    sha = user.script_load("return redis.call('GET', KEYS[1])")
    with pytest.raises(NoPermissionError):
        user.evalsha(sha, 1, theirs[0])
    # (Valkey 8 words these two "ACL failure in script: ... no permissions ...", without NOPERM: docs/servers.md)
    sha = user.script_load("return redis.call('GET', 'other:id:{theirs}')")  # an undeclared key is checked too
    with pytest.raises(redis.ResponseError, match="NOPERM|can.t access|can.t run|(?i:no permissions)"):
        user.evalsha(sha, 0)
    sha = user.script_load("return redis.call('FLUSHALL')")
    with pytest.raises(redis.ResponseError, match="NOPERM|can.t access|can.t run|(?i:no permissions)"):
        user.evalsha(sha, 0)
    # A backend of a neighbour's prefix used with this user's credentials: refused, nothing read or written.
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    wrong = RedisCheckpointBackend(url=user_url(own_redis), prefix="app:eu", retries=0, metrics=registry)
    with pytest.raises(CheckpointStoreError, match="NOPERM|permission"):
        wrong.load("theirs")
    with pytest.raises(CheckpointStoreError, match="NOPERM|permission"):
        wrong.save(contract.make("mine", "fa", "r"))
    assert registry.get_sample_value("dynamiq_ckpt_redis_errors_total", {"kind": "noperm"}) == 2, "counted as refusals"
    # SCAN (for clear()) is not filtered by key patterns: the user sees a neighbour's key *names* (docs/security.md).
    assert user.scan(0, match="other:*", count=1000)[1]
    # clear() of the user's own namespace: its SCAN sees every key name, but it deletes only its own.
    mine = RedisCheckpointBackend(url=user_url(own_redis), prefix="app")
    mine.save(contract.make("mine", "fa", "r"))
    mine.clear()
    assert sorted(k.decode() for k in admin.keys("*")) == sorted(theirs)
    assert all(b.load("theirs") is not None for b in neighbours.values())
    assert admin.dbsize() == len(theirs)


def test_a_naive_prefix_pattern_would_reach_a_nested_namespace(own_redis):
    """Why the rule lists one pattern per key kind: ``~app:*`` grants ``app:eu``'s keys; the rule's patterns do not,
    and glob characters in a prefix are literal."""
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command("ACL", "SETUSER", "naive", "on", f">{PASSWORD}", "resetkeys", "~app:*", "-@all", "+get")
    admin.set("app:eu:cp:{f}:x", "eu")
    assert redis.Redis.from_url(user_url(own_redis, "naive")).get("app:eu:cp:{f}:x") == b"eu"
    for prefix, own, foreign in [("app", "app:cp:{f}:x", "app:eu:cp:{f}:x"), ("t*", "t*:id:{x}", "tx:id:{x}"),
                                 ("t?x", "t?x:id:{x}", "tax:id:{x}"), ("t[1]", "t[1]:id:{x}", "t1:id:{x}"),
                                 ("t\\", "t\\:id:{x}", "t:id:{x}"), ("t", "t:id:{x}", "t*:id:{x}")]:  # fmt: skip
        add_user(admin, prefix, user="tenant")
        admin.set(own, "own")
        admin.set(foreign, "foreign")
        user = redis.Redis.from_url(user_url(own_redis, "tenant"))
        assert user.get(own) == b"own", prefix
        with pytest.raises(NoPermissionError):
            user.get(foreign)
        user.close()


def test_without_scan_only_clear_is_refused(own_redis):
    """The stricter variant docs/security.md offers: no +scan, so no key names of others; clear() is refused."""
    admin = redis.Redis(port=own_redis.port)
    admin.execute_command("ACL", "SETUSER", "ckpt", *[a for a in acl_args("app", PASSWORD) if a != "+scan"])
    backend = RedisCheckpointBackend(url=user_url(own_redis), prefix="app", retries=0)
    backend.save(contract.make("x", "fa", "r"))
    assert backend.load("x").id == "x" and [c.id for c in backend.get_list_by_run("r")] == ["x"]
    assert backend.delete("x") is True
    with pytest.raises(CheckpointStoreError, match="no permissions to run the 'scan' command"):
        backend.clear()


# ---- the worker process as the user -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_worker_process_runs_as_the_user_and_recovers_a_run(own_redis, tmp_path):
    admin = redis.Redis(port=own_redis.port)
    add_user(admin, "wk")
    url = user_url(own_redis)
    backend = RedisCheckpointBackend(url=url, prefix="wk", lease_ttl_seconds=1.0)
    flow = chain_flow(backend, 2, flow_id="chain-2-wk")
    orphan(backend, flow, "wf-wk")
    port, log = free_port(), tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", url, "--prefix", "wk", "--flows",
         "tests.flows:worker_flows", "--lease-ttl", "1", "--poll", "0.1", "--metrics-port", str(port)],
        cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        env=os.environ | {"DYNAMIQ_REDIS_CKPT_URL": url, PREFIX_ENV: "wk", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            latest = backend.get_latest_by_flow_and_run("chain-2-wk", "wf-wk")
            if latest is not None and latest.status == S.COMPLETED:
                break
            time.sleep(0.2)
        assert latest.status == S.COMPLETED, log.read_text()[-3000:]
        assert urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200
        assert urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status == 200
        metrics = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
        text = metrics.read().decode()
        assert metrics.status == 200
        version = admin.info("server")["redis_version"]
        assert f'redis_version="{version}"' in text and "dynamiq_ckpt_fleet_up 1.0" in text
    finally:
        worker.terminate()
        code = worker.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    assert refusals(admin) == [], "the worker sent nothing the rule refuses"
    assert "NOPERM" not in log.read_text()
    backend.clear()
