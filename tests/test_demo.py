"""The README's first command: the demo kills a flow's process mid-run, a real worker process claims and completes
the orphan by itself, and the demo passes its own checks. These tests read what the demo printed and check it
again, so a demo that checks nothing (or prints a happy story) fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynamiq_redis_ckpt.demo import LEASE_TTL, POLL, Demo, parse_metrics, show_metrics

ROOT = Path(__file__).resolve().parent.parent
CLAIM_BOUND = LEASE_TTL + POLL + 1.5


def run_demo(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env.pop("DYNAMIQ_REDIS_CKPT_URL", None)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "dynamiq_redis_ckpt.demo", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)  # fmt: skip


def check_story(done: subprocess.CompletedProcess, *, processes: bool) -> None:
    """What the demo printed: a clean exit, the timeline in order and in time, each node's runs, a clean stop."""
    out = done.stdout
    context = (out[-4000:], done.stderr[-3000:])
    assert done.returncode == 0 and "\nPASS: " in out and "CHECK FAILED" not in out, context

    events = ("killed", "lease ran out", "claimed", "completed")
    lines = re.findall(r"^  \+(\d+\.\d+)  .*?(killed|lease ran out|claimed|completed)", out, re.M)
    assert [event for _, event in lines] == list(events), context  # printed in this order
    killed, lease_out, claimed, completed = (float(at) for at, _ in lines)
    assert killed == 0 < lease_out <= LEASE_TTL + 0.1, context
    assert lease_out - 0.25 <= claimed < completed, context
    assert claimed <= CLAIM_BOUND, f"the worker claimed {claimed} s after the kill: more than ttl + poll + 1.5 s"

    nodes = dict(re.findall(r"^  (n\d)  (.*)$", out, re.M))
    assert sorted(nodes) == ["n1", "n2", "n3", "n4", "n5", "n6"], context
    flow = "flow process" if processes else "flow"
    for node in ("n1", "n2", "n3"):
        assert re.fullmatch(rf"once +{flow}( \d+)?", nodes[node]), (node, nodes[node])
    assert re.match(rf"twice +{flow}( \d+)?, then worker( \d+)? \(killed mid-node", nodes["n4"]), nodes["n4"]
    for node in ("n5", "n6"):
        assert re.fullmatch(r"once +worker( \d+)?", nodes[node]), (node, nodes[node])
    assert "as an uninterrupted run's: True" in out, context
    assert re.search(r'dynamiq_ckpt_(worker_)?claims_total\{.*"orphan".*\} 1$', out, re.M), context
    assert "0 demo:* keys left" in out, context

    if processes:
        flow_pid = int(re.search(r"^Flow: +pid (\d+)", out, re.M)[1])
        worker_pid = int(re.search(r"^Worker: pid (\d+): python -m dynamiq_redis_ckpt.cli worker ", out, re.M)[1])
        assert flow_pid != worker_pid and f"flow process {flow_pid}" in nodes["n1"]
        assert f"worker {worker_pid}" in nodes["n5"] and f"worker {worker_pid} claimed" in out
        assert "--metrics-port" in out and "killed by SIGKILL" in out, context
        assert "Worker stopped with SIGTERM: exited with code 0" in out, context
        assert re.search(r"resuming run demo-order-A-1042 of flow demo-flow from \S+ \(attempt 1\)", out), context


@pytest.mark.slow
def test_the_worker_recovers_the_killed_run_on_a_given_redis(redis_server):
    check_story(run_demo("--url", redis_server.url), processes=True)


@pytest.mark.slow
def test_the_demo_on_its_embedded_redis_server():
    done = run_demo()
    assert "Redis: redis-server started for this demo at redis://127.0.0.1:" in done.stdout, done.stdout[-3000:]
    check_story(done, processes=True)


@pytest.mark.slow
def test_without_redis_server_the_worker_runs_in_process_on_fakeredis():
    done = run_demo(env=os.environ | {"PATH": os.path.dirname(sys.executable)})  # no redis-server on PATH
    assert "fakeredis (in-process) started for this demo" in done.stdout, done.stdout[-3000:]
    assert "the kill is SIMULATED" in done.stdout
    check_story(done, processes=False)


CATALOGUE_SCRAPE = """\
# TYPE dynamiq_ckpt_worker_claims_total counter
dynamiq_ckpt_worker_claims_total{trigger="orphan",outcome="won"} 1.0
# TYPE dynamiq_ckpt_recovery_latency_seconds histogram
dynamiq_ckpt_recovery_latency_seconds_bucket{le="0.5"} 1.0
dynamiq_ckpt_recovery_latency_seconds_bucket{le="+Inf"} 1.0
dynamiq_ckpt_recovery_latency_seconds_count 1.0
dynamiq_ckpt_recovery_latency_seconds_sum 0.43
# TYPE dynamiq_ckpt_resumes_total counter
dynamiq_ckpt_resumes_total{trigger="orphan",outcome="success"} 1.0
# TYPE dynamiq_ckpt_fleet_runs gauge
dynamiq_ckpt_fleet_runs{state="leased"} 0.0
dynamiq_ckpt_fleet_runs{state="orphaned"} 0.0
"""


def test_the_demo_shows_and_checks_the_catalogue_metrics_when_the_worker_has_them(capsys):
    demo = Demo(url=None, embedded=None, effects_path="", workdir="")
    show_metrics(demo, parse_metrics(CATALOGUE_SCRAPE))
    shown = capsys.readouterr().out
    assert demo.failures == []
    assert "dynamiq_ckpt_recovery_latency_seconds count 1, sum 0.430: 0.43 s" in shown
    assert 'dynamiq_ckpt_worker_claims_total{outcome="won",trigger="orphan"} 1' in shown
    assert "dynamiq_ckpt_fleet_runs at the kill: -; now: leased 0, orphaned 0" in shown

    unobserved = Demo(url=None, embedded=None, effects_path="", workdir="")
    show_metrics(unobserved, parse_metrics(CATALOGUE_SCRAPE.replace("_count 1.0", "_count 0.0")))
    assert unobserved.failures == ["the worker observed 1 recovery latency (count 0)"]


def test_a_worker_without_its_recovery_metrics_fails_the_demo(capsys):
    older = 'dynamiq_ckpt_claims_total{reason="orphan"} 1.0\ndynamiq_ckpt_resumes_total{outcome="success"} 1.0\n'
    demo = Demo(url=None, embedded=None, effects_path="", workdir="")
    show_metrics(demo, parse_metrics(older))
    assert demo.failures[0].startswith("the worker exports its recovery metrics (missing: dynamiq_ckpt_worker_claims")
    assert "the worker observed 1 recovery latency (count 0)" in demo.failures
