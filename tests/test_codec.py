"""Every value Dynamiq puts in a checkpoint round-trips exactly as with Dynamiq's own encode/decode helpers."""

from __future__ import annotations

import copy
import io
import math
import threading
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from enum import Enum

import random

import pytest
from dynamiq.checkpoints.checkpoint import FlowCheckpoint, NodeCheckpointState, PendingInputContext
from pydantic import BaseModel

from dynamiq_redis_ckpt import CheckpointCorruptedError, CheckpointEncodeError
from dynamiq_redis_ckpt.bench.workloads import prose
from dynamiq_redis_ckpt import codec


class Color(str, Enum):
    RED = "red"


class Level(int, Enum):
    HIGH = 3


class Point(BaseModel):
    x: int
    label: str


BIG_TEXT = "natural language " * 100
VALUES = {
    "aware_datetime": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc),
    "naive_datetime": datetime(2026, 1, 2, 3, 4, 5),
    "date": date(2026, 5, 6),
    "bytes": b"\x00\xffbinary",
    "big_bytes": bytes(range(256)) * 8,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "str_enum": Color.RED,
    "int_enum": Level.HIGH,
    "tuple": (1, "a", (2, 3)),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a"}),
    "big_int": 2**100,
    "negative_big_int": -(2**70),
    "uint64_edge": 2**64 - 1,
    "inf": float("inf"),
    "decimal": Decimal("3.14159265358979323846"),
    "int_keys": {1: "one", 2: {"nested": (1,)}},
    "uuid_keys": {uuid.UUID(int=7): 1},
    "marker_lookalike": {"__bytes__": "not really bytes", "__tuple__": [1]},
    "model": Point(x=1, label="p"),
    "list_of_tuples": [(1, 2), (3, 4)],
    "none": None,
    "bool": True,
    "empty": "",
    "unicode": "ünïcødé ✓ 日本",
    "big_text": BIG_TEXT,
    "same_text_twice": [BIG_TEXT, BIG_TEXT],
    "deep": {"a": [{"b": [{"c": BIG_TEXT}]}]},
}


def checkpoint_with(value) -> FlowCheckpoint:
    cp = FlowCheckpoint(flow_id="codec", run_id="r", wf_run_id="w", original_input={"v": value})
    cp.node_states["n1"] = NodeCheckpointState(
        node_id="n1", node_type="T", status="success",
        input_data={"v": value}, output_data={"v": value}, internal_state={"v": value},
    )  # fmt: skip
    cp.pending_inputs["n1"] = PendingInputContext(node_id="n1", prompt="ok?", timestamp=datetime.now(timezone.utc))
    cp.metadata = {"note": "m"}
    return cp


def comparable(value):
    if isinstance(value, io.BytesIO):
        return ("BytesIO", value.getvalue(), getattr(value, "name", None))
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(comparable(v) for v in value)
    return value


def types_of(value):
    if isinstance(value, dict):
        return ("dict", {k: types_of(v) for k, v in value.items()})
    if isinstance(value, (list, tuple, set)):
        return (type(value).__name__, [types_of(v) for v in value])
    return type(value).__name__


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_round_trips_like_dynamiq(backend, name):
    cp = checkpoint_with(VALUES[name])
    theirs = FlowCheckpoint.from_json(cp.to_json())
    backend.save(cp)
    ours = backend.load(cp.id)
    for field in ("input_data", "output_data", "internal_state"):
        mine = getattr(ours.node_states["n1"], field)
        dyn = getattr(theirs.node_states["n1"], field)
        assert comparable(mine) == comparable(dyn), field
        assert types_of(mine) == types_of(dyn), field
    assert comparable(ours.original_input) == comparable(theirs.original_input)
    assert types_of(ours.original_input) == types_of(theirs.original_input)
    assert ours.model_dump(exclude={"node_states", "original_input"}) == theirs.model_dump(
        exclude={"node_states", "original_input"}
    )


def test_nan_and_bytesio_round_trip(backend):
    bio = io.BytesIO(b"file content")
    bio.name = "report.pdf"
    cp = checkpoint_with({"nan": float("nan"), "file": bio})
    backend.save(cp)
    got = backend.load(cp.id).original_input["v"]
    assert math.isnan(got["nan"])
    assert isinstance(got["file"], io.BytesIO)
    assert got["file"].getvalue() == b"file content" and got["file"].name == "report.pdf"


def test_save_does_not_modify_the_checkpoint(backend):
    cp = checkpoint_with({"t": (1, 2), "s": {1}, "text": BIG_TEXT})
    before = copy.deepcopy(cp)
    backend.save(cp)
    backend.update(cp)
    assert cp == before
    assert cp.original_input["v"]["t"] == (1, 2)


@pytest.mark.parametrize(
    "value, type_name",
    [(lambda: 1, "function"), (threading.Lock(), "lock"), (print, "builtin")],
)
def test_unrepresentable_value_names_node_and_field_and_writes_nothing(backend, value, type_name):
    cp = FlowCheckpoint(flow_id="bad", run_id="r")
    cp.node_states["writer"] = NodeCheckpointState(
        node_id="writer", node_type="T", status="success", output_data={"ok": 1, "payload": [1, value]}
    )
    with pytest.raises(CheckpointEncodeError) as caught:
        backend.save(cp)
    assert caught.value.node_id == "writer"
    assert caught.value.field == "output_data"
    assert caught.value.path == ("node_states", "writer", "output_data", "payload", 1)
    assert "writer" in str(caught.value) and "output_data" in str(caught.value)
    assert backend.load(cp.id) is None
    assert backend.get_list_by_flow("bad") == []


def test_bytearray_keeps_its_content_as_bytes(backend):
    # msgpack stores bytes-like values natively; Dynamiq's JSON would have lost the content altogether.
    cp = checkpoint_with({"buf": bytearray(b"\x00raw\xff"), "view": memoryview(b"mv")})
    backend.save(cp)
    got = backend.load(cp.id).original_input["v"]
    assert got == {"buf": b"\x00raw\xff", "view": b"mv"}


def test_unrepresentable_flow_input_names_the_field(backend):
    cp = FlowCheckpoint(flow_id="bad", run_id="r", original_input={"cb": lambda: 0})
    with pytest.raises(CheckpointEncodeError) as caught:
        backend.save(cp)
    assert caught.value.node_id is None and caught.value.field == "original_input"


def test_an_unchanged_node_state_is_the_same_chunk_in_the_next_snapshot():
    parent = checkpoint_with(["x" * 5000])
    child = parent.model_copy(update={"id": "child", "parent_checkpoint_id": parent.id,
                                      "node_states": dict(parent.node_states)})  # fmt: skip
    child.node_states["n2"] = NodeCheckpointState(node_id="n2", node_type="T", status="success", output_data="y" * 900)
    before, after = codec.encode_checkpoint(parent), codec.encode_checkpoint(child)
    assert set(before.chunks) < set(after.chunks)
    assert len(set(after.chunks) - set(before.chunks)) == 1


def test_repeated_text_in_a_pack_is_stored_once():
    text = "natural language " * 300
    _, blob = codec.build_pack({codec.digest(b"a"): text.encode(), codec.digest(b"b"): text.encode()})
    assert len(blob) < len(text) / 10


def test_pack_checksum_detects_a_flipped_byte():
    pack, blob = codec.build_pack({codec.digest(b"\xa3abc" * 40): b"\xa3abc" * 40})
    assert codec.read_pack(pack.id, blob, "c").chunks == pack.chunks
    for at in range(1, len(blob)):
        damaged = bytearray(blob)
        damaged[at] ^= 0xFF
        with pytest.raises(CheckpointCorruptedError):
            codec.read_pack(pack.id, bytes(damaged), "c")


def _history(turns: int) -> bytes:
    return prose(random.Random(5), 120 * turns).encode()  # the same turns, then one more


def test_a_based_pack_stores_what_the_new_version_adds():
    older, newer = _history(10), _history(11)  # a message history that grew by one turn
    base, _ = codec.build_pack({codec.digest(older): older})
    _, alone = codec.build_pack({codec.digest(newer): newer})
    pack, blob = codec.build_pack({codec.digest(newer): newer}, base)
    assert codec.pack_base(blob) == base.id and pack.base == base.id
    assert len(blob) * 4 < len(alone)
    assert codec.read_pack(pack.id, blob, "c", base=base).chunks == {codec.digest(newer): newer}
    assert pack.id != codec.pack_id({codec.digest(newer): newer})  # same chunks, another base: another pack


def test_a_based_pack_is_refused_without_its_base_or_with_another():
    older, newer = _history(3), _history(4)
    base, _ = codec.build_pack({codec.digest(older): older})
    other, _ = codec.build_pack({codec.digest(b"x" * 600): b"x" * 600})
    pack, blob = codec.build_pack({codec.digest(newer): newer}, base)
    for wrong in (None, other, codec.Pack(base.id, {}, b"not the base body " * 40)):
        with pytest.raises(CheckpointCorruptedError):
            codec.read_pack(pack.id, blob, "c", base=wrong)
    for at in range(1, len(blob)):
        damaged = bytearray(blob)
        damaged[at] ^= 0xFF
        with pytest.raises(CheckpointCorruptedError):
            codec.read_pack(pack.id, bytes(damaged), "c", base=base)


def test_a_format_3_root_stored_uncompressed_still_unwraps():
    """Format 3 kept a small root document as it was (layer byte 0); format 4 always compresses, and reads both."""
    root = codec.encode_checkpoint(FlowCheckpoint(flow_id="f", run_id="r")).root
    assert codec.unwrap(b"\x00" + root, "c") == root
    assert codec.unwrap(codec.wrap(root), "c") == root
    assert codec.wrap(root)[0] == codec.LAYER_ZSTD
