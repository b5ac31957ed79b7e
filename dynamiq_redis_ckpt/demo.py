"""Crash a Dynamiq flow in the middle of a run, then resume it from the checkpoints it left in Redis.

Run it with ``python -m dynamiq_redis_ckpt.demo [--url URL]`` (or ``python -m dynamiq_redis_ckpt.cli demo``).
Without ``--url`` or ``$DYNAMIQ_REDIS_CKPT_URL`` it starts a private ``redis-server`` (or, when none is installed,
an in-process fakeredis). It writes keys under the prefix ``demo:`` and deletes every ``demo:*`` key when done, so
do not point it at a Redis where that prefix holds anything you want to keep.

What it does:

1. Runs a 6-node chain flow (n1 → … → n6) that checkpoints after every node, in a child process; node n4 logs its
   side effect and then SIGKILLs its own process, so nothing after that is written. (On the fakeredis fallback,
   whose server other processes cannot reach, the flow runs in a thread instead and n4 raises SimulatedCrash.)
2. Reads the newest checkpoint of the flow back from Redis.
3. Resumes from it with a new Flow and a new backend object in this process.
4. Checks that the nodes that had completed did not run again, and that the output equals an uninterrupted run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from typing import Any, Literal

from dynamiq.checkpoints.config import CheckpointConfig
from dynamiq.checkpoints.types import CheckpointStatus
from dynamiq.flows import Flow
from dynamiq.nodes import NodeGroup
from dynamiq.nodes.node import Node, NodeDependency
from dynamiq.runnables import RunnableConfig, RunnableStatus
from redis.exceptions import RedisError, ResponseError

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.config import URL_ENV, mask_url
from dynamiq_redis_ckpt.embedded import EmbeddedRedis, start_embedded_redis
from dynamiq_redis_ckpt.errors import CheckpointStoreError

FLOW_ID = "demo-flow"
REFERENCE_FLOW_ID = "demo-flow-reference"
PREFIX = "demo"
NODE_IDS = tuple(f"n{i}" for i in range(1, 7))
CRASH_AT = "n4"
STEP_SECONDS = 0.2
FLOW_INPUT = {"order": "A-1042", "items": 3}
CHILD_TIMEOUT = 120.0


class SimulatedCrash(BaseException):
    """Stops a run the way a killed process does: Dynamiq catches ``Exception``, not this, so it records nothing."""


class DemoStep(Node):
    """Sleeps a little, appends its id to a side-effects log, and extends a digest chain; may crash after logging."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "demo step"
    seconds: float = STEP_SECONDS
    effects_path: str | None = None
    crash: Literal["", "sigkill", "raise"] = ""

    def execute(self, input_data: dict[str, Any], config: RunnableConfig = None, **kwargs) -> dict[str, Any]:
        if self.depends:
            previous = input_data[self.depends[0].node.id]["output"]
        else:
            previous = {"trail": [], "digest": json.dumps(input_data, sort_keys=True)}
        time.sleep(self.seconds)
        if self.effects_path:
            with open(self.effects_path, "a") as f:
                f.write(f"{self.id}\n")
                f.flush()
                os.fsync(f.fileno())
        if self.crash == "sigkill":
            print(f"    [child pid {os.getpid()}] {self.id}: side effect logged, now SIGKILL-ing myself", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.crash == "raise":
            raise SimulatedCrash(f"{self.id} stops the run")
        digest = hashlib.sha256(f"{previous['digest']}|{self.id}".encode()).hexdigest()[:16]
        return {"trail": [*previous["trail"], self.id], "digest": digest}


def build_flow(
    backend: RedisCheckpointBackend | None,
    *,
    flow_id: str = FLOW_ID,
    effects_path: str | None = None,
    crash: Literal["", "sigkill", "raise"] = "",
    seconds: float = STEP_SECONDS,
) -> Flow:
    """The demo flow n1 → … → n6, checkpointing to ``backend`` after every node (not at all when it is None)."""
    nodes: list[Node] = []
    for node_id in NODE_IDS:
        nodes.append(
            DemoStep(
                id=node_id, name=f"step {node_id}", seconds=seconds, effects_path=effects_path,
                crash=crash if node_id == CRASH_AT else "",
                depends=[NodeDependency(nodes[-1])] if nodes else [],
            )
        )  # fmt: skip
    checkpoint = CheckpointConfig(enabled=True, backend=backend) if backend else CheckpointConfig(enabled=False)
    return Flow(id=flow_id, nodes=nodes, checkpoint=checkpoint)


def node_outputs(result) -> dict[str, Any]:
    """``{node_id: output}`` of a flow result."""
    return {node_id: (found or {}).get("output") for node_id, found in (result.output or {}).items()}


def _quiet_dynamiq() -> None:
    # Dynamiq logs every node start and end at INFO on its own logger; keep its warnings and errors only. Its first
    # run imports its tool nodes lazily, and with them deprecation warnings of other libraries: not the demo's news.
    for name in ("dynamiq", "dynamiq.utils.logger"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _keys(client: Any) -> list[bytes]:
    return list(client.scan_iter(match=f"{PREFIX}:*", count=1000))


def _memory_line(client: Any) -> str:
    keys = _keys(client)
    try:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        total = sum(size or 0 for size in pipe.execute())
    except ResponseError as e:
        if "unknown command" not in str(e).lower():
            raise
        return f"{len(keys)} keys; size skipped: this server does not implement MEMORY USAGE"
    return f"{len(keys)} keys, {total} bytes ({total / 1024:.1f} KiB) by MEMORY USAGE"


def _run_child(url: str, effects_path: str) -> tuple[str, bool]:
    """Run 1 in a child process that SIGKILLs itself in n4; returns (what happened, as planned)."""
    # The url goes by environment, not argv, where a password in it would show in ps and in this output.
    command = [sys.executable, "-m", "dynamiq_redis_ckpt.demo", "--child", "--effects", effects_path]
    print(f"  starting: python {' '.join(command[1:])}  (url in ${URL_ENV})", flush=True)
    started = time.monotonic()
    child = subprocess.Popen(command, env=dict(os.environ, **{URL_ENV: url}))
    print(f"  child pid {child.pid} is running the flow", flush=True)
    try:
        code = child.wait(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return f"child did not finish within {CHILD_TIMEOUT:g} s; killed it", False
    ran = _read_effects(effects_path)
    last = ran[-1] if ran else "none"
    took = time.monotonic() - started
    if code == -signal.SIGKILL:
        return f"child killed by SIGKILL during node {last} ({took:.1f} s after start)", last == CRASH_AT
    return f"child exited with code {code} (expected death by SIGKILL); last node logged: {last}", False


def _run_in_thread(backend: RedisCheckpointBackend, effects_path: str) -> tuple[str, bool]:
    """Run 1 in a thread of this process; n4 raises SimulatedCrash, which Dynamiq does not catch."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = build_flow(backend, effects_path=effects_path, crash="raise").run_sync(FLOW_INPUT)
        except SimulatedCrash as e:
            outcome["crash"] = e

    thread = threading.Thread(target=target, name="demo-run-1")
    thread.start()
    thread.join(CHILD_TIMEOUT)
    if thread.is_alive():
        return f"run 1 did not finish within {CHILD_TIMEOUT:g} s", False
    ran = _read_effects(effects_path)
    last = ran[-1] if ran else "none"
    if "crash" in outcome:
        return f"run 1 stopped by SimulatedCrash during node {last}", last == CRASH_AT
    result = outcome.get("result")
    return f"run 1 was not interrupted (status {getattr(result, 'status', result)})", False


def _read_effects(path: str) -> list[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def run_demo(url: str | None, source: str = "--url") -> int:
    """The demo on the Redis at ``url`` (``source`` says where the url came from), or on a private one when None.

    Returns 0 when every check passed, 1 otherwise.
    """
    _quiet_dynamiq()
    failures: list[str] = []

    def check(ok: bool, what: str) -> bool:
        if not ok:
            failures.append(what)
            print(f"  CHECK FAILED: {what}")
        return ok

    embedded: EmbeddedRedis | None = None
    if url:
        print(f"Redis: {mask_url(url)} (from {source})")
    else:
        embedded = start_embedded_redis()
        url = embedded.url
        where = f" at {url}" if url else " (no redis-server on PATH)"
        print(f"Redis: {embedded.kind} started for this demo{where}")

    def new_backend() -> RedisCheckpointBackend:
        """A new backend object, on a new client (of the same in-process server on fakeredis)."""
        kwargs = embedded.backend_kwargs() if embedded is not None else {"url": url}
        return RedisCheckpointBackend(**kwargs, prefix=PREFIX)

    workdir = tempfile.TemporaryDirectory(prefix="dynamiq-redis-ckpt-demo-")
    try:
        effects_path = os.path.join(workdir.name, "side-effects.log")
        open(effects_path, "w").close()
        try:
            inspector = new_backend()
            inspector.redis.ping()
        except (RedisError, CheckpointStoreError) as e:
            print(f"Cannot use that Redis: {e}")
            return 1
        leftovers = _keys(inspector.redis)
        if leftovers:
            print(f"  removing {len(leftovers)} key(s) under {PREFIX}:* left by an earlier run")
            inspector.clear()
        print(f"Flow {FLOW_ID!r}: {' -> '.join(NODE_IDS)}, {STEP_SECONDS:g} s per node, "
              f"checkpoint after every node (RedisCheckpointBackend, prefix={PREFIX!r})")  # fmt: skip
        print(f"Side-effects log: {effects_path}")

        # ---- run 1: crash in the middle -----------------------------------------------------------------------
        if url:
            print(f"\nRun 1: a child process runs the flow; {CRASH_AT} SIGKILLs its own process after its side effect")
            what, as_planned = _run_child(url, effects_path)
        else:
            print(f"\nRun 1: no redis-server available, and a fakeredis server lives only in this process, so the "
                  f"crash is SIMULATED IN-PROCESS:\n  the flow runs in a thread and {CRASH_AT} raises SimulatedCrash "
                  f"(a BaseException Dynamiq does not catch),\n  so, as with a kill, the run stops and records nothing "
                  f"more")  # fmt: skip
            what, as_planned = _run_in_thread(new_backend(), effects_path)
        print(f"  {what}")
        check(as_planned, f"run 1 ended as planned, in {CRASH_AT}")

        # ---- what Redis holds ---------------------------------------------------------------------------------
        print(f"\nRedis holds (backend.get_latest_by_flow({FLOW_ID!r})):")
        checkpoints = inspector.get_list_by_flow(FLOW_ID)
        latest = inspector.get_latest_by_flow(FLOW_ID)
        if latest is None:
            check(False, "a checkpoint of the interrupted run is stored")
            return _finish(failures, inspector, embedded)
        completed_before = list(latest.completed_node_ids)
        expected_done = list(NODE_IDS[: NODE_IDS.index(CRASH_AT)])
        print(f"  {len(checkpoints)} checkpoints of {FLOW_ID}; the latest:")
        print(f"  id {latest.id}, status {latest.status.value}, completed_node_ids {completed_before}")
        check(latest.status == CheckpointStatus.ACTIVE, "the latest checkpoint is still active")
        check(completed_before == expected_done, f"the latest checkpoint has completed {expected_done}")

        # ---- run 2: resume ------------------------------------------------------------------------------------
        print(f"\nRun 2: a new Flow and a new backend in this process: run_sync(None, resume_from={latest.id!r})")
        resumed_flow = build_flow(new_backend(), effects_path=effects_path)
        result = resumed_flow.run_sync(None, resume_from=latest.id)
        final = node_outputs(result).get(NODE_IDS[-1])
        print(f"  status {result.status.value}; final output ({NODE_IDS[-1]}): {json.dumps(final)}")
        check(result.status == RunnableStatus.SUCCESS, "the resumed run succeeded")
        after = inspector.get_latest_by_flow(FLOW_ID)
        if after is not None:
            print(f"  Redis now: {len(inspector.get_list_by_flow(FLOW_ID))} checkpoints of {FLOW_ID}, "
                  f"the latest {after.status.value}")  # fmt: skip
            check(after.status == CheckpointStatus.COMPLETED, "the newest checkpoint after run 2 is completed")

        # ---- side effects and output ---------------------------------------------------------------------------
        counts = Counter(_read_effects(effects_path))
        print("\nSide-effects log (how many times each node ran, both runs together):")
        print("  " + ", ".join(f"{n} x{counts[n]}" for n in NODE_IDS))
        once = all(counts[n] == 1 for n in completed_before)
        print(f"  nodes completed before the crash ({', '.join(completed_before) or 'none'}) ran once: {once}")
        check(once, "nodes completed before the crash ran exactly once")
        in_flight = [n for n in NODE_IDS if n not in completed_before and counts[n] > 1]
        print(f"  ran twice (in flight at the crash, so ran again on resume): {', '.join(in_flight) or 'none'}")
        check(set(in_flight) <= {CRASH_AT} and counts[CRASH_AT] <= 2, f"only {CRASH_AT} may have run twice")
        check(all(counts[n] >= 1 for n in NODE_IDS), "every node ran")

        reference = build_flow(None, flow_id=REFERENCE_FLOW_ID, seconds=0).run_sync(FLOW_INPUT)
        matches = reference.status == RunnableStatus.SUCCESS and node_outputs(reference) == node_outputs(result)
        print(f"  output matches an uninterrupted run: {matches}  (fresh flow {REFERENCE_FLOW_ID!r}, no checkpoints)")
        check(matches, "resumed output equals an uninterrupted run")

        print(f"\nRedis memory used by {PREFIX}:* keys: {_memory_line(inspector.redis)}")
        return _finish(failures, inspector, embedded)
    finally:
        workdir.cleanup()
        if embedded is not None:
            embedded.close()


def _finish(failures: list[str], inspector: RedisCheckpointBackend, embedded: EmbeddedRedis | None) -> int:
    inspector.clear()
    remaining = len(_keys(inspector.redis))
    print(f"Cleaned up with backend.clear(): {remaining} {PREFIX}:* keys left")
    if remaining:
        failures.append("backend.clear() left keys behind")
    if embedded is not None and embedded.url:
        print("Stopping the demo's redis-server.")
    if failures:
        print(f"\nFAILED: {len(failures)} check(s): " + "; ".join(failures))
        return 1
    print("\nAll checks passed.")
    return 0


def run_child(effects_path: str) -> int:
    """Run 1 in the child process: run the flow until n4 kills this process (the url comes in the environment)."""
    _quiet_dynamiq()
    backend = RedisCheckpointBackend(url=os.environ[URL_ENV], prefix=PREFIX)
    result = build_flow(backend, effects_path=effects_path, crash="sigkill").run_sync(FLOW_INPUT)
    print(f"    [child] the flow was not interrupted: {result.status}", flush=True)
    return 3


def build_parser() -> argparse.ArgumentParser:
    """The demo's command line parser."""
    parser = argparse.ArgumentParser(prog="python -m dynamiq_redis_ckpt.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url",
        help=f"Redis to use (default ${URL_ENV}, else a private redis-server or fakeredis); "
        f"the demo deletes every {PREFIX}:* key there when done",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--effects", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m dynamiq_redis_ckpt.demo [--url URL]``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.child:
        return run_child(args.effects)
    if args.url:
        return run_demo(args.url, "--url")
    return run_demo(os.environ.get(URL_ENV) or None, f"${URL_ENV}")


if __name__ == "__main__":
    sys.exit(main())
