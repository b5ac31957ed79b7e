"""Turning a FlowCheckpoint into stored bytes and back.

Layers, innermost first:

1. **Values** are packed by msgpack's C packer. Plain data (str, int, float, bool, None, bytes, list, dict) is
   packed natively; every other value Dynamiq can restore (datetime, UUID, tuple, set, Decimal, BytesIO, ...)
   becomes an extension (type 2) holding Dynamiq's reversible marker, so ``decode_reversible`` restores it exactly as
   Dynamiq's own backends do, while a user's dict that merely looks like a marker stays a dict. A value with no
   faithful encoding (a function, a lock, an open file) raises :class:`CheckpointEncodeError` naming the node and the
   field, where Dynamiq's helpers would store ``{}``.
2. **Chunks.** Each node state and the flow's original input is one chunk, stored once under its content address
   (SHA-256, first 16 bytes) and referenced from the root document (extension type 1). An APPEND snapshot shares
   every unchanged node state with its parent, so it stores only the nodes that changed.
3. **Packs.** The chunks a save adds, its root document among them, are packed together and compressed with zstd
   (with its frame checksum), against the body of an earlier pack of the run when the store has one (a *based*
   pack: a new version of a node state, or of the root, costs about what it adds).

4. **Deltas.** A large chunk that is a new version of one the process stored before (the same node, one save
   earlier) is packed as copies from that version plus the bytes in between (:mod:`dynamiq_redis_ckpt.delta`),
   when that version is in the base pack: a save hashes and compresses what changed, not the whole state again.

A blob starts with one byte naming the layers applied to it: 1 = zstd, 4 = compressed against a base pack, 8 = the
base's id is 12 bytes and the pack holds a reference on it (packs only), 16 = some chunks are deltas over chunks of
the base (packs only), 2 = sealed: encrypted at rest with AES-256-GCM after compression (packs only, opt-in; see
:func:`wrap` and docs/encryption.md).

Format 5 (this one) adds delta chunks to format 4, which keeps the root document in the pack and links each pack to
its base, so a checkpoint names only its newest packs and its hash stays small. It reads format 4, format 3 (root in
the hash, every pack named, 16-byte pack ids) and format 2 (no based packs); format 1 walked every value in Python,
was never released and is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
import types
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Callable, Mapping, Sequence

import msgpack
import zstandard
from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState
from dynamiq.utils import REVERSIBLE_MARKERS, decode_reversible, encode_reversible

from dynamiq_redis_ckpt import delta
from dynamiq_redis_ckpt.errors import (
    CheckpointCorruptedError,
    CheckpointEncodeError,
    EncryptionKeyError,
    UnsupportedFormatError,
)

FORMAT_VERSION = 5
READABLE_FORMATS = (2, 3, 4, 5)  # 3 added based packs, 4 linked them and moved the root into them, 5 deltas
CHUNK_MIN = 512  # smaller node states stay inline in the root: a small checkpoint loads without a pack
DIGEST_SIZE = 16
PACK_ID_SIZE = 12  # format 4: 24 hex digits, so a checkpoint naming two packs still fits a compact Redis hash
REF_EXT = 1
MARK_EXT = 2
INLINE_EXT = 3
LAYER_ZSTD = 1
LAYER_SEALED = 2  # encrypted at rest: key id, nonce, ciphertext and tag follow the base id (see wrap)
LAYER_BASE = 4  # packs only: zstd with an earlier pack's body as dictionary, whose id follows the layer byte
LAYER_LINKED = 8  # with LAYER_BASE: that id is PACK_ID_SIZE bytes and the pack holds a reference on its base
LAYER_DELTA = 16  # with LAYER_BASE (format 5): chunks may be deltas over the base's; the dictionary is its body's tail
DICTIONARY_TAIL = 128 << 10  # format 5: the base body's last bytes a pack is compressed against (zstd indexes a
# dictionary on every use: a whole-body one cost a save time in proportion to everything the run had stored)
LAYER_ANCESTRY = 32  # with LAYER_LINKED (format 5): the ids of the packs below the base follow its id
KNOWN_LAYERS = LAYER_ZSTD | LAYER_SEALED | LAYER_BASE | LAYER_LINKED | LAYER_DELTA | LAYER_ANCESTRY
MAX_ANCESTORS = 32  # a pack's head names at most this many packs below its base (a reader learns the rest)
NONCE_SIZE = 12  # AES-GCM's 96-bit nonce, random per blob
TAG_SIZE = 16
_AAD = b"dynamiq-redis-ckpt/pack/1\0"
ZSTD_LEVEL = 3
_NOT_STORABLE = (
    types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, types.GeneratorType,
    types.CoroutineType, types.AsyncGeneratorType, io.IOBase, threading.Thread,
)  # fmt: skip
_PLAIN = (str, int, float, bool, bytes, type(None))
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1
_DATETIME_HEAD = msgpack.packb({"__datetime__": ""})[:-1]  # map header and key; the value is appended


class _Unencodable(Exception):
    def __init__(self, value: object):
        self.value = value


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (naive datetimes are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return (moment - _EPOCH) // timedelta(microseconds=1)


def digest(data: bytes) -> bytes:
    """Content address of a chunk."""
    return hashlib.sha256(data).digest()[:DIGEST_SIZE]


def short_sum(data: bytes) -> str:
    """Checksum stored beside a root document (64 bits of SHA-256, hex)."""
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class EncodedCheckpoint:
    """A checkpoint split into its root document and the content chunks it references.

    ``slots`` names the chunk each node state (by node id) and the original input (``INPUT_SLOT``) went to, so the
    next save of the run can compare against them; ``deltas`` holds, for chunks that are a new version of one in
    ``prior``, how to build them from it (see :mod:`dynamiq_redis_ckpt.delta`)."""

    root: bytes
    chunks: dict[bytes, bytes] = field(default_factory=dict)
    slots: dict[str, bytes] = field(default_factory=dict)
    deltas: dict[bytes, tuple[bytes, list]] = field(default_factory=dict)

    @property
    def raw_size(self) -> int:
        """Bytes of msgpack before compression, each distinct chunk counted once."""
        return len(self.root) + sum(len(c) for c in self.chunks.values())


INPUT_SLOT = "\0input"  # the original input's slot: node ids come from Dynamiq and hold no NUL
DELTA_MIN = 4096  # smaller chunks are hashed and packed whole: a delta would save too little to pay for itself
Prior = Callable[[str], "tuple[bytes, bytes] | None"]  # slot -> (address, bytes) of its previous version, if held


def delta_address(source: bytes, ops: list) -> bytes:
    """The address of a chunk stored as ``ops`` over ``source``: a digest of that description, which names the
    content exactly as long as ``source`` does (the same content reached another way gets another address: it is
    then stored twice, never confused)."""
    return digest(b"\0delta\0" + source + msgpack.packb(ops))


_stamps: dict[tuple, msgpack.ExtType] = {}


def _datetime(moment: datetime) -> msgpack.ExtType:
    # A node's timestamps are re-encoded on every later save of the run, and isoformat() is slow: keep them.
    key = (moment, moment.tzinfo, moment.fold)
    found = _stamps.get(key)
    if found is None:
        text = moment.isoformat().encode()  # ascii, at most 32 bytes: a msgpack fixstr or str8, written by hand
        head = bytes((0xA0 | len(text),)) if len(text) < 32 else bytes((0xD9, len(text)))
        if len(_stamps) >= 4096:
            _stamps.clear()
        found = _stamps[key] = msgpack.ExtType(MARK_EXT, _DATETIME_HEAD + head + text)
    return found


_moments: dict[bytes, datetime] = {}


def _moment(marker: bytes) -> datetime:
    """The datetime a datetime marker extension holds (datetimes are immutable: parsed once, kept)."""
    found = _moments.get(marker)
    if found is None:
        found = decode_reversible(msgpack.unpackb(marker))
        if len(_moments) >= 4096:
            _moments.clear()
        _moments[marker] = found
    return found


def _stamped(fields: dict) -> dict:
    """``fields`` with its datetime values as marker extensions (so the packer needs no callback for them)."""
    return {k: _datetime(v) if type(v) is datetime else v for k, v in fields.items()}


class _ValuePacker:
    """msgpack's C packer with Dynamiq's reversible markers as extensions (one per thread: packers keep state)."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=self._special, strict_types=True, autoreset=True)
        self._odd = False

    def pack(self, value: Any) -> bytes:
        """Pack one value; raises _Unencodable for a value that has no faithful encoding."""
        self._odd = False
        try:
            data = self._packer.pack(value)
        except BaseException:
            self._packer.reset()
            raise
        if self._odd and _has_odd_keys(value):
            # Dynamiq turns a dict key that is not a primitive (a UUID, a tuple) into its str(); the C packer cannot
            # tell a key from a value, so such values take one more pass with their keys converted first.
            data = self._packer.pack(_plain_keys(value))
        return data

    def _special(self, obj: Any) -> Any:
        # Called for what msgpack does not pack itself; what this returns must be packable without another call.
        if isinstance(obj, Enum):
            obj = obj.value
        if isinstance(obj, int) and not isinstance(obj, bool):
            obj = int(obj)
            return obj if _INT_MIN <= obj <= _UINT_MAX else self._marker({"__int__": str(obj)})
        for base in (str, float, dict, list):
            if isinstance(obj, base):
                return base(obj)
        if obj is None or isinstance(obj, (bool, bytes)):
            return obj
        self._odd = True
        if isinstance(obj, datetime):
            return _datetime(obj)
        if isinstance(obj, tuple):
            return self._marker({"__tuple__": list(obj)})
        if isinstance(obj, (set, frozenset)):
            return self._marker({"__set__": list(obj)})
        if isinstance(obj, type):
            return obj.__name__
        unfaithful = isinstance(obj, (bytearray, memoryview, *_NOT_STORABLE)) or callable(obj)
        if unfaithful and not isinstance(obj, io.BytesIO):
            raise _Unencodable(obj)
        encoded = encode_reversible(obj)
        if encoded is obj:
            raise _Unencodable(obj)
        if isinstance(encoded, dict) and not REVERSIBLE_MARKERS.isdisjoint(encoded):
            return self._marker(encoded)
        return encoded

    def _marker(self, marker: dict) -> msgpack.ExtType:
        return msgpack.ExtType(MARK_EXT, msgpack.packb(marker, default=self._special, strict_types=True))


def _has_odd_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return any(not isinstance(k, _PLAIN) or _has_odd_keys(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_odd_keys(v) for v in value)
    return False


def _plain_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k if isinstance(k, _PLAIN) else str(k)): _plain_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_keys(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_keys(v) for v in value)
    return value


def _path_to(value: Any, target: Any) -> list | None:
    """Where ``target`` sits inside ``value`` (only walked to name the culprit of a failed encode)."""
    if value is target:
        return []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, child in items:
        found = _path_to(child, target)
        if found is not None:
            return [key, *found]
    return None


_local = threading.local()


def _packer() -> _ValuePacker:
    found = getattr(_local, "packer", None)
    if found is None:
        found = _local.packer = _ValuePacker()
    return found


def _node_record(state: NodeCheckpointState) -> dict:
    record = _stamped(state.__dict__)
    if state.__pydantic_extra__:
        record.update(state.__pydantic_extra__)
    return record


def encode_checkpoint(checkpoint: FlowCheckpoint, prior: Prior | None = None) -> EncodedCheckpoint:
    """Encode a checkpoint into its root document and content chunks. Never mutates ``checkpoint``.

    Every value is packed anew on every save: a node state may have been changed in place, and only its bytes can
    tell. With ``prior`` (the previous version of each slot, as this process stored it) a chunk whose bytes are the
    same keeps its address without being hashed again, and a large one that changed is described as a delta over
    its previous version, so what a save hashes and compresses is what changed."""
    packer = _packer()
    encoded = EncodedCheckpoint(b"")
    chunks = encoded.chunks

    def chunk(packed: bytes, slot: str) -> msgpack.ExtType:
        if len(packed) < CHUNK_MIN:
            return msgpack.ExtType(INLINE_EXT, packed)
        before = prior(slot) if prior is not None else None
        if before is not None and before[1] == packed:
            key = before[0]
        elif before is not None and len(packed) >= DELTA_MIN and (ops := delta.diff(before[1], packed)) is not None:
            key = delta_address(before[0], ops)
            encoded.deltas[key] = (before[0], ops)
        else:
            key = digest(packed)
        chunks[key] = packed
        encoded.slots[slot] = key
        return msgpack.ExtType(REF_EXT, key)

    where: tuple = ()
    value: Any = None
    try:
        doc = _stamped(checkpoint.model_dump(exclude={"original_input", "node_states"}))
        doc["pending_inputs"] = {k: _stamped(v) for k, v in doc["pending_inputs"].items()}
        nodes = {}
        for node_id, state in checkpoint.node_states.items():
            where, value = ("node_states", node_id), state
            nodes[node_id] = chunk(packer.pack(_node_record(state)), node_id)
        where, value = ("original_input",), checkpoint.original_input
        doc["original_input"] = chunk(packer.pack(checkpoint.original_input), INPUT_SLOT)
        doc["node_states"] = nodes
        where, value = (), doc
        encoded.root = packer.pack(doc)
    except _Unencodable as e:
        inner = _path_to(_node_record(value) if isinstance(value, NodeCheckpointState) else value, e.value) or []
        raise CheckpointEncodeError(checkpoint.id, (*where, *inner), e.value) from None
    except (ValueError, RecursionError) as e:  # msgpack's "recursion limit exceeded": nested deeper than it packs
        if isinstance(e, ValueError) and "recursion" not in str(e):
            raise
        record = _node_record(value) if isinstance(value, NodeCheckpointState) else value
        field = next((k for k, v in record.items() if not _packs(packer, v)), None) if isinstance(record, dict) else None
        problem = f"holds a value nested deeper than {_MAX_DEPTH} levels, which cannot be stored"
        raise CheckpointEncodeError(checkpoint.id, (*where, *(() if field is None else (field,))), record, problem) from None
    return encoded


_MAX_DEPTH = 511  # msgpack's packer refuses values nested deeper


def _packs(packer: _ValuePacker, value: Any) -> bool:
    try:
        packer.pack(value)
    except (ValueError, RecursionError, _Unencodable):
        return False
    return True


def decode_checkpoint(checkpoint_id: str, root: bytes, chunk_of: Callable[[bytes], bytes | None]) -> FlowCheckpoint:
    """Rebuild a checkpoint from its root document, fetching referenced chunks through ``chunk_of``."""

    def ext_hook(code: int, data: bytes) -> Any:
        if code == MARK_EXT:
            return _moment(data) if data.startswith(_DATETIME_HEAD) else decode_reversible(unpack(data))
        if code == INLINE_EXT:
            return unpack(data)
        if code == REF_EXT:
            chunk = chunk_of(data)
            if chunk is None:
                raise CheckpointCorruptedError(checkpoint_id, f"content chunk {data.hex()} is missing")
            return unpack(chunk)
        raise CheckpointCorruptedError(checkpoint_id, f"unknown msgpack extension {code}")

    def unpack(data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=ext_hook, strict_map_key=False, raw=False)

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


def root_slots(root: bytes) -> dict[str, bytes]:
    """The chunk address of each node state and of the original input a root document references (the slots of
    :class:`EncodedCheckpoint`); {} for a document that does not read as one."""

    def keep(code: int, data: bytes) -> Any:
        return data if code == REF_EXT else None

    try:
        doc = msgpack.unpackb(root, ext_hook=keep, strict_map_key=False, raw=False)
        slots = {k: v for k, v in doc["node_states"].items() if type(k) is str and type(v) is bytes}
        if type(doc["original_input"]) is bytes:
            slots[INPUT_SLOT] = doc["original_input"]
    except Exception:
        return {}
    return slots


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread, reused across calls.
    ctx = getattr(_local, "cctx", None)
    if ctx is None:
        ctx = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)
    return ctx


def _decompressor() -> zstandard.ZstdDecompressor:
    ctx = getattr(_local, "dctx", None)
    if ctx is None:
        ctx = _local.dctx = zstandard.ZstdDecompressor()
    return ctx


def _based_compressor(dictionary: bytes) -> zstandard.ZstdCompressor:
    # A context per call (about 15 µs): python-zstandard binds a dictionary to a context when it is built.
    as_dict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, dict_data=as_dict)


def _based_decompressor(dictionary: bytes) -> zstandard.ZstdDecompressor:
    as_dict = zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdDecompressor(dict_data=as_dict)


@dataclass(frozen=True)
class Pack:
    """A decoded content pack: its chunks, and its body (the chunks packed, before compression)."""

    id: str
    chunks: dict[bytes, bytes]
    body: bytes
    base: str = ""  # the pack whose body was this one's compression dictionary ('' = none)


def wrap(data: bytes, base: Pack | None = None, *, sealer: Any = None, flow: str = "", pack: str = "",
         layers: int = 0, ancestors: Sequence[str] = ()) -> bytes:
    """Apply the storage layers and prefix the layer byte: zstd, against ``base``'s body as a raw-content dictionary
    when given (then the base's id follows the layer byte; with ``layers=LAYER_DELTA``, format 5, at most the
    body's last ``DICTIONARY_TAIL`` bytes). ``ancestors`` (a linked base only) are the packs below the base, in
    chain order: their count and 12-byte ids follow the base's id, so a process that reads one head learns the
    whole chain. Format 3 also stored small root documents uncompressed (layer byte 0), which :func:`unwrap` still
    reads.

    With a ``sealer`` (encryption at rest, :class:`dynamiq_redis_ckpt.crypto.Sealer`) the compressed bytes are then
    encrypted with AES-256-GCM under the sealer's current key, and the blob is::

        layer byte (| 2) | base id (0 or 12 bytes) | key id length (1) | key id | nonce (12) | ciphertext | tag (16)

    The base id stays where an unsealed blob has it (the scripts read it to walk a chain). The additional
    authenticated data binds the ciphertext to its flow, its pack id and that whole header, so a flipped byte, a
    blob moved to another pack key or flow, or a header edited to name another base or key fails authentication."""
    if base is not None:
        layers |= LAYER_ZSTD | LAYER_BASE | (LAYER_LINKED if linked(base.id) else 0)
        dictionary = base.body[-DICTIONARY_TAIL:] if layers & LAYER_DELTA else base.body
        head, body = bytes([layers]) + bytes.fromhex(base.id), _based_compressor(dictionary).compress(data)
        if ancestors and linked(base.id):
            named = ancestors[:MAX_ANCESTORS]
            head = bytes([head[0] | LAYER_ANCESTRY]) + head[1:] + bytes([len(named)]) + bytes.fromhex("".join(named))
    else:
        head, body = bytes([LAYER_ZSTD]), _compressor().compress(data)
    if sealer is None:
        return head + body
    key_id, cipher = sealer.for_writing()
    kid = key_id.encode("ascii")
    head = bytes([head[0] | LAYER_SEALED]) + head[1:] + bytes([len(kid)]) + kid
    nonce = os.urandom(NONCE_SIZE)
    return head + nonce + cipher.encrypt(nonce, body, _aad(flow, pack, head))


def _aad(flow: str, pack: str, head: bytes) -> bytes:
    return b"%s%s\0%s\0%s" % (_AAD, flow.encode(), pack.encode(), head)


def sealed_key_id(blob: bytes) -> str | None:
    """The id of the key a sealed blob was encrypted with; None for a blob that is not sealed (or is truncated)."""
    if not blob or not blob[0] & LAYER_SEALED:
        return None
    start = _after_base(blob)
    if len(blob) <= start or len(blob) < start + 1 + blob[start]:
        return None
    return blob[start + 1 : start + 1 + blob[start]].decode("ascii", "backslashreplace")


def _open(blob: bytes, start: int, checkpoint_id: str, key: str | None, sealer: Any, flow: str, pack: str) -> bytes:
    """Decrypt a sealed blob whose key id length byte is at ``start``; typed errors for a missing key or a blob that
    fails authentication."""
    if len(blob) <= start or len(blob) < start + 1 + blob[start] + NONCE_SIZE + TAG_SIZE:
        raise CheckpointCorruptedError(checkpoint_id, "encrypted pack is truncated", key)
    end = start + 1 + blob[start]
    key_id = blob[start + 1 : end].decode("ascii", "backslashreplace")
    cipher = sealer.for_reading(key_id) if sealer is not None else None
    if cipher is None:
        raise EncryptionKeyError(checkpoint_id, key_id, key, configured=sealer is not None)
    from cryptography.exceptions import InvalidTag

    nonce = blob[end : end + NONCE_SIZE]
    try:
        return cipher.decrypt(nonce, blob[end + NONCE_SIZE :], _aad(flow, pack, blob[:end]))
    except InvalidTag:
        raise CheckpointCorruptedError(
            checkpoint_id,
            f"encrypted pack fails authentication under key id {key_id!r}: it was altered, moved from another pack "
            f"or flow, or the key given for that id is not the one it was encrypted with",
            key,
        ) from None


def unwrap(
    blob: bytes, checkpoint_id: str, key: str | None = None, base: Pack | None = None,
    *, sealer: Any = None, flow: str = "", pack: str = "",
) -> bytes:
    """Undo :func:`wrap` (``base`` is the pack :func:`pack_base` names; ``sealer``, ``flow`` and ``pack`` open a
    sealed blob); raises a typed error for unknown layers, damaged data, a missing base or a missing key."""
    if not blob:
        raise CheckpointCorruptedError(checkpoint_id, "empty blob", key)
    layers = blob[0]
    if layers & ~KNOWN_LAYERS:
        raise UnsupportedFormatError(checkpoint_id, f"layer mask {layers}", FORMAT_VERSION)
    start, decompressor = 1, _decompressor()
    if layers & LAYER_BASE:
        if base is None or base.id != pack_base(blob):
            raise CheckpointCorruptedError(checkpoint_id, "the pack this blob was compressed against is missing", key)
        dictionary = base.body[-DICTIONARY_TAIL:] if layers & LAYER_DELTA else base.body
        start, decompressor = _after_base(blob), _based_decompressor(dictionary)
    if layers & LAYER_SEALED:
        body = _open(blob, start, checkpoint_id, key, sealer, flow, pack)
    else:
        body = blob[start:]
    if layers & LAYER_ZSTD:
        try:
            body = decompressor.decompress(body)
        except zstandard.ZstdError as e:
            raise CheckpointCorruptedError(checkpoint_id, f"zstd: {e}", key) from e
    return body


def pack_id(chunks: Mapping[bytes, bytes], base: str = "", size: int = PACK_ID_SIZE) -> str:
    """The id of the pack holding these chunks compressed against ``base``: a digest of the chunks' addresses and
    the base's id (the same chunks against another base are another blob, so another pack). Format 3 ids were 16
    bytes (``size``)."""
    return hashlib.sha256(b"".join(sorted(chunks)) + bytes.fromhex(base)).digest()[:size].hex()


def linked(pack: str) -> bool:
    """Whether a pack (by its id) would hold a reference on a base: a based format-4 pack does, so a checkpoint names
    only the newest pack of a chain; a format-3 checkpoint named every pack of it."""
    return len(pack) == 2 * PACK_ID_SIZE


def build_pack(
    chunks: Mapping[bytes, bytes], base: Pack | None = None, *, sealer: Any = None, flow: str = "",
    deltas: Mapping[bytes, tuple[bytes, list]] | None = None, ancestors: Sequence[str] = (),
) -> tuple[Pack, bytes]:
    """Pack chunks into one stored blob, compressed against ``base``'s body when given; returns (pack, blob).

    A later version of a node state repeats most of the earlier one (a growing message history, an upstream
    output quoted in the next node's input), so zstd with the earlier pack's body as a raw-content dictionary stores
    a few hundred bytes where the pack alone would take kilobytes. Format 5 (a linked base) uses the body's last
    ``DICTIONARY_TAIL`` bytes, and a chunk given in ``deltas`` whose source is a chunk of ``base`` is stored as that
    delta: only its changes are packed and compressed. The blob is
    always zstd-framed, with the frame checksum :func:`read_pack` verifies; a based blob names its base after the
    layer byte (12 bytes for a linked pack, 16 in format 3). With a ``sealer`` the blob is encrypted too, bound to
    ``flow`` and the pack's id. ``ancestors``: the packs below ``base`` (see :func:`wrap`). The returned pack holds
    every chunk whole.
    """
    flat: list = []
    layers = LAYER_DELTA if base is not None and linked(base.id) else 0
    for ref in sorted(chunks):
        found = deltas.get(ref) if deltas and layers else None
        if found is not None and found[0] in base.chunks:
            flat += (ref, [found[0], *found[1]])
        else:
            flat += (ref, chunks[ref])
    body = msgpack.packb(flat)
    base_id = base.id if base is not None else ""
    pack = Pack(pack_id(chunks, base_id), dict(chunks), body, base_id)
    if sealer is None:
        return pack, wrap(body, base, layers=layers, ancestors=ancestors)
    return pack, wrap(body, base, sealer=sealer, flow=flow, pack=pack.id, layers=layers, ancestors=ancestors)


def _undelta(stored: list, base: Pack, checkpoint_id: str, key: str | None) -> bytes:
    """A delta chunk rebuilt from the base chunk it names."""
    source = base.chunks.get(stored[0]) if stored and type(stored[0]) is bytes else None
    if source is None:
        raise CheckpointCorruptedError(checkpoint_id, "a delta chunk names a chunk its base pack does not hold", key)
    try:
        return delta.apply(source, stored[1:])
    except ValueError as e:
        raise CheckpointCorruptedError(checkpoint_id, f"a delta chunk is damaged: {e}", key) from None


def _after_base(blob: bytes) -> int:
    """Where a blob's head ends: after the layer byte, the base's id and the ancestors' ids (as the layers say)."""
    if not blob[0] & LAYER_BASE:
        return 1
    start = 1 + (PACK_ID_SIZE if blob[0] & LAYER_LINKED else DIGEST_SIZE)
    if blob[0] & LAYER_ANCESTRY and len(blob) > start:
        start += 1 + PACK_ID_SIZE * blob[start]
    return start


def pack_ancestors(head: bytes) -> list[str]:
    """The ids of the packs below a pack's base that its head names (format 5), in chain order; [] when it names
    none or the head is cut short."""
    if not head or head[0] & (LAYER_ANCESTRY | LAYER_LINKED) != LAYER_ANCESTRY | LAYER_LINKED:
        return []
    start = 1 + PACK_ID_SIZE
    if len(head) <= start or len(head) < start + 1 + PACK_ID_SIZE * head[start]:
        return []
    ids = head[start + 1 : start + 1 + PACK_ID_SIZE * head[start]].hex()
    return [ids[i : i + 2 * PACK_ID_SIZE] for i in range(0, len(ids), 2 * PACK_ID_SIZE)]


def chain_links(pack: str, blob: bytes) -> dict[str, str]:
    """The links (pack -> base) a pack blob's head tells: its own, and those down the ancestors it names."""
    chain = [pack, pack_base(blob), *pack_ancestors(blob)]
    links = {pack: chain[1]}
    links.update((above, below) for above, below in zip(chain[1:], chain[2:]) if above)
    return links


def pack_base(blob: bytes) -> str:
    """The id of the pack a pack blob was compressed against, or '' (read before :func:`read_pack`)."""
    if not blob or not blob[0] & LAYER_BASE:
        return ""
    size = PACK_ID_SIZE if blob[0] & LAYER_LINKED else DIGEST_SIZE
    return blob[1 : 1 + size].hex() if len(blob) > size else ""


def read_pack(
    expected_id: str, blob: bytes, checkpoint_id: str, key: str | None = None, base: Pack | None = None,
    *, sealer: Any = None, flow: str = "",
) -> Pack:
    """Decode a pack blob (``base`` is the pack :func:`pack_base` names); zstd's frame checksum guards the content
    and the id, recomputed from the content, must be the one the checkpoint names. A sealed blob is opened with
    ``sealer`` (GCM's tag guards it, bound to ``flow`` and ``expected_id``)."""
    if not blob or not blob[0] & LAYER_ZSTD:
        raise CheckpointCorruptedError(checkpoint_id, "pack is not zstd-framed", key)
    body = unwrap(blob, checkpoint_id, key, base, sealer=sealer, flow=flow, pack=expected_id)
    try:
        flat = msgpack.unpackb(body, raw=False)
        chunks = dict(zip(flat[::2], flat[1::2]))
    except Exception as e:
        raise CheckpointCorruptedError(checkpoint_id, f"pack does not decode: {e!r}", key) from e
    if blob[0] & LAYER_DELTA and base is not None:
        chunks = {ref: _undelta(c, base, checkpoint_id, key) if type(c) is list else c for ref, c in chunks.items()}
    if not all(type(c) is bytes and type(r) is bytes and len(r) == DIGEST_SIZE for r, c in chunks.items()):
        raise CheckpointCorruptedError(checkpoint_id, "pack holds malformed chunks", key)
    base_id = pack_base(blob)
    if pack_id(chunks, base_id, len(expected_id) // 2) != expected_id:
        raise CheckpointCorruptedError(checkpoint_id, "pack is not the one named", key)
    return Pack(expected_id, chunks, body, base_id)
