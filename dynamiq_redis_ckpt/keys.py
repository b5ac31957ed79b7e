"""Key layout: the only code that knows separators and hash tags.

Everything belonging to one flow shares the hash tag ``{<flow_id>}``, so every Lua script touches keys of one
Redis Cluster slot. Two small lookup keys live in slots of their own and are written before the script:

==============================  ======  ======================================================
key                             type    holds
==============================  ======  ======================================================
``P:cp:{F}:<id>``               hash    one checkpoint: metadata, its root document's address, its packs
``P:flow:{F}``                  zset    every checkpoint of flow F, score = created_at (µs)
``P:flow:{F}:st:<status>``      zset    checkpoints of flow F with that status
``P:flow:{F}:run:<run>``        zset    checkpoints of flow F whose run_id or wf_run_id is <run>
``P:pack:{F}:<pack>``           string  content pack, counted by the snapshots naming it and the packs linked to it
``P:lease:{F}:<run>``           hash    a run's lease: owner, fencing token, expiry, newest checkpoint
``P:flow:{F}:leases``           zset    runs of flow F holding a lease, score = expiry (server ms)
``P:flow:{F}:due``              zset    paused runs of flow F with a timer, score = resume_at (ms)
``P:flow:{F}:dead``             zset    dead-lettered runs of flow F, score = when (server ms)
``P:wake:{<n>}``                zset    flows a worker must look at, score = when (ms; 0 = now), 16 shards
``P:wake:{<n>}:v``              hash    flow -> version, bumped by every write that gives a flow new work
``P:deadflows:{<n>}``           set     flows that have had dead letters (16 shards; read only to list them)
``P:inbox:{F}:<run>``           hash    answers from people for a paused run's nodes, kept until used
``P:id:{<id>}``                 string  flow id of checkpoint <id> (so load needs only the id)
``P:runflows:{<run>}``          set     flows that hold checkpoints of run <run>
==============================  ======  ======================================================

Ids are escaped inside hash tags (``%`` → ``%25``, ``{`` → ``%7B``, ``}`` → ``%7D``, empty → ``%``) so an id
containing braces can neither end its tag early nor move keys of one flow to different slots.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from dynamiq_redis_ckpt.errors import ConfigurationError


KINDS = ("cp", "flow", "pack", "id", "runflows", "lease", "wake", "deadflows", "inbox", "flows")
FLOW_SHARDS = 16


def tag(value: str) -> str:
    """Return ``value`` as a hash tag: braces around an escaped, never-empty id."""
    if not value:
        return "{%}"
    return "{" + value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D") + "}"


def glob_escape(text: str) -> str:
    """``text`` as a literal inside a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class Keys:
    """Builds every key of one namespace (``prefix``)."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or "{" in self.prefix or "}" in self.prefix:
            raise ConfigurationError(f"prefix must be non-empty and free of braces, got {self.prefix!r}")

    def checkpoint(self, flow_id: str, checkpoint_id: str) -> str:
        """Hash holding one checkpoint."""
        return f"{self.prefix}:cp:{tag(flow_id)}:{checkpoint_id}"

    def flow_index(self, flow_id: str) -> str:
        """Sorted set of all checkpoints of a flow."""
        return f"{self.prefix}:flow:{tag(flow_id)}"

    def status_index(self, flow_id: str, status: str) -> str:
        """Sorted set of a flow's checkpoints in one status."""
        return f"{self.prefix}:flow:{tag(flow_id)}:st:{status}"

    def run_index(self, flow_id: str, run_id: str) -> str:
        """Sorted set of a flow's checkpoints labelled with a run id (run_id or wf_run_id)."""
        return f"{self.prefix}:flow:{tag(flow_id)}:run:{run_id}"

    def pack(self, flow_id: str, pack_id: str) -> str:
        """String holding one content pack of a flow (its reference count, then its blob)."""
        return self.pack_prefix(flow_id) + pack_id

    def pack_prefix(self, flow_id: str) -> str:
        """What every pack key of a flow starts with (the load script appends pack ids)."""
        return f"{self.prefix}:pack:{tag(flow_id)}:"

    def lease(self, flow_id: str, run_key: str) -> str:
        """Hash holding a run's lease (owner, token, exp, head, attempts)."""
        return f"{self.prefix}:lease:{tag(flow_id)}:{run_key}"

    def lease_index(self, flow_id: str) -> str:
        """Sorted set of a flow's leased runs by expiry."""
        return f"{self.prefix}:flow:{tag(flow_id)}:leases"

    def due_index(self, flow_id: str) -> str:
        """Sorted set of a flow's paused runs by the time they are due."""
        return f"{self.prefix}:flow:{tag(flow_id)}:due"

    def dead_index(self, flow_id: str) -> str:
        """Sorted set of a flow's dead-lettered runs."""
        return f"{self.prefix}:flow:{tag(flow_id)}:dead"

    @staticmethod
    def shard_of(flow_id: str) -> int:
        """The shard (0 .. FLOW_SHARDS-1) of the sharded flow indexes a flow belongs to."""
        return zlib.crc32(flow_id.encode()) % FLOW_SHARDS

    def wake(self, shard: int) -> str:
        """One shard of the flows a worker must look at, by when (server ms)."""
        return f"{self.prefix}:wake:{{{shard}}}"

    def wake_versions(self, shard: int) -> str:
        """Versions of a wake shard's flows: a worker forgets or postpones a flow only if nothing new came since."""
        return f"{self.prefix}:wake:{{{shard}}}:v"

    def dead_flows(self, shard: int) -> str:
        """One shard of the set of flows that have had dead letters."""
        return f"{self.prefix}:deadflows:{{{shard}}}"

    def legacy_flow_registry(self, shard: int) -> str:
        """One shard of the registry of flows that versions before the wake shards kept (read once to migrate)."""
        return f"{self.prefix}:flows:{{{shard}}}"

    def inbox(self, flow_id: str, run_key: str) -> str:
        """Hash of people's answers for a paused run's nodes (node_id -> JSON)."""
        return f"{self.prefix}:inbox:{tag(flow_id)}:{run_key}"

    def locator(self, checkpoint_id: str) -> str:
        """String naming the flow a checkpoint id belongs to."""
        return f"{self.prefix}:id:{tag(checkpoint_id)}"

    def run_flows(self, run_id: str) -> str:
        """Set of flows holding checkpoints of a run."""
        return f"{self.prefix}:runflows:{tag(run_id)}"

    def is_lease_index(self, key: str) -> bool:
        """Whether ``key`` (of this namespace) is a flow's lease index (``P:flow:{F}:leases``)."""
        return key.startswith(f"{self.prefix}:flow:{{") and key[key.index("}", len(self.prefix)) + 1 :] == ":leases"

    def lease_of_index(self, index: str, run_key: str) -> str:
        """The lease of run ``run_key`` in lease index ``index``: ``P:flow:{F}:leases`` -> ``P:lease:{F}:<run>``."""
        flow_tag = index[len(f"{self.prefix}:flow:") : -len(":leases")]
        return f"{self.prefix}:lease:{flow_tag}:{run_key}"

    def namespace_patterns(self) -> tuple[str, ...]:
        """SCAN patterns matching every key of this namespace and nothing else, one per kind of :data:`KINDS`
        (used only by ``clear``).

        Each kind is followed by ``{``, so a namespace nested under this one (prefix ``app:tenant``) does not match.
        """
        escaped = glob_escape(self.prefix)
        return tuple(f"{escaped}:{kind}:\\{{*" for kind in KINDS)
