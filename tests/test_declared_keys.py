"""Every key a Lua script touches is declared in its KEYS, and all of them are in one cluster slot.

Redis Cluster checks a script's keys only by its KEYS (while a slot migrates, a proxy routes by them): a script
that builds a key name itself and touches it works on one node until the day it does not. So a real redis-server
runs a workload that makes linked pack chains and walks them every way the store does (saves that extend a chain
and take a TTL, overwrites from a process that knows nothing, cold loads and lists, a paused checkpoint handed back
to the ttl by the run going on, cascading deletes and cleanup, lease takes, a takeover, claims and renewals), while
MONITOR records each EVALSHA with its keys and the commands the script ran (tagged ``lua``). The server itself says
which keys each of those commands touches (COMMAND GETKEYS).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest
import redis
from dynamiq.checkpoints.types import CheckpointStatus as S
from redis.crc import key_slot

from dynamiq_redis_ckpt import RedisCheckpointBackend, as_running_flow
from dynamiq_redis_ckpt.bench.workloads import append_chain
from dynamiq_redis_ckpt import scripts
from dynamiq_redis_ckpt.leases import LeaseTicket, release_op, renew_many_op, renew_op
from dynamiq_redis_ckpt.registry import HeldLease
from dynamiq_redis_ckpt.requests import Script
from dynamiq_redis_ckpt.store import StoreCore
from dynamiq_redis_ckpt.worker import Recovery
from tests.redis_proc import RedisProcess
from tests.test_contract import make
from tests.test_packs import chain_of

_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}


def parse_monitor_line(line: bytes) -> tuple[str, list[bytes]]:
    """``+<time> [<db> <client>] "arg" "arg" ...`` -> (client, args), undoing the server's quoting (sdscatrepr)."""
    text = line.decode("latin-1")
    start = text.index("[") + 1
    end = text.index("]", start)
    client = text[start:end].split(" ", 1)[1]
    args, i, n = [], end + 1, len(text)
    while i < n:
        if text[i] != '"':
            i += 1
            continue
        i += 1
        out = bytearray()
        while text[i] != '"':
            c = text[i]
            if c == "\\":
                nxt = text[i + 1]
                if nxt == "x":
                    out.append(int(text[i + 2 : i + 4], 16))
                    i += 4
                    continue
                out += _ESCAPES.get(nxt, nxt.encode("latin-1"))
                i += 2
                continue
            out += c.encode("latin-1")
            i += 1
        args.append(bytes(out))
        i += 1
    return client, args


class Monitor:
    """MONITOR on a raw socket, read on a thread until stopped: the lines the server sent, parsed."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.lines: list[tuple[str, list[bytes]]] = []
        self._buffer = b""
        self._stop = threading.Event()
        assert self._readline() == b"+OK"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _readline(self) -> bytes | None:
        while b"\r\n" not in self._buffer:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                return None
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while True:
            try:
                line = self._readline()
            except TimeoutError:
                line = None
            if line is None:
                if self._stop.is_set():
                    return
                continue
            self.lines.append(parse_monitor_line(line))

    def stop(self, marker_client: redis.Redis) -> list[tuple[str, list[bytes]]]:
        marker = f"monitor-end-{uuid.uuid4().hex}"
        marker_client.echo(marker)  # the last line: everything before it was read
        deadline = time.monotonic() + 30
        while not any(args and args[-1] == marker.encode() for _, args in self.lines[-5:]):
            assert time.monotonic() < deadline, "MONITOR did not show the end marker"
            time.sleep(0.05)
        self._stop.set()
        self.thread.join()
        self.sock.close()
        return self.lines


def script_calls(lines) -> list[tuple[list[bytes], list[list[bytes]]]]:
    """(declared keys, commands the script ran) for every EVAL/EVALSHA in the log, in order."""
    calls, current = [], None
    for client, args in lines:
        if client == "lua":
            assert current is not None, f"a script command with no EVAL before it: {args[:3]!r}"
            current[1].append(args)
            continue
        name = args[0].upper() if args else b""
        if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO"):
            current = (args[3 : 3 + int(args[2])], [])
            calls.append(current)
        else:
            current = None
    return calls


def keys_of(raw: redis.Redis, commands: list[list[bytes]]) -> list[list[bytes]]:
    """The keys each command touches, as the server reads its arguments (COMMAND GETKEYS; none for TIME and the
    like, which it answers with an error)."""
    pipe = raw.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command("COMMAND", "GETKEYS", *command)
    return [[] if isinstance(r, redis.ResponseError) else r for r in pipe.execute(raise_on_error=False)]


def workload(url: str, prefix: str) -> dict[str, int]:
    """Everything the store does with scripts, on chains of linked packs; returns a few counts for the checks."""
    ttl = 3600
    writer = RedisCheckpointBackend(url=url, prefix=prefix, ttl_seconds=ttl)
    cold = lambda: RedisCheckpointBackend(url=url, prefix=prefix, ttl_seconds=ttl)  # noqa: E731 - another pod
    chain = list(append_chain(31, 14, flow_id="dk"))
    for cp in chain[:10]:
        writer.save(cp)
    linked = len(chain_of(writer, chain[9]))
    # another process goes on with the run, knowing nothing: its new pack starts afresh
    other = cold()
    for cp in chain[10:]:
        other.save(cp)
    # overwrites from processes that know nothing: the old version's packs are let go of down their chains
    cold().save(chain[9].model_copy(update={"status": S.FAILED}))
    cold().save(chain[8].model_copy(update={"status": S.COMPLETED}))
    # cold loads and lists walk the chains
    reader = cold()
    assert reader.load(chain[7].id) == chain[7]
    assert reader.load(chain[-1].id) == chain[-1]
    assert len(cold().get_list_by_flow("dk", limit=20)) == len(chain)
    # a paused checkpoint (held past the ttl) and the run going on from it in a cold process: the hold is handed
    # back down the chains of the paused checkpoint's packs
    paused = chain[-1].model_copy(update={"id": "dk-paused", "status": S.PAUSED, "parent_checkpoint_id": chain[-1].id})
    writer.save(paused)
    after = paused.model_copy(update={"id": "dk-after", "status": S.ACTIVE, "parent_checkpoint_id": paused.id})
    cold().save(after)
    # deletes and cleanup, cascading down chains, from processes that know nothing
    assert cold().delete(chain[2].id)
    assert cold().delete(chain[9].id)
    deleted = cold().cleanup_by_flow("dk", keep_count=2)
    raw = writer.redis
    held = [raw.pttl(writer._core.keys.pack("dk", p)) for p in chain_of(writer, paused)]
    handed_back = all(0 < left <= ttl * 1000 for left in held)
    # leases: takes, a run going on under its lease, a takeover of an orphan by an explicit resume, claims, renewals
    with as_running_flow():
        leased = RedisCheckpointBackend(url=url, prefix=prefix, ttl_seconds=ttl, lease_ttl_seconds=3)
        run = list(append_chain(32, 6, flow_id="dl"))
        for cp in run:
            leased.save(cp)
        gone = LeaseTicket("take", "gone:1:x", 0, 200)
        leased._sync.run(leased._core.save(make("orph-head", "dl", "r", "orph", S.ACTIVE, text="o " * 300),
                                           ticket=gone))  # fmt: skip
        time.sleep(0.3)
        recovery = Recovery(cold())
        claims = [recovery.claim("dl", "orph")]
        cold().save(make("took-1", "dl", "resumed", "wf-took", S.ACTIVE, minute=1, parent="orph-head"))
        leased._sync.run(leased._core.save(make("orph2-head", "dl", "r2", "orph2", S.ACTIVE, text="p " * 300),
                                           ticket=LeaseTicket("take", "gone:2:y", 0, 200)))  # fmt: skip
        time.sleep(0.3)
        claim = Recovery(leased).claim("dl", "orph2")
        claims.append(claim)
        # renewals and a hand-back, as the heartbeat and a worker send them
        assert claim, "the orphan was claimed"
        ref = HeldLease(leased._namespace, "dl", "orph2", claim.owner, claim.token, leased.lease_policy).ref
        assert leased._sync.run(renew_op(leased.store.keys, ref)) == "OK"
        assert leased._sync.run(renew_many_op(leased.store.keys, [ref], ("dl",))) == ["OK"]
        leased._sync.run(release_op(leased.store.keys, "dl", "orph2", claim.owner, claim.token, failed=False))
        for backend in (leased, recovery.backend if hasattr(recovery, "backend") else None):
            if backend is not None:
                backend.close()
    return {"linked": linked, "deleted": deleted, "claims": sum(1 for c in claims if c), "handed_back": handed_back}


@pytest.fixture
def server():
    proc = RedisProcess().start()
    yield proc
    proc.kill()


def test_every_key_a_script_touches_is_declared_and_in_one_slot(server, monkeypatch):
    asked = []
    learned = getattr(StoreCore, "_learned", None)

    def counting(self, flow, links, wanted):
        found = learned(self, flow, links, wanted)
        asked.extend(found[1])
        return found

    monkeypatch.setattr(StoreCore, "_learned", counting, raising=False)
    raw = redis.Redis.from_url(server.url)
    raw.set_response_callback("COMMAND", lambda response, **options: response)  # GETKEYS: the keys as sent
    host, port = "127.0.0.1", int(server.url.rsplit(":", 1)[1].split("/")[0])
    monitor = Monitor(host, port)
    counts = workload(server.url, f"dk{uuid.uuid4().hex[:6]}")
    lines = monitor.stop(raw)
    assert counts["linked"] >= 5, "the workload made linked chains"
    assert counts["deleted"] > 0, "cleanup deleted checkpoints"
    assert counts["handed_back"], "the run going on handed the paused checkpoint's packs back to the ttl"
    assert counts["claims"] >= 1, "a worker claimed an orphan"
    calls = script_calls(lines)
    assert len(calls) > 30, "MONITOR showed the scripts"
    ran = [c[0].upper() for _, commands in calls for c in commands]
    assert ran.count(b"DEL") >= 2, "deletes let go of packs"
    cascades = [cmds for _, cmds in calls if sum(c[0].upper() == b"DEL" and b":pack:" in c[1] for c in cmds) >= 2]
    assert cascades, "a delete cascaded down a chain"
    assert any(b"superseded_by" in c for _, cmds in calls for c in cmds), "a save took an orphaned run over"
    shas = {scripts.sha(name).encode(): name for name in ("renew", "claim")}
    evals = [args for _, args in lines if args and args[0].upper() == b"EVALSHA"]
    assert {shas.get(args[1]) for args in evals} >= {"renew", "claim"}, "leases were claimed and renewed"
    undeclared, slots, walked = [], [], 0
    for declared, commands in calls:
        wanted = set(declared)
        if len({key_slot(k) for k in declared}) > 1:
            slots.append(declared)
        for command, touched in zip(commands, keys_of(raw, commands)):
            walked += any(b":pack:" in k for k in touched)
            missing = [k for k in touched if k not in wanted]
            if missing:
                undeclared.append((command[0], missing, len(declared)))
    assert walked > 0, "scripts read packs"
    assert not slots, f"a script's keys span cluster slots: {slots[:3]!r}"
    assert not undeclared, f"{len(undeclared)} script commands touched undeclared keys, e.g. {undeclared[:5]!r}"
    # the protocol was exercised: cold pods were asked for keys they had not declared, and declared them
    assert any(":pack:" in key for key in asked), "scripts asked for pack keys they were not given (cold pods)"
    assert any(":lease:" in key for key in asked), "a cold pod's takeover asked for the superseded run's lease"


def round_trips(backend, op) -> tuple[int, object]:
    """Run a store operation, counting the requests it sends (each one round trip)."""
    sent, request = 1, next(op)
    try:
        while True:
            request = op.send(backend._sync._execute(request))
            sent += 1
    except StopIteration as done:
        return sent, done.value


@pytest.mark.parametrize("ttl", [None, 3600])
def test_a_warm_process_saves_and_loads_in_one_round_trip_and_a_cold_one_learns_the_chains(server, ttl):
    prefix = f"rt{uuid.uuid4().hex[:6]}"
    writer = RedisCheckpointBackend(url=server.url, prefix=prefix, ttl_seconds=ttl)
    chain = list(append_chain(33, 12, flow_id="rt"))
    writer.save(chain[0])
    for cp in chain[1:]:
        assert round_trips(writer, writer._core.save(cp))[0] == 1, "a warm save of a linked chain: one round trip"
    assert len(chain_of(writer, chain[-1])) >= 5
    update = chain[-1].model_copy(update={"status": S.COMPLETED})
    assert round_trips(writer, writer._core.save(update, must_exist=True))[0] == 2, "update: script, then lookups"
    assert round_trips(writer, writer._core.load(chain[-1].id)) == (1, update), "a warm load: one round trip"
    reader = RedisCheckpointBackend(url=server.url, prefix=prefix, ttl_seconds=ttl)
    cold, found = round_trips(reader, reader._core.load(chain[-2].id))
    assert found == chain[-2] and 1 < cold <= 3 + len(chain_of(writer, chain[-2])), "a cold load learns the chain"
    assert round_trips(reader, reader._core.load(chain[-2].id)) == (1, chain[-2]), "and then is warm"
    child = chain[-2].model_copy(update={"id": "rt-child", "parent_checkpoint_id": chain[-2].id})
    assert round_trips(reader, reader._core.save(child))[0] == 1, "a save after a load knows every chain it walks"


def snapshot(raw: redis.Redis, prefix: str) -> dict:
    """Every key of a namespace with its value and expiry (DUMP: type and content)."""
    return {key: (raw.dump(key), raw.pttl(key) > 0) for key in raw.scan_iter(match=f"{prefix}:*")}


def test_a_script_that_meets_an_undeclared_base_writes_nothing_then_the_resend_does_it_all(server):
    prefix = f"ud{uuid.uuid4().hex[:6]}"
    writer = RedisCheckpointBackend(url=server.url, prefix=prefix)
    chain = list(append_chain(34, 6, flow_id="ud"))
    for cp in chain:
        writer.save(cp)
    newest, base, *_ = chain_of(writer, chain[-1])
    raw, keys = writer.redis, writer._core.keys
    counts = {p: int(raw.getrange(keys.pack("ud", p), 0, 7)) for p in (newest, base)}
    assert counts == {newest: 1, base: 2}, "the newest pack goes with its checkpoint, and lets go of its base"
    cold = RedisCheckpointBackend(url=server.url, prefix=prefix)
    op = cold._core.delete(chain[-1].id)
    request, replies = next(op), []
    while not isinstance(request, Script):
        request = op.send(cold._sync._execute(request))
    assert request.name == "delete" and keys.pack("ud", base) not in request.keys, "a cold process cannot know it"
    before = snapshot(raw, prefix)
    reply = cold._sync._execute(request)
    assert reply[0] == b"UNDECLARED" and [k.decode() for k in reply[2]] == [keys.pack("ud", base)]
    assert [x.decode() for x in reply[1]] == [newest, base], "with the link it read on the way"
    assert snapshot(raw, prefix) == before, "nothing was written"
    try:
        while True:
            request = op.send(cold._sync._execute(request))
            replies.append(request)
    except StopIteration as done:
        assert done.value is True
    assert raw.exists(keys.pack("ud", newest)) == 0
    assert int(raw.getrange(keys.pack("ud", base), 0, 7)) == 1, "the base was let go of once"
    assert cold.load(chain[-2].id) == chain[-2]
