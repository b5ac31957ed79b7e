"""RedisCheckpointBackend: Dynamiq's CheckpointBackend contract on Redis."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

import redis
import redis.asyncio
from dynamiq.checkpoints.backends.base import CheckpointBackend
from dynamiq.checkpoints.checkpoint import FlowCheckpoint
from dynamiq.checkpoints.types import CheckpointStatus
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from dynamiq_redis_ckpt import config, crypto
from dynamiq_redis_ckpt.driver import AsyncDriver, RetryPolicy, SyncDriver
from dynamiq_redis_ckpt.errors import ConfigurationError
from dynamiq_redis_ckpt.eviction import EvictionCheck
from dynamiq_redis_ckpt.guard import LeaseGuard, saved_by_running_flow
from dynamiq_redis_ckpt.keys import Keys
from dynamiq_redis_ckpt.observe import observed
from dynamiq_redis_ckpt.registry import LeasePolicy, LeaseStore
from dynamiq_redis_ckpt.store import BucketsCheck, Preflight, StoreCore

# A flow's runs spread over 48 slots on a cluster: even over 2, 3, 4, 6, 8, 12, 16 or 24 masters (docs/cluster.md).
DEFAULT_CLUSTER_BUCKETS = 48


class RedisCheckpointBackend(CheckpointBackend):
    """Stores Dynamiq checkpoints in Redis: deduplicated, compressed, indexed, safe to share between pods.

    One instance is thread-safe and serves every flow of a process on one connection pool; its async methods use
    ``redis.asyncio`` natively, with one client per event loop.

    Example::

        backend = RedisCheckpointBackend(url="redis://redis:6379/0", prefix="billing", ttl_seconds=7 * 86400)
        flow = Flow(nodes=[...], checkpoint=CheckpointConfig(enabled=True, backend=backend))
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = Field(default="RedisCheckpoint")
    url: str | None = Field(default=None, description="redis://, rediss://, unix://, redis+sentinel:// or "
                            "redis+cluster:// url (see docs/sentinel.md, docs/cluster.md); default "
                            "$DYNAMIQ_REDIS_CKPT_URL or localhost")
    prefix: str = Field(default=config.DEFAULT_PREFIX, description="Namespace of every key (per app or tenant)")
    ttl_seconds: float | None = Field(default=None, description="Expire checkpoints this long after their last save")
    socket_timeout: float = Field(default=2.0, description="Seconds to wait for a Redis reply (async: per request)")
    socket_connect_timeout: float = Field(default=2.0, description="Seconds to wait for a connection")
    max_connections: int = Field(default=32, description="Connection pool size (per event loop for async calls)")
    max_checkpoint_bytes: int = Field(default=64 << 20, description="Largest encoded checkpoint accepted")
    retries: int = Field(default=3, description="Retries of a request that could not reach Redis")
    retry_backoff_seconds: float = Field(default=0.05, description="First retry delay; doubles per retry (cap 1 s)")
    client: Any = Field(default=None, exclude=True, description="An existing redis.Redis (or "
                    "redis.cluster.RedisCluster) to use instead of url")
    leases: bool = Field(default=True, description="Hold a fenced run lease from a run's first save to its end")
    lease_ttl_seconds: float = Field(default=15.0, description="A lease runs out this long after its last renewal")
    heartbeat_interval_seconds: float | None = Field(default=None, description="Renewal period; default ttl / 3")
    metrics: Any = Field(default=None, exclude=True, description="Prometheus metrics: True (prometheus-client's "
                         "default registry), a CollectorRegistry, or None (off, no cost)")  # fmt: skip
    metrics_flow_label: bool = Field(default=False, description="Label save/load metrics with the flow id")
    allow_eviction: bool = Field(default=False, description="Accept a Redis whose maxmemory-policy may evict our keys "
                                 "(one warning instead of ConfigurationError; see docs/production.md)")
    tls_ca_file: str | None = Field(default=None, description="rediss://: CA file (PEM) the server's certificate must "
                                    "chain to; default $DYNAMIQ_REDIS_CKPT_TLS_CA, else the system's CAs")
    tls_cert_file: str | None = Field(default=None, description="rediss://: client certificate (PEM) for servers that "
                                      "require one; default $DYNAMIQ_REDIS_CKPT_TLS_CERT")
    tls_key_file: str | None = Field(default=None, description="rediss://: the client certificate's private key "
                                     "(PEM); default $DYNAMIQ_REDIS_CKPT_TLS_KEY")
    encryption_keys: Any = Field(default=None, exclude=True, repr=False, description="Encryption at rest "
                                 "(docs/encryption.md): a callable returning ({key id: 32-byte key}, current key id); "
                                 "None: $DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS if set, else off; False: off")  # fmt: skip
    tls_check_hostname: bool = Field(default=True, description="rediss://: the server's certificate must be valid "
                                     "for the url's host")
    sentinels: list[tuple[str, int]] | None = Field(default=None, description="Sentinel: (host, port) of each "
                                                    "sentinel (instead of, or overriding, a redis+sentinel:// url's)")
    sentinel_service: str | None = Field(default=None, description="Sentinel: the monitored primary's name")
    sentinel_password: str | None = Field(default=None, exclude=True, description="Sentinel: the sentinels' own "
                                          "password, when they require one")
    replica_acks: int = Field(default=0, description="WAIT until this many replicas have every request's writes "
                              "before it counts as done (0: do not wait; see docs/sentinel.md)")
    flow_buckets: int | None = Field(default_factory=config.env_buckets,
                                     description="How many slots a flow's runs are spread over (a "
                                     "run stays in one; lists merge them): default $DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS, "
                                     "else 1, and 48 on a Redis Cluster. Fixed per namespace (docs/cluster.md)")
    replica_ack_timeout_seconds: float = Field(default=0.5, description="How long one WAIT for replica_acks lasts "
                                               "before the request is retried")
    adopt_flow_buckets: bool = Field(default=False, description="Use the flow_buckets the namespace recorded (one "
                                     "when none is), never refused and never recording one: for operator tools")

    _owns_client: bool = PrivateAttr(default=True)
    _namespace: str = PrivateAttr()
    _core: StoreCore = PrivateAttr()
    _sync: SyncDriver = PrivateAttr()
    _async: AsyncDriver = PrivateAttr()
    _guard: LeaseGuard = PrivateAttr()
    _observer: Any = PrivateAttr(default=None)

    @field_validator("ttl_seconds")
    @classmethod
    def _positive_ttl(cls, value: float | None) -> float | None:
        if value is not None and value <= 0:
            raise ConfigurationError(f"ttl_seconds must be positive or None, got {value}")
        return value

    @model_validator(mode="after")
    def _heartbeat_fits_ttl(self) -> "RedisCheckpointBackend":
        if self.heartbeat_interval_seconds is None:
            self.heartbeat_interval_seconds = self.lease_ttl_seconds / 3
        if self.heartbeat_interval_seconds <= 0 or self.lease_ttl_seconds < 2 * self.heartbeat_interval_seconds:
            raise ConfigurationError(
                f"lease_ttl_seconds ({self.lease_ttl_seconds}) must be at least twice heartbeat_interval_seconds "
                f"({self.heartbeat_interval_seconds}), and both positive"
            )
        return self

    @field_validator("flow_buckets")
    @classmethod
    def _bucket_count(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 1024:
            raise ConfigurationError(f"flow_buckets must be between 1 and 1024, got {value}")
        return value

    @field_validator("retries", "max_connections", "max_checkpoint_bytes", "replica_acks")
    @classmethod
    def _non_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ConfigurationError(f"must not be negative, got {value}")
        return value

    def model_post_init(self, __context: Any) -> None:
        policy = RetryPolicy(self.retries, self.retry_backoff_seconds)
        options = config.client_options(self.socket_timeout, self.socket_connect_timeout, self.max_connections)
        if self.client is not None:
            if self._tls_files:
                raise ConfigurationError("tls_* options apply to a url; configure TLS on the client passed in instead")
            config.check_client(self.client)
            self._owns_client = False
            sync_client = self.client
            self._namespace = f"client-{id(self.client)}|{self.prefix}"
            timeout = config.connection_kwargs(sync_client).get("socket_timeout")
            connect_timeout = config.connection_kwargs(sync_client).get("socket_connect_timeout")
            make_async = lambda: config.async_twin(sync_client)  # noqa: E731
        elif self.sentinels or self.sentinel_service or config.is_sentinel(self.url or config.resolve_url(None)):
            if self._tls_files:
                raise ConfigurationError("TLS to Sentinel-managed servers is not supported yet")
            url = self.url or config.resolve_url(None)
            url = url if self.url or config.is_sentinel(url) else None  # options alone: not the localhost default
            conf = config.sentinel_config(url, self.sentinels, self.sentinel_service, self.sentinel_password)
            self._namespace = f"{conf.url}|{self.prefix}"
            sync_client, make_async = config.sentinel_clients(conf, options)
            timeout, connect_timeout = self.socket_timeout, self.socket_connect_timeout
        elif config.is_cluster_url(url := config.resolve_url(self.url)):
            self._namespace = f"{config.mask_url(url)}|{self.prefix}"
            if self._tls_files and not url.startswith("rediss+"):
                raise ConfigurationError(f"tls_* options need a rediss+cluster:// url, got {config.mask_url(url)!r}")
            tls_url = "rediss://" if url.startswith("rediss+") else "redis://"
            options.update(config.tls_options(tls_url, self.tls_ca_file, self.tls_cert_file, self.tls_key_file,
                                              self.tls_check_hostname))  # fmt: skip
            make_sync, make_async = config.cluster_clients(url, options)
            sync_client = None  # built at first use (see SyncDriver.client)
            timeout, connect_timeout = self.socket_timeout, self.socket_connect_timeout
        else:
            self._namespace = f"{url}|{self.prefix}"
            tls = config.tls_options(url, self.tls_ca_file, self.tls_cert_file, self.tls_key_file,
                                     self.tls_check_hostname)  # fmt: skip
            options.update(tls)
            sync_client = redis.Redis.from_url(url, **options)
            timeout, connect_timeout = self.socket_timeout, self.socket_connect_timeout
            async_options = {**options, "socket_timeout": None}  # the driver bounds each request (see AsyncDriver)
            make_async = lambda: redis.asyncio.Redis.from_url(url, **async_options)  # noqa: E731
        ttl_ms = int(self.ttl_seconds * 1000) if self.ttl_seconds else 0
        self._sync = SyncDriver(sync_client, policy, make_sync if sync_client is None else None)
        self._async = AsyncDriver(make_async, policy, timeout, connect_timeout)
        buckets = self.flow_buckets or (DEFAULT_CLUSTER_BUCKETS if self._sync.cluster else 1)
        self._core = StoreCore(Keys(self.prefix), ttl_ms=ttl_ms, max_checkpoint_bytes=self.max_checkpoint_bytes,
                               buckets=buckets)  # fmt: skip
        self._core.sealer = crypto.sealer_for(self.encryption_keys)
        if self.replica_acks:
            wait_ms = max(1, int(self.replica_ack_timeout_seconds * 1000))
            if timeout is not None and self.replica_ack_timeout_seconds >= timeout:
                raise ConfigurationError(f"replica_ack_timeout_seconds ({self.replica_ack_timeout_seconds}) must be "
                                         f"shorter than socket_timeout ({timeout}): WAIT is part of the request")
            for driver in (self._sync, self._async):
                driver.replica_acks, driver.replica_ack_timeout_ms = self.replica_acks, wait_ms
        kwargs = options if sync_client is None else config.connection_kwargs(sync_client)
        eviction = None
        if "server" not in kwargs:  # fakeredis (an in-process server) evicts nothing
            eviction = EvictionCheck(allow=self.allow_eviction, ttl=bool(self.ttl_seconds), leases=self.leases)
        adopt = self._adopt_buckets if self.adopt_flow_buckets else None
        checks = Preflight(BucketsCheck(self._core.keys, buckets, adopt), eviction)
        self._sync.preflight = self._async.preflight = checks
        if "ssl_cert_reqs" in kwargs:
            # a plain port times out a TLS client, and a server that requires client certificates may just close
            # the connection: say what to check
            hint = "TLS: is the port a TLS port? (a plain one leaves the handshake to time out)"
            if not kwargs.get("ssl_certfile"):
                hint += "; no client certificate is set: if the server requires one (tls-auth-clients yes), set " \
                        "tls_cert_file and tls_key_file"
            self._sync.hint = self._async.hint = hint
        lease_store = LeaseStore(self._core.keys, self._sync)
        interval = self.heartbeat_interval_seconds or self.lease_ttl_seconds / 3  # set before the "after" validator
        lease_policy = LeasePolicy(self.lease_ttl_seconds, interval, lease_store)
        self._guard = LeaseGuard(self._core, self._namespace, lease_policy)
        if self.metrics is not None and self.metrics is not False:
            self._observe_with(self.metrics)

    @property
    def _tls_files(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file or self.tls_key_file)

    def _adopt_buckets(self, buckets: int) -> None:
        self._core.buckets = buckets

    def _observe_with(self, metrics: Any) -> None:
        from dynamiq_redis_ckpt.metrics import StoreMetrics  # imported only when metrics are on

        if isinstance(metrics, StoreMetrics):
            observer = metrics
        else:
            observer = StoreMetrics.on(None if metrics is True else metrics, flow_label=self.metrics_flow_label)
        self._observer = self._sync.observer = self._async.observer = self._core.observer = observer
        policy = self._guard.policy
        self._guard.policy = LeasePolicy(policy.ttl, policy.interval, policy.store, observer)

    def _cleanup(self, flow_id: str, keep_count: int, max_ttl_minutes: int | None):
        return self._core.cleanup_by_flow(flow_id, keep_count, max_ttl_minutes, self.max_cleanup_results)

    def _op(self, operation: str, op, flow: str | None = None):
        """``op``, reporting its duration (and a save's outcome and sizes) when metrics are on."""
        if self._observer is None:
            return op
        return observed(self._observer, operation, op, flow if self.metrics_flow_label else None)

    @property
    def to_dict_exclude_params(self) -> dict[str, bool]:
        return {"client": True, "encryption_keys": True}

    def to_dict(self, include_secure_params: bool = False, for_tracing: bool = False, **kwargs) -> dict[str, Any]:
        """Serializable settings; the url's password is always masked."""
        data = super().to_dict(include_secure_params=include_secure_params, **kwargs)
        data["url"] = config.mask_url(data.get("url"))
        return data

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            if name == "sentinel_password" and value:
                value = "***"
            yield name, config.mask_url(value) if name == "url" else value

    @property
    def redis(self) -> redis.Redis:
        """The synchronous client this backend uses."""
        return self._sync.client

    @property
    def store(self) -> StoreCore:
        """The checkpoint operations of this backend's namespace (run them with :meth:`execute`)."""
        return self._core

    @property
    def lease_policy(self) -> LeasePolicy:
        """How this backend's runs hold their leases (ttl, heartbeat interval, where they live)."""
        return self._guard.policy

    @property
    def namespace(self) -> str:
        """Which Redis and prefix this backend stores in (backends with equal namespaces share leases)."""
        return self._namespace

    def execute(self, op):
        """Run a store operation (a generator of :mod:`dynamiq_redis_ckpt.store` or :mod:`~dynamiq_redis_ckpt.leases`)
        with this backend's retries and typed errors; the recovery worker's way to Redis."""
        return self._sync.run(op)

    async def execute_async(self, op):
        """Async :meth:`execute`, on this event loop's client."""
        return await self._async.run(op)

    def encryption_key_ids(self) -> dict[str, int]:
        """How many stored packs each encryption key id sealed ('' = stored unencrypted); retire a key from the
        provider only once it is at zero (see docs/encryption.md)."""
        return self.execute(self._core.encryption_key_ids())

    def ping(self) -> bool:
        """Check that Redis answers (with the configured retries); raises StoreUnavailableError when it does not.

        Dynamiq logs and swallows failed saves, so a service can call this at start-up to fail loudly instead.
        """
        return self._sync.run(self._core.ping())

    def close(self) -> None:
        """Release this backend's connection pool (not a client that was passed in). Safe to call twice."""
        client = self._sync.built_client
        if self._owns_client and client is not None:
            client.close()
            for sentinel in config.sentinel_manager_clients(client):
                sentinel.close()

    async def aclose(self) -> None:
        """Release the connections of the running event loop's client."""
        await self._async.aclose()

    # ---- sync contract ----------------------------------------------------------------------------------------

    def _save(self, checkpoint: FlowCheckpoint, must_exist: bool, caller):
        """The save operation (shared by the sync and async paths): a running flow's is fenced by its run's lease,
        any other caller's leaves leases alone (see :mod:`dynamiq_redis_ckpt.guard`)."""
        fenced = self.leases and saved_by_running_flow(caller)
        return self._op("save", self._guard.save(checkpoint, must_exist=must_exist, fenced=fenced), checkpoint.flow_id)

    def save(self, checkpoint: FlowCheckpoint) -> str:
        """Save (insert or overwrite) a checkpoint; returns its id. The checkpoint object is not modified.

        A running Flow's save is fenced by its run's lease and raises LeaseLostError (a BaseException) when the run
        was taken over; a plain call (a script, an operator) never touches leases.
        """
        return self._sync.run(self._save(checkpoint, False, sys._getframe(1))).checkpoint_id

    def load(self, checkpoint_id: str) -> FlowCheckpoint | None:
        """Load a checkpoint by id; None when it is not stored (or has expired)."""
        return self._sync.run(self._op("load", self._core.load(checkpoint_id)))

    def update(self, checkpoint: FlowCheckpoint) -> None:
        """Overwrite a stored checkpoint; raises CheckpointNotFoundError (a FileNotFoundError) when absent."""
        self._sync.run(self._save(checkpoint, True, sys._getframe(1)))

    def delete(self, checkpoint_id: str) -> bool:
        """Delete a checkpoint; True when it existed."""
        return self._sync.run(self._op("delete", self._core.delete(checkpoint_id)))

    def get_list_by_flow(
        self,
        flow_id: str,
        *,
        status: CheckpointStatus | None = None,
        limit: int | None = None,
        before: datetime | None = None,
    ) -> list[FlowCheckpoint]:
        """Checkpoints of a flow, newest first (``limit=None`` for all)."""
        return self._sync.run(self._op("list", self._core.list_by_flow(flow_id, status, limit, before), flow_id))

    def get_latest_by_flow(self, flow_id: str, *, status: CheckpointStatus | None = None) -> FlowCheckpoint | None:
        """The newest checkpoint of a flow; CheckpointCorruptedError when that one is damaged (resuming from an older
        one would run nodes again: pick one from ``get_list_by_flow`` deliberately)."""
        op = self._core.list_by_flow(flow_id, status, 1, None, newest=True)
        found = self._sync.run(self._op("list", op, flow_id))
        return found[0] if found else None

    def get_list_by_run(self, run_id: str, *, limit: int | None = None) -> list[FlowCheckpoint]:
        """Checkpoints whose run_id or wf_run_id is ``run_id``, across flows, newest first."""
        return self._sync.run(self._op("list", self._core.list_by_run(run_id, limit)))

    def get_list_by_flow_and_run(
        self,
        flow_id: str,
        run_id: str,
        *,
        wf_run_id: str | None = None,
        status: CheckpointStatus | None = None,
        limit: int | None = None,
    ) -> list[FlowCheckpoint]:
        """Checkpoints of a flow matching ``run_id`` or ``wf_run_id`` (in either field), newest first."""
        op = self._core.list_by_flow_and_run(flow_id, run_id, wf_run_id, status, limit)
        return self._sync.run(self._op("list", op, flow_id))

    def get_latest_by_flow_and_run(
        self,
        flow_id: str,
        run_id: str,
        *,
        wf_run_id: str | None = None,
        status: CheckpointStatus | None = None,
    ) -> FlowCheckpoint | None:
        """The newest checkpoint of a flow's run; CheckpointCorruptedError when that one is damaged."""
        op = self._core.list_by_flow_and_run(flow_id, run_id, wf_run_id, status, 1, newest=True)
        found = self._sync.run(self._op("list", op, flow_id))
        return found[0] if found else None

    def cleanup_by_flow(self, flow_id: str, *, keep_count: int = 10, max_ttl_minutes: int | None = None) -> int:
        """Dynamiq's retention rule; never deletes the head of a chain that is active, paused or pending input."""
        return self._sync.run(
            self._op("cleanup", self._cleanup(flow_id, keep_count, max_ttl_minutes), flow_id)
        )

    def clear(self) -> None:
        """Delete every key of this backend's namespace (``prefix``), and nothing else."""
        self._sync.run(self._core.clear())

    # ---- async contract ---------------------------------------------------------------------------------------

    async def save_async(self, checkpoint: FlowCheckpoint) -> str:
        """Async :meth:`save`."""
        return (await self._async.run(self._save(checkpoint, False, sys._getframe(1)))).checkpoint_id

    async def load_async(self, checkpoint_id: str) -> FlowCheckpoint | None:
        """Async :meth:`load`."""
        return await self._async.run(self._op("load", self._core.load(checkpoint_id)))

    async def update_async(self, checkpoint: FlowCheckpoint) -> None:
        """Async :meth:`update`."""
        await self._async.run(self._save(checkpoint, True, sys._getframe(1)))

    async def delete_async(self, checkpoint_id: str) -> bool:
        """Async :meth:`delete`."""
        return await self._async.run(self._op("delete", self._core.delete(checkpoint_id)))

    async def get_list_by_flow_async(
        self,
        flow_id: str,
        *,
        status: CheckpointStatus | None = None,
        limit: int | None = None,
        before: datetime | None = None,
    ) -> list[FlowCheckpoint]:
        """Async :meth:`get_list_by_flow`."""
        return await self._async.run(self._op("list", self._core.list_by_flow(flow_id, status, limit, before), flow_id))

    async def get_latest_by_flow_async(
        self, flow_id: str, *, status: CheckpointStatus | None = None
    ) -> FlowCheckpoint | None:
        """Async :meth:`get_latest_by_flow`."""
        op = self._core.list_by_flow(flow_id, status, 1, None, newest=True)
        found = await self._async.run(self._op("list", op, flow_id))
        return found[0] if found else None

    async def get_list_by_run_async(self, run_id: str, *, limit: int | None = None) -> list[FlowCheckpoint]:
        """Async :meth:`get_list_by_run`."""
        return await self._async.run(self._op("list", self._core.list_by_run(run_id, limit)))

    async def get_list_by_flow_and_run_async(
        self,
        flow_id: str,
        run_id: str,
        *,
        wf_run_id: str | None = None,
        status: CheckpointStatus | None = None,
        limit: int | None = None,
    ) -> list[FlowCheckpoint]:
        """Async :meth:`get_list_by_flow_and_run`."""
        op = self._core.list_by_flow_and_run(flow_id, run_id, wf_run_id, status, limit)
        return await self._async.run(self._op("list", op, flow_id))

    async def get_latest_by_flow_and_run_async(
        self,
        flow_id: str,
        run_id: str,
        *,
        wf_run_id: str | None = None,
        status: CheckpointStatus | None = None,
    ) -> FlowCheckpoint | None:
        """Async :meth:`get_latest_by_flow_and_run`."""
        op = self._core.list_by_flow_and_run(flow_id, run_id, wf_run_id, status, 1, newest=True)
        found = await self._async.run(self._op("list", op, flow_id))
        return found[0] if found else None

    async def get_chain_async(self, checkpoint_id: str) -> list[FlowCheckpoint]:
        """Async :meth:`get_chain`."""
        chain: list[FlowCheckpoint] = []
        current: str | None = checkpoint_id
        seen: set[str] = set()
        while current and current not in seen:
            seen.add(current)
            found = await self.load_async(current)
            if not found:
                break
            chain.append(found)
            current = found.parent_checkpoint_id
        return chain

    async def cleanup_by_flow_async(
        self, flow_id: str, *, keep_count: int = 10, max_ttl_minutes: int | None = None
    ) -> int:
        """Async :meth:`cleanup_by_flow`."""
        return await self._async.run(
            self._op("cleanup", self._cleanup(flow_id, keep_count, max_ttl_minutes), flow_id)
        )

    async def clear_async(self) -> None:
        """Async :meth:`clear`."""
        await self._async.run(self._core.clear())
