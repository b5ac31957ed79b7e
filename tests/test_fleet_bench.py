"""The fleet benchmark's quick mode, run as a real process: its correctness fields hold (it prints its speeds,
nothing here checks a time).

It starts its own redis-server, runs 24 runs holding leases in one process (threads, then asyncio), then 24 runs
of a real Dynamiq Flow in a process SIGKILLed mid-node and recovered by 2 worker processes (started beside it, so
their imports of Dynamiq overlap its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynamiq_redis_ckpt.bench.fleet import all_correct, render_markdown

ROOT = Path(__file__).resolve().parents[1]
RUNS = 24


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("fleet")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "dynamiq_redis_ckpt.bench", "fleet", "--quick", "--runs", str(RUNS), "--workers",
            "2", "--children", "1", "--workers-early", "--threads", "8", "--parts", "leases,orphans",
            "--out", str(out)]  # fmt: skip  (the million part has its own test: test_million_bench.py)
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert (out / "fleet.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "fleet.json").read_text()), (out / "fleet.md").read_text(), done


def test_the_quick_run_passes_its_checks_and_says_so(report):
    data, markdown, done = report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all_correct(data)
    assert "## Leases: one process, N live runs" in markdown and "## Orphans:" in markdown
    assert "| all checks pass | yes |" in markdown


def test_every_lease_held_to_the_end_and_handed_back(report):
    data, _, _ = report
    for mode in ("threads", "asyncio"):
        leases = data["leases"][mode]
        assert leases["runs"] == RUNS
        assert leases["leases_lost"] == 0, leases["lost_examples"]
        assert leases["saves"] == round(leases["snapshots_per_run"] * RUNS)  # every snapshot of every run saved
        assert leases["leases_held_after"] == 0  # the COMPLETED saves handed every lease back
        assert leases["hold"]["beats"] >= 1 and leases["hold"]["leases_renewed"] >= RUNS  # the heartbeat renewed


def test_every_orphan_completed_once_and_no_completed_node_ran_again(report):
    data, _, _ = report
    (recovered,) = data["orphans"]["rounds"]
    assert recovered["workers"] == 2 and recovered["runs"] == RUNS
    assert recovered["failed_before_kill"] == 0 and recovered["leases_lost_before_kill"] == 0
    assert recovered["nodes_done_before_kill"] == 3 * RUNS  # every run had completed n1-n3 when it was killed
    assert recovered["runs_completed_once"] == RUNS
    assert recovered["runs_completed_more_than_once"] == 0 and recovered["runs_not_completed"] == 0
    assert recovered["last_node_ran_once"] == RUNS
    assert recovered["completed_nodes_rerun"] == 0
    assert recovered["nodes_never_run"] == 0
    assert recovered["runs_with_more_than_one_rerun"] == 0
    assert recovered["in_flight_node_rerun"] == RUNS  # n4 was in flight in every run: it ran again, once
    assert recovered["claims"] == RUNS and recovered["dead_letters"] == 0
    assert sum(recovered["runs_per_worker"]) == RUNS
    assert recovered["correct"] is True


def test_the_report_renders_sections_it_was_given_and_unknown_ones_as_data():
    markdown = render_markdown({"million": {"snapshots": 1_000_000}, "_meta": {"runs": 1}})
    assert "## million" in markdown and '"snapshots": 1000000' in markdown and "- runs: 1" in markdown
