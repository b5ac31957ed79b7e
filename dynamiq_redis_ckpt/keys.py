"""Key layout: the only code that knows separators and hash tags.

Everything belonging to one run lives in one *home*, whose hash tag puts it in one Redis Cluster slot, so every Lua
script touches keys of one slot. With one bucket per flow (``flow_buckets=1``, the default on a single server) a
flow's home is the flow itself, ``{<flow_id>}``: every run of the flow shares it. With more (48 by default on a
cluster), a new run goes to the home of one of its flow's buckets, ``{<flow_id>%b<salt>}``, chosen by its run id,
and a run resumed or forked from a checkpoint stays in that checkpoint's home (see :func:`flow_homes`). ``F`` below
is a home. Two small lookup keys live in slots of their own and are written before the script; they name homes:

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
``P:id:{<id>}``                 string  home of checkpoint <id> (so load needs only the id)
``P:runflows:{<run>}``          set     homes that hold checkpoints of run <run>
``P:meta:{buckets}``            string  how many buckets per flow the namespace uses (absent: one)
``P:catalog:{<n>}``             zset    flow ids with checkpoints, score = when a writer last said so (ms), 16 shards
``P:catalog:{<n>}:names``       zset    the same flow ids, score 0: in id order, for pages that hold still
==============================  ======  ======================================================

Ids are escaped inside hash tags (``%`` → ``%25``, ``{`` → ``%7B``, ``}`` → ``%7D``, empty → ``%``) so an id
containing braces can neither end its tag early nor move keys of one flow to different slots.
"""

from __future__ import annotations

import functools
import zlib
from binascii import crc_hqx
from dataclasses import dataclass

from dynamiq_redis_ckpt.errors import ConfigurationError


KINDS = ("cp", "flow", "pack", "id", "runflows", "lease", "wake", "deadflows", "inbox", "flows", "meta", "catalog")
FLOW_SHARDS = 16
SLOTS = 16384
HOME_SEP = "\x00"  # in a home: the flow id, then its bucket's salt (a save refuses a flow id holding it)


def _escape(value: str) -> str:
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def tag(value: str) -> str:
    """Return ``value`` (a flow id, a home, any id) as a hash tag: braces around an escaped, never-empty id. A home's
    bucket salt follows its escaped flow id as ``%b<salt>``, which no escaped id contains."""
    if not value:
        return "{%}"
    flow, sep, salt = value.partition(HOME_SEP)
    return "{" + _escape(flow) + (f"%b{salt}" if sep else "") + "}"


def home(flow_id: str, salt: int) -> str:
    """The home of one bucket of a flow: the flow id and the bucket's salt (see :func:`flow_homes`)."""
    return f"{flow_id}{HOME_SEP}{salt}"


def flow_of(home_or_flow: str) -> str:
    """The flow id of a home (a flow id is its own)."""
    return home_or_flow.partition(HOME_SEP)[0]


@functools.lru_cache(maxsize=4096)
def flow_homes(flow_id: str, buckets: int) -> tuple[str, ...]:
    """Where a flow's runs live: the flow itself (the one-bucket layout, and every run saved before buckets), then,
    with ``buckets`` > 1, one home per bucket. Bucket ``b``'s salt is the smallest whose tag hashes near the middle
    of the ``b``-th of ``buckets`` equal ranges of the cluster's 16,384 slots (within a quarter of the range's width
    of its centre), so the buckets spread over the masters as evenly as the masters' slot ranges allow."""
    if HOME_SEP in flow_id:  # no flow has such an id (a save refuses it): it names nothing, not another's bucket
        return ()
    if buckets <= 1:
        return (flow_id,)
    homes = [flow_id]
    stem = (_escape(flow_id) + "%b").encode()  # a home's tag, without its salt and braces: the slot is its CRC16
    for bucket in range(buckets):
        centre, width = (2 * bucket + 1) * SLOTS // (2 * buckets), max(2, SLOTS // buckets // 4)
        low, high = centre - width // 2, centre + width // 2
        salt = 0
        while not low <= crc_hqx(stem + str(salt).encode(), 0) % SLOTS < high:
            salt += 1
        homes.append(home(flow_id, salt))
    return tuple(homes)


def new_run_home(flow_id: str, run_key: str, buckets: int) -> str:
    """The home of a new run (one not resumed from a checkpoint): its bucket chosen by its run id."""
    if buckets <= 1:
        return flow_id
    return flow_homes(flow_id, buckets)[1 + zlib.crc32(run_key.encode()) % buckets]


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

    def catalog(self, shard: int) -> str:
        """One shard of the catalog of flows (see :mod:`dynamiq_redis_ckpt.catalog`): flow id -> when last said (ms)."""
        return f"{self.prefix}:catalog:{{{shard}}}"

    def catalog_names(self, shard: int) -> str:
        """The flow ids of a catalog shard again, all of score 0, so pages go in id order (ZRANGEBYLEX)."""
        return f"{self.prefix}:catalog:{{{shard}}}:names"

    def legacy_flow_registry(self, shard: int) -> str:
        """One shard of the registry of flows that versions before the wake shards kept (read once to migrate)."""
        return f"{self.prefix}:flows:{{{shard}}}"

    def inbox(self, flow_id: str, run_key: str) -> str:
        """Hash of people's answers for a paused run's nodes (node_id -> JSON)."""
        return f"{self.prefix}:inbox:{tag(flow_id)}:{run_key}"

    def buckets_meta(self) -> str:
        """String holding how many buckets per flow this namespace was first used with (set by a backend with more
        than one: every backend of the namespace must use that many)."""
        return f"{self.prefix}:meta:{{buckets}}"

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
