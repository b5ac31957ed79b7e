"""Where a run's keys live, for tests that read keys directly: its flow's own, or a bucket's (``flow_buckets``)."""

from __future__ import annotations

from dynamiq_redis_ckpt.leases import run_homes_op


def home(backend, flow: str, run: str) -> str:
    """The home (keys.flow_homes) holding run ``run`` of ``flow``: the flow id itself with one bucket."""
    return backend.execute(run_homes_op(backend.store.keys, run, flow))[0]
