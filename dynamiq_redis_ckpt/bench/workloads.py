"""Deterministic, realistic checkpoints for the benchmark: agent-like flows and an agent mid-loop.

Everything is derived from a seed, so two runs of the benchmark (and two backends in one run) see the same bytes.
Text is natural-language-like (a fixed vocabulary, sentences, varied words), which compresses about as well as
model output does; it is never random bytes (too hard to compress) nor one repeated word (too easy).

* :func:`append_chain` yields the snapshots a Flow in APPEND mode saves: one before the first node, then one per
  completed node, each a shallow ``model_copy`` of the previous one with a new id and ``parent_checkpoint_id``,
  as ``CheckpointFlowMixin._save_checkpoint_unlocked`` builds them. Dynamiq's snapshots share their node-state dict
  and lists (it saves each before changing them); here each gets its own dict and lists, holding the same
  node-state objects, so snapshots can be built ahead of the timed part.
* Every node looks like an agent step: its ``input_data`` carries the run's query and the upstream node's result
  (so content repeats downstream, as in real flows), its ``output_data`` an answer and the message history that
  produced it, its ``internal_state`` the agent's iteration state.
* :func:`agent_loop` is one agent node checkpointing every iteration while its message history grows.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Iterator

from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState
from dynamiq.checkpoints.types import CheckpointStatus

WORDS = (
    "the a of to and in that is for it with as was on be by this are from at or an have not which but they you "
    "were all their has one can more been there when if will would about what so out up into do than other its "
    "time only could new some these two may first then any like over also after such most made well used should "
    "agent model tool answer question context document retrieval search query result summary invoice customer "
    "order payment account report analysis data table value record policy request response error retry step plan "
    "observation thought action input output message system user assistant function call argument schema status "
    "region quarter revenue growth margin forecast risk compliance contract clause vendor shipment delay estimate "
    "because therefore however although meanwhile instead finally next previous current relevant specific general "
    "checked compared verified updated returned found missing expected reported reviewed approved rejected pending"
).split()

SYSTEM_PROMPT_WORDS = 110
BASE_TIME = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


def prose(rng: random.Random, words: int) -> str:
    """Sentences of vocabulary words, capitalised and punctuated."""
    out: list[str] = []
    sentence = rng.randint(8, 20)
    for i in range(words):
        word = rng.choice(WORDS)
        if sentence == 0 or i == 0:
            word = word.capitalize()
            sentence = rng.randint(8, 20)
        sentence -= 1
        out.append(word + ("." if sentence == 0 or i == words - 1 else ("," if rng.random() < 0.06 else "")))
    return " ".join(out)


def _messages(rng: random.Random, system: str, query: str, turns: int) -> list[dict]:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": query}]
    for t in range(turns):
        call = {"name": rng.choice(["search", "sql", "calculator", "crm_lookup"]), "arguments": {"q": prose(rng, 9)}}
        messages.append({"role": "assistant", "content": prose(rng, 45), "tool_calls": [call]})
        messages.append({"role": "tool", "content": prose(rng, 70), "name": call["name"], "tool_call_id": f"call_{t}"})
    return messages


def _node_state(rng: random.Random, index: int, system: str, query: str, upstream: dict | None) -> NodeCheckpointState:
    messages = _messages(rng, system, query, turns=1)
    answer = prose(rng, 130)
    started = BASE_TIME + timedelta(seconds=7 * index)
    input_data = {"input": query, "metadata": {"step": index, "tenant": "acme"}}
    if upstream is not None:
        input_data[upstream["node"]] = {"status": "success", "output": upstream["output"]}
    output = {"content": answer, "messages": messages[2:], "tokens": {"prompt": 1800 + 37 * index, "completion": 240}}
    return NodeCheckpointState(
        node_id=f"agent-{index:02d}",
        node_type="Agent",
        status="success",
        input_data=input_data,
        output_data=output,
        internal_state={"iteration": {"completed_iterations": 1, "iteration_data": {"prompt_messages": messages}}},
        started_at=started,
        completed_at=started + timedelta(seconds=5, microseconds=1000 * index),
    )


def _next(cp: FlowCheckpoint, new_id: str, moment: datetime) -> FlowCheckpoint:
    return cp.model_copy(
        update={"id": new_id, "parent_checkpoint_id": cp.id, "created_at": moment, "updated_at": moment,
                "node_states": dict(cp.node_states), "completed_node_ids": list(cp.completed_node_ids),
                "pending_node_ids": list(cp.pending_node_ids)}
    )  # fmt: skip


def append_chain(seed: int, nodes: int, *, flow_id: str = "bench-flow") -> Iterator[FlowCheckpoint]:
    """The ``nodes + 1`` APPEND snapshots of one run of an ``nodes``-node agent flow (run ``seed``), in save order."""
    rng = random.Random(seed)
    system = prose(random.Random(-1), SYSTEM_PROMPT_WORDS)  # one system prompt for every run, as in a real app
    query = prose(rng, 35)
    run_id = f"run-{seed:06d}"
    node_ids = [f"agent-{i:02d}" for i in range(nodes)]
    created = BASE_TIME + timedelta(minutes=seed)
    cp = FlowCheckpoint(
        id=f"cp-{seed:06d}-00",
        flow_id=flow_id,
        run_id=run_id,
        wf_run_id=run_id,
        pending_node_ids=list(node_ids),
        original_input={"input": query, "user": {"id": f"u{seed % 997}", "locale": "en-GB"}},
        original_config={"run_id": run_id, "callbacks": []},
        created_at=created,
        updated_at=created,
        dynamiq_version="0.69.0",
        metadata={"bench": True},
    )
    yield cp
    upstream = None
    for i in range(nodes):
        state = _node_state(rng, i, system, query, upstream)
        upstream = {"node": state.node_id, "output": state.output_data}
        moment = created + timedelta(seconds=7 * (i + 1))
        cp = _next(cp, f"cp-{seed:06d}-{i + 1:02d}", moment)
        cp.mark_node_complete(state.node_id, state)
        cp.updated_at = moment
        if i == nodes - 1:
            cp.status = CheckpointStatus.COMPLETED
        yield cp


def agent_loop(seed: int, iterations: int, *, flow_id: str = "bench-agent") -> Iterator[FlowCheckpoint]:
    """One agent node checkpointing after every loop iteration; its message history grows by a thought and a tool
    observation each time (``iterations + 1`` APPEND snapshots)."""
    rng = random.Random(seed)
    system = prose(random.Random(-1), SYSTEM_PROMPT_WORDS)
    query = prose(rng, 35)
    run_id = f"loop-{seed:06d}"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": query}]
    created = BASE_TIME + timedelta(minutes=seed)
    cp = FlowCheckpoint(
        id=f"lp-{seed:06d}-000", flow_id=flow_id, run_id=run_id, wf_run_id=run_id, pending_node_ids=["agent"],
        original_input={"input": query}, created_at=created, updated_at=created, dynamiq_version="0.69.0",
    )  # fmt: skip
    yield cp
    for it in range(iterations):
        messages = messages + _messages(rng, system, query, turns=1)[2:]
        state = NodeCheckpointState(
            node_id="agent", node_type="Agent", status="running", input_data={"input": query},
            internal_state={"iteration": {"completed_iterations": it + 1,
                                          "iteration_data": {"prompt_messages": list(messages)}}},
            started_at=created,
        )  # fmt: skip
        cp = _next(cp, f"lp-{seed:06d}-{it + 1:03d}", created + timedelta(seconds=3 * (it + 1)))
        cp.node_states["agent"] = state
        yield cp


def tiny(seed: int, index: int, *, flow_id: str) -> FlowCheckpoint:
    """A small checkpoint (about 1 KB) used to fill a flow's index for the listing benchmark."""
    rng = random.Random(seed * 100_003 + index)
    moment = BASE_TIME + timedelta(seconds=seed * 1000 + index)
    run_id = f"fill-{seed:05d}"
    return FlowCheckpoint(
        id=f"f-{seed:05d}-{index:03d}", flow_id=flow_id, run_id=run_id, wf_run_id=run_id,
        completed_node_ids=["a"], pending_node_ids=["b"], original_input={"input": prose(rng, 20)},
        node_states={"a": NodeCheckpointState(node_id="a", node_type="Agent", status="success",
                                              output_data={"content": prose(rng, 60)})},
        created_at=moment, updated_at=moment,
    )  # fmt: skip
