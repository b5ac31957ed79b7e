"""Kill a Dynamiq flow's process mid-run and watch a recovery worker finish the run by itself.

Run it with ``python -m dynamiq_redis_ckpt.demo [--url URL]`` (or ``python -m dynamiq_redis_ckpt.cli demo``).
Without ``--url`` or ``$DYNAMIQ_REDIS_CKPT_URL`` it starts a private ``redis-server`` (or, when none is installed,
an in-process fakeredis). It writes keys under the prefix ``demo:`` and deletes every ``demo:*`` key when done, so
do not point it at a Redis where that prefix holds anything you want to keep.

What it does:

1. Starts a real worker process, ``python -m dynamiq_redis_ckpt.cli worker --flows
   dynamiq_redis_ckpt.demo_flows:worker_flows --lease-ttl 3 --poll 0.2 --metrics-port PORT``, and waits for its
   ``/readyz``.
2. Runs a 6-node chain flow (n1 → … → n6, checkpoint after every node, lease ttl 3 s) in another process, and
   SIGKILLs that process while n4 runs.
3. Watches Redis: the dead process's lease runs out, the worker claims the run and completes it, with nobody
   calling ``resume_from``. Prints the timeline, which nodes ran once and which twice (from the nodes' own log),
   and the worker's recovery metrics read from its ``/metrics``.
4. Checks all of it, stops the worker with SIGTERM (it must exit 0), and deletes its keys.

On the fakeredis fallback, whose server no other process can reach, the flow and the worker run in threads of the
demo's process instead, and the "kill" is simulated; the demo says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.request import urlopen

from dynamiq.checkpoints.types import CheckpointStatus
from dynamiq.runnables import RunnableConfig, RunnableStatus
from redis.exceptions import RedisError, ResponseError

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.config import URL_ENV, mask_url
from dynamiq_redis_ckpt.demo_flows import (
    EFFECTS_ENV,
    FLOW_ID,
    HALT,
    LEASE_TTL,
    NODE_IDS,
    PREFIX,
    STEP_SECONDS,
    SimulatedCrash,
    build_flow,
)
from dynamiq_redis_ckpt.embedded import EmbeddedRedis, start_embedded_redis
from dynamiq_redis_ckpt.errors import CheckpointStoreError

REFERENCE_FLOW_ID = "demo-flow-reference"
RUN_ID = "demo-order-A-1042"
KILL_DURING = "n4"
FLOW_INPUT = {"order": "A-1042", "items": 3}
POLL = 0.2  # the worker's --poll
CLAIM_MARGIN = 1.5  # seconds allowed past ttl + poll for a claim on a busy machine
START_TIMEOUT = 120.0  # for the worker and the flow's process to import Dynamiq and get ready
DONE_TIMEOUT = 60.0  # from the kill to the run's completion
FLOWS = "dynamiq_redis_ckpt.demo_flows:worker_flows"
# What the demo shows of the worker's /metrics (names of the metric catalogue; printed when the worker has them).
CLAIMS = "dynamiq_ckpt_worker_claims"  # counters by family name, without _total
LATENCY = "dynamiq_ckpt_recovery_latency_seconds"
RESUMES = "dynamiq_ckpt_resumes"
FLEET = "dynamiq_ckpt_fleet_runs"
SHOWN = (CLAIMS, LATENCY, RESUMES, FLEET)  # the worker's recovery metrics the demo prints and checks
WORKER_LOG_SHOWN = ("worker ready", "resuming run", "ended:", "worker stopped")
_ROOT = str(Path(__file__).resolve().parent.parent)  # where this package is imported from: the worker uses the same


def _quiet_dynamiq() -> None:
    # Dynamiq logs every node start and end at INFO on its own logger; keep its warnings and errors only. Its first
    # run imports its tool nodes lazily, and with them deprecation warnings of other libraries: not the demo's news.
    for name in ("dynamiq", "dynamiq.utils.logger"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _read_effects(path: str) -> list[tuple[str, int, float]]:
    """The nodes' log: (node id, pid, unix time it started), in order."""
    found = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                found.append((parts[0], int(parts[1]), float(parts[2])))
    return found


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except URLError as e:
        code = getattr(e, "code", None)
        return (code or 0), str(e)
    except OSError as e:
        return 0, str(e)


def scrape(port: int) -> dict[str, list]:
    """The worker's /metrics, parsed (see :func:`parse_metrics`); {} when unreachable."""
    status, text = _get(f"http://127.0.0.1:{port}/metrics")
    return parse_metrics(text) if status == 200 else {}


def parse_metrics(text: str) -> dict[str, list]:
    """Prometheus text as {family name (a counter's without _total): [(sample name, labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        name = family.name[: -len("_total")] if family.name.endswith("_total") else family.name
        families[name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return families


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


def _histogram(samples: list, name: str) -> tuple[float, float] | None:
    """(count, sum) of an unlabelled histogram's samples, None when it has none."""
    count = sum(v for n, _, v in samples if n == f"{name}_count")
    total = sum(v for n, _, v in samples if n == f"{name}_sum")
    return (count, total) if any(n == f"{name}_count" for n, _, _ in samples) else None


def _total(samples: list, **match: str) -> float:
    """The sum of a counter's ``_total`` samples whose labels include ``match``."""
    return sum(
        value for name, labels, value in samples
        if name.endswith("_total") and all(labels.get(k) == v for k, v in match.items())
    )  # fmt: skip


@dataclass
class Timeline:
    """What the demo saw after the kill, in seconds after it (local clock; the lease expiry is Redis's clock)."""

    killed_unix: float = 0.0
    lease_out: float | None = None
    token_at_kill: int | None = None
    claimed: float | None = None
    claim_owner: str = ""
    claim_token: int | None = None
    completed: float | None = None


@dataclass
class Demo:
    """One demo run: where Redis is, how the worker runs, and the checks that failed."""

    url: str | None
    embedded: EmbeddedRedis | None
    effects_path: str
    workdir: str
    failures: list[str] = field(default_factory=list)
    final: Any = None  # the run's completed checkpoint
    fleet_at_kill: list | None = None  # dynamiq_ckpt_fleet_runs samples scraped right after the kill

    def check(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failures.append(what)
            print(f"  CHECK FAILED: {what}")
        return ok

    def backend(self, **options) -> RedisCheckpointBackend:
        """A new backend object, on a new client (of the same in-process server on fakeredis)."""
        kwargs = self.embedded.backend_kwargs() if self.embedded is not None and not self.url else {"url": self.url}
        return RedisCheckpointBackend(**kwargs, prefix=PREFIX, **options)


# ---- the worker: a real process, or (fakeredis fallback) a thread of this one ------------------------------------


class WorkerProcess:
    """``python -m dynamiq_redis_ckpt.cli worker`` in its own process, its log in a file."""

    in_process = False

    def __init__(self, url: str, workdir: str, effects_path: str):
        self.port = _free_port()
        self.log_path = os.path.join(workdir, "worker.log")
        self.command = [
            sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--prefix", PREFIX, "--flows", FLOWS,
            "--lease-ttl", f"{LEASE_TTL:g}", "--poll", f"{POLL:g}", "--metrics-port", str(self.port),
        ]  # fmt: skip
        # The url goes by environment, not argv, where a password in it would show in ps and in this output.
        env = dict(os.environ, **{URL_ENV: url, EFFECTS_ENV: effects_path})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, cwd=_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def describe(self) -> str:
        return f"python {' '.join(self.command[1:])}  (url in ${URL_ENV})"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout: float) -> str | None:
        """Wait for /readyz 200 and the worker's loop to start; None when ready, else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"the worker exited with code {self.proc.returncode} before it was ready"
            if _get(f"http://127.0.0.1:{self.port}/readyz", 0.5)[0] == 200 and "worker ready" in self.log():
                return None
            time.sleep(0.1)
        return f"the worker was not ready within {timeout:g} s"

    def stop(self) -> tuple[int | None, str]:
        """SIGTERM; returns (exit code, what happened)."""
        if self._log.closed:
            return self.proc.returncode, f"exited with code {self.proc.returncode}"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._log.close()
            return None, "did not stop within 30 s of SIGTERM; killed it"
        self._log.close()
        return code, f"exited with code {code}"


class WorkerThread:
    """The same Worker, run in a thread of this process with its /metrics served (the fakeredis fallback)."""

    in_process = True

    def __init__(self, demo: Demo):
        from prometheus_client import CollectorRegistry

        from dynamiq_redis_ckpt.metrics import WorkerMetrics, serve
        from dynamiq_redis_ckpt.worker import Recovery, Worker

        self.port = _free_port()
        self.pid = os.getpid()
        self.records: list[str] = []
        self._capture()
        backend = demo.backend(lease_ttl_seconds=LEASE_TTL)
        metrics = WorkerMetrics(CollectorRegistry())

        def factory(flow_id: str):  # the demo's worker_flows, on this process's fakeredis
            return build_flow(demo.backend(lease_ttl_seconds=LEASE_TTL), effects_path=demo.effects_path)

        self.worker = Worker(Recovery(backend), factory, poll_seconds=POLL, metrics=metrics)
        self.server = serve(self.port, metrics.registry, lambda: self.worker.alive, backend.ping)
        self.worker.warm_up()
        self.thread = threading.Thread(target=self.worker.run, name="demo-worker", daemon=True)
        self.thread.start()
        logging.getLogger("dynamiq_redis_ckpt.worker").info("worker ready (in-process)")

    def _capture(self) -> None:
        records = self.records

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.getMessage()}")

        self._handler = Keep(logging.INFO)
        logger = logging.getLogger("dynamiq_redis_ckpt.worker")
        logger.setLevel(logging.INFO)
        logger.propagate = False  # its log is shown with the demo's output, not interleaved with it
        logger.addHandler(self._handler)

    def describe(self) -> str:
        return "Worker(Recovery(backend), worker_flows, poll_seconds=0.2).run() in a thread of this process"

    def log(self) -> str:
        return "\n".join(self.records)

    def wait_ready(self, timeout: float) -> str | None:
        return None if _get(f"http://127.0.0.1:{self.port}/readyz")[0] == 200 else "the worker's /readyz is not 200"

    def stop(self) -> tuple[int | None, str]:
        """Stop the loop as SIGTERM does; returns (0 when its thread returned, what happened)."""
        self.worker.stop()
        self.thread.join(30)
        self.server.shutdown()
        self.server.server_close()
        logger = logging.getLogger("dynamiq_redis_ckpt.worker")
        logger.removeHandler(self._handler)
        logger.propagate = True
        if self.thread.is_alive():
            return None, "the worker thread did not stop within 30 s"
        return 0, "its thread returned"


# ---- the flow: a process we SIGKILL, or (fakeredis fallback) a thread we halt ------------------------------------


class FlowProcess:
    """The flow's own process (``python -m dynamiq_redis_ckpt.demo --child``), started before the worker is ready
    (importing Dynamiq takes seconds) and told to run when it is."""

    in_process = False

    def __init__(self, url: str, effects_path: str):
        self.command = [sys.executable, "-m", "dynamiq_redis_ckpt.demo", "--child", "--effects", effects_path]
        env = dict(os.environ, **{URL_ENV: url})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.command, cwd=_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float) -> str | None:
        """Wait for the child's "ready <output of an uninterrupted run>" line; None when ready, else why not."""
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return f"the flow's process was not ready within {timeout:g} s"
        word, _, reference = self.proc.stdout.readline().partition(" ")  # or "" when the child died
        if word != "ready":
            return f"the flow's process did not start (exit code {self.proc.poll()})"
        self.reference = json.loads(reference)
        return None

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, run: str) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def ended(self) -> tuple[bool, str]:
        """(killed by SIGKILL, what happened)."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return False, "the flow's process is still running after SIGKILL"
        if code == -signal.SIGKILL:
            return True, "killed by SIGKILL"
        return False, f"exited with code {code} (expected death by SIGKILL)"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class FlowThread:
    """The flow in a thread of this process (the fakeredis fallback). Its "kill" stops its lease's heartbeat, as a
    dead process's stops, and halts the running node with SimulatedCrash (a BaseException Dynamiq does not catch),
    so the run writes nothing more."""

    in_process = True

    def __init__(self, demo: Demo):
        self.backend = demo.backend(lease_ttl_seconds=LEASE_TTL)
        self.flow = build_flow(self.backend, effects_path=demo.effects_path)
        self.pid = os.getpid()
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name="demo-flow", daemon=True)

    def _run(self) -> None:
        try:
            self.outcome["result"] = self.flow.run_sync(FLOW_INPUT, config=RunnableConfig(run_id=RUN_ID))
        except SimulatedCrash as e:
            self.outcome["crash"] = e

    def wait_ready(self, timeout: float) -> str | None:
        self.reference = reference_output()
        return None

    def go(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def kill(self, run: str) -> None:
        from dynamiq_redis_ckpt.registry import REGISTRY

        REGISTRY.drop((self.backend.namespace, FLOW_ID, run))  # its heartbeat stops: the lease will run out
        HALT.set()

    def ended(self) -> tuple[bool, str]:
        self.thread.join(10)
        if not self.thread.is_alive():
            HALT.clear()  # the worker's resumed run must not stop too
        if "crash" in self.outcome:
            return True, "stopped by SimulatedCrash"
        return False, f"the run was not interrupted ({self.outcome})"

    def close(self) -> None:
        HALT.set()
        self.thread.join(10)
        HALT.clear()


# ---- the demo --------------------------------------------------------------------------------------------------


def run_demo(url: str | None, source: str = "--url") -> int:
    """The demo on the Redis at ``url`` (``source`` says where the url came from), or on a private one when None.

    Returns 0 when every check passed, 1 otherwise.
    """
    _quiet_dynamiq()
    embedded: EmbeddedRedis | None = None
    if url:
        print(f"Redis: {mask_url(url)} (from {source})")
    else:
        embedded = start_embedded_redis()
        url = embedded.url
        where = f" at {url}" if url else " (no redis-server on PATH)"
        print(f"Redis: {embedded.kind} started for this demo{where}")
    workdir = tempfile.TemporaryDirectory(prefix="dynamiq-redis-ckpt-demo-")
    try:
        effects_path = os.path.join(workdir.name, "nodes.log")
        open(effects_path, "w").close()
        demo = Demo(url=url, embedded=embedded, effects_path=effects_path, workdir=workdir.name)
        return _run(demo)
    finally:
        workdir.cleanup()
        if embedded is not None:
            if embedded.url:
                print("Stopping the demo's redis-server.")
            embedded.close()


def _run(demo: Demo) -> int:
    try:
        inspector = demo.backend()
        inspector.redis.ping()
    except (RedisError, CheckpointStoreError) as e:
        print(f"Cannot use that Redis: {e}")
        return 1
    leftovers = _keys(inspector.redis)
    if leftovers:
        print(f"  removing {len(leftovers)} key(s) under {PREFIX}:* left by an earlier run")
        inspector.clear()
    print(f"Flow {FLOW_ID!r}: {' -> '.join(NODE_IDS)}, {STEP_SECONDS:g} s per node, checkpoint after every node, "
          f"lease ttl {LEASE_TTL:g} s (prefix {PREFIX!r})")  # fmt: skip

    worker: WorkerProcess | WorkerThread | None = None
    flow: FlowProcess | FlowThread | None = None
    try:
        if demo.url:
            worker = WorkerProcess(demo.url, demo.workdir, demo.effects_path)
            print(f"\nWorker: pid {worker.pid}: {worker.describe()}")
            flow = FlowProcess(demo.url, demo.effects_path)
            print(f"Flow:   pid {flow.pid}: python {' '.join(flow.command[1:3])} (runs the flow, run id {RUN_ID!r})")
        else:
            print("\nNo redis-server on PATH, and a fakeredis server lives only in this process, so the worker and the "
                  "flow\nrun IN THIS PROCESS, in threads, and the kill is SIMULATED (the flow's lease heartbeat stops,"
                  "\nits node raises SimulatedCrash). Install redis-server to see two real processes.")  # fmt: skip
            worker = WorkerThread(demo)
            print(f"Worker: {worker.describe()}")
            flow = FlowThread(demo)
        not_ready = flow.wait_ready(START_TIMEOUT) or worker.wait_ready(START_TIMEOUT)
        if not demo.check(not_ready is None, f"worker and flow started ({not_ready})"):
            return _finish(demo, inspector, worker, flow)
        print(f"  worker ready: GET http://127.0.0.1:{worker.port}/readyz -> 200")

        flow.go()
        timeline = _kill_and_watch(demo, inspector, worker, flow)
        if timeline is not None:
            _report(demo, inspector, worker, flow, timeline)
        return _finish(demo, inspector, worker, flow)
    except BaseException:
        if worker is not None and not worker.in_process:
            print("\nWorker log (last lines):\n" + _indent(worker.log()[-2000:]))
        raise
    finally:
        if flow is not None:
            flow.close()
        if worker is not None:
            worker.stop()  # a second stop does nothing


def _kill_and_watch(demo: Demo, inspector: RedisCheckpointBackend, worker, flow) -> Timeline | None:
    """Kill the flow while KILL_DURING runs, then watch Redis until the worker completed the run."""
    deadline = time.monotonic() + START_TIMEOUT
    while not any(node == KILL_DURING and pid == flow.pid for node, pid, _ in _read_effects(demo.effects_path)):
        if time.monotonic() > deadline or not flow.alive():
            demo.check(False, f"the flow reached {KILL_DURING} within {START_TIMEOUT:g} s, running")
            return None
        time.sleep(0.02)
    time.sleep(STEP_SECONDS / 2)  # in the middle of the node

    # Its run id is RUN_ID, which Dynamiq stores as the checkpoint's wf_run_id (the lease's key); read, not assumed.
    at_kill = inspector.get_latest_by_flow(FLOW_ID)
    if not demo.check(at_kill is not None, "a checkpoint of the running flow is stored"):
        return None
    flow.kill(at_kill.wf_run_id)
    killed_local, server = time.monotonic(), inspector.redis.time()
    killed_server = server[0] + server[1] / 1e6
    timeline = Timeline(killed_unix=time.time())
    as_planned, how = flow.ended()
    what = "the flow's thread" if flow.in_process else f"the flow's process (pid {flow.pid})"
    print(f"\nKilled {what} during {KILL_DURING}: {how}")
    demo.check(as_planned, f"the flow's run was stopped during {KILL_DURING} ({how})")

    at_kill = inspector.get_latest_by_flow(FLOW_ID)  # again: a save may have landed between the read and the kill
    expected_done = list(NODE_IDS[: NODE_IDS.index(KILL_DURING)])
    print(f"  Redis holds its newest checkpoint: status {at_kill.status.value}, completed {at_kill.completed_node_ids}")
    demo.check(at_kill.status == CheckpointStatus.ACTIVE, "the killed run's newest checkpoint is still active")
    demo.check(list(at_kill.completed_node_ids) == expected_done, f"the killed run had completed {expected_done}")
    demo.fleet_at_kill = scrape(worker.port).get("dynamiq_ckpt_fleet_runs")

    lease_key = inspector.store.keys.lease(FLOW_ID, at_kill.wf_run_id)
    owner, token, exp = inspector.redis.hmget(lease_key, "owner", "token", "exp")
    timeline.token_at_kill = int(token or 0)
    if exp:
        timeline.lease_out = int(exp) / 1000 - killed_server
    print(f"  its lease is still held by the killed flow; it runs out {timeline.lease_out or 0:.2f} s after the kill")
    print(f"  nobody calls resume_from: waiting for the worker (it looks every {POLL:g} s) ...")

    deadline = killed_local + DONE_TIMEOUT
    while time.monotonic() < deadline:
        now = time.monotonic() - killed_local
        if timeline.claimed is None:
            owner, token = inspector.redis.hmget(lease_key, "owner", "token")
            if token is not None and int(token) > timeline.token_at_kill:
                timeline.claimed, timeline.claim_owner, timeline.claim_token = now, (owner or b"").decode(), int(token)
        latest = inspector.get_latest_by_flow(FLOW_ID)
        if latest is not None and latest.status == CheckpointStatus.COMPLETED:
            timeline.completed = now
            demo.final = latest
            break
        time.sleep(0.05)
    return timeline


def _report(demo: Demo, inspector: RedisCheckpointBackend, worker, flow, timeline: Timeline) -> None:
    bound = LEASE_TTL + POLL + CLAIM_MARGIN
    who = "the worker (a thread of this process)" if worker.in_process else f"worker {worker.pid}"
    print("\nTimeline (seconds after the kill):")
    victim = "the flow (a thread)" if flow.in_process else f"flow process {flow.pid}"
    print(f"  +0.00  {victim} killed during {KILL_DURING}")
    if timeline.lease_out is not None:
        print(f"  +{timeline.lease_out:.2f}  its lease ran out (Redis clock)")
    if timeline.claimed is not None:
        print(f"  +{timeline.claimed:.2f}  {who} claimed the orphan (fencing token {timeline.token_at_kill} -> "
              f"{timeline.claim_token})")  # fmt: skip
    if timeline.completed is not None:
        print(f"  +{timeline.completed:.2f}  the run completed, resumed by the worker from its checkpoint")
    claimed, completed = timeline.claimed, timeline.completed
    demo.check(completed is not None, f"the worker completed the run within {DONE_TIMEOUT:g} s of the kill")
    if demo.check(claimed is not None, "the worker claimed the run (its lease token went up)"):
        demo.check(claimed <= bound, f"claimed within lease ttl + poll + {CLAIM_MARGIN:g} s = {bound:g} s of the kill "
                                     f"(took {claimed:.2f} s)")  # fmt: skip
        if timeline.lease_out is not None:
            demo.check(claimed >= timeline.lease_out - 0.25, "claimed only after the lease ran out")
        if completed is not None:
            demo.check(claimed < completed, "claimed before completed")
        if not worker.in_process:
            owner = timeline.claim_owner
            demo.check(f":{worker.pid}:" in owner, f"the claim's owner is the worker ({owner})")

    # ---- which nodes ran where ----------------------------------------------------------------------------------
    ran: dict[str, list[int]] = defaultdict(list)  # node -> pids of its starts
    where_ran: dict[str, list[str]] = defaultdict(list)
    for node, pid, started in _read_effects(demo.effects_path):
        ran[node].append(pid)
        if flow.in_process:  # one pid: before the kill it was the flow, after it the worker
            where_ran[node].append("flow" if started < timeline.killed_unix else "worker")
        else:
            where_ran[node].append({flow.pid: "flow process", worker.pid: "worker"}.get(pid, "process") + f" {pid}")
    print("\nNodes (from their own log, one line per start of a node):")
    for node in NODE_IDS:
        pids = ran.get(node, [])
        times = {1: "once ", 2: "twice"}.get(len(pids), f"{len(pids)} times")
        where = ", then ".join(where_ran[node])
        note = " (killed mid-node, run again by the worker)" if len(pids) == 2 else ""
        print(f"  {node}  {times}  {where}{note}")
    twice = [n for n in NODE_IDS if len(ran.get(n, [])) > 1]
    demo.check(all(len(ran.get(n, [])) >= 1 for n in NODE_IDS), "every node ran")
    demo.check(set(twice) <= {KILL_DURING} and len(ran.get(KILL_DURING, [])) <= 2,
               f"at most {KILL_DURING}, the node running at the kill, ran twice (twice: {twice})")  # fmt: skip
    done_before = NODE_IDS[: NODE_IDS.index(KILL_DURING)]
    demo.check(all(ran.get(n) == [flow.pid] for n in done_before), f"{', '.join(done_before)} ran once, in the flow")
    if not worker.in_process:
        after = NODE_IDS[NODE_IDS.index(KILL_DURING) :]
        demo.check(all(ran.get(n, [None])[-1] == worker.pid for n in after), f"the worker ran {', '.join(after)}")

    if demo.final is not None:
        want = flow.reference  # the last node's output of an uninterrupted run without checkpoints
        state = demo.final.node_states.get(NODE_IDS[-1])
        got = getattr(state, "output_data", None)
        got = got.get("output", got) if isinstance(got, dict) else got
        print(f"  final output ({NODE_IDS[-1]}): {json.dumps(got)}, as an uninterrupted run's: {got == want}")
        demo.check(want is not None and got == want, f"the recovered output equals an uninterrupted run's ({want})")

    # ---- the worker's metrics -------------------------------------------------------------------------------------
    print(f"\nWorker metrics (GET http://127.0.0.1:{worker.port}/metrics):")
    show_metrics(demo, _scrape_after_resume(worker.port))
    print(f"\nRedis memory used by {PREFIX}:* keys: {_memory_line(inspector.redis)}")


def _scrape_after_resume(port: int) -> dict[str, list]:
    families: dict[str, list] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the worker counts a resume once the run has returned and handed its lease
        families = scrape(port)
        if _total(families.get(RESUMES, []), outcome="success") >= 1:
            break
        time.sleep(0.1)
    return families


def show_metrics(demo: Demo, families: dict[str, list]) -> None:
    """Print the worker's recovery metrics and check them."""
    if not demo.check(bool(families), "the worker serves /metrics"):
        return
    for name in (CLAIMS, RESUMES):
        for sample, labels, value in families.get(name, []):
            if sample.endswith("_total") and value:
                print(f"  {sample}{_labels(labels)} {value:g}")
    latency = _histogram(families.get(LATENCY, []), LATENCY)
    if latency is not None:
        count, total = latency
        observed = f": {total / count:.2f} s from the lease running out to the resumed run's 1st save" if count else ""
        print(f"  {LATENCY} count {count:g}, sum {total:.3f}{observed}")
    if FLEET in families:
        now = ", ".join(f"{labels.get('state')} {value:g}" for _, labels, value in families[FLEET])
        then = ", ".join(f"{labels.get('state')} {value:g}" for _, labels, value in demo.fleet_at_kill or [])
        print(f"  {FLEET} at the kill: {then or '-'}; now: {now}")
    missing = [name for name in (CLAIMS, LATENCY, RESUMES) if name not in families]  # the fleet: a worker process's
    demo.check(not missing, f"the worker exports its recovery metrics (missing: {', '.join(missing) or 'none'})")
    demo.check(_total(families.get(RESUMES, []), outcome="success") == 1, "the worker counted 1 successful resume")
    demo.check(_total(families.get(CLAIMS, []), outcome="won") == 1, "the worker counted 1 claim won")
    count = (latency or (0, 0))[0]
    demo.check(count == 1, f"the worker observed 1 recovery latency (count {count:g})")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.strip().splitlines())


def _finish(demo: Demo, inspector: RedisCheckpointBackend, worker, flow) -> int:
    if worker is not None:
        code, how = worker.stop()
        lines = [re.sub(r"^\d{4}-\d\d-\d\d ", "", line) for line in worker.log().splitlines()
                 if any(shown in line for shown in WORKER_LOG_SHOWN)]  # fmt: skip
        print(f"\nWorker stopped with SIGTERM: {how}" if not worker.in_process else f"\nWorker stopped: {how}")
        if lines:
            print("  its log:\n" + _indent("\n".join(lines[-6:])))
        demo.check(code == 0, f"the worker stopped cleanly ({how})")
        if demo.failures and not worker.in_process:
            print("\nWorker log (last lines):\n" + _indent(worker.log()[-3000:]))
    inspector.clear()
    remaining = len(_keys(inspector.redis))
    print(f"Cleaned up with backend.clear(): {remaining} {PREFIX}:* keys left")
    demo.check(remaining == 0, "backend.clear() left no keys behind")
    if demo.failures:
        print(f"\nFAIL: {len(demo.failures)} check(s) failed: " + "; ".join(demo.failures))
        return 1
    print("\nPASS: the worker recovered the killed run by itself; every check passed.")
    return 0


def reference_output() -> Any:
    """The last node's output of an uninterrupted run of the demo flow, without checkpoints (None if it failed)."""
    result = build_flow(None, flow_id=REFERENCE_FLOW_ID, seconds=0).run_sync(FLOW_INPUT)
    if result.status != RunnableStatus.SUCCESS:
        return None
    return (result.output or {}).get(NODE_IDS[-1], {}).get("output")


def run_child(effects_path: str) -> int:
    """The flow's process: import, say "ready", wait for "go", run the flow until the demo kills this process."""
    _quiet_dynamiq()
    backend = RedisCheckpointBackend(url=os.environ[URL_ENV], prefix=PREFIX, lease_ttl_seconds=LEASE_TTL)
    flow = build_flow(backend, effects_path=effects_path)
    # An uninterrupted run first (no checkpoints): Dynamiq's lazy imports happen now, and the demo compares outputs.
    print(f"ready {json.dumps(reference_output())}", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    result = flow.run_sync(FLOW_INPUT, config=RunnableConfig(run_id=RUN_ID))
    print(f"the flow was not interrupted: {result.status}", file=sys.stderr, flush=True)
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
