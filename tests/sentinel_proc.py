"""A real Sentinel deployment on loopback: a primary, one or more replicas and three sentinels, owned by one test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import redis

from tests.redis_proc import RedisProcess, free_port

SERVICE = "mymaster"


class SentinelSetup:
    """``redis-server --port A``, ``replicas`` x ``redis-server --port B --replicaof 127.0.0.1 A`` and three
    ``redis-server <conf> --sentinel`` monitoring A with quorum 2 (down after 1 s, failover timeout 5 s).

    Two replicas keep ``replica_acks=1`` available through a graceful failover: the new primary gets the other
    replica at once, where with one it has none until Sentinel demotes the old primary (~10 s later)."""

    def __init__(self, down_after_ms: int = 1000, replicas: int = 1, diskless_sync_delay: int | None = None):
        self.diskless_sync_delay = diskless_sync_delay  # repl-diskless-sync-delay on every server (None: Redis's 5 s)
        self.primary = RedisProcess()
        self.replicas = [RedisProcess() for _ in range(replicas)]
        self.replica = self.replicas[0]
        self.down_after_ms = down_after_ms
        self.dir = tempfile.mkdtemp(prefix="sentinel-test-")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> "SentinelSetup":
        self.primary.start()
        for proc in self.replicas:
            proc.start()
        for proc in (self.primary, *self.replicas):
            if self.diskless_sync_delay is not None:
                redis.Redis(port=proc.port).config_set("repl-diskless-sync-delay", self.diskless_sync_delay)
        for proc in self.replicas:
            replica = redis.Redis(port=proc.port)
            replica.replicaof("127.0.0.1", self.primary.port)
            self._wait(lambda: replica.info("replication").get("master_link_status") == "up", "replica in sync")
        for port in self.sentinel_ports:
            conf = os.path.join(self.dir, f"sentinel-{port}.conf")
            with open(conf, "w") as f:
                f.write(f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
                        f"sentinel resolve-hostnames no\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                        f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                        f"sentinel failover-timeout {SERVICE} 5000\n")  # fmt: skip
            self.sentinels.append(subprocess.Popen([shutil.which("redis-server"), conf, "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.sentinel_ports:  # every sentinel knows the replica and the other sentinels
            client = redis.Redis(port=port, socket_connect_timeout=0.2, decode_responses=True)
            self._wait(lambda: self._ready(client), f"sentinel {port} ready")
        return self

    def _ready(self, client: redis.Redis) -> bool:
        try:
            master = client.sentinel_master(SERVICE)
        except redis.ConnectionError:
            return False
        return master["num-slaves"] >= len(self.replicas) and master["num-other-sentinels"] >= 2

    @staticmethod
    def _wait(check, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}")
            time.sleep(0.05)

    def master_port(self) -> int:
        """The primary's port as a sentinel reports it."""
        client = redis.Redis(port=self.sentinel_ports[0], decode_responses=True)
        return int(client.sentinel_get_master_addr_by_name(SERVICE)[1])

    def failover(self) -> None:
        """A graceful, forced failover: ``SENTINEL FAILOVER`` on one sentinel."""
        redis.Redis(port=self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", SERVICE)

    def wait_switched(self, old_port: int, timeout: float = 20) -> None:
        """Until every sentinel names another primary than ``old_port`` and that one says it is a master."""
        def switched() -> bool:
            for port in self.sentinel_ports:
                addr = redis.Redis(port=port, decode_responses=True).sentinel_get_master_addr_by_name(SERVICE)
                if int(addr[1]) == old_port:
                    return False
            return redis.Redis(port=int(addr[1])).info("replication")["role"] == "master"

        self._wait(switched, "the failover")

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.sentinels = []
        self.primary.kill()
        for proc in self.replicas:
            proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
