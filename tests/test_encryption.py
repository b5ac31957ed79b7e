"""Encryption at rest (opt-in): AES-256-GCM of every stored pack, keys from a provider, rotation, typed errors; and,
off, not one stored byte different from before encryption existed."""

from __future__ import annotations

import hashlib

import fakeredis
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend, codec
from tests.test_contract import make

# Computed on main (48c80a7) before encryption was added: an unencrypted save must store exactly these bytes.
GOLDEN_PACKS = (
    "bf78d1379fc336bf5b6ea82637a656532e3d881ec5c352d51d51c47ee0861b10",
    "4131019e1c76098f6066876eb9058fd3371f86aae10d59589b93145760aeb8d2",
)
GOLDEN_STORE = "e2f9274dc28f1bd8eaa1e9ae3a81ddb79a8184036a91a239ecb763ecf51b2f72"


def fixed_chain():
    a = make("gold-1", "gflow", "grun", "gwf", S.ACTIVE, 1, None, text="golden words " * 80)
    b = make("gold-2", "gflow", "grun", "gwf", S.COMPLETED, 2, "gold-1", text="golden words " * 80 + "more " * 60)
    return [a, b]


def store_digest(r, prefix: str) -> str:
    """SHA-256 over every key of a namespace and its value (a hash without its wall-clock 'sv' field)."""
    h = hashlib.sha256()
    for key in sorted(r.scan_iter(match=f"{prefix}:*")):
        kind = r.type(key).decode()
        if kind == "string":
            val = r.get(key)
        elif kind == "hash":
            val = repr(sorted((k, v) for k, v in r.hgetall(key).items() if k != b"sv")).encode()
        elif kind == "zset":
            val = repr(r.zrange(key, 0, -1, withscores=True)).encode()
        elif kind == "set":
            val = repr(sorted(r.smembers(key))).encode()
        else:
            val = kind.encode()
        h.update(key + b"\0" + val + b"\0")
    return h.hexdigest()


def test_unencrypted_packs_are_byte_for_byte_those_of_main():
    encoded = [codec.encode_checkpoint(c) for c in fixed_chain()]
    first, blob1 = codec.build_pack(encoded[0].chunks)
    _, blob2 = codec.build_pack(encoded[1].chunks, first)
    assert (hashlib.sha256(blob1).hexdigest(), hashlib.sha256(blob2).hexdigest()) == GOLDEN_PACKS


def test_unencrypted_store_is_byte_for_byte_that_of_main():
    r = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    backend = RedisCheckpointBackend(client=r, prefix="gold", leases=False)
    for cp in fixed_chain():
        backend.save(cp)
    assert store_digest(r, "gold") == GOLDEN_STORE
