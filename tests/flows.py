"""Real Dynamiq flows for the tests: custom nodes that need no API keys and log their side effects."""

from __future__ import annotations

import os
from queue import Queue
import random
import signal
import time
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Literal

from dynamiq.checkpoints import BaseCheckpointState, RunPausedException
from pydantic import PrivateAttr

from dynamiq import Workflow
from dynamiq.checkpoints.config import CheckpointBehavior, CheckpointConfig
from dynamiq.flows import Flow
from dynamiq.nodes import NodeGroup
from dynamiq.nodes.node import Node, NodeDependency
from dynamiq.runnables import RunnableConfig

WORDS = (
    "the agent reviewed customer order invoice shipment delayed because warehouse inventory count was lower than "
    "expected so it drafted a polite reply offering a refund or a replacement and asked the finance team to approve "
    "the credit note before sending anything to the customer who had already written twice this week"
).split()

CRASH_ENV = "CKPT_TEST_CRASH_AT"
SLEEP_ENV = "CKPT_TEST_STEP_SLEEP"
PREFIX_ENV = "CKPT_TEST_PREFIX"
EFFECTS_ENV = "CKPT_TEST_EFFECTS"


def prose(seed: int, words: int) -> str:
    """Deterministic natural-language-like text."""
    rng = random.Random(seed)
    out = []
    for i in range(words):
        word = rng.choice(WORDS)
        out.append(word.capitalize() if i % 14 == 0 else word)
        if i % 14 == 13:
            out[-1] += "."
    return " ".join(out)


class RunInterrupted(BaseException):
    """Stands for the process going away mid-node: like SIGKILL it escapes Dynamiq's ``except Exception``."""


class Step(Node):
    """Appends a paragraph to the running transcript; logs that it ran; may SIGKILL its own process."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "step"
    index: int = 0
    words: int = 120
    effects_path: str | None = None
    interrupt_once_path: str | None = None
    _crash_signal: ClassVar[int] = signal.SIGKILL

    def execute(self, input_data: dict[str, Any], config: RunnableConfig = None, **kwargs) -> dict[str, Any]:
        transcript: list[str] = []
        for value in input_data.values():  # the longest upstream transcript, whatever the order of input_data
            if isinstance(value, dict) and isinstance(value.get("output"), dict):
                upstream = list(value["output"].get("transcript", []))
                transcript = max(transcript, upstream, key=len)
        paragraph = prose(self.index, self.words)
        path = self.effects_path or os.environ.get(EFFECTS_ENV)
        if path:
            from dynamiq_redis_ckpt import idempotency_key

            with open(path, "a") as f:
                f.write(f"{self.id}\n")
            with open(path + ".keys", "a") as f:
                f.write(f"{idempotency_key(config, self.id)}\n")
                f.flush()
                os.fsync(f.fileno())
        if os.environ.get(SLEEP_ENV):
            time.sleep(float(os.environ[SLEEP_ENV]))
        if os.environ.get(CRASH_ENV) == self.id:
            os.kill(os.getpid(), self._crash_signal)
        if self.interrupt_once_path and not os.path.exists(self.interrupt_once_path):
            open(self.interrupt_once_path, "w").close()
            raise RunInterrupted(f"{self.id} interrupted on its first attempt")
        return {"content": paragraph, "transcript": transcript + [paragraph], "step": self.index}


def chain_flow(
    backend,
    n: int = 20,
    *,
    flow_id: str = "chain",
    behavior: CheckpointBehavior = CheckpointBehavior.APPEND,
    effects_path: str | None = None,
    interrupt_once: dict[str, str] | None = None,
    words: int = 120,
) -> Flow:
    """A chain of ``n`` Step nodes with ids s00, s01, ... checkpointing to ``backend``."""
    nodes: list[Node] = []
    for i in range(n):
        node = Step(
            id=f"s{i:02d}", name=f"step {i}", index=i, words=words, effects_path=effects_path,
            interrupt_once_path=(interrupt_once or {}).get(f"s{i:02d}"),
            depends=[NodeDependency(nodes[-1])] if nodes else [],
        )  # fmt: skip
        nodes.append(node)
    return Flow(
        id=flow_id,
        nodes=nodes,
        checkpoint=CheckpointConfig(enabled=True, backend=backend, behavior=behavior),
    )


class TimerState(BaseCheckpointState):
    resume_at: datetime | None = None


class WaitUntil(Node):
    """Pauses the run (Dynamiq's timer pause) until a time fixed on its first execution and kept in the checkpoint."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "wait-until"
    seconds: float = 2.0
    _resume_at: datetime | None = PrivateAttr(default=None)

    def to_checkpoint_state(self) -> TimerState:
        return TimerState(**super().to_checkpoint_state().model_dump(), resume_at=self._resume_at)

    def from_checkpoint_state(self, state) -> None:
        super().from_checkpoint_state(state)
        self._resume_at = TimerState.model_validate(state if isinstance(state, dict) else state.model_dump()).resume_at

    def execute(self, input_data, config: RunnableConfig = None, **kwargs):
        now = datetime.now(timezone.utc)
        if not self.is_resumed or self._resume_at is None:
            self._resume_at = now + timedelta(seconds=self.seconds)
        if now < self._resume_at:
            context = config.checkpoint.context if config and config.checkpoint else None
            if context is not None and context.pause_run(self.id, resume_at=self._resume_at):
                raise RunPausedException(f"waiting until {self._resume_at.isoformat()}", resume_at=self._resume_at)
            raise ValueError("cannot pause here")
        path = os.environ.get(EFFECTS_ENV)
        if path:
            with open(path, "a") as f:
                f.write(f"{self.id}@{now.timestamp():.6f}\n")
        return {"waited_until": self._resume_at.isoformat(), "woke_at": now.isoformat()}


def timer_flow(backend, flow_id: str = "timer", seconds: float = 2.0) -> Flow:
    """s00 -> wait (pauses ``seconds``) -> s01."""
    first = Step(id="s00", index=0, words=20)
    wait = WaitUntil(id="wait", seconds=seconds, depends=[NodeDependency(first)])
    last = Step(id="s01", index=1, words=20, depends=[NodeDependency(wait)])
    return Flow(id=flow_id, nodes=[first, wait, last], checkpoint=CheckpointConfig(enabled=True, backend=backend))


class AskPerson(Node):
    """Asks a person: takes the answer queued for it on resume, otherwise pauses the run until input arrives."""

    group: Literal[NodeGroup.UTILS] = NodeGroup.UTILS
    name: str = "ask-person"

    def execute(self, input_data, config: RunnableConfig = None, **kwargs):
        if os.environ.get(CRASH_ENV) == self.id and self.streaming.input_streaming_enabled:
            os.kill(os.getpid(), signal.SIGKILL)  # the resuming pod dies before the node reads the answer
        if self.streaming.input_streaming_enabled:
            try:
                answer = self.streaming.input_queue.get_nowait()
            except Exception:
                answer = None
            if answer is not None:
                from dynamiq.types.streaming import StreamingEventMessage

                return {"answer": StreamingEventMessage.model_validate_json(answer).data}
        context = config.checkpoint.context if config and config.checkpoint else None
        if context is not None and context.pause_run(self.id):
            raise RunPausedException("waiting for a person")
        raise ValueError("no answer and the run cannot pause")


def ask_flow(backend, flow_id: str = "ask", tool: bool = False) -> Flow:
    """s00 -> ask -> s01; ``tool`` uses Dynamiq's own HumanFeedbackTool (input via stream) instead of AskPerson."""
    from dynamiq.nodes.tools.human_feedback import HumanFeedbackTool
    from dynamiq.types.feedback import FeedbackMethod
    from dynamiq.types.streaming import StreamingConfig

    first = Step(id="s00", index=0, words=20)
    if tool:
        ask = HumanFeedbackTool(id="ask", input_method=FeedbackMethod.STREAM, action="ask", msg_template="{{input}}",
                                streaming=StreamingConfig(enabled=True, timeout=0.5, input_queue_poll_interval=0.1,
                                                          input_queue=Queue()),  # nobody answers in time: pause
                                depends=[NodeDependency(first)])  # fmt: skip
    else:
        ask = AskPerson(id="ask", depends=[NodeDependency(first)])
    last = Step(id="s01", index=1, words=20, depends=[NodeDependency(ask)])
    return Flow(id=flow_id, nodes=[first, ask, last], checkpoint=CheckpointConfig(enabled=True, backend=backend))


def worker_flows(flow_id: str) -> Flow:
    """Flow registry for recovery workers in tests: ``chain-<n>[-x]`` are n-node chains, ``timer[-x]`` timer flows."""
    from dynamiq_redis_ckpt import RedisCheckpointBackend

    backend = RedisCheckpointBackend(url=os.environ["DYNAMIQ_REDIS_CKPT_URL"], prefix=os.environ[PREFIX_ENV])
    if flow_id.startswith("timer"):
        return timer_flow(backend, flow_id)
    if flow_id.startswith("ask"):
        return ask_flow(backend, flow_id, tool=flow_id.startswith("ask-tool"))
    return chain_flow(backend, int(flow_id.split("-")[1]), flow_id=flow_id, words=60)


def final_output(result) -> dict:
    """The last node's output of a flow result (flows keyed by node id)."""
    outputs = result.output
    last = sorted(outputs)[-1]
    return outputs[last]["output"]


__all__ = ["RunInterrupted", "Step", "worker_flows", "chain_flow", "final_output", "prose", "Workflow"]
