"""Self-test of tests/cluster_proc.py: a real 3 + 3 Redis Cluster comes up, serves a cluster client over every
master, survives a SIGKILLed master, and moves slots (redis-cli reshard; the manual sequence with its ASK window).

``pytest -s`` prints how long startup, a failover and a reshard took."""

from __future__ import annotations

import itertools
import threading

import pytest
import redis

from tests.cluster_fixtures import redis_cluster  # noqa: F401 (the fixture)
from tests.cluster_proc import SLOTS, ClusterSetup


def keys_for_slots(cluster: ClusterSetup, slots, prefix: str) -> dict[int, str]:
    """One key name per slot in ``slots`` (found by trying names)."""
    wanted, found = set(slots), {}
    for i in itertools.count():
        name = f"{prefix}{i}"
        slot = cluster.key_slot(name)
        if slot in wanted and slot not in found:
            found[slot] = name
            if len(found) == len(wanted):
                return found


def test_cluster_comes_up_with_a_replica_per_master(redis_cluster):
    assert redis_cluster.stable()
    masters = redis_cluster.masters()
    assert len(masters) == 3
    assert sum(len(redis_cluster.slots_of(m)) for m in masters) == SLOTS
    for master in masters:
        assert len(redis_cluster.replicas_of(master)) == 1
        replica = redis_cluster.replica_of(master)
        info = redis.Redis(port=replica[1]).info("replication")
        assert info["role"] == "slave" and info["master_port"] == master[1]
    assert redis_cluster.url == f"redis://127.0.0.1:{masters[0][1]}"


def test_cluster_client_reads_and_writes_on_every_master(redis_cluster):
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url, decode_responses=True)
    names = [f"spread:{i}" for i in range(30)]
    assert {redis_cluster.node_for_key(name) for name in names} == set(redis_cluster.masters())
    for name in names:
        client.set(name, name.upper())
    assert [client.get(name) for name in names] == [name.upper() for name in names]
    for host, port in redis_cluster.masters():  # each master holds its share, and only that
        mine = [n for n in names if redis_cluster.node_for_key(n)[1] == port]
        assert redis.Redis(port=port).dbsize() >= len(mine) > 0
    client.close()


@pytest.mark.slow
def test_kill_master_promotes_its_replica_and_keeps_acked_writes(redis_cluster):
    client = redis_cluster.client()
    key = "failover:key"
    old = redis_cluster.node_for_key(key)[1]
    replica = redis_cluster.replica_of(old)[1]
    pipe = redis.Redis(port=old).pipeline(transaction=False)  # one connection: WAIT waits for this SET
    pipe.set(key, "kept")
    pipe.execute_command("WAIT", 1, 1000)
    assert pipe.execute() == [True, 1]

    new, seconds = redis_cluster.kill_master(for_key=key)
    print(f"\nfailover of master {old}: replica {new} serving after {seconds:.2f} s")
    assert new == replica
    assert redis_cluster.node_for_key(key) == ("127.0.0.1", new)
    assert len(redis_cluster.masters()) == 3
    assert client.get(key) == "kept"  # the client finds the new master (its old connection is refused)

    seconds = redis_cluster.restart(old)
    print(f"old master {old} back as a replica after {seconds:.2f} s")
    assert redis_cluster.replica_of(new) == ("127.0.0.1", old)
    assert redis.Redis(port=old).info("replication")["role"] == "slave"
    client.close()


@pytest.mark.slow
def test_reshard_moves_slots_while_a_client_keeps_working(redis_cluster):
    source, target = (port for _, port in redis_cluster.masters()[:2])
    count = 100
    first = sorted(redis_cluster.slots_of(source))[:count]  # redis-cli takes a source's lowest slots first
    names = keys_for_slots(redis_cluster, first, "reshard:")
    client = redis_cluster.client()
    for name in names.values():
        client.set(name, name)

    stop, errors, ops = threading.Event(), [], [0]

    def traffic():  # its own client, writing and reading the keys being moved
        busy = redis_cluster.client()
        for name in itertools.cycle(names.values()):
            if stop.is_set():
                break
            try:
                busy.set(name, name)
                assert busy.get(name) == name
                ops[0] += 1
            except Exception as e:  # noqa: BLE001 (any error fails the test below)
                errors.append(repr(e))
        busy.close()

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        moved, seconds = redis_cluster.reshard(count, source, target)
    finally:
        stop.set()
        thread.join(10)
    print(f"\nreshard of {count} slots ({len(names)} keys) {source} -> {target}: {seconds:.2f} s, "
          f"{ops[0]} SET+GET meanwhile")
    assert moved == set(first)
    assert not errors, errors[:5]
    assert ops[0] > 0
    assert {redis_cluster.node_for_key(n)[1] for n in names.values()} == {target}
    assert [client.get(n) for n in names.values()] == list(names.values())  # the client followed MOVED
    with pytest.raises(redis.ResponseError, match="^MOVED"):
        redis.Redis(port=source).get(names[first[0]])
    client.close()


@pytest.mark.slow
def test_half_migrated_slot_answers_ask_then_finishes(redis_cluster):
    names = [f"{{ask}}:{i}" for i in range(10)]  # one slot
    slot = redis_cluster.key_slot(names[0])
    source = redis_cluster.master_for_slot(slot)[1]
    target = next(port for _, port in redis_cluster.masters() if port != source)
    client = redis_cluster.client()
    for name in names:
        client.set(name, name)

    moved = redis_cluster.begin_migration(slot, target, keys=4)
    assert len(moved) == 4
    assert redis_cluster.migrating() == {slot: (source, target)}
    assert redis_cluster.master_for_slot(slot)[1] == source  # still the owner
    on_source, on_target = redis.Redis(port=source, decode_responses=True), redis.Redis(port=target)
    with pytest.raises(redis.ResponseError, match=f"^ASK {slot} 127.0.0.1:{target}$"):
        on_source.get(moved[0])
    left = next(name for name in names if name not in moved)
    assert on_source.get(left) == left  # not moved yet: served where it was
    with pytest.raises(redis.ResponseError, match="^MOVED"):
        on_target.get(moved[0])  # without ASKING the target sends the client back
    asking = on_target.pipeline(transaction=False)
    asking.execute_command("ASKING")
    asking.get(moved[0])
    assert asking.execute() == [True, moved[0].encode()]
    assert [client.get(name) for name in names] == names  # the cluster client follows ASK

    assert redis_cluster.finish_migration(slot) == 6
    assert redis_cluster.migrating() == {}
    assert redis_cluster.master_for_slot(slot)[1] == target
    with pytest.raises(redis.ResponseError, match="^MOVED"):
        on_source.get(moved[0])
    assert [client.get(name) for name in names] == names

    seconds = redis_cluster.migrate_slots([slot], source)  # the whole manual sequence, back where it was
    print(f"\nslot {slot} ({len(names)} keys) moved back by SETSLOT/MIGRATE in {seconds:.2f} s")
    assert redis_cluster.master_for_slot(slot)[1] == source
    assert redis.Redis(port=source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == len(names)
    assert [client.get(name) for name in names] == names
    client.close()
