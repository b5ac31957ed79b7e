"""``top`` in a real terminal (tmux): the screen read back matches Redis, follows a change (a new orphan, more
saves seen by a worker's /metrics), and ``q`` quits with code 0; ``--once --json`` and bad input as processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.leases import fleet_op
from dynamiq_redis_ckpt.metrics import StoreMetrics, WorkerMetrics, serve
from dynamiq_redis_ckpt.watch import quantile
from tests.cli_proc import ROOT, cli_all, command
from tests.flows import chain_flow
from tests.redis_proc import free_port
from tests.test_cli_queues import hold, populate, where

STATES = ("leased", "orphaned", "scheduled", "due", "dead")


@pytest.fixture(scope="module")
def store(redis_server):
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"top{uuid.uuid4().hex[:8]}")
    populate(backend)
    assert chain_flow(backend, 2, flow_id="done").run_sync({"q": 1}).status.value == "success"  # nothing queued
    yield backend
    backend.clear()


@pytest.fixture
def worker_metrics():
    """A worker's /metrics (the package's own collectors and server): 90 recoveries of 0.3 s and 10 of 40 s, 100
    saves of 0.3 ms. Yields (url, the store metrics, to record more saves)."""
    registry = CollectorRegistry()
    recovery, saves = WorkerMetrics(registry), StoreMetrics(registry)
    for seconds in [0.3] * 90 + [40.0] * 10:
        recovery.recovery_latency.observe(seconds)
    for _ in range(100):
        saves.call("save", 0.0003)
    port = free_port()
    server = serve(port, registry, lambda: True, lambda: True, host="127.0.0.1")
    yield f"http://127.0.0.1:{port}/metrics", saves
    server.shutdown()


def test_quantiles_as_prometheus_estimates_them():
    buckets = [(0.25, 0), (0.5, 90), (30, 90), (45, 100), (float("inf"), 100)]
    assert quantile(0.5, buckets) == pytest.approx(0.25 + 0.25 * 50 / 90)
    assert quantile(0.99, buckets) == pytest.approx(43.5)
    assert quantile(0.5, [(1, 0), (float("inf"), 4)]) == 1, "in +Inf: the highest finite bound"
    assert quantile(0.5, [(1, 0), (float("inf"), 0)]) is None


@pytest.mark.slow
def test_once_json_and_bad_input(store, worker_metrics):
    url, _ = worker_metrics
    once, table, bad_input, unreachable = cli_all(
        ["top", "--once", "--json", "--metrics", url, *where(store)],
        ["top", "--once", *where(store)],
        ["top", "--interval", "0", "--metrics", "localhost:9", *where(store)],
        ["top", "--once", "--url", "redis://127.0.0.1:1/0"],
    )
    assert once.returncode == 0, once.stderr[-2000:]
    shot = json.loads(once.stdout)
    assert shot["totals"] == store.execute(fleet_op(store.store.keys)).runs, "the same counts the fleet gauges read"
    assert shot["totals"] == {"leased": 2, "orphaned": 2, "scheduled": 1, "due": 0, "dead": 1}
    flows = {f["flow"]: f for f in shot["flows"]}
    assert (flows["orders"]["leased"], flows["orders"]["orphaned"], flows["billing"]["dead"]) == (1, 2, 1)
    assert flows["timer"]["scheduled"] == 1 and 0 <= flows["timer"]["newest_save_seconds"] < 600
    assert flows["orders"]["oldest_orphan_seconds"] > 0
    assert flows["done"]["leased"] == flows["done"]["orphaned"] == 0 and 0 <= flows["done"]["newest_save_seconds"] < 600

    recovery, save = shot["metrics"]["recovery"], shot["metrics"]["save"]
    assert recovery["p50"] == pytest.approx(0.25 + 0.25 * 50 / 90) and recovery["p99"] == pytest.approx(43.5)
    assert save["p50"] == pytest.approx(0.000375) and recovery["count"] == 100 and save["count"] == 100
    assert "no --metrics URL given" in table.stdout and "orders" in table.stdout
    assert bad_input.returncode == 2 and "--interval" in bad_input.stderr
    assert unreachable.returncode == 5 and "unreachable" in unreachable.stderr


class Terminal:
    """A tmux session of its own (a private server socket) running one command in a 160x45 terminal."""

    def __init__(self, args: list[str], rc_path):
        self.socket = f"ckpt-top-{uuid.uuid4().hex[:8]}"
        self.rc_path = rc_path
        line = " ".join(f"'{a}'" for a in args)
        # COLUMNS and LINES: pytest's, inherited by the tmux server; rich would draw for them, not the terminal
        shell = f"cd '{ROOT}' && env -u COLUMNS -u LINES PYTHONPATH='{ROOT}' {line}; echo $? > '{rc_path}'; sleep 60"
        subprocess.run(["tmux", "-L", self.socket, "new-session", "-d", "-x", "160", "-y", "45", shell], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p"], capture_output=True,
                              text=True).stdout  # fmt: skip

    def wait_for(self, predicate, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            assert time.monotonic() < deadline, f"the screen ({self.size()}) never showed it:\n{screen}"
            time.sleep(0.2)

    def size(self) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "display", "-p", "#{window_width}x#{window_height}"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "-L", self.socket, "send-keys", *keys], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def totals(screen: str) -> dict[str, int]:
    """The runs table's numbers, by heading."""
    lines = screen.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["leased", "orphaned"])
    return dict(zip(STATES, map(int, lines[at + 2].split()[:5])))


def flow_row(screen: str, flow: str) -> list[str] | None:
    return next((line.split() for line in screen.splitlines() if line.split()[:1] == [flow]), None)


def showing(**rows: list[str]):
    """A predicate: the screen's totals and the rows named (their cells from the second on) are these. A capture
    may catch a redraw halfway (the top of one frame over the bottom of the last): the test waits for a screen
    showing all of them."""
    expected_totals = rows.pop("totals", None)

    def shows(screen: str) -> bool:
        try:
            if expected_totals is not None and totals(screen) != expected_totals:
                return False
            return all(flow_row(screen, name)[1 : 1 + len(cells)] == cells for name, cells in rows.items())
        except (StopIteration, TypeError, ValueError, IndexError):
            return False

    return shows


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_live_view_in_a_terminal(store, worker_metrics, tmp_path):
    url, saves = worker_metrics
    rc = tmp_path / "rc"
    state = {"leased": 2, "orphaned": 2, "scheduled": 1, "due": 0, "dead": 1}
    assert store.execute(fleet_op(store.store.keys)).runs == state, "what Redis holds, as the fleet gauges count it"
    term = Terminal(command("top", "--interval", "0.5", "--metrics", url, *where(store)), rc)
    try:
        term.wait_for(showing(totals=state, orders=["1", "2", "0", "0", "0"], billing=["1", "0", "0", "0", "1"],
                              timer=["0", "0", "1", "0", "0"], done=["0", "0", "0", "0", "0", "-"],
                              recovery=["388.89", "ms", "43.50", "s"]))  # fmt: skip

        hold(store, "payments", "wf-new-orphan", "pod-gone:2:y", 100)  # a new orphan, once 100 ms have passed
        for _ in range(50):
            saves.call("save", 0.002)  # a worker's saves got slower
        state["orphaned"] += 1
        # p50 of the last minute's saves (the 50 new ones, in the 1-2.5 ms bucket), not of all 150
        screen = term.wait_for(showing(totals=state, payments=["0", "1", "0"], save=["1.75", "ms"]))
        assert "150 in all" in screen and store.execute(fleet_op(store.store.keys)).runs == state

        term.keys("q")
        term.wait_for(lambda s: rc.exists() and rc.read_text().strip() != "", timeout=30)
        assert rc.read_text().strip() == "0", "q quits cleanly"
    finally:
        term.close()
