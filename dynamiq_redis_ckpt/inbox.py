"""People's answers for paused runs, delivered the way Dynamiq 0.69 delivers input to a resumed run.

A node waiting for a person (an approval with ``feedback_method=STREAM``, a ``HumanFeedbackTool`` with
``input_method=STREAM``, or a custom node that calls ``pause_run(node_id)``) reads the answer from its streaming
``input_queue`` when the run resumes from its checkpoint. The queue itself cannot be stored, so the answer is kept
in Redis (``P:inbox:{F}:<run>``) and put on a fresh queue on the node's own ``streaming`` config each time the run
is resumed, until the node has completed: a resuming pod that crashes before the node reads it loses nothing.
"""

from __future__ import annotations

import json
from queue import Queue
from typing import Any

from dynamiq.types.feedback import ApprovalStreamingInputEventMessage, FeedbackMethod
from dynamiq.types.streaming import StreamingConfig, StreamingEventMessage


def answer_message(node: Any, data: Any) -> str:
    """The JSON message ``node`` expects on its input queue: an approval answer or a streaming event."""
    approval = getattr(node, "approval", None)
    if approval is not None and approval.enabled and approval.feedback_method == FeedbackMethod.STREAM:
        return ApprovalStreamingInputEventMessage(entity_id=node.id, event=approval.event, data=data).to_json()
    return StreamingEventMessage(entity_id=node.id, event=node.streaming.event, data=data).to_json()


def attach_answers(flow: Any, answers: dict[str, str]) -> list[str]:
    """Give each waiting node of ``flow`` a fresh input queue holding its answer; returns the node ids served.

    The queue goes on the node's own ``streaming`` (a queue in ``RunnableConfig.nodes_override`` cannot pass
    Dynamiq's checkpoint serialization), rebuilt rather than copied because ``input_streaming_enabled`` is cached.
    """
    served = []
    nodes = {node.id: node for node in flow.nodes}
    for node_id, raw in answers.items():
        node = nodes.get(node_id)
        if node is None:
            continue
        queue: Queue = Queue()
        queue.put(answer_message(node, json.loads(raw)))
        settings = node.streaming.model_dump(exclude={"input_queue", "input_queue_done_event"})
        node.streaming = StreamingConfig(**{**settings, "enabled": True, "input_queue": queue})
        served.append(node_id)
    return served
