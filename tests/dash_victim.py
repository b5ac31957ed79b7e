"""A process SIGKILLed with two runs in flight, for the dashboard test:

    python -m tests.dash_victim URL PREFIX GO_FILE

It imports, runs a flow to the end, says ``victim ready``, and starts only when GO_FILE exists (so its start-up overlaps
the worker's, and the kill comes right when the test asks). Then it runs ``chain-6-killed`` and ``retired-12`` (a flow
the test's worker does not have: its recovery fails until it is a dead letter) on two threads, and SIGKILLs itself
once both have saved completed nodes: both runs are orphaned mid-run, their leases run out, the worker claims them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import chain_flow

if __name__ == "__main__":
    url, prefix, go = sys.argv[1], sys.argv[2], sys.argv[3]
    backend = RedisCheckpointBackend(url=url, prefix=prefix,
                                     lease_ttl_seconds=float(os.environ.get("CKPT_TEST_LEASE_TTL", "2")))  # fmt: skip
    # Dynamiq imports seconds of modules lazily during a run's second node: a run to the end first, so the runs
    # below are killed right after the test says go, not whenever those imports end.
    chain_flow(backend, 2, flow_id="warm-up-2", words=10).run_sync({"question": "ready?"})
    print("victim ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.05)
    for flow_id, n in (("chain-6-killed", 6), ("retired-12", 12)):
        flow = chain_flow(backend, n, flow_id=flow_id, words=60)
        threading.Thread(target=flow.run_sync, args=({"question": "where is my order?"},), daemon=True,
                         kwargs={"config": RunnableConfig(run_id=f"wf-{flow_id}")}).start()  # fmt: skip

    def done(flow_id: str) -> int:
        latest = backend.get_latest_by_flow(flow_id)
        return len(latest.completed_node_ids) if latest else 0

    while done("chain-6-killed") < 2 or done("retired-12") < 1:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)
