"""The dashboard test's worker flow registry: the test flows, and no flow for ``retired-*`` (a flow taken out of the
deployment while one of its runs waited to be recovered), whose recoveries therefore fail until a dead letter."""

from __future__ import annotations

from dynamiq.flows import Flow

from tests.flows import worker_flows


def flows(flow_id: str) -> Flow:
    if flow_id.startswith("retired"):
        raise KeyError(f"flow {flow_id!r} is not deployed on this worker")
    return worker_flows(flow_id)
