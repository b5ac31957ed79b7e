"""Per-flow figures for ``dynamiq-redis-ckpt stats``: checkpoints, runs, bytes stored, compression and dedup, read
from the checkpoint hashes and the packs they name (a damaged pack reported as such)."""

from __future__ import annotations

from dataclasses import dataclass

from dynamiq_redis_ckpt import codec, history
from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError, CheckpointStoreError, EncryptionKeyError)  # fmt: skip
from dynamiq_redis_ckpt.history import Op
from dynamiq_redis_ckpt.keys import flow_homes
from dynamiq_redis_ckpt.requests import Batch, cmd, pairs, text
from dynamiq_redis_ckpt.store import StoreCore

_PACK_COUNT = 8  # a pack string starts with its reference count, 8 ASCII digits (see save.lua)


@dataclass
class FlowStats:
    """A flow's figures. ``logical_bytes``: the sum of each checkpoint's raw size (what Dynamiq's own backends would
    store, uncompressed); ``raw_bytes``: the content the packs hold before compression (each pack's chunks: what is
    left after deduplication), None when a pack is sealed and this process lacks its key, or is damaged (then
    ``damaged`` says why); ``pack_bytes`` and ``hash_bytes``: what Redis holds (pack strings, and the checkpoint
    hashes' fields and values)."""

    flow: str
    checkpoints: int = 0
    runs: int = 0
    packs: int = 0
    pack_bytes: int = 0
    hash_bytes: int = 0
    logical_bytes: int = 0
    raw_bytes: int | None = 0
    damaged: str = ""

    @property
    def stored_bytes(self) -> int:
        return self.pack_bytes + self.hash_bytes

    @property
    def compression(self) -> float | None:
        """raw / pack bytes: what zstd (against base packs) saved."""
        return _ratio(self.raw_bytes, self.pack_bytes)

    @property
    def dedup(self) -> float | None:
        """logical / raw: what sharing unchanged content between checkpoints saved."""
        return _ratio(self.logical_bytes, self.raw_bytes)

    def as_dict(self) -> dict:
        return {"flow": self.flow, "checkpoints": self.checkpoints, "runs": self.runs, "packs": self.packs,
                "stored_bytes": self.stored_bytes, "pack_bytes": self.pack_bytes, "hash_bytes": self.hash_bytes,
                "raw_bytes": self.raw_bytes, "logical_bytes": self.logical_bytes, "compression": self.compression,
                "dedup": self.dedup, "damaged": self.damaged or None}  # fmt: skip


def _ratio(over: int | None, under: int | None) -> float | None:
    return round(over / under, 3) if over is not None and under else None


def flow_stats_op(store: StoreCore, flow: str) -> Op:
    """The :class:`FlowStats` of ``flow``: every checkpoint hash of its homes (their indexes, a page at a time), the
    packs they name and the bases below them (read whole, and decoded to measure their content). The index is paged
    by position, so a checkpoint deleted meanwhile does not make another one be skipped."""
    stats, runs = FlowStats(flow), set()
    for home in flow_homes(flow, store.buckets):
        named: set[str] = set()
        last = None
        while True:
            entries, more = yield from history.ascending_page(store.keys.flow_index(home), "-inf", last, history.CHUNK)
            members = [m for _, m in entries]
            if entries:
                last = entries[-1]
                hashes = yield Batch(tuple(cmd("HGETALL", store.keys.checkpoint(home, m)) for m in members))
                for member, raw in zip(members, hashes):
                    raw = pairs(raw) if isinstance(raw, list) else raw
                    if not raw:
                        continue  # expired, its index entry not pruned yet
                    fields = history.decoded_fields(raw)
                    stats.checkpoints += 1
                    stats.hash_bytes += sum(len(k) + len(v) for k, v in raw.items())
                    stats.logical_bytes += history.int_field(fields.get("raw")) or 0
                    if (damage := history.field_damage(fields)) and not stats.damaged:
                        stats.damaged = f"checkpoint {text(member)}: {damage}"
                    runs.add((home, history.run_key_of(fields)))
                    named.update(p for p in (fields.get("pk") or "").split(",") if p)
            if not more:
                break
        yield from _measure_packs(store, home, named, stats)
    stats.runs = len(runs)
    return stats


def _measure_packs(store: StoreCore, home: str, named: set[str], stats: FlowStats) -> Op:
    """Add the packs ``named`` and their bases (down the chains) to ``stats``: their stored size, and their content
    before compression (decoded bases first; a base's body is dropped once every pack built on it is decoded)."""
    blobs: dict[str, bytes] = {}
    frontier = sorted(named)
    while frontier:
        page, frontier = frontier[:history.CHUNK], frontier[history.CHUNK:]
        for pack_id, blob in zip(page, (yield Batch(tuple(cmd("GET", store.keys.pack(home, p)) for p in page)))):
            if blob is None:
                continue  # deleted meanwhile
            blobs[pack_id] = blob[_PACK_COUNT:]
            base = codec.pack_base(blobs[pack_id])
            if base and base not in blobs and base not in frontier:
                frontier.append(base)
    stats.packs += len(blobs)
    stats.pack_bytes += sum(len(b) + _PACK_COUNT for b in blobs.values())
    if stats.raw_bytes is None:
        return
    bases = {p: codec.pack_base(b) for p, b in blobs.items()}
    users: dict[str, int] = {}
    for base in bases.values():
        if base:
            users[base] = users.get(base, 0) + 1
    decoded: dict[str, codec.Pack] = {}
    try:
        for pack_id in list(blobs):
            chain = [pack_id]  # the pack, then its bases not decoded yet, decoded oldest first
            while (base := bases.get(chain[-1])) and base not in decoded and base in blobs:
                chain.append(base)
            for p in reversed(chain):
                if p in decoded or p not in blobs:
                    continue
                base = decoded.get(bases[p]) if bases[p] else None
                pack = codec.read_pack(p, blobs.pop(p), "-", store.keys.pack(home, p), base, sealer=store.sealer,
                                       flow=home)  # fmt: skip
                stats.raw_bytes += sum(len(chunk) for chunk in pack.chunks.values())
                decoded[p] = pack
                if base is not None:
                    users[base.id] -= 1
                    if not users[base.id]:
                        del decoded[base.id]
                if not users.get(p):
                    del decoded[p]
    except EncryptionKeyError:  # a sealed pack and no key: the content cannot be measured here
        stats.raw_bytes = None
    except CheckpointStoreError as e:  # a pack truncated, or its base gone: damaged
        stats.raw_bytes = None
        reason = f"{e.reason} (key {e.key})" if isinstance(e, CheckpointCorruptedError) and e.key else str(e)
        stats.damaged = "; ".join(filter(None, (stats.damaged, f"a pack is damaged: {reason}")))
