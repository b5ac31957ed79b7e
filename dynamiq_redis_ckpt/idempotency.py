"""Keys that let a node's side effects outside (payments, emails, tool calls) happen once per run."""

from __future__ import annotations

from typing import Any


def idempotency_key(config: Any, node_id: str, step: int | str = 0) -> str:
    """A key for the side effects a node causes outside (a payment, an email, a tool call), to deduplicate them.

    It is the same for every execution of the node in one run — including the re-execution of the node that was
    in flight when its process died, the one case where a node runs twice — so a downstream service that keeps
    the keys it has seen applies the effect once. ``step`` tells apart effects a node makes more than once on
    purpose (a loop iteration, the n-th email). The run is ``config.run_id``, which is the run's wf_run_id when
    the run was started with ``RunnableConfig(run_id=...)``; the recovery worker always resumes that way.
    """
    run = getattr(config, "run_id", None)
    if not run:
        raise ValueError("idempotency_key needs the RunnableConfig the node was given (with its run_id)")
    return f"dynamiq:{run}:{node_id}:{step}"
