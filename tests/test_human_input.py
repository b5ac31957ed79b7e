"""A run waiting for a person is resumed with that person's answer from any process, exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import ConfigurationError, RedisCheckpointBackend
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import CRASH_ENV, ask_flow
from tests.test_worker import env_for, start_worker, stop, wait_for
from tests.homes import home

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def backend(redis_server):
    made = RedisCheckpointBackend(url=redis_server.url, prefix=f"h{uuid.uuid4().hex[:6]}")
    yield made
    made.clear()


@pytest.mark.parametrize("tool", [False, True], ids=["custom-node", "HumanFeedbackTool"])
def test_answer_resumes_the_waiting_node(backend, tool):
    flow_id = "ask-tool-1" if tool else "ask-1"
    first = ask_flow(backend, flow_id, tool=tool).run_sync({"input": "Ship it?"}, config=RunnableConfig(run_id="wf-h"))
    assert first.status.value == "failure"
    paused = backend.get_latest_by_flow(flow_id)
    assert paused.status == S.PENDING_INPUT and list(paused.pending_inputs) == ["ask"]
    recovery = Recovery(backend)
    assert recovery.find_due() == [], "a run waiting for a person is not due until someone answers"
    answer = {"content": "yes, ship it"} if tool else {"choice": "blue"}
    assert recovery.deliver_input("wf-h", answer) == "ask"
    assert recovery.find_due() == [(flow_id, "wf-h")]
    claim = recovery.claim(flow_id, "wf-h", "due")
    assert claim is not None and claim.head == paused.id
    assert recovery.claim(flow_id, "wf-h", "due") is None, "claimed once"
    result = recovery.resume(claim, lambda f: ask_flow(RedisCheckpointBackend(url=backend.url, prefix=backend.prefix), f, tool=tool))
    assert result.status.value == "success"
    expected = {"content": "yes, ship it"} if tool else {"answer": {"choice": "blue"}}
    assert result.output["ask"]["output"] == expected
    done = backend.get_latest_by_flow(flow_id)
    assert done.status == S.COMPLETED and done.wf_run_id == "wf-h"
    inbox = backend._core.keys.inbox(home(backend, flow_id, "wf-h"), "wf-h")
    assert backend.redis.hlen(inbox) == 0, "a used answer is forgotten"


def test_answer_for_a_run_that_is_not_waiting_is_refused(backend):
    with pytest.raises(ConfigurationError):
        Recovery(backend).deliver_input("no-such-run", {"x": 1})


@pytest.mark.slow
def test_answer_from_another_process_survives_the_resuming_worker_crashing(redis_server, backend, tmp_path):
    flow_id = "ask-2"
    ask_flow(backend, flow_id).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-p"))
    # A worker that dies (SIGKILL) when its resumed run reaches the waiting node, before the node reads the answer.
    doomed = start_worker(redis_server, backend.prefix, tmp_path / "doomed.log", **{CRASH_ENV: "ask"})
    wait_for(lambda: "worker ready" in (tmp_path / "doomed.log").read_text())
    cli = subprocess.run(
        [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "resume", "wf-p", "--input", json.dumps({"choice": "red"}),
         "--url", redis_server.url, "--prefix", backend.prefix],
        cwd=ROOT, env=env_for(redis_server, backend.prefix), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert doomed.wait(timeout=60) == -signal.SIGKILL
    assert backend.get_latest_by_flow(flow_id).status != S.COMPLETED
    survivor = start_worker(redis_server, backend.prefix, tmp_path / "survivor.log")
    try:
        done = wait_for(lambda: (cp := backend.get_latest_by_flow(flow_id)) and cp.status == S.COMPLETED and cp)
        assert done.node_states["ask"].output_data == {"answer": {"choice": "red"}}
        assert done.wf_run_id == "wf-p"
    finally:
        assert stop(survivor) == 0
    time.sleep(0.1)


def test_embedded_async_worker_resumes_an_answered_run(backend):
    """A service runs the worker loop on its own event loop: claims with redis.asyncio, resumes with run_async."""
    import asyncio

    from dynamiq_redis_ckpt.worker import Worker

    ask_flow(backend, "ask-3").run_sync({"q": 1}, config=RunnableConfig(run_id="wf-a"))
    recovery = Recovery(backend)
    recovery.deliver_input("wf-a", {"choice": "green"})
    factory = lambda f: ask_flow(RedisCheckpointBackend(url=backend.url, prefix=backend.prefix), f)  # noqa: E731
    from prometheus_client import CollectorRegistry

    from dynamiq_redis_ckpt.metrics import WorkerMetrics

    metrics = WorkerMetrics(CollectorRegistry())
    worker = Worker(recovery, factory, concurrency=2, poll_seconds=0.1, metrics=metrics)

    async def serve():
        loop_task = asyncio.create_task(worker.run_async())
        for _ in range(300):
            latest = await backend.get_latest_by_flow_async("ask-3")
            if latest.status == S.COMPLETED:
                break
            await asyncio.sleep(0.1)
        worker.stop()
        await loop_task
        return latest

    done = asyncio.run(serve())
    assert done.status == S.COMPLETED and done.node_states["ask"].output_data == {"answer": {"choice": "green"}}
    assert worker.resumed == 1
    sample = metrics.registry.get_sample_value
    assert sample("dynamiq_ckpt_resumes_total", {"trigger": "input", "outcome": "success"}) == 1
    assert sample("dynamiq_ckpt_worker_claims_total", {"trigger": "due", "outcome": "won"}) == 1
    assert sample("dynamiq_ckpt_human_input_wait_seconds_count") == 1
    assert 0 <= sample("dynamiq_ckpt_human_input_wait_seconds_sum") < 60
    assert sample("dynamiq_ckpt_timer_lag_seconds_count") == 1, "answer -> resumed run's first save"


def test_answer_finds_the_flow_where_a_multi_flow_run_waits(backend):
    """Review finding: a run with checkpoints in two flows, paused in the second: no need to name the flow."""
    from tests.flows import chain_flow

    chain_flow(backend, 2, flow_id="first-flow", words=10).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-m"))
    ask_flow(backend, "ask-m").run_sync({"q": 1}, config=RunnableConfig(run_id="wf-m"))
    assert Recovery(backend).deliver_input("wf-m", {"choice": "x"}) == "ask"
    assert Recovery(backend).find_due() == [("ask-m", "wf-m")]


def test_stopping_the_async_worker_hands_running_runs_back(backend):
    """Review finding: Worker.run_async().stop() hands leases back at once and cancels the runs."""
    import asyncio
    import os

    from dynamiq_redis_ckpt.worker import Worker
    from tests.flows import SLEEP_ENV, chain_flow

    chain = lambda f: chain_flow(RedisCheckpointBackend(url=backend.url, prefix=backend.prefix), 6, flow_id=f, words=10)  # noqa: E731
    from dynamiq_redis_ckpt.leases import LeaseTicket

    first = chain("chain-6-async")
    backend._sync.run(backend._core.save(
        make_first_checkpoint(first, "wf-s"), ticket=LeaseTicket("take", "gone:1:x", 0, 200)
    ))  # fmt: skip
    lease = backend._core.keys.lease(home(backend, "chain-6-async", "wf-s"), "wf-s")
    time.sleep(0.3)
    worker = Worker(Recovery(backend), chain, concurrency=1, poll_seconds=0.1)
    os.environ[SLEEP_ENV] = "0.5"

    async def serve():
        task = asyncio.create_task(worker.run_async())
        for _ in range(100):
            if backend.redis.hget(lease, "owner") not in (None, b"", b"gone:1:x"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)
        worker.stop()
        stopped = time.monotonic()
        while backend.redis.hget(lease, "owner") != b"" and time.monotonic() - stopped < 2:
            await asyncio.sleep(0.02)
        handed_back_after = time.monotonic() - stopped
        await task
        return handed_back_after

    try:
        handed_back_after = asyncio.run(serve())
    finally:
        os.environ.pop(SLEEP_ENV, None)
    assert handed_back_after < 1.5, "the lease was handed back when the loop stopped"
    assert Recovery(backend).find_orphans() == [("chain-6-async", "wf-s")]


def make_first_checkpoint(flow, wf_run_id):
    """The run-start checkpoint Dynamiq would have saved for ``flow``."""
    from dynamiq.checkpoints.checkpoint import FlowCheckpoint

    return FlowCheckpoint(flow_id=flow.id, run_id="gone", wf_run_id=wf_run_id, original_input={"q": 1},
                          pending_node_ids=[n.id for n in flow.nodes])  # fmt: skip
