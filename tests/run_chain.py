"""Run a checkpointed chain flow in its own process (killed by the tests): python -m tests.run_chain URL PREFIX FLOW N."""

import os
import sys

from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import chain_flow

if __name__ == "__main__":
    url, prefix, flow_id, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ttl = float(os.environ.get("CKPT_TEST_LEASE_TTL", "15"))
    timeouts = {"socket_timeout": float(os.environ.get("CKPT_TEST_SOCKET_TIMEOUT", "2")),
                "retries": int(os.environ.get("CKPT_TEST_RETRIES", "3"))}  # fmt: skip
    backend = RedisCheckpointBackend(url=url, prefix=prefix, lease_ttl_seconds=ttl, **timeouts)
    flow = chain_flow(backend, n, flow_id=flow_id, words=60)
    # A run started with its own run id: nodes' idempotency keys then match across resumes (see README).
    result = flow.run_sync({"question": "where is my order?"}, config=RunnableConfig(run_id=f"wf-{flow_id}"))
    print(result.status.value)
