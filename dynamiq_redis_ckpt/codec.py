"""Turning a FlowCheckpoint into stored bytes and back.

Layers, innermost first:

1. **Values** are encoded with Dynamiq's reversible markers (``__datetime__``, ``__tuple__``, ``__int__``, ...), so
   Dynamiq's ``decode_reversible`` restores them exactly as its own backends do. Unlike Dynamiq's helpers, a value
   that has no faithful encoding (a function, a lock, an open file) raises :class:`CheckpointEncodeError` naming the
   node and field, instead of being stored as ``{}``. ``bytes`` stay raw bytes (msgpack has a type for them).
2. **Chunks.** Every string, bytes value, list or dict whose msgpack form reaches ``CHUNK_MIN`` bytes is stored
   once under its content digest (BLAKE2b-128) and replaced by a reference (msgpack ext type 1). A node output
   that reappears in the ``input_data`` of every downstream node, and in every later APPEND snapshot, is one chunk.
3. **Packs.** The chunks a snapshot adds are packed together and compressed with zstd (compressing many small
   chunks together is what makes them small); a snapshot's root document is compressed alone.

A blob starts with one byte naming the layers applied to it (1 = zstd); bit 2 is reserved for encryption.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
import types
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping
from uuid import UUID

import msgpack
import zstandard
from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.utils import REVERSIBLE_MARKERS, decode_reversible, encode_reversible

from dynamiq_redis_ckpt.errors import CheckpointCorruptedError, CheckpointEncodeError, UnsupportedFormatError

FORMAT_VERSION = 1
CHUNK_MIN = 192
DIGEST_SIZE = 16
REF_EXT = 1
LAYER_ZSTD = 1
KNOWN_LAYERS = LAYER_ZSTD
ZSTD_LEVEL = 3
ZSTD_MIN = 64
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
_NOT_STORABLE = (
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, types.GeneratorType,
    types.CoroutineType, types.AsyncGeneratorType, io.IOBase, threading.Thread,
)  # fmt: skip
_ANY_FIELDS = ("input_data", "output_data", "internal_state")


class _Unencodable(Exception):
    def __init__(self, value: object):
        self.value = value
        self.path: list = []


def digest(data: bytes) -> bytes:
    """Content address of a chunk."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def short_sum(data: bytes) -> str:
    """Checksum stored beside a root document and used as a pack id (64-bit BLAKE2b, hex)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class EncodedCheckpoint:
    """A checkpoint split into its root document and the content chunks it references."""

    root: bytes
    chunks: dict[bytes, bytes] = field(default_factory=dict)

    @property
    def raw_size(self) -> int:
        """Bytes of msgpack before compression, each distinct chunk counted once."""
        return len(self.root) + sum(len(c) for c in self.chunks.values())


class _Splitter:
    """One walk over a checkpoint: encode values the way Dynamiq does and cut out large content as chunks."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}

    def _chunk(self, packed: bytes) -> msgpack.ExtType:
        key = digest(packed)
        self.chunks[key] = packed
        return msgpack.ExtType(REF_EXT, key)

    def value(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is str:
            return self._chunk(msgpack.packb(obj)) if len(obj) >= CHUNK_MIN else obj
        if kind is dict:
            return self._dict(obj)
        if kind is list:
            return self._container([self._item(i, v) for i, v in enumerate(obj)])
        if obj is None or kind is bool:
            return obj
        if kind is int:
            return obj if _INT_MIN <= obj <= _UINT_MAX else {"__int__": str(obj)}
        if kind is float:
            return obj if math.isfinite(obj) else {"__float__": str(obj)}
        if kind is bytes:
            return self._chunk(msgpack.packb(obj)) if len(obj) >= CHUNK_MIN else obj
        return self._other(obj)

    def _item(self, key: Any, value: Any) -> Any:
        try:
            return self.value(value)
        except _Unencodable as e:
            e.path.append(key)
            raise

    def _dict(self, obj: dict) -> Any:
        if all(type(k) is str and k not in REVERSIBLE_MARKERS for k in obj):
            return self._container({k: self._item(k, v) for k, v in obj.items()})
        pairs = [[self.value(_dict_key(k)), self._item(k, v)] for k, v in obj.items()]
        if all(type(k) is str and k not in REVERSIBLE_MARKERS for k, _ in pairs):
            return self._container(dict(pairs))
        return self._container({"__dict_items__": pairs})

    def _container(self, node: Any) -> Any:
        packed = msgpack.packb(node)
        return node if len(packed) < CHUNK_MIN else self._chunk(packed)

    def _other(self, obj: Any) -> Any:
        if isinstance(obj, Enum):
            return self.value(obj.value)
        if isinstance(obj, bool) or obj is None:
            return obj
        if isinstance(obj, str):
            return self.value(str.__str__(obj))
        if isinstance(obj, int):
            return self.value(int(obj))
        if isinstance(obj, float):
            return self.value(float(obj))
        if isinstance(obj, dict):
            return self._dict(dict(obj))
        if isinstance(obj, list):
            return self.value(list(obj))
        if isinstance(obj, tuple):
            return self._container({"__tuple__": self._container([self._item(i, v) for i, v in enumerate(obj)])})
        if isinstance(obj, (set, frozenset)):
            return self._container({"__set__": self._container([self._item(i, v) for i, v in enumerate(obj)])})
        if isinstance(obj, type):
            return obj.__name__
        unfaithful = isinstance(obj, (bytearray, memoryview, *_NOT_STORABLE)) or callable(obj)
        if unfaithful and not isinstance(obj, io.BytesIO):
            raise _Unencodable(obj)
        encoded = encode_reversible(obj)
        if encoded is obj:
            raise _Unencodable(obj)
        if isinstance(encoded, dict) and not REVERSIBLE_MARKERS.isdisjoint(encoded):
            # A marker made by Dynamiq's encoder (datetime, UUID, BytesIO, ...): kept as is, never escaped.
            return self._container({k: self.value(v) for k, v in encoded.items()})
        return self.value(encoded)


def _dict_key(key: Any) -> Any:
    """Dynamiq's rule for dict keys: primitives stay, UUIDs and everything else become strings."""
    if isinstance(key, UUID):
        return str(key)
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    return str(key)


def encode_checkpoint(checkpoint: FlowCheckpoint) -> EncodedCheckpoint:
    """Encode a checkpoint into its root document and content chunks. Never mutates ``checkpoint``."""
    splitter = _Splitter()
    doc = checkpoint.model_dump(exclude={"original_input", "node_states"})
    nodes = {}
    for node_id, state in checkpoint.node_states.items():
        dumped = state.model_dump(exclude=set(_ANY_FIELDS))
        for name in _ANY_FIELDS:
            dumped[name] = getattr(state, name)
        nodes[node_id] = dumped
    doc["node_states"] = nodes
    doc["original_input"] = checkpoint.original_input
    try:
        root = {k: splitter._item(k, v) for k, v in doc.items()}
    except _Unencodable as e:
        raise CheckpointEncodeError(checkpoint.id, tuple(reversed(e.path)), e.value) from None
    return EncodedCheckpoint(root=msgpack.packb(root), chunks=splitter.chunks)


def decode_checkpoint(checkpoint_id: str, root: bytes, chunk_of: Callable[[bytes], bytes | None]) -> FlowCheckpoint:
    """Rebuild a checkpoint from its root document, fetching referenced chunks through ``chunk_of``."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code != REF_EXT:
            raise CheckpointCorruptedError(checkpoint_id, f"unknown msgpack extension {code}")
        chunk = chunk_of(data)
        if chunk is None:
            raise CheckpointCorruptedError(checkpoint_id, f"content chunk {data.hex()} is missing")
        return unpack(chunk)

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(
            data, ext_hook=ext_hook, object_hook=decode_reversible, strict_map_key=False, raw=False
        )

    try:
        tree = unpack(root)
    except CheckpointCorruptedError:
        raise
    except Exception as e:
        raise CheckpointCorruptedError(checkpoint_id, f"document does not decode: {e!r}") from e
    try:
        return FlowCheckpoint(**tree)
    except Exception as e:
        raise CheckpointCorruptedError(checkpoint_id, f"document is not a valid FlowCheckpoint: {e}") from e


_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread, reused across calls.
    ctx = getattr(_local, "cctx", None)
    if ctx is None:
        ctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return ctx


def _decompressor() -> zstandard.ZstdDecompressor:
    ctx = getattr(_local, "dctx", None)
    if ctx is None:
        ctx = _local.dctx = zstandard.ZstdDecompressor()
    return ctx


def wrap(data: bytes) -> bytes:
    """Apply the storage layers (zstd when it pays) and prefix the layer byte."""
    if len(data) >= ZSTD_MIN:
        packed = _compressor().compress(data)
        if len(packed) < len(data):
            return bytes([LAYER_ZSTD]) + packed
    return b"\x00" + data


def unwrap(blob: bytes, checkpoint_id: str, key: str | None = None) -> bytes:
    """Undo :func:`wrap`; raises a typed error for unknown layers or damaged data."""
    if not blob:
        raise CheckpointCorruptedError(checkpoint_id, "empty blob", key)
    layers = blob[0]
    if layers & ~KNOWN_LAYERS:
        raise UnsupportedFormatError(checkpoint_id, f"layer mask {layers}", FORMAT_VERSION)
    body = blob[1:]
    if layers & LAYER_ZSTD:
        try:
            body = _decompressor().decompress(body)
        except zstandard.ZstdError as e:
            raise CheckpointCorruptedError(checkpoint_id, f"zstd: {e}", key) from e
    return body


def build_pack(chunks: Mapping[bytes, bytes]) -> tuple[str, bytes]:
    """Pack chunks into one stored blob; returns (pack id, blob). The id is a digest of the content."""
    flat: list[bytes] = []
    for key in sorted(chunks):
        flat += (key, chunks[key])
    body = msgpack.packb(flat)
    return short_sum(body), wrap(body)


def read_pack(blob: bytes, checkpoint_id: str, key: str | None = None) -> dict[bytes, bytes]:
    """Unpack a pack blob into ``{digest: chunk}``, verifying every chunk against its digest."""
    body = unwrap(blob, checkpoint_id, key)
    try:
        flat = msgpack.unpackb(body, raw=False)
        chunks = dict(zip(flat[::2], flat[1::2]))
    except Exception as e:
        raise CheckpointCorruptedError(checkpoint_id, f"pack does not decode: {e!r}", key) from e
    for ref, chunk in chunks.items():
        if not isinstance(chunk, bytes) or digest(chunk) != ref:
            raise CheckpointCorruptedError(checkpoint_id, "content chunk fails its checksum", key)
    return chunks
