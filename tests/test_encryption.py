"""Encryption at rest (opt-in): AES-256-GCM of every stored pack, keys from a provider, rotation, typed errors; and,
off, not one stored byte different from before encryption existed."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import uuid

import fakeredis
import pytest
from dynamiq.checkpoints.backends.in_memory import InMemory
from dynamiq.checkpoints.types import CheckpointStatus as S
from dynamiq.runnables import RunnableStatus

from dynamiq_redis_ckpt import (
    CheckpointCorruptedError,
    CheckpointStoreError,
    ConfigurationError,
    EncryptionKeyError,
    RedisCheckpointBackend,
    codec,
)
from dynamiq_redis_ckpt import crypto
from tests.flows import RunInterrupted, chain_flow, final_output
from tests.test_contract import make

# An unencrypted save must store exactly these bytes: computed on main (48c80a7) before encryption was added, and
# again when format 5 (delta chunks; a based pack's dictionary is its base's tail) changed based packs and the
# format field. The first pack (no base) is the same bytes as in format 4.
GOLDEN_PACKS = (
    "bf78d1379fc336bf5b6ea82637a656532e3d881ec5c352d51d51c47ee0861b10",
    "5fc8a666a17c73b16b45429f105a61e5245b867c030bbd0b05438ae725902981",
)
GOLDEN_STORE = "435d6e9d4fd495828040d978320d678d39572a9348a1191baa1140620760848c"


def fixed_chain():
    a = make("gold-1", "gflow", "grun", "gwf", S.ACTIVE, 1, None, text="golden words " * 80)
    b = make("gold-2", "gflow", "grun", "gwf", S.COMPLETED, 2, "gold-1", text="golden words " * 80 + "more " * 60)
    return [a, b]


def store_digest(r, prefix: str) -> str:
    """SHA-256 over every key of a namespace and its value (a hash without its wall-clock 'sv' field; not the catalog
    of flows, whose scores are wall-clock times: it holds no checkpoint data)."""
    h = hashlib.sha256()
    for key in sorted(r.scan_iter(match=f"{prefix}:*")):
        if key.startswith(f"{prefix}:catalog:".encode()):
            continue
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


# ---- encryption on ----------------------------------------------------------------------------------------------

K1, K2, K3 = bytes(range(32)), bytes(range(100, 132)), bytes(range(200, 232))
SECRET = "the patient's diagnosis is confidential "  # repeated past CHUNK_MIN: stored in a pack, not inline


class KeyProvider:
    """A provider whose keys and current id a test changes (what a user's rotation does)."""

    def __init__(self, keys: dict[str, bytes], current: str):
        self.keys, self.current, self.calls = dict(keys), current, 0

    def __call__(self):
        self.calls += 1
        return dict(self.keys), self.current


def secret_cp(cp_id="c1", flow="fe", run="r1", minute=0, parent=None, status=S.COMPLETED):
    return make(cp_id, flow, run, None, status, minute, parent, text=f"{SECRET} {cp_id} " * 30)


def on_same_store(backend, **options) -> RedisCheckpointBackend:
    """Another backend object on the same store and prefix (another process), with nothing cached."""
    if backend.url:
        return RedisCheckpointBackend(url=backend.url, prefix=backend.prefix, **options)
    return RedisCheckpointBackend(client=backend.redis, prefix=backend.prefix, **options)


@pytest.fixture(params=["redis", "fakeredis"])
def sealed(request, redis_server):
    """An encrypting backend (current key k1; its provider is ``sealed.encryption_keys``), on a real redis-server and
    on fakeredis."""
    provider = KeyProvider({"k1": K1}, "k1")
    prefix = f"t{uuid.uuid4().hex[:8]}"
    if request.param == "redis":
        made = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, encryption_keys=provider)
    else:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        made = RedisCheckpointBackend(client=client, prefix=prefix, encryption_keys=provider)
    yield made
    if request.param == "redis":
        made.clear()


@pytest.fixture(autouse=True)
def no_env_keys(monkeypatch):
    monkeypatch.delenv(crypto.ENV, raising=False)


def pack_blobs(backend) -> dict[bytes, bytes]:
    """Every stored pack's blob (after its 8-digit reference count), by key."""
    r = backend.redis
    return {k: r.get(k)[8:] for k in r.scan_iter(match=f"{backend.prefix}:pack:*")}


def packs_named(backend, cp) -> list[bytes]:
    key = backend.store.keys.checkpoint(cp.flow_id, cp.id)
    return [backend.store.keys.pack(cp.flow_id, p).encode() for p in backend.redis.hget(key, "pk").decode().split(",")]


def everything_stored(backend) -> bytes:
    r, out = backend.redis, []
    for key in r.scan_iter(match=f"{backend.prefix}:*"):
        kind = r.type(key)
        out.append(key)
        if kind == b"string":
            out.append(r.get(key))
        elif kind == b"hash":
            out += [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
    return b"\0".join(out)


def test_round_trip_sync_seals_every_pack_and_keeps_index_metadata_plain(sealed):
    parent = secret_cp("c1", minute=1, status=S.ACTIVE)
    child = secret_cp("c2", minute=2, parent="c1")
    sealed.save(parent)
    sealed.save(child)
    blobs = pack_blobs(sealed)
    assert blobs and all(b[0] & codec.LAYER_SEALED for b in blobs.values())
    assert all(codec.sealed_key_id(b) == "k1" for b in blobs.values())
    stored = everything_stored(sealed)
    assert SECRET.encode() not in stored and b"diagnosis" not in stored
    # what the indexes need stays readable without a key: status, run ids, timestamps, parent, pack names
    fields = sealed.redis.hgetall(sealed.store.keys.checkpoint("fe", "c2"))
    assert fields[b"st"] == b"completed" and fields[b"run"] == b"r1" and fields[b"par"] == b"c1"
    assert int(fields[b"ts"]) == codec.micros(child.created_at)
    other = on_same_store(sealed, encryption_keys=sealed.encryption_keys)  # nothing cached: every pack decrypted
    assert other.load("c1") == parent and other.load("c2") == child
    assert [c.id for c in other.get_list_by_flow("fe")] == ["c2", "c1"]
    assert [c.id for c in other.get_list_by_run("r1")] == ["c2", "c1"]
    assert other.get_latest_by_flow("fe", status=S.ACTIVE) == parent


def test_round_trip_async(sealed):
    cps = [secret_cp(f"a{i}", minute=i, parent=f"a{i - 1}" if i else None) for i in range(4)]

    async def run():
        for cp in cps:
            await sealed.save_async(cp)
        other = on_same_store(sealed, encryption_keys=sealed.encryption_keys)
        assert [await other.load_async(cp.id) for cp in cps] == cps
        assert [c.id for c in await other.get_list_by_flow_async("fe")] == ["a3", "a2", "a1", "a0"]
        await other.aclose()

    asyncio.run(run())
    assert all(b[0] & codec.LAYER_SEALED for b in pack_blobs(sealed).values())


def test_a_real_flow_runs_and_resumes_encrypted(sealed, tmp_path):
    question = {"question": "where is my order?"}
    reference = final_output(chain_flow(InMemory(), 6, flow_id="reference", words=60).run_sync(question))
    flow = chain_flow(sealed, 6, flow_id="enc", interrupt_once={"s03": str(tmp_path / "f")}, words=60)
    with pytest.raises(RunInterrupted):
        flow.run_sync(question)
    resumed = on_same_store(sealed, encryption_keys=sealed.encryption_keys)
    latest = resumed.get_latest_by_flow("enc")
    assert latest.completed_node_ids == ["s00", "s01", "s02"]
    result = chain_flow(resumed, 6, flow_id="enc", words=60).run_sync(None, resume_from=latest.id)
    assert result.status == RunnableStatus.SUCCESS and final_output(result) == reference
    blobs = pack_blobs(sealed)
    assert blobs and all(b[0] & codec.LAYER_SEALED for b in blobs.values())
    transcript = final_output(result)
    assert all(str(v).encode() not in everything_stored(sealed) for v in transcript.values() if len(str(v)) > 40)
    without = on_same_store(sealed)
    with pytest.raises(EncryptionKeyError):
        without.get_latest_by_flow("enc")


def test_rotation_old_checkpoints_stay_readable_new_ones_use_the_current_key(sealed):
    sealed.save(secret_cp("old", flow="fr", run="r-old", minute=1))
    sealed.encryption_keys.keys["k2"] = K2
    sealed.encryption_keys.current = "k2"  # rotate: k2 is current, k1 still provided for what it sealed
    sealed.save(secret_cp("new", flow="fr", run="r-new", minute=2))
    old_cp = secret_cp("old", flow="fr", run="r-old", minute=1)
    new_cp = secret_cp("new", flow="fr", run="r-new", minute=2)
    blob = sealed.redis.get
    assert {codec.sealed_key_id(blob(k)[8:]) for k in packs_named(sealed, old_cp)} == {"k1"}
    assert {codec.sealed_key_id(blob(k)[8:]) for k in packs_named(sealed, new_cp)} == {"k2"}
    both = on_same_store(sealed, encryption_keys=KeyProvider({"k2": K2, "k1": K1}, "k2"))
    assert both.load("old") == old_cp and both.load("new") == new_cp
    only_new = on_same_store(sealed, encryption_keys=KeyProvider({"k2": K2}, "k2"))
    assert only_new.load("new") == new_cp
    with pytest.raises(EncryptionKeyError) as caught:  # k1 retired too early
        only_new.load("old")
    assert caught.value.checkpoint_id == "old" and caught.value.key_id == "k1" and "old" in str(caught.value)


def test_missing_key_id_is_a_typed_error_naming_the_checkpoint(sealed):
    sealed.save(secret_cp("lost"))
    other = on_same_store(sealed, encryption_keys=KeyProvider({"k9": K3}, "k9"))
    with pytest.raises(EncryptionKeyError) as caught:
        other.load("lost")
    assert isinstance(caught.value, CheckpointStoreError) and not isinstance(caught.value, CheckpointCorruptedError)
    assert caught.value.checkpoint_id == "lost" and "'k1'" in str(caught.value) and "lost" in str(caught.value)
    with pytest.raises(EncryptionKeyError):  # a list does not pass over it as damage: the key is missing, not the data
        other.get_list_by_flow("fe")


def test_a_backend_without_encryption_reading_an_encrypted_checkpoint_says_so(sealed):
    sealed.save(secret_cp("locked"))
    plain = on_same_store(sealed)
    with pytest.raises(EncryptionKeyError) as caught:
        plain.load("locked")
    assert caught.value.checkpoint_id == "locked" and crypto.ENV in str(caught.value)
    assert "no encryption keys" in str(caught.value)


def test_wrong_key_under_the_same_id_is_corruption_not_wrong_data(sealed):
    sealed.save(secret_cp("wk"))
    other = on_same_store(sealed, encryption_keys=KeyProvider({"k1": K3}, "k1"))
    with pytest.raises(CheckpointCorruptedError) as caught:
        other.load("wk")
    assert caught.value.checkpoint_id == "wk" and "fails authentication" in str(caught.value)


def test_one_flipped_byte_in_a_stored_pack_is_corruption(sealed):
    cp = secret_cp("tamper")
    sealed.save(cp)
    (key,) = packs_named(sealed, cp)
    stored = sealed.redis.get(key)
    middle = 8 + len(stored[8:]) // 2
    sealed.redis.set(key, stored[:middle] + bytes([stored[middle] ^ 0x01]) + stored[middle + 1 :])
    with pytest.raises(CheckpointCorruptedError) as caught:
        on_same_store(sealed, encryption_keys=sealed.encryption_keys).load("tamper")
    assert caught.value.checkpoint_id == "tamper" and caught.value.key == key.decode()


def test_every_single_byte_flip_of_a_sealed_pack_is_a_typed_error_never_data():
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    provider = KeyProvider({"k1": K1}, "k1")
    writer = RedisCheckpointBackend(client=client, prefix="flip", encryption_keys=provider)
    parent, cp = secret_cp("p", status=S.ACTIVE), secret_cp("x", minute=1, parent="p")
    writer.save(parent)
    writer.save(cp)  # a based, linked pack: its header holds the base id
    (key,) = packs_named(writer, cp)
    stored = client.get(key)
    assert stored[8] & codec.LAYER_BASE
    for i in range(8, len(stored)):
        client.set(key, stored[:i] + bytes([stored[i] ^ 0x20]) + stored[i + 1 :])
        reader = RedisCheckpointBackend(client=client, prefix="flip", encryption_keys=provider)
        with pytest.raises(CheckpointStoreError) as caught:
            reader.load("x")
        assert caught.value.checkpoint_id == "x"
        head = 1 + codec.PACK_ID_SIZE  # layer byte and base id; then the key id's length and the key id
        if i - 8 >= head + 1 + 2:  # nonce, ciphertext, tag: authentication fails
            assert isinstance(caught.value, CheckpointCorruptedError), (i, caught.value)
    client.set(key, stored)
    assert RedisCheckpointBackend(client=client, prefix="flip", encryption_keys=provider).load("x") == cp


def test_a_blob_moved_to_another_pack_or_flow_fails_authentication():
    sealer = crypto.Sealer(KeyProvider({"k1": K1}, "k1"))
    chunks = {codec.digest(b"a" * 600): b"a" * 600}
    pack, blob = codec.build_pack(chunks, sealer=sealer, flow="f1")
    assert codec.read_pack(pack.id, blob, "cp", sealer=sealer, flow="f1").chunks == chunks
    for flow, pack_id in (("f2", pack.id), ("f1", "0" * 24)):
        with pytest.raises(CheckpointCorruptedError, match="fails authentication"):
            codec.read_pack(pack_id, blob, "cp", sealer=sealer, flow=flow)


def test_nonces_are_random_per_blob():
    sealer = crypto.Sealer(KeyProvider({"k1": K1}, "k1"))
    chunks = {codec.digest(b"b" * 600): b"b" * 600}
    blobs = {codec.build_pack(chunks, sealer=sealer, flow="f")[1] for _ in range(20)}
    assert len(blobs) == 20  # same content, same key: different nonce and ciphertext each time


def test_keys_from_the_environment(monkeypatch):
    spec = f"k2:{base64.b64encode(K2).decode()}, k1:{base64.b64encode(K1).decode()}"
    monkeypatch.setenv(crypto.ENV, spec)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    backend = RedisCheckpointBackend(client=client, prefix="env")
    cp = secret_cp("e1")
    backend.save(cp)
    assert {codec.sealed_key_id(b) for b in pack_blobs(backend).values()} == {"k2"}  # the first is current
    assert RedisCheckpointBackend(client=client, prefix="env").load("e1") == cp
    off = RedisCheckpointBackend(client=client, prefix="env2", encryption_keys=False)  # False: off despite the env
    off.save(cp)
    assert not any(b[0] & codec.LAYER_SEALED for b in pack_blobs(off).values())
    dumped = str(backend.to_dict()) + repr(backend)
    assert base64.b64encode(K2).decode() not in dumped and "encryption_keys" not in backend.to_dict()
    import functools

    partial = functools.partial(tuple, [{"k1": K1}, "k1"])
    holding = RedisCheckpointBackend(client=client, prefix="env3", encryption_keys=partial)
    assert "encryption_keys" not in repr(holding) and str(K1) not in repr(holding)  # a partial's repr shows its args


@pytest.mark.parametrize(
    "spec",
    [base64.b64encode(K1).decode(), "k1:notbase64!", f"k1:{base64.b64encode(b'short').decode()}", ",",
     f"a b:{base64.b64encode(K1).decode()}",
     f"k1:{base64.b64encode(K1).decode()},k1:{base64.b64encode(K2).decode()}"],
    ids=["key-without-id", "not-base64", "short-key", "no-key", "bad-id", "id-twice"],
)
def test_a_bad_environment_spec_is_a_configuration_error(monkeypatch, spec):
    monkeypatch.setenv(crypto.ENV, spec)
    with pytest.raises(ConfigurationError) as caught:
        RedisCheckpointBackend(client=fakeredis.FakeRedis(), prefix="bad")
    assert base64.b64encode(K1).decode()[:4] not in str(caught.value), "no part of a key in the message"


@pytest.mark.parametrize(
    "provider",
    [lambda: ({"k1": b"x" * 16}, "k1"), lambda: ({"k1": K1}, "k2"), lambda: {"k1": K1}, lambda: ({}, ""),
     lambda: ({"k:1": K1}, "k:1"), "k1", lambda: 1 / 0],
    ids=["short-key", "current-missing", "no-current", "empty", "bad-id", "not-callable", "raises"],
)
def test_a_bad_provider_fails_the_backend_at_construction(provider):
    with pytest.raises(ConfigurationError):
        RedisCheckpointBackend(client=fakeredis.FakeRedis(), prefix="bad", encryption_keys=provider)


def test_a_persons_answer_waits_encrypted_and_resumes_the_run(redis_server):
    from dynamiq.runnables import RunnableConfig

    from dynamiq_redis_ckpt.worker import Recovery
    from tests.flows import ask_flow

    provider = KeyProvider({"k1": K1}, "k1")
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"h{uuid.uuid4().hex[:6]}", encryption_keys=provider)
    try:
        first = ask_flow(backend, "ask-enc").run_sync({"input": "Ship it?"}, config=RunnableConfig(run_id="wf-e"))
        assert first.status.value == "failure"
        recovery = Recovery(backend)
        assert recovery.deliver_input("wf-e", {"choice": "a confidential blue"}) == "ask"
        inbox = backend.store.keys.inbox("ask-enc", "wf-e")
        stored = backend.redis.hget(inbox, "ask")
        assert stored.startswith(crypto.SEALED_TEXT.encode()) and b"confidential" not in stored
        claim = recovery.claim("ask-enc", "wf-e", "due")
        with pytest.raises(EncryptionKeyError):  # a worker without the key cannot read the answer
            Recovery(on_same_store(backend))._opened(claim, {"ask": stored.decode()})
        moved = {"ask": stored.decode()}
        with pytest.raises(CheckpointCorruptedError):  # bound to its flow, run and node
            recovery._opened(dataclasses.replace(claim, run="wf-other"), moved)
        result = recovery.resume(claim, lambda f: ask_flow(on_same_store(backend, encryption_keys=provider), f))
        assert result.status.value == "success"
        assert result.output["ask"]["output"] == {"answer": {"choice": "a confidential blue"}}
    finally:
        backend.clear()


def test_a_run_going_on_across_turning_encryption_on_and_counting_key_use(sealed):
    plain = on_same_store(sealed)
    parent, child = secret_cp("m1", minute=1, status=S.ACTIVE), secret_cp("m2", minute=2, parent="m1")
    plain.save(parent)  # written before encryption was turned on
    assert sealed.encryption_key_ids() == {"": 1}
    sealed.load("m1")  # an unencrypted pack reads with or without keys; now held, it is the new pack's base
    sealed.save(child)
    assert sealed.encryption_key_ids() == {"": 1, "k1": 1}
    assert on_same_store(sealed, encryption_keys=sealed.encryption_keys).load("m2") == child
    with pytest.raises(EncryptionKeyError):
        on_same_store(sealed).load("m2")
    assert on_same_store(sealed).load("m1") == parent
    sealed.encryption_keys.keys["k2"] = K2
    sealed.encryption_keys.current = "k2"
    sealed.save(secret_cp("m3", minute=3))
    assert sealed.encryption_key_ids() == {"": 1, "k1": 1, "k2": 1}
    sealed.delete("m2")
    assert sealed.encryption_key_ids() == {"": 1, "k2": 1}, "k1 sealed nothing left: it may be retired"


def test_deleting_encrypted_checkpoints_frees_their_packs_down_the_chain(sealed):
    """The scripts walk and count chains by the base id after the layer byte, which sealing leaves where it was."""
    ids = [f"d{i}" for i in range(12)]  # longer than a chain may grow before it starts afresh
    for i, cp_id in enumerate(ids):
        sealed.save(secret_cp(cp_id, minute=i, parent=ids[i - 1] if i else None, status=S.ACTIVE))
    blobs = pack_blobs(sealed)
    assert any(b[0] & codec.LAYER_LINKED for b in blobs.values())
    assert all(b[0] & codec.LAYER_SEALED for b in blobs.values())
    assert on_same_store(sealed, encryption_keys=sealed.encryption_keys).load("d11") == secret_cp(
        "d11", minute=11, parent="d10", status=S.ACTIVE
    )
    for cp_id in ids:
        assert sealed.delete(cp_id)
    assert pack_blobs(sealed) == {} and sealed.encryption_key_ids() == {}
