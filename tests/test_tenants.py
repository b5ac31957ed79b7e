"""Tenant isolation: namespaces (prefixes) on one server never see or touch each other's keys; clear() empties only its own."""

from __future__ import annotations

import time

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.registry import REGISTRY
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import chain_flow
from tests.test_acl import orphan
from tests.test_human_input import make_first_checkpoint


def test_clear_leaves_no_lease_index_entry_of_a_lease_it_deleted(redis_server):
    """clear() kept every flow's lease index whole: an orphan's index entry outlived its lease and checkpoints, so
    the namespace was never empty and workers kept finding a run that no longer existed. Only live runs' entries stay."""
    backend = RedisCheckpointBackend(url=redis_server.url, prefix="lease-ix", lease_ttl_seconds=15.0)
    short = RedisCheckpointBackend(url=redis_server.url, prefix="lease-ix", lease_ttl_seconds=0.3)
    keys = backend.store.keys
    try:
        orphan(short, chain_flow(short, 2, flow_id="gone"), "wf-orphan")
        orphan(short, chain_flow(short, 2, flow_id="busy"), "wf-orphan")
        with as_running_flow():  # a live run (this process renews its lease) beside the orphan of its flow
            backend.save(make_first_checkpoint(chain_flow(backend, 2, flow_id="busy"), "wf-live"))
        time.sleep(0.4)
        assert set(Recovery(backend).find_orphans()) == {("gone", "wf-orphan"), ("busy", "wf-orphan")}
        backend.clear()
        left = sorted(k.decode() for k in backend.redis.scan_iter(match="lease-ix:*"))
        assert left == sorted([keys.lease("busy", "wf-live"), keys.lease_index("busy")] + [keys.wake(keys.shard_of("busy")), keys.wake_versions(keys.shard_of("busy"))]), left
        assert backend.redis.zrange(keys.lease_index("busy"), 0, -1) == [b"wf-live"]
        assert Recovery(backend).find_orphans() == []
    finally:
        held = REGISTRY.get((backend.namespace, "busy", "wf-live"))
        if held is not None:
            REGISTRY.fence(backend.namespace, "busy", "wf-live", held.token, "test over")
        backend.clear()
