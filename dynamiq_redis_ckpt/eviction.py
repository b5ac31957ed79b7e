"""Refuse a Redis that may evict our keys.

Under ``maxmemory`` a Redis whose ``maxmemory-policy`` is not ``noeviction`` deletes keys to make room: one pack of a
checkpoint, an index, a run's lease. Nothing tells the writer; the loss shows up later as a run that cannot resume.
The safe policy is ``noeviction``: a full Redis then refuses writes (``OOM``), which the driver retries and then
reports as StoreUnavailableError, and nothing stored is lost.

``volatile-*`` policies evict only keys that have a TTL. This backend gives a TTL to its checkpoints, packs and
indexes when ``ttl_seconds`` is set, and to the fencing token an ended run leaves in its lease key when leases are
on (the default), so ``volatile-*`` is safe only with ``ttl_seconds=None`` and ``leases=False``.

The check runs once per backend, lazily, on its first operation (sync or async): the backend is built without a
connection, and no save pays a round trip for it. The policy is read from ``INFO memory`` (which the
least-privilege ACL user may run), else with ``CONFIG GET``; where neither answers, a warning is logged once and the
backend goes on. An unsafe policy raises ConfigurationError on every operation until it is fixed (each failing
operation reads the policy again, so fixing it with ``CONFIG SET`` takes effect without a restart), unless
``allow_eviction=True``, which logs one loud warning instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from dynamiq_redis_ckpt.errors import CheckpointStoreError, ConfigurationError, StoreUnavailableError
from dynamiq_redis_ckpt.requests import Each, cmd, text

logger = logging.getLogger(__name__)

SAFE_POLICY = "noeviction"


def read_policy():
    """Operation: the server's maxmemory-policy, or None when neither INFO memory nor CONFIG GET is allowed. On a
    Redis Cluster every primary is asked and the least safe policy among theirs is the answer.

    INFO first: the least-privilege ACL user (see :mod:`dynamiq_redis_ckpt.acl`) may run ``INFO memory`` but not
    CONFIG, which could read ``requirepass``; CONFIG GET for servers that hide the field from INFO."""
    try:
        policies = [_info_field(reply, "maxmemory_policy") for reply in (yield Each(cmd("INFO", "memory")))]
        if all(policies):
            return _least_safe(policies)
    except StoreUnavailableError:
        raise
    except CheckpointStoreError:  # INFO refused (an ACL, a renamed command): CONFIG may be allowed
        pass
    try:
        replies = yield Each(cmd("CONFIG", "GET", "maxmemory-policy"))
    except StoreUnavailableError:
        raise
    except CheckpointStoreError:
        return None
    policies = []
    for reply in replies:
        values = list(reply.values()) if isinstance(reply, dict) else list(reply or [])[1::2]
        if not values:
            return None
        policies.append(text(values[0]))
    return _least_safe(policies)


def _least_safe(policies: list[str]) -> str:
    return max(policies, key=lambda policy: 0 if policy == SAFE_POLICY else 1 if policy.startswith("volatile-") else 2)


def _info_field(info: Any, field: str) -> str | None:
    if isinstance(info, dict):
        value = info.get(field)
        return None if value is None else text(value) if isinstance(value, bytes) else str(value)
    for line in text(info or b"").splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return value.strip()
    return None


class EvictionCheck:
    """The one-time check of a backend (shared by its sync and async drivers); ``passed`` once it needs no more."""

    def __init__(self, *, allow: bool, ttl: bool, leases: bool):
        self.allow = allow
        self.ttl = ttl
        self.leases = leases
        self.passed = False
        self.policy: str | None = None
        self._lock = threading.Lock()

    def op(self):
        """Operation: read the policy and judge it (raises ConfigurationError on an unsafe one)."""
        policy = yield from read_policy()
        self.judge(policy)

    def unsafe_because(self, policy: str) -> str | None:
        """Why this backend's keys may be evicted under ``policy``; None when they may not."""
        if policy == SAFE_POLICY:
            return None
        if policy.startswith("volatile-"):
            holders = []
            if self.ttl:
                holders.append("its checkpoints, packs and indexes (ttl_seconds is set)")
            if self.leases:
                holders.append("ended runs' lease tokens (leases are on)")
            if not holders:
                return None
            return f"it evicts keys that have a TTL, and this backend gives one to {' and '.join(holders)}"
        return "it may evict any key"

    def judge(self, policy: str | None) -> None:
        with self._lock:
            if self.passed:
                return
            self.policy = policy
            if policy is None:
                logger.warning("could not read Redis's maxmemory-policy (CONFIG GET and INFO refused); make sure it "
                               "is %r, or Redis may evict parts of checkpoints under memory pressure", SAFE_POLICY)
                self.passed = True
                return
            reason = self.unsafe_because(policy)
            if reason is None:
                self.passed = True
                return
            problem = (f"Redis maxmemory-policy is {policy!r}: {reason}, so under memory pressure Redis would drop "
                       f"parts of checkpoints and leases without telling anyone")  # fmt: skip
            if self.allow:
                logger.warning("%s. Going on because allow_eviction=True: runs may fail to resume.", problem)
                self.passed = True
                return
        raise ConfigurationError(
            f"{problem}. Set it to {SAFE_POLICY!r} (CONFIG SET maxmemory-policy {SAFE_POLICY}, redis.conf, or your "
            f"provider's parameter group), or pass allow_eviction=True to accept losing checkpoints"
        )
