"""Run a checkpointed chain flow in its own process (killed by the tests): python -m tests.run_chain URL PREFIX FLOW N."""

import sys

from dynamiq_redis_ckpt import RedisCheckpointBackend
from tests.flows import chain_flow

if __name__ == "__main__":
    url, prefix, flow_id, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    flow = chain_flow(RedisCheckpointBackend(url=url, prefix=prefix), n, flow_id=flow_id, words=60)
    result = flow.run_sync({"question": "where is my order?"})
    print(result.status.value)
