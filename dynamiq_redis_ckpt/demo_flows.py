"""The demo's flow, importable by a recovery worker: ``dynamiq-redis-ckpt worker --flows
dynamiq_redis_ckpt.demo_flows:worker_flows`` rebuilds it by id (see :mod:`dynamiq_redis_ckpt.demo`).

Every node appends ``<node id> <pid> <unix time>`` to the file named by ``$DYNAMIQ_REDIS_CKPT_DEMO_EFFECTS`` when it
starts, so the demo can tell which nodes ran once, which twice, and in which process.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from typing import Any, Literal

from dynamiq.checkpoints.config import CheckpointConfig
from dynamiq.flows import Flow
from dynamiq.nodes import NodeGroup
from dynamiq.nodes.node import Node, NodeDependency
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.config import URL_ENV

FLOW_ID = "demo-flow"
PREFIX = "demo"
NODE_IDS = tuple(f"n{i}" for i in range(1, 7))
STEP_SECONDS = 0.5
LEASE_TTL = 3.0  # seconds: short, so the demo's orphan is recovered quickly (the default is 15)
EFFECTS_ENV = "DYNAMIQ_REDIS_CKPT_DEMO_EFFECTS"

# Only for the in-process fallback (fakeredis, whose server no other process can reach): setting it stops the run
# at its current node the way a kill does. A process never sets it for a run in another process.
HALT = threading.Event()


class SimulatedCrash(BaseException):
    """Stops a run the way a killed process does: Dynamiq catches ``Exception``, not this, so it records nothing."""


class DemoStep(Node):
    """Logs that it started, sleeps a little, and extends a digest chain (its output depends on every node before)."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "demo step"
    seconds: float = STEP_SECONDS
    effects_path: str | None = None

    def execute(self, input_data: dict[str, Any], config: RunnableConfig = None, **kwargs) -> dict[str, Any]:
        if self.depends:
            previous = input_data[self.depends[0].node.id]["output"]
        else:
            previous = {"trail": [], "digest": json.dumps(input_data, sort_keys=True)}
        if self.effects_path:
            with open(self.effects_path, "a") as f:
                f.write(f"{self.id} {os.getpid()} {time.time():.3f}\n")
                f.flush()
                os.fsync(f.fileno())
        if HALT.wait(self.seconds):
            raise SimulatedCrash(f"{self.id} stops the run")
        digest = hashlib.sha256(f"{previous['digest']}|{self.id}".encode()).hexdigest()[:16]
        return {"trail": [*previous["trail"], self.id], "digest": digest}


def build_flow(
    backend: RedisCheckpointBackend | None,
    *,
    flow_id: str = FLOW_ID,
    effects_path: str | None = None,
    seconds: float = STEP_SECONDS,
) -> Flow:
    """The demo flow n1 → … → n6, checkpointing to ``backend`` after every node (not at all when it is None)."""
    nodes: list[Node] = []
    for node_id in NODE_IDS:
        nodes.append(
            DemoStep(
                id=node_id, name=f"step {node_id}", seconds=seconds, effects_path=effects_path,
                depends=[NodeDependency(nodes[-1])] if nodes else [],
            )
        )  # fmt: skip
    checkpoint = CheckpointConfig(enabled=True, backend=backend) if backend else CheckpointConfig(enabled=False)
    return Flow(id=flow_id, nodes=nodes, checkpoint=checkpoint)


def worker_flows(flow_id: str) -> Flow:
    """The flows registry of the demo's worker: the demo flow by id, on the Redis at ``$DYNAMIQ_REDIS_CKPT_URL``,
    logging to ``$DYNAMIQ_REDIS_CKPT_DEMO_EFFECTS``."""
    if flow_id != FLOW_ID:
        raise KeyError(f"the demo's worker knows only {FLOW_ID!r}, not {flow_id!r}")
    backend = RedisCheckpointBackend(url=os.environ[URL_ENV], prefix=PREFIX, lease_ttl_seconds=LEASE_TTL)
    return build_flow(backend, effects_path=os.environ.get(EFFECTS_ENV))
