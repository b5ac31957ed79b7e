"""Example flows for trying the worker: an order pipeline of four plain Python nodes (no LLM, no API key).

The worker image copies this module to /app and its default command serves it (``--flows example_flows:build_flow``);
the compose stack's example app (``example_app.py``) runs the same flows. A real deployment builds its own image
``FROM`` the worker image with the app's flows module and points ``--flows`` (the ConfigMap's ``FLOWS``) at it.

Environment: ``DYNAMIQ_REDIS_CKPT_URL`` (the Redis), ``DYNAMIQ_REDIS_CKPT_PREFIX`` (key namespace; the worker's
``--prefix`` must be the same), ``LEASE_TTL`` (the lease ttl in seconds, default 15; the worker's ``--lease-ttl``: in
Kubernetes both come from the ConfigMap), ``EXAMPLE_STEP_SECONDS`` (time each node takes, default 0.5).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any, Literal

from dynamiq.checkpoints.config import CheckpointConfig
from dynamiq.flows import Flow
from dynamiq.nodes import NodeGroup
from dynamiq.nodes.node import Node, NodeDependency
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt import RedisCheckpointBackend

FLOW_ID = "orders"
STEPS = ("validate", "price", "reserve", "confirm")
# Set by the example app before a run it wants to crash: the process exits inside "reserve", mid-run, and a worker
# must finish the run. Never set in a worker.
CRASH_IN_RESERVE = threading.Event()


class OrderStep(Node):
    """One step of an order: takes the previous step's order, adds its own field, takes a little time."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "order step"
    step: str = "validate"

    def execute(self, input_data: dict[str, Any], config: RunnableConfig = None, **kwargs) -> dict[str, Any]:
        order: dict[str, Any] = dict(input_data.get("order") or {})
        for value in input_data.values():  # the upstream step's output
            if isinstance(value, dict) and isinstance(value.get("output"), dict):
                order.update(value["output"].get("order", {}))
        time.sleep(float(os.environ.get("EXAMPLE_STEP_SECONDS", "0.5")))
        if self.step == "reserve" and CRASH_IN_RESERVE.is_set():
            os._exit(3)  # the process dies mid-run, as on SIGKILL: its lease runs out and a worker takes the run
        order[self.step] = {"validate": "ok", "price": 42.5, "reserve": "WH-1", "confirm": "sent"}[self.step]
        return {"order": order}


@functools.lru_cache(maxsize=1)
def backend() -> RedisCheckpointBackend:
    """One backend per process (one connection pool), with the store's metrics on the default registry."""
    return RedisCheckpointBackend(
        url=os.environ.get("DYNAMIQ_REDIS_CKPT_URL", "redis://localhost:6379/0"),
        prefix=os.environ.get("DYNAMIQ_REDIS_CKPT_PREFIX", "dynamiq:ckpt"),
        ttl_seconds=86400,
        lease_ttl_seconds=float(os.environ.get("LEASE_TTL", "15")),
        metrics=True,
    )


def order_flow(flow_id: str = FLOW_ID) -> Flow:
    nodes: list[Node] = []
    for step in STEPS:
        nodes.append(OrderStep(id=step, name=step, step=step, depends=[NodeDependency(nodes[-1])] if nodes else []))
    return Flow(id=flow_id, nodes=nodes, checkpoint=CheckpointConfig(enabled=True, backend=backend()))


def build_flow(flow_id: str) -> Flow:
    """The worker's registry (``--flows example_flows:build_flow``): a new Flow for a flow id."""
    if flow_id != FLOW_ID:
        raise KeyError(f"unknown flow {flow_id!r}: this example only has {FLOW_ID!r}")
    return order_flow(flow_id)
