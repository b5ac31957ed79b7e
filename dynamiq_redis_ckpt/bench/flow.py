"""A real Dynamiq Flow for the per-node overhead benchmark: a chain of agent-like nodes that need no API keys."""

from __future__ import annotations

import random
from typing import Any, Literal

from dynamiq.checkpoints.config import CheckpointBehavior, CheckpointConfig
from dynamiq.flows import Flow
from dynamiq.nodes import NodeGroup
from dynamiq.nodes.node import Node, NodeDependency
from dynamiq.runnables import RunnableConfig

from dynamiq_redis_ckpt.bench.workloads import prose

ANSWER_WORDS = 130


class BenchAgent(Node):
    """Answers with deterministic prose (about 130 words) and passes its upstream node's answer along, as an agent
    step that quotes the previous step's result would; never sleeps or calls out."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "bench-agent"
    index: int = 0

    def execute(self, input_data: dict[str, Any], config: RunnableConfig = None, **kwargs) -> dict[str, Any]:
        upstream = ""
        for value in input_data.values():
            if isinstance(value, dict) and isinstance(value.get("output"), dict):
                upstream = value["output"].get("content", "")
        answer = prose(random.Random(self.index), ANSWER_WORDS)
        query = str(input_data.get("input", ""))
        messages = [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        return {"content": answer, "previous": upstream, "messages": messages, "step": self.index}


def agent_flow(backend: Any | None, nodes: int = 10, flow_id: str = "bench-real-flow") -> Flow:
    """A chain of ``nodes`` :class:`BenchAgent` nodes; checkpointing (APPEND) to ``backend``, or off when None."""
    chain: list[Node] = []
    for i in range(nodes):
        chain.append(BenchAgent(id=f"a{i:02d}", index=i, depends=[NodeDependency(chain[-1])] if chain else []))
    checkpoint = (
        CheckpointConfig(enabled=True, backend=backend, behavior=CheckpointBehavior.APPEND)
        if backend is not None
        else CheckpointConfig(enabled=False)
    )
    return Flow(id=flow_id, nodes=chain, checkpoint=checkpoint)


def runner(flow: Flow, query: str) -> Any:
    """A no-argument callable running ``flow`` once; raises if the run did not succeed."""

    def run() -> None:
        result = flow.run_sync(input_data={"input": query})
        if getattr(result.status, "value", result.status) != "success":
            raise RuntimeError(f"flow {flow.id} ended with {result.status}: {getattr(result, 'error', None)}")

    return run
