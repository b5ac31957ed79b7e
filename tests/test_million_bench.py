"""The million-snapshot benchmark at a small size: every result it reports is there and adds up (no timings
asserted). It starts its own redis-server, fills it from forked processes and stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dynamiq_redis_ckpt.bench.million import READ_SAMPLES, SNAPSHOTS_PER_RUN, Plan, key_kind, render, run_million

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result() -> dict:
    lines: list[str] = []
    found = run_million(None, 2_000, lines.append)
    assert lines, "it says what it does"
    return found


def test_plan_adds_up_to_the_requested_count_with_unique_ids():
    plan = Plan(1_234)
    snaps = [cp for run in range(plan.runs) for cp in plan.snapshots_of(run)]
    assert len(snaps) == 1_234 and len({cp.id for cp in snaps}) == 1_234
    assert plan.runs == 124 and len(plan.snapshots_of(123)) == 4  # the last run cut short
    assert {cp.flow_id for cp in snaps} == {plan.flow_id(i) for i in range(plan.flows)}
    assert plan.is_agent_flow(4) and not plan.is_agent_flow(3)
    agent = plan.snapshots_of(4)
    assert len(agent) == SNAPSHOTS_PER_RUN and agent[-1].status.value == "completed"  # a loop's run ends


def test_key_kinds_tell_a_flows_sorted_sets_apart():
    assert key_kind("p", "p:cp:{f}:x") == "cp"
    assert key_kind("p", "p:flow:{f}") == "flow"
    assert key_kind("p", "p:flow:{f}:st:active") == "flow:st"
    assert key_kind("p", "p:flow:{f}:run:r:1") == "flow:run"
    assert key_kind("p-ttl", "p-ttl:pack:{f}:abc") == "pack"


def test_every_snapshot_is_stored_and_counted(result):
    assert result["snapshots"] == result["stored"] == 2_000
    kinds = result["kinds"]
    assert kinds["cp"]["keys"] == kinds["id"]["keys"] == 2_000  # one hash and one locator per snapshot
    assert kinds["flow"]["keys"] == result["flows"] == 20
    assert result["dbsize"] == sum(k["keys"] for k in kinds.values())
    assert all(k["mean_bytes"] > 0 and 0 < k["sampled"] <= k["keys"] for k in kinds.values())
    assert result["fill"]["saves_per_s"] > 0 and result["fill"]["processes"] == 2


def test_memory_is_measured_and_smaller_than_dynamiqs_json(result):
    memory, js = result["memory"], result["json_bytes_per_snapshot"]
    assert memory["after"] > memory["before"] and memory["bytes_per_snapshot"] > 0
    assert js["min"] <= js["mean"] <= js["max"] and js["sampled"] == 1_000
    assert memory["bytes_per_snapshot"] < js["mean"]


def test_reads_return_what_was_stored(result):
    reads = result["reads"]
    assert all(r["n"] == READ_SAMPLES and r["p99_ms"] >= r["p50_ms"] > 0 for r in reads.values())
    for name in ("list_newest_10", "list_flow_and_run", "list_run"):
        assert reads[name]["returned"] == reads[name]["expected"], name
    assert reads["load_warm"]["found"] == reads["load_cold"]["found"] == READ_SAMPLES


def test_cleanup_keeps_ten_and_a_whole_flow_goes(result):
    cleanup, gone = result["cleanup"], result["delete_flow"]
    assert cleanup["before"] == 100 and cleanup["removed"] == cleanup["expected"] == 90 and cleanup["after"] == 10
    assert gone["before"] == gone["removed"] == 100
    assert gone["keys_left"] == {}  # no hash, index or pack of that flow is left
    assert gone["memory_freed"] > 0


def test_expiry_empties_the_ttl_namespace_and_returns_its_memory(result):
    expiry = result["expiry"]
    assert expiry["snapshots"] == 200 and expiry["keys_with_ttl"] > 200
    assert expiry["emptied"] and expiry["expiring_keys_left"] == 0
    assert not {"cp", "pack", "id", "runflows", "flow"} & set(expiry["keys_left"])  # every checkpoint's data expired
    assert 0 < expiry["memory_returned"] <= expiry["memory_added"] * 1.2


def test_result_is_json_and_renders_as_markdown(result):
    assert json.loads(json.dumps(result)) == result
    text = render(result)
    assert text.startswith("## One Redis, 2,000 snapshots") and "| `pack` |" in text


def test_command_line_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "dynamiq_redis_ckpt.bench.million", "--snapshots", "100", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "## One Redis, 100 snapshots" in done.stdout
    assert json.loads((tmp_path / "million.json").read_text())["stored"] == 100
    assert (tmp_path / "million.md").read_text().startswith("## One Redis, 100 snapshots")
