"""``leases``, ``orphans``, ``timers`` and ``dead`` as real processes against a real redis-server: tables, --json,
paging, the flow filter and exit codes. The runs: live leases and orphans saved under leases (as a running flow's
saves are), a real Dynamiq timer flow paused in this process, a run dead-lettered by failed recoveries."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.leases import LeaseTicket
from dynamiq_redis_ckpt.worker import Recovery
from tests.cli_proc import cli_all
from tests.flows import timer_flow
from tests.test_contract import make


def hold(backend, flow: str, run: str, owner: str, ttl_ms: int) -> None:
    """Save a run's first checkpoint under a lease ``owner`` takes for ``ttl_ms`` (and never renews)."""
    ticket = LeaseTicket("take", owner, 0, ttl_ms)
    backend._sync.run(backend._core.save(make(f"{run}-head", flow, "r", run, S.ACTIVE), ticket=ticket))


def populate(backend) -> None:
    """Two live leases (orders, billing), two orphans (orders), one timer (a real paused timer flow, due in 10 min),
    one dead letter (billing): the state both CLI suites read."""
    hold(backend, "orders", "wf-live", "pod-a:7:abc", 600_000)
    hold(backend, "billing", "wf-live-b", "pod-b:9:def", 600_000)
    for run in ("wf-orphan-1", "wf-orphan-2"):
        hold(backend, "orders", run, "pod-gone:1:x", 100)
    hold(backend, "billing", "wf-dead", "pod-gone:1:x", 100)
    time.sleep(0.2)
    recovery = Recovery(backend, max_attempts=1, backoff_seconds=0.05)
    assert recovery.hand_back(recovery.claim("billing", "wf-dead"), failed=True)
    time.sleep(0.2)
    assert recovery.claim("billing", "wf-dead") is None, "the second failure dead-letters it"
    paused = timer_flow(backend, "timer", seconds=600).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-timer"))
    assert paused.status.value == "failure"  # Dynamiq reports a pause as a failure carrying RunPausedException


@pytest.fixture(scope="module")
def store(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"q{uuid.uuid4().hex[:8]}")
    populate(backend)
    yield backend
    backend.clear()


def where(backend) -> list[str]:
    return ["--url", backend.url, "--prefix", backend.prefix]


def rows_of(table: str) -> list[list[str]]:
    """A rich table's body rows, split on runs of spaces (no cell here holds two spaces)."""
    lines = table.splitlines()
    body = lines[lines.index(next(line for line in lines if set(line.strip()) == {"─"})) + 1 :]
    return [line.split() for line in body if line.strip() and not line.startswith("next page")]


@pytest.mark.slow
def test_listings_paging_retry_and_exit_codes(store):
    leases, leases_json, orphans, first, timers_table, timers, dead, dead_json = cli_all(
        ["leases", *where(store)],
        ["leases", "orders", "--json", *where(store)],
        ["orphans", *where(store)],
        ["orphans", "--json", "--limit", "1", *where(store)],
        ["timers", *where(store)],
        ["timers", "--json", *where(store)],
        ["dead", "list", *where(store)],
        ["dead", "list", "--json", *where(store)],
    )
    for done in (leases, leases_json, orphans, first, timers_table, timers, dead, dead_json):
        assert done.returncode == 0, (done.args, done.stderr[-2000:])

    held = {row[0]: row for row in rows_of(leases.stdout)}
    assert set(held) == {"wf-live", "wf-live-b"}, leases.stdout
    assert held["wf-live"][1:4] == ["orders", "pod-a:7:abc", "1"] and held["wf-live"][-2:] == ["wf-live-head", "0"]
    assert held["wf-live-b"][1:3] == ["billing", "pod-b:9:def"] and held["wf-live-b"][4] == "in"
    only_orders = json.loads(leases_json.stdout)
    assert [(r["run"], r["flow"], r["owner"], r["token"], r["head"]) for r in only_orders["items"]] == [
        ("wf-live", "orders", "pod-a:7:abc", 1, "wf-live-head")] and only_orders["next"] is None
    assert 500 < only_orders["items"][0]["expires_in"] <= 600, "expiry from the server's clock: ~10 min"

    assert sorted(row[0] for row in rows_of(orphans.stdout)) == ["wf-orphan-1", "wf-orphan-2"], orphans.stdout
    assert all(row[1] == "orders" and "ago" in row for row in rows_of(orphans.stdout))
    page = json.loads(first.stdout)
    assert len(page["items"]) == 1 and page["next"], "one row, and the cursor of the rest"
    assert page["items"][0]["expired_for"] > 0 and page["items"][0]["last_owner"] == "pod-gone:1:x"

    [shown] = rows_of(timers_table.stdout)
    assert shown[:3] == ["wf-timer", "timer", "in"] and shown[-2] == "timer", timers_table.stdout
    [timer] = json.loads(timers.stdout)["items"]
    assert shown[-1] == timer["checkpoint"]
    assert (timer["run"], timer["flow"], timer["reason"]) == ("wf-timer", "timer", "timer")
    assert 500 < timer["due_in"] <= 600
    assert store.load(timer["checkpoint"]).status == S.PENDING_INPUT, "the checkpoint the run resumes from"

    [row] = rows_of(dead.stdout)
    assert row[:2] == ["billing", "wf-dead"] and row[3:] == ["ago", "2", "wf-dead-head"], dead.stdout
    [letter] = json.loads(dead_json.stdout)["items"]
    assert (letter["flow"], letter["run"], letter["attempts"], letter["head"]) == ("billing", "wf-dead", 2,
                                                                                  "wf-dead-head")
    assert time.time() - 120 < letter["since"] <= time.time()

    # Then, at once: the next page, dead retry (a dead letter and not), bad input, Redis unreachable. The retried
    # run becomes an orphan of billing, before the next page's place (orders): it cannot change that page.
    rest, unknown, bad_cursor, missing_run, unreachable, retried = cli_all(
        ["orphans", "--json", "--limit", "1", "--cursor", page["next"], *where(store)],
        ["dead", "retry", "billing", "no-such-run", *where(store)],
        ["orphans", "--cursor", "not-a-cursor", *where(store)],
        ["dead", "drop", "billing", *where(store)],
        ["timers", "--url", "redis://127.0.0.1:1/0"],
        ["dead", "retry", "billing", "wf-dead", "--json", *where(store)],
    )
    second = json.loads(rest.stdout)
    assert [r["run"] for r in page["items"] + second["items"]] in (["wf-orphan-1", "wf-orphan-2"],
                                                                  ["wf-orphan-2", "wf-orphan-1"])
    assert second["next"] is None
    assert unknown.returncode == 4 and "not a dead letter" in unknown.stderr
    assert bad_cursor.returncode == 2 and "cursor" in bad_cursor.stderr
    assert missing_run.returncode == 2 and "FLOW RUN" in missing_run.stderr
    assert unreachable.returncode == 5 and "unreachable" in unreachable.stderr
    assert retried.returncode == 0 and "put back" in json.loads(retried.stdout)["message"]
    recovery = Recovery(store)
    assert recovery.dead_letters() == [] and ("billing", "wf-dead") in recovery.find_orphans()
