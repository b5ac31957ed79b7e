"""A real Redis Cluster on loopback: N masters with one replica each (default 3 + 3), owned by the tests that start it.

Every node is a redis-server (:func:`tests.redis_proc.server_binary`) with ``--cluster-enabled yes``, its own temp
dir (nodes.conf lives there, so a restarted node keeps its identity and rejoins), no persistence and a short
``cluster-node-timeout`` (1 s) so that a SIGKILLed master's replica is promoted within a few seconds. The cluster is
made by ``redis-cli --cluster create``. Topology questions (``masters()``, ``replica_of()``, ``master_for_slot()``)
are asked of the cluster each time, since failovers and slot moves change the answers.

Moving slots: :meth:`ClusterSetup.reshard` runs ``redis-cli --cluster reshard``; :meth:`ClusterSetup.begin_migration`
and :meth:`ClusterSetup.finish_migration` do the manual CLUSTER SETSLOT IMPORTING/MIGRATING + MIGRATE + SETSLOT NODE
sequence, and can stop half way (some keys moved, the slot still migrating) so that a test sees ``-ASK`` replies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import redis
import redis.crc
from redis.cluster import ClusterNode

from tests.redis_proc import RedisProcess, free_port

SLOTS = 16384
HOST = "127.0.0.1"
Address = tuple[str, int]


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free loopback ports, no two alike (:func:`free_port` may hand out one twice)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class ClusterNodeProcess(RedisProcess):
    """One cluster-enabled redis-server: :class:`RedisProcess` (kill, pause, resume) with the cluster options.

    ``nodes.conf`` is kept in ``self.dir`` across :meth:`restart`, so the node comes back with its node id."""

    def __init__(self, port: int, bus_port: int, node_timeout_ms: int, binary: str | None = None):
        super().__init__(port=port, binary=binary)
        self.bus_port = bus_port  # --cluster-port: the cluster bus (default port + 10000, often out of range)
        self.node_timeout_ms = node_timeout_ms

    def start(self) -> "ClusterNodeProcess":
        return self.launch(
            "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file",
            os.path.join(self.dir, "nodes.conf"), "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-port", str(self.bus_port),
            "--repl-diskless-sync-delay", "0",  # a replica (re)syncs at once, not after Redis's default 5 s
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def parse_cluster_nodes(text: str) -> dict[str, dict]:
    """``CLUSTER NODES`` output -> {node_id: {"addr": (host, port), "flags": set, "master_id": id | None,
    "connected": bool, "slots": set[int], "migrating": {slot: id}, "importing": {slot: id}}}.

    Migrating/importing entries (``[slot->-id]``, ``[slot-<-id]``) are shown only by the node doing it."""
    nodes: dict[str, dict] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split()
        host_port = fields[1].split("@")[0]
        host, _, port = host_port.rpartition(":")
        slots: set[int] = set()
        migrating: dict[int, str] = {}
        importing: dict[int, str] = {}
        for item in fields[8:]:
            if item.startswith("["):
                body = item.strip("[]")
                if "->-" in body:
                    slot, other = body.split("->-")
                    migrating[int(slot)] = other
                else:
                    slot, other = body.split("-<-")
                    importing[int(slot)] = other
            elif "-" in item:
                start, end = item.split("-")
                slots.update(range(int(start), int(end) + 1))
            else:
                slots.add(int(item))
        nodes[fields[0]] = {
            "addr": (host or HOST, int(port)),
            "flags": set(fields[2].split(",")),
            "master_id": None if fields[3] == "-" else fields[3],
            "connected": fields[7] == "connected",
            "slots": slots,
            "migrating": migrating,
            "importing": importing,
        }
    return nodes


class ClusterSetup:
    """``masters`` masters, each with ``replicas_per_master`` replicas, made by ``redis-cli --cluster create``.

    ``node_timeout_ms`` is ``cluster-node-timeout``: with 1000 ms a SIGKILLed master is failed over in ~2-3 s.
    Ports are free loopback ports; ``startup_nodes``/``url`` name the first master as it was at start (any node
    will do for a cluster client: it learns the rest).

    Needs Redis >= 7.0 (or Valkey): every node's cluster bus gets its own free port by ``--cluster-port``, since the
    default (port + 10000) is out of range for most ephemeral ports.
    """

    def __init__(self, masters: int = 3, replicas_per_master: int = 1, node_timeout_ms: int = 1000,
                 binary: str | None = None):  # fmt: skip
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise RuntimeError("redis-cli is not on PATH (apt-get install redis-tools)")
        self.n_masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        count = masters * (1 + replicas_per_master)
        ports = distinct_free_ports(2 * count)
        self.nodes = [ClusterNodeProcess(ports[i], ports[count + i], node_timeout_ms, binary) for i in range(count)]
        self.by_port = {node.port: node for node in self.nodes}
        self.startup_seconds: float | None = None

    # -- addresses ---------------------------------------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[Address]:
        """(host, port) of every node started (dead ones included: a client skips them)."""
        return [(HOST, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port of the first master at start>``: what ``RedisCluster.from_url`` takes."""
        return f"redis://{HOST}:{self.nodes[0].port}"

    @property
    def ckpt_url(self) -> str:
        """The backend's url for this cluster: ``redis+cluster://`` and every node it started (any one that answers names the rest)."""
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.startup_nodes)

    @property
    def version(self) -> str:
        """What the nodes are, as the session's server line says it: ``redis 7.0.15 cluster``."""
        return f"{self.nodes[0].version} cluster"

    def client(self, **kwargs) -> "redis.cluster.RedisCluster":
        """A ``redis.cluster.RedisCluster`` on all startup nodes (decode_responses=True unless given)."""
        kwargs.setdefault("decode_responses", True)
        nodes = [ClusterNode(host, port) for host, port in self.startup_nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)

    # -- start / stop ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> "ClusterSetup":
        """Start every node, ``redis-cli --cluster create`` (the first ``masters`` ports become masters), then wait
        until every node says ``cluster_state:ok``, agrees on who serves all 16384 slots, and every replica is in
        sync with its master. ``self.startup_seconds`` is how long that took."""
        began = time.monotonic()
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"{HOST}:{node.port}" for node in self.nodes]
            self._cli("--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas_per_master),
                      "--cluster-yes", timeout=timeout)  # fmt: skip
            self.wait_stable(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """SIGKILL every node and remove their temp dirs."""
        for node in self.nodes:
            node.kill()
            shutil.rmtree(node.dir, ignore_errors=True)

    def __enter__(self) -> "ClusterSetup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _cli(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([self.cli, *args], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} exited with {done.returncode}:\n"
                               f"{done.stdout[-3000:]}\n{done.stderr[-2000:]}")  # fmt: skip
        return done.stdout

    # -- asking the cluster ------------------------------------------------------------------------------------

    @staticmethod
    def _redis(port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, decode_responses=True, socket_connect_timeout=0.5, socket_timeout=5)

    def live_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.alive]

    def view(self, port: int | None = None) -> dict[str, dict]:
        """``CLUSTER NODES`` of node ``port`` (default: the first live node), parsed (:func:`parse_cluster_nodes`)."""
        return parse_cluster_nodes(self._redis(port or self.live_ports()[0]).execute_command("CLUSTER", "NODES"))

    def node_id(self, port: int) -> str:
        return self._redis(port).execute_command("CLUSTER", "MYID")

    def _port_of(self, master: Address | int) -> int:
        return master if isinstance(master, int) else int(master[1])

    def masters(self) -> list[Address]:
        """The masters serving slots now, by ``CLUSTER NODES`` of a live node, ordered by their lowest slot."""
        nodes = [n for n in self.view().values() if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]]
        return [n["addr"] for n in sorted(nodes, key=lambda n: min(n["slots"]))]

    def replicas_of(self, master: Address | int) -> list[Address]:
        """The replicas (not failed) of ``master`` ((host, port) or port)."""
        view = self.view()
        port = self._port_of(master)
        (master_id,) = [nid for nid, n in view.items() if n["addr"][1] == port]
        return sorted(n["addr"] for n in view.values()
                      if n["master_id"] == master_id and "fail" not in n["flags"])  # fmt: skip

    def replica_of(self, master: Address | int) -> Address:
        """A replica of ``master``; LookupError if it has none."""
        replicas = self.replicas_of(master)
        if not replicas:
            raise LookupError(f"master {master} has no replica")
        return replicas[0]

    @staticmethod
    def key_slot(key: str | bytes) -> int:
        return redis.crc.key_slot(key.encode() if isinstance(key, str) else key)

    def master_for_slot(self, slot: int) -> Address:
        """The master that owns ``slot`` now (during a migration: the source, which still owns it)."""
        for node in self.view().values():
            if slot in node["slots"] and "master" in node["flags"]:
                return node["addr"]
        raise LookupError(f"no master serves slot {slot}")

    def node_for_key(self, key: str | bytes) -> Address:
        """The master that owns ``key``'s slot now."""
        return self.master_for_slot(self.key_slot(key))

    def slots_of(self, master: Address | int) -> set[int]:
        port = self._port_of(master)
        for node in self.view().values():
            if node["addr"][1] == port:
                return node["slots"]
        raise LookupError(f"no node on port {port}")

    # -- waiting -----------------------------------------------------------------------------------------------

    @staticmethod
    def _wait(check, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if check():
                    return
            except (redis.RedisError, OSError) as e:  # a node still starting, or one just killed
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}" + (f" (last error: {last!r})" if last else ""))
            time.sleep(0.05)

    def stable(self) -> bool:
        """Every live node: ``cluster_state:ok``; the same slot -> master map, covering all 16384 slots, and no
        slot migrating or importing; every master it knows (alive) has its replicas, each in sync."""
        ports = self.live_ports()
        maps = []
        for port in ports:
            client = self._redis(port)
            if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                return False
            view = parse_cluster_nodes(client.execute_command("CLUSTER", "NODES"))
            owner = {}
            for nid, node in view.items():
                if "master" in node["flags"]:
                    if node["migrating"] or node["importing"]:
                        return False
                    for slot in node["slots"]:
                        owner[slot] = nid
            if len(owner) != SLOTS:
                return False
            maps.append(owner)
        if any(m != maps[0] for m in maps[1:]):
            return False
        for port in ports:
            info = self._redis(port).info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def wait_stable(self, timeout: float = 30) -> None:
        self._wait(self.stable, "cluster_state:ok and one slot map on every node", timeout)

    # -- failures ----------------------------------------------------------------------------------------------

    def kill_master(self, port: int | None = None, *, for_key: str | bytes | None = None,
                    timeout: float = 30) -> tuple[int, float]:  # fmt: skip
        """SIGKILL the master on ``port`` (or the one owning ``for_key``), wait until its replica is promoted and
        the live nodes are :meth:`stable` again; return (the new master's port, seconds from the kill)."""
        if (port is None) == (for_key is None):
            raise TypeError("give port or for_key")
        if port is None:
            port = self.node_for_key(for_key)[1]
        view = self.view(port)
        me = next(n for n in view.values() if "myself" in n["flags"])
        if "master" not in me["flags"]:
            raise ValueError(f"{port} is not a master")
        my_id = next(nid for nid, n in view.items() if "myself" in n["flags"])
        replica_ports = {n["addr"][1] for n in view.values() if n["master_id"] == my_id}
        if not replica_ports:
            raise ValueError(f"master {port} has no replica to promote")
        slots = me["slots"]
        began = time.monotonic()
        self.by_port[port].kill()
        promoted: list[int] = []

        def taken_over() -> bool:
            for candidate in replica_ports:
                if self.by_port[candidate].alive and slots <= self.slots_of(candidate):
                    promoted[:] = [candidate]
                    return self.stable()
            return False

        self._wait(taken_over, f"a replica of {port} to take over", timeout)
        return promoted[0], time.monotonic() - began

    def restart(self, port: int, timeout: float = 30) -> float:
        """Start the killed node on ``port`` again (same dir, so same node id): a master that was failed over
        rejoins as a replica of its successor. Waits until every live node sees it connected and it is in sync;
        returns the seconds that took. (Data: none of its own, no persistence; a replica resyncs from its master.)"""
        node = self.by_port[port]
        if node.alive:
            raise ValueError(f"node {port} is running")
        began = time.monotonic()
        node.start()

        def rejoined() -> bool:
            for other in self.live_ports():
                entry = next(n for n in self.view(other).values() if n["addr"][1] == port)
                if {"fail", "fail?"} & entry["flags"]:
                    return False
                if other != port and not entry["connected"]:
                    return False
            return self.stable()

        self._wait(rejoined, f"node {port} to rejoin", timeout)
        return time.monotonic() - began

    # -- moving slots ------------------------------------------------------------------------------------------

    def reshard(self, count: int, from_port: int, to_port: int, timeout: float = 120) -> tuple[set[int], float]:
        """Move ``count`` slots (with their keys) from master ``from_port`` to master ``to_port`` with
        ``redis-cli --cluster reshard ... --cluster-yes``; clients keep working (MOVED/ASK). Waits until every node
        agrees; returns (the slots moved, seconds)."""
        before = self.slots_of(to_port)
        began = time.monotonic()
        self._cli("--cluster", "reshard", f"{HOST}:{from_port}", "--cluster-from", self.node_id(from_port),
                  "--cluster-to", self.node_id(to_port), "--cluster-slots", str(count), "--cluster-yes",
                  timeout=timeout)  # fmt: skip
        self.wait_stable(timeout)
        return self.slots_of(to_port) - before, time.monotonic() - began

    def begin_migration(self, slot: int, to_port: int, keys: int | None = 0) -> list[str]:
        """Start moving ``slot`` from its owner to master ``to_port``: CLUSTER SETSLOT IMPORTING on the target,
        MIGRATING on the source, then MIGRATE ``keys`` of the slot's keys (None: all). The slot stays migrating:
        on the source, a moved key answers ``-ASK <slot> <target>``, a key not yet moved is served as before.
        Returns the names of the keys moved. :meth:`finish_migration` ends it."""
        source_port = self.master_for_slot(slot)[1]
        if source_port == to_port:
            raise ValueError(f"slot {slot} is already on {to_port}")
        source, target = self._redis(source_port), self._redis(to_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source_port))
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(to_port))
        return self._migrate_keys(slot, source_port, to_port, keys)

    def _migrate_keys(self, slot: int, source_port: int, to_port: int, keys: int | None) -> list[str]:
        source = self._redis(source_port)
        moved: list[str] = []
        while keys is None or len(moved) < keys:
            batch = 100 if keys is None else min(100, keys - len(moved))
            names = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not names:
                break
            source.execute_command("MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *names)
            moved.extend(names)
        return moved

    def migrating(self) -> dict[int, tuple[int, int]]:
        """Slots being migrated now: {slot: (source port, target port)}, as the sources report them."""
        found = {}
        for port in self.live_ports():
            view = self.view(port)
            me = next(n for n in view.values() if "myself" in n["flags"])
            for slot, target_id in me["migrating"].items():
                found[slot] = (port, view[target_id]["addr"][1])
        return found

    def finish_migration(self, slot: int, timeout: float = 30) -> int:
        """Move the rest of ``slot``'s keys and assign it to the target: CLUSTER SETSLOT NODE on the target, the
        source, then every other master (what redis-cli does). Waits until every node agrees; returns the keys
        moved now."""
        source_port, to_port = self.migrating()[slot]
        moved = self._migrate_keys(slot, source_port, to_port, None)
        target_id = self.node_id(to_port)
        masters = [port for _, port in self.masters()]
        for port in [to_port, source_port, *(p for p in masters if p not in (to_port, source_port))]:
            self._redis(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_stable(timeout)
        return len(moved)

    def migrate_slots(self, slots, to_port: int, timeout: float = 30) -> float:
        """Move each of ``slots`` with its keys to master ``to_port`` by the manual sequence; returns seconds."""
        began = time.monotonic()
        for slot in slots:
            self.begin_migration(slot, to_port, keys=None)
            self.finish_migration(slot, timeout)
        return time.monotonic() - began

