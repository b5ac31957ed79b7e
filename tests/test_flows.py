"""End to end with real Dynamiq Flows: interrupted runs resume from Redis on a new Flow and a new backend object."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from dynamiq import Workflow
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.config import CheckpointBehavior
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableConfig, RunnableStatus

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import CRASH_ENV, EFFECTS_ENV, RunInterrupted, chain_flow, final_output
from tests.homes import home

ROOT = Path(__file__).resolve().parent.parent
QUESTION = {"question": "where is my order?"}


def effects(path: Path) -> collections.Counter:
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def twin(backend) -> RedisCheckpointBackend:
    """A new backend object on the same store (what a new process or a new Flow builder makes)."""
    if backend.url:
        return RedisCheckpointBackend(url=backend.url, prefix=backend.prefix)
    return RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix)


@pytest.fixture(scope="module")
def reference_output():
    result = chain_flow(InMemory(), 8, flow_id="reference", words=60).run_sync(QUESTION)
    assert result.status == RunnableStatus.SUCCESS
    return final_output(result)


def test_interrupted_run_resumes_on_new_flow_and_backend(backend, tmp_path, reference_output):
    log = tmp_path / "effects"
    flow = chain_flow(backend, 8, flow_id="fail", effects_path=str(log), interrupt_once={"s05": str(tmp_path / "f")}, words=60)
    with pytest.raises(RunInterrupted):
        flow.run_sync(QUESTION)
    failed = backend.get_latest_by_flow("fail")
    assert failed.status == S.ACTIVE and failed.completed_node_ids == [f"s0{i}" for i in range(5)]

    resumed_backend = twin(backend)
    again = chain_flow(resumed_backend, 8, flow_id="fail", effects_path=str(log), words=60)
    result = again.run_sync(None, resume_from=resumed_backend.get_latest_by_flow("fail").id)
    assert result.status == RunnableStatus.SUCCESS
    assert final_output(result) == reference_output
    counts = effects(log)
    assert all(counts[f"s0{i}"] == 1 for i in range(5)), counts
    assert counts["s05"] == 2 and counts["s06"] == counts["s07"] == 1
    latest = resumed_backend.get_latest_by_flow("fail")
    assert latest.status == S.COMPLETED
    chain = resumed_backend.get_chain(latest.id)
    assert chain[-1].parent_checkpoint_id is None and len(chain) == len(backend.get_list_by_flow("fail", limit=None))
    # The resume drew a new wf_run_id (no RunnableConfig(run_id=...)); it took the interrupted run over, so no worker
    # resumes that one a second time once its lease would have run out.
    old_run = failed.wf_run_id or failed.run_id
    old = backend.redis.hgetall(backend.store.keys.lease(home(backend, "fail", old_run), old_run))
    assert old[b"owner"] == b"" and old[b"superseded_by"] == (latest.wf_run_id or latest.run_id).encode()
    assert Recovery(backend).find_work() == []


@pytest.mark.slow
def test_killed_process_resumes_elsewhere(redis_server, tmp_path, reference_output):
    """SIGKILL mid-run in a real process; another process's new Flow resumes; completed nodes never rerun."""
    log = tmp_path / "effects"
    prefix = "kill"
    env = os.environ | {CRASH_ENV: "s05", EFFECTS_ENV: str(log), "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-m", "tests.run_chain", redis_server.url, prefix, "killed", "8"],
        env=env, cwd=ROOT, capture_output=True, timeout=240,
    )  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    try:
        latest = backend.get_latest_by_flow("killed")
        assert latest.status == S.ACTIVE and latest.completed_node_ids == [f"s0{i}" for i in range(5)]
        flow = chain_flow(backend, 8, flow_id="killed", effects_path=str(log), words=60)
        result = flow.run_sync(None, resume_from=latest.id)
        assert result.status == RunnableStatus.SUCCESS
        assert final_output(result) == reference_output
        counts = effects(log)
        assert [counts[f"s0{i}"] for i in range(8)] == [1, 1, 1, 1, 1, 2, 1, 1], counts
    finally:
        backend.clear()


def test_run_async_resumes(backend, tmp_path, reference_output):
    log = tmp_path / "effects"

    async def scenario():
        flow = chain_flow(backend, 8, flow_id="async", effects_path=str(log), interrupt_once={"s03": str(tmp_path / "f")}, words=60)
        with pytest.raises(RunInterrupted):
            await flow.run_async(QUESTION)
        other = twin(backend)
        latest = await other.get_latest_by_flow_async("async")
        assert latest.status == S.ACTIVE and len(latest.completed_node_ids) == 3
        again = chain_flow(other, 8, flow_id="async", effects_path=str(log), words=60)
        return await again.run_async(None, resume_from=latest.id)

    result = asyncio.run(scenario())
    assert result.status == RunnableStatus.SUCCESS
    assert final_output(result) == reference_output
    assert [effects(log)[f"s0{i}"] for i in range(8)] == [1, 1, 1, 2, 1, 1, 1, 1]


def test_yaml_workflow_checkpoints_to_redis_and_resumes(redis_server, tmp_path, reference_output):
    from dynamiq.serializers.loaders.yaml import WorkflowYAMLLoader

    log = tmp_path / "effects"
    nodes = []
    for i in range(8):
        depends = f"\n    depends:\n      - node: s0{i - 1}" if i else ""
        nodes.append(f"  s0{i}:\n    type: tests.flows.Step\n    name: step {i}\n    index: {i}\n    words: 60\n"
                     f"    effects_path: {log}{depends}")  # fmt: skip
    nodes[4] += f"\n    interrupt_once_path: {tmp_path / 'interrupted-once'}"
    yaml_text = (
        "nodes:\n" + "\n".join(nodes) + "\n"
        "flows:\n  yaml-flow:\n    name: yaml flow\n    nodes: [" + ", ".join(f"s0{i}" for i in range(8)) + "]\n"
        "    checkpoint:\n      enabled: true\n      backend:\n"
        "        type: dynamiq_redis_ckpt.RedisCheckpointBackend\n"
        f"        url: {redis_server.url}\n        prefix: yaml\n        ttl_seconds: 3600\n"
        "workflows:\n  wf:\n    flow: yaml-flow\n"
    )
    path = tmp_path / "wf.yaml"
    path.write_text(yaml_text)

    def load() -> Workflow:
        return Workflow.from_yaml_file_data(WorkflowYAMLLoader.load(str(path)), wf_id="wf")

    workflow = load()
    backend = workflow.flow.checkpoint.backend
    assert isinstance(backend, RedisCheckpointBackend) and backend.ttl_seconds == 3600
    assert backend.type == "dynamiq_redis_ckpt.RedisCheckpointBackend"
    try:
        with pytest.raises(RunInterrupted):
            workflow.run_sync(QUESTION)
        again = load()
        latest = again.flow.checkpoint.backend.get_latest_by_flow("yaml-flow")
        assert latest.status == S.ACTIVE and len(latest.completed_node_ids) == 4
        result = again.run_sync(None, resume_from=latest.id)
        assert result.status == RunnableStatus.SUCCESS
        assert final_output(result) == reference_output
        assert [effects(log)[f"s0{i}"] for i in range(8)] == [1, 1, 1, 1, 2, 1, 1, 1]
        dumped = again.flow.to_dict()["checkpoint"]["backend"]
        assert dumped["type"] == "dynamiq_redis_ckpt.RedisCheckpointBackend" and dumped["prefix"] == "yaml"
    finally:
        backend.clear()


def test_replace_mode_resume_relabels_run(backend, tmp_path, reference_output):
    flow = chain_flow(backend, 8, flow_id="replace", behavior=CheckpointBehavior.REPLACE,
                      interrupt_once={"s02": str(tmp_path / "f")}, words=60)  # fmt: skip
    with pytest.raises(RunInterrupted):
        flow.run_sync(QUESTION, config=RunnableConfig(run_id="wf-first"))
    (only,) = backend.get_list_by_flow("replace")
    assert only.status == S.ACTIVE and only.wf_run_id == "wf-first"
    other = twin(backend)
    again = chain_flow(other, 8, flow_id="replace", behavior=CheckpointBehavior.REPLACE, words=60)
    result = again.run_sync(None, config=RunnableConfig(run_id="wf-second"), resume_from=only.id)
    assert result.status == RunnableStatus.SUCCESS and final_output(result) == reference_output
    (final,) = other.get_list_by_flow("replace")
    assert final.id == only.id and final.status == S.COMPLETED and final.wf_run_id == "wf-second"
    assert other.get_list_by_run("wf-first") == [] and [c.id for c in other.get_list_by_run("wf-second")] == [only.id]
    assert other.get_list_by_run(only.run_id) == [] and other.get_list_by_run(final.run_id)[0].id == only.id
    assert other.get_list_by_flow("replace", status=S.FAILED) == []


def test_many_flows_on_threads_share_one_backend(backend):
    """One backend instance, one pool, many flows saving from many threads at once."""
    results = {}

    def run(i):
        results[i] = chain_flow(backend, 5, flow_id=f"threaded-{i % 3}", words=40).run_sync(
            QUESTION, config=RunnableConfig(run_id=f"wf-{i}")
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status == RunnableStatus.SUCCESS for r in results.values())
    for i in range(12):
        runs = backend.get_list_by_run(f"wf-{i}")
        assert len(runs) == 7 and runs[0].status == S.COMPLETED
        assert [c.id for c in backend.get_chain(runs[0].id)] == [c.id for c in runs]


def test_append_run_footprint_is_at_most_a_tenth_of_its_final_snapshot(own_redis, capsys):
    """20-node APPEND run: every snapshot holds the whole state; Redis keeps each repeated content once."""
    backend = RedisCheckpointBackend(url=own_redis.url, prefix="footprint")
    flow = chain_flow(backend, 20, flow_id="footprint")
    assert flow.run_sync(QUESTION).status == RunnableStatus.SUCCESS
    snapshots = backend.get_list_by_flow("footprint", limit=None)
    assert len(snapshots) == 22
    final_json = len(snapshots[0].to_json())
    all_json = sum(len(s.to_json()) for s in snapshots)
    raw = backend.redis
    used = sum(raw.memory_usage(k, samples=0) for k in raw.scan_iter(match="footprint:*"))
    with capsys.disabled():
        print(f"\n[footprint] 20-node APPEND run: final snapshot JSON {final_json} B, all 22 snapshots JSON "
              f"{all_json} B ({all_json / final_json:.1f}x), Redis MEMORY USAGE {used} B "
              f"({used / final_json:.3f}x of the final snapshot)")
    assert used <= 0.1 * final_json  # 0.053x measured with based packs (format 2: 0.096x)
    fresh = RedisCheckpointBackend(url=own_redis.url, prefix="footprint")
    assert flow._checkpoint == fresh.load(flow._checkpoint.id), "the final snapshot loads whole and exact"
    for position, snap in enumerate(reversed(fresh.get_chain(snapshots[0].id))):
        assert len(snap.completed_node_ids) == min(position, 20)
