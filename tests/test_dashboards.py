"""Every panel of the Grafana dashboard, proven on a real Prometheus scraping a real worker and a real app process.

Prometheus (Debian's package) scrapes, every second, a recovery worker and an application process that run real
Dynamiq flows on a real redis-server: runs completing, a run SIGKILLed mid-run and recovered by the worker, a timer
firing, a person's answer, and a run whose recovery keeps failing until it is a dead letter. Then each panel's
queries run through Prometheus's HTTP API exactly as Grafana expands them; any query that errors or draws nothing
fails the test. The renderer draws the dashboard from the same data, to a temporary file, or to the image the
README shows: ``DYNAMIQ_CKPT_DASHBOARD_PNG=docs/dashboard.png DYNAMIQ_CKPT_DASHBOARD_SECONDS=60`` (the time range
drawn is at least that many seconds; 20 by default).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dashboards import build
from dashboards.queries import intervals, panels, run_panel
from dashboards.render import JSON, render
from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import SLEEP_ENV
from tests.prometheus_proc import SCRAPE_SECONDS, PrometheusProcess
from tests.redis_proc import free_port
from tests.test_worker import env_for, stop, wait_for

ROOT = Path(__file__).resolve().parent.parent
TTL = 2.0
# Exposed by the processes but deliberately on no panel (the count of flows one fleet read looked at).
NOT_ON_A_PANEL = {"dynamiq_ckpt_fleet_flows", "dynamiq_ckpt_fleet_truncated"}
# Panels whose subject the scenario produces for sure: each must show a value above 0 somewhere, not just a flat 0
# (orphans, fenced writes and Redis errors may or may not happen between two scrapes: they need only data).
SHOWS_THE_SCENARIO = {
    "Runs by state", "Recovery latency p99", "Save p99", "Dead letters", "Workers", "Fleet read",
    "Save latency", "Load latency", "Latency by operation", "Checkpoint size", "Compression ratio", "Saves by outcome",
    "Recovery latency", "Claims by trigger and outcome", "Resumes by trigger and outcome", "Lease renewals by outcome",
    "Leases lost by reason", "Leases held and runs resuming", "Resume duration", "Worker poll",
    "Timer lag", "Runs scheduled and due", "Human input wait", "Resumes after a timer or an answer",
    "Runs moved to dead letters", "Failed recoveries",
}


def test_the_json_is_what_build_py_makes():
    assert build.main(["--check"]) == 0, "run python -m dashboards.build and commit dashboards/dynamiq-redis-ckpt.json"


def test_the_dashboard_imports_into_any_grafana():
    board = json.loads(JSON.read_text())
    text = JSON.read_text()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    uids = set(re.findall(r'"uid": ("[^"]*"|null)', text))
    assert uids <= {'"${datasource}"', f'"{build.UID}"'}, f"a uid of somebody's Grafana: {uids}"
    for panel in panels(board):
        assert panel["datasource"] == build.DATASOURCE and panel["targets"] and panel["description"]
        assert all(t["datasource"] == build.DATASOURCE for t in panel["targets"])
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Store", "Leases and recovery", "Timers and people", "Dead letters"]


def test_the_panels_show_every_metric_of_the_catalogue_and_no_other():
    """Fast and without Prometheus: a misspelt name, or a metric no panel shows, is caught here first."""
    from dynamiq_redis_ckpt.metrics import catalogue

    exprs = [t["expr"] for p in panels(json.loads(JSON.read_text())) for t in p["targets"]]
    used = {re.sub(r"_bucket$", "", name) for e in exprs for name in re.findall(r"dynamiq_ckpt_\w+", e)}
    assert used - set(catalogue()) == set(), "names the package does not export"
    assert set(catalogue()) - used == NOT_ON_A_PANEL, "metrics no panel shows"


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)  # fmt: skip


def _completed(backend, flow_id):
    cp = backend.get_latest_by_flow(flow_id)
    return cp is not None and cp.status == S.COMPLETED


@pytest.mark.slow
def test_every_panel_draws_real_data_on_a_real_prometheus(redis_server, tmp_path):
    began = time.monotonic()
    prefix = "dash"
    worker_port, app_port = free_port(), free_port()
    # Prometheus first: it takes ~5 s to start scraping a new target (its discovery sends updates every 5 s).
    prometheus = PrometheusProcess({"dynamiq-ckpt-worker": [f"127.0.0.1:{worker_port}"],
                                    "dynamiq-ckpt-app": [f"127.0.0.1:{app_port}"]}).start()  # fmt: skip
    api, t0 = prometheus.api, time.time()
    env = env_for(redis_server, prefix, **{SLEEP_ENV: "0.3", "CKPT_TEST_LEASE_TTL": str(TTL)})
    worker = _start(["dynamiq_redis_ckpt.cli", "worker", "--url", redis_server.url, "--prefix", prefix,
                     "--flows", "tests.dash_flows:flows", "--lease-ttl", str(TTL), "--poll", "0.2",
                     "--max-attempts", "1", "--metrics-port", str(worker_port)],
                    tmp_path / "worker.log", env)  # fmt: skip
    app = _start(["tests.dash_app", redis_server.url, prefix, str(app_port)], tmp_path / "app.log", env)
    go = tmp_path / "go"
    victim = _start(["tests.dash_victim", redis_server.url, prefix, str(go)], tmp_path / "victim.log", env)
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    phase = lambda what: print(f"[dashboards] {time.time() - t0:5.1f} s  {what}", flush=True)  # noqa: E731
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"  # noqa: E731
                             for p in sorted(tmp_path.glob("*.log")))  # fmt: skip
    said = lambda name, line: line in (tmp_path / f"{name}.log").read_text()  # noqa: E731

    def until(predicate, timeout: float, what: str):
        try:
            return wait_for(predicate, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{what}: not within {timeout:g} s\n{logs()}") from None

    try:
        print()
        until(lambda: said("worker", "worker ready") and said("victim", "victim ready")
              and said("app", "paused a timer and a question"), 90, "worker, app and victim ready")  # fmt: skip
        phase("worker ready; the app runs flows, a timer and a question paused")
        start = time.time() - 3  # the dashboard's time range: from just before the work began
        # A process SIGKILLed with two runs in flight: one the worker completes, one of a flow it does not have (its
        # recovery fails, then the next claim, after the back-off, moves it to dead letters: --max-attempts 1).
        go.touch()
        assert victim.wait(timeout=60) == -signal.SIGKILL, logs()
        killed = time.monotonic()
        phase("a process SIGKILLed with two runs in flight")
        recovery = Recovery(backend)
        until(lambda: _completed(backend, "chain-6-killed"), 30, "the killed run completed by the worker")
        phase(f"killed run completed by the worker {time.monotonic() - killed:.1f} s after the kill (ttl {TTL:g} s)")
        until(lambda: [d.run for d in recovery.dead_letters()] == ["wf-retired-12"], 30, "the dead letter")
        phase("the retired flow's run is a dead letter")
        until(lambda: _completed(backend, "timer-dash") and _completed(backend, "ask-dash"), 30,
              "the timer's and the answered run's resumptions")  # fmt: skip
        phase("timer fired and the answered run resumed")
        # The end state scraped on both targets; then a rate window more, so rates over the last events are drawn.
        dead = 'max(dynamiq_ckpt_fleet_runs{state="dead"}) == 1 and on() count(up == 1) == 2'
        until(lambda: api.query(dead, time.time()), 20, "Prometheus scraping the end state")
        history = float(os.environ.get("DYNAMIQ_CKPT_DASHBOARD_SECONDS", "20"))  # at least this much to look at
        time.sleep(max(intervals(start, time.time(), SCRAPE_SECONDS)["__rate_interval"] + SCRAPE_SECONDS,
                       history - (time.time() - start)))  # fmt: skip
        end = time.time()
        phase("scraped")
        scenario = time.monotonic() - began

        board = json.loads(JSON.read_text())
        template = {"job": ".+", "datasource": "prometheus"}
        failures, used, checked = [], set(), 0
        for panel in panels(board):
            try:
                results = run_panel(api, panel, start, end, SCRAPE_SECONDS, template)
            except AssertionError as e:  # Prometheus refused the query
                failures.append(f"{panel['title']}: {e}")
                continue
            for result in results:
                checked += 1
                used |= set(re.findall(r"dynamiq_ckpt_\w+", result.expr))
                if not result.series:
                    failures.append(f"{result.panel} [{result.ref}] returned nothing: {result.expr}")
                elif not result.finite():
                    failures.append(f"{result.panel} [{result.ref}] only NaN/Inf: {result.expr}")
            if panel["title"] in SHOWS_THE_SCENARIO and not any(r.peak() > 0 for r in results):
                failures.append(f"{panel['title']} stayed at 0 although the scenario did what it shows: "
                                f"{[r.expr for r in results]}")  # fmt: skip
        jobs = api.label_values("job", "dynamiq_ckpt_leases_held")
        if sorted(jobs) != ["dynamiq-ckpt-app", "dynamiq-ckpt-worker"]:
            failures.append(f"the $job variable lists {jobs}")
        series = api.api("series", **{"match[]": '{__name__=~"dynamiq_ckpt_.+"}', "start": f"{start:.0f}",
                                      "end": f"{end:.0f}"})  # fmt: skip
        exposed = {s["__name__"] for s in series}
        families = {re.sub(r"_(bucket|count|sum)$", "", n) for n in exposed if not n.endswith("_created")}
        shown = {re.sub(r"_bucket$", "", n) for n in used}
        missing = sorted(families - shown - NOT_ON_A_PANEL)
        if missing:
            failures.append(f"metrics on no panel: {missing}")

        # The renderer, on the same data (to docs/ when asked: the image the README shows comes from this run).
        image = Path(os.environ.get("DYNAMIQ_CKPT_DASHBOARD_PNG") or tmp_path / "dashboard.png")
        drawn_at = time.monotonic()
        by_panel = render(board, api, start, end, image, scrape_seconds=SCRAPE_SECONDS, template=template,
                          subtitle="test run: a worker and an app on a real redis-server, scraped every second")
        assert not failures, "\n".join(failures) + f"\n(of {checked} queries)\n" + logs()[-4000:]
        assert image.stat().st_size > 50_000 and len(by_panel) == len(panels(board)), "a panel the renderer missed"
        print(f"[dashboards] {checked} queries of {len(panels(board))} panels drew data over {end - start:.0f} s "
              f"({intervals(start, end, SCRAPE_SECONDS)}); scenario {scenario:.1f} s, "
              f"render {time.monotonic() - drawn_at:.1f} s")  # fmt: skip
    finally:
        for proc in (worker, app):
            if proc.poll() is None:
                assert stop(proc) == 0, logs()
        if victim.poll() is None:
            victim.kill()
        prometheus.kill()
        backend.clear()
