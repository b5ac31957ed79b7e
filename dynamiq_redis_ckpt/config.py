"""Connection options and the clients built from them."""

from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio

from dynamiq_redis_ckpt import cluster
from dynamiq_redis_ckpt.errors import ConfigurationError

URL_ENV = "DYNAMIQ_REDIS_CKPT_URL"
TLS_CA_ENV = "DYNAMIQ_REDIS_CKPT_TLS_CA"
TLS_CERT_ENV = "DYNAMIQ_REDIS_CKPT_TLS_CERT"
TLS_KEY_ENV = "DYNAMIQ_REDIS_CKPT_TLS_KEY"
BUCKETS_ENV = "DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS"
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "dynamiq:ckpt"


def env_buckets() -> int | None:
    """``$DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS`` as an int (None when unset): the default of ``flow_buckets``."""
    value = os.environ.get(BUCKETS_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigurationError(f"${BUCKETS_ENV} must be a whole number, got {value!r}") from None


def resolve_url(url: str | None) -> str:
    """The url given, else ``$DYNAMIQ_REDIS_CKPT_URL``, else ``redis://localhost:6379/0``."""
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if urlsplit(url).scheme not in ("redis", "rediss", "unix", SENTINEL_SCHEME, *CLUSTER_SCHEMES):
        raise ConfigurationError(f"url must start with redis://, rediss://, unix://, {SENTINEL_SCHEME}:// or "
                                 f"{CLUSTER_SCHEMES[0]}://, got {mask_url(url)!r}")  # fmt: skip
    return url


SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SECRET_PARAMS = {"password", "ssl_password", "sentinel_password"}  # redis-py reads a password from the query too


def _split_netloc(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, hosts) of a url's netloc; hosts may be a comma-separated list (Sentinel)."""
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    username, colon, password = userinfo.partition(":")
    return (unquote(username) or None), (unquote(password) if colon else None), hosts


def is_sentinel(url: str | None) -> bool:
    return bool(url) and urlsplit(url).scheme == SENTINEL_SCHEME


def _addresses(hosts: str, default_port: int, what: str, url: str) -> list[tuple[str, int]]:
    """``host1:port1,host2,...`` as (host, port) pairs (IPv6 hosts in brackets); ConfigurationError naming ``what``."""
    found = []
    for item in filter(None, hosts.split(",")):
        bare = ":" not in item or (item.startswith("[") and item.endswith("]"))  # no port: "host", "[::1]"
        host, _, port = (item, "", str(default_port)) if bare else item.rpartition(":")
        try:
            found.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigurationError(f"bad {what} address {item!r} in {mask_url(url)!r}") from None
    return found


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_clients(url: str, options: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Makers of a ``redis.cluster.RedisCluster`` and of its asyncio twin (one per event loop) from
    ``redis+cluster://[[user]:password@]host1:port1[,host2:port2,...]`` (``rediss+cluster://`` for TLS, with the
    options of :func:`tls_options`). The hosts are startup nodes: any one that answers tells the clients the rest."""
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncCluster
    from redis.cluster import ClusterNode, RedisCluster

    parts = urlsplit(url)
    username, password, hosts = _split_netloc(parts.netloc)
    if parts.path.strip("/") not in ("", "0"):
        raise ConfigurationError(f"a Redis Cluster has only database 0, got {parts.path!r} in {mask_url(url)!r}")
    nodes = _addresses(hosts, 6379, "cluster node", url)
    if not nodes:
        raise ConfigurationError(f"no cluster node in {mask_url(url)!r} (redis+cluster://host:port[,host:port])")
    password = password or dict(parse_qsl(parts.query)).get("password")
    options = {**options, "username": username, "password": password}
    if parts.scheme == "rediss+cluster":
        options["ssl"] = True
    def make_sync() -> Any:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], **options)

    async_options = {**options, "socket_timeout": None}  # the driver bounds each request (see AsyncDriver)
    async_options.pop("health_check_interval", None)

    def make_async() -> Any:
        return AsyncCluster(startup_nodes=[AsyncNode(h, p) for h, p in nodes], **async_options)

    return make_sync, make_async


def connection_kwargs(client: Any) -> dict[str, Any]:
    """The keyword arguments a client opens its connections with (a cluster client: those of each node)."""
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        return pool.connection_kwargs
    manager = getattr(client, "nodes_manager", None)
    return dict(getattr(manager, "connection_kwargs", {}) or {})


class SentinelConfig(NamedTuple):
    """Where the sentinels are and what they monitor: from a ``redis+sentinel://`` url and/or options."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None  # the primary's (and replicas') password
    sentinel_password: str | None  # the sentinels' own password, when they require one

    @property
    def url(self) -> str:
        """The canonical url (without passwords): names the namespace and shows in logs."""
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"{SENTINEL_SCHEME}://{hosts}/{self.service}/{self.db}"


def sentinel_config(url: str | None, sentinels: list | None, service: str | None,
                    sentinel_password: str | None) -> SentinelConfig:
    """``redis+sentinel://[[user]:password@]host1:port1,host2:port2/service_name[/db][?sentinel_password=...]``;
    the ``sentinels``, ``sentinel_service`` and ``sentinel_password`` options fill in (or override) its parts."""
    hosts: list[tuple[str, int]] = []
    username = password = None
    db, url_service = 0, None
    if url:
        parts = urlsplit(url)
        if parts.scheme != SENTINEL_SCHEME:
            raise ConfigurationError(f"sentinel options need a {SENTINEL_SCHEME}:// url or none, got {mask_url(url)!r}")
        username, password, netloc_hosts = _split_netloc(parts.netloc)
        hosts = _addresses(netloc_hosts, 26379, "sentinel", url)
        path = [unquote(p) for p in parts.path.split("/") if p]
        if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ConfigurationError(f"{SENTINEL_SCHEME} url path must be /service_name[/db], got {parts.path!r}")
        url_service = path[0] if path else None
        db = int(path[1]) if len(path) == 2 else 0
        query = dict(parse_qsl(parts.query))
        sentinel_password = sentinel_password or query.get("sentinel_password")
        password = password or query.get("password")
    if sentinels:
        try:
            hosts = [(str(host), int(port)) for host, port in sentinels]
        except (TypeError, ValueError):
            raise ConfigurationError(f"sentinels must be (host, port) pairs, got {sentinels!r}") from None
    service = service or url_service
    if not hosts:
        raise ConfigurationError("Sentinel: no sentinel addresses (give them in the url or as sentinels=[(host, port)])")
    if not service:
        raise ConfigurationError("Sentinel: no service name (the url's path, /mymaster/0, or sentinel_service)")
    return SentinelConfig(hosts, service, db, username, password, sentinel_password)


def _majority(answers: list, service: str, errors: list) -> tuple[str, int]:
    """The primary most sentinels name (ties: the first named); MasterNotFoundError when none names one."""
    from redis.sentinel import MasterNotFoundError

    named = [(host.decode() if isinstance(host, bytes) else host, int(port)) for host, port in filter(None, answers)]
    if not named:
        detail = f" : {', '.join(errors)}" if errors else ""
        raise MasterNotFoundError(f"No master found for {service!r}{detail}")
    return Counter(named).most_common(1)[0][0]


@functools.cache
def _sentinel_classes() -> tuple[type, type]:
    """``Sentinel`` (sync and asyncio) that find the primary with ``SENTINEL GET-MASTER-ADDR-BY-NAME`` on every
    sentinel and take the answer most of them give.

    redis-py asks ``SENTINEL MASTERS`` of the sentinels in turn and takes the first usable answer. During a failover
    that answer lags: the sentinel running the failover names the promoted replica in GET-MASTER-ADDR-BY-NAME as soon
    as it is promoted, but keeps the old primary in SENTINEL MASTERS until the failover ends (~1 s later here), and
    redis-py asks that sentinel first once it has answered. Asking all of them costs one round trip per sentinel, on
    (re)connect only."""
    import redis.asyncio.sentinel
    import redis.sentinel
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    class MajoritySentinel(redis.sentinel.Sentinel):
        def discover_master(self, service_name):
            answers, errors = [], []
            for sentinel in self.sentinels:
                try:
                    answers.append(sentinel.sentinel_get_master_addr_by_name(service_name))
                except (RedisConnectionError, RedisTimeoutError) as e:
                    errors.append(f"{sentinel} - {e!r}")
            return _majority(answers, service_name, errors)

    class AsyncMajoritySentinel(redis.asyncio.sentinel.Sentinel):
        async def discover_master(self, service_name):
            answers, errors = [], []
            for sentinel in self.sentinels:
                try:
                    answers.append(await sentinel.sentinel_get_master_addr_by_name(service_name))
                except (RedisConnectionError, RedisTimeoutError) as e:
                    errors.append(f"{sentinel} - {e!r}")
            return _majority(answers, service_name, errors)

    return MajoritySentinel, AsyncMajoritySentinel


def sentinel_clients(conf: SentinelConfig, options: dict[str, Any]) -> tuple[redis.Redis, Callable[[], Any]]:
    """The primary's sync client and a maker of its asyncio twin (one per event loop), both from the sentinels' answer
    (see :func:`_sentinel_classes`) and both rediscovering the primary on reconnect. The sentinels themselves are asked
    with the same socket timeouts (the async client too: a stalled sentinel must not hold a request until its
    deadline)."""
    sync_class, async_class = _sentinel_classes()
    auth = {"username": conf.username, "password": conf.password, "db": conf.db}
    sentinel_kwargs = {"socket_timeout": options["socket_timeout"],
                       "socket_connect_timeout": options["socket_connect_timeout"],
                       "password": conf.sentinel_password}  # fmt: skip
    sync = sync_class(conf.sentinels, sentinel_kwargs=sentinel_kwargs)
    client = sync.master_for(conf.service, **options, **auth)
    async_options = {**options, "socket_timeout": None}  # the driver bounds each request (see AsyncDriver)

    def make_async() -> Any:
        manager = async_class(conf.sentinels, sentinel_kwargs=sentinel_kwargs)
        return manager.master_for(conf.service, **async_options, **auth)

    return client, make_async


def sentinel_manager_clients(client: Any) -> list:
    """The clients a Sentinel-managed client keeps to its sentinels (none for another client)."""
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    return list(getattr(manager, "sentinels", []))


def mask_url(url: str | None) -> str | None:
    """The url with any password (in its user part or its query string) replaced by ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, True)],
                      safe="*")  # fmt: skip
    netloc = parts.netloc
    username, password, hosts = _split_netloc(netloc)  # not parts.hostname: a Sentinel url lists several hosts
    if password is not None:
        netloc = f"{netloc.rpartition('@')[0].partition(':')[0]}:***@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def client_options(socket_timeout: float, socket_connect_timeout: float, max_connections: int) -> dict[str, Any]:
    """Keyword arguments for ``Redis.from_url`` shared by the sync and async clients."""
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "max_connections": max_connections,
        "decode_responses": False,
        "health_check_interval": 30,
    }


def tls_options(url: str, ca_file: str | None, cert_file: str | None, key_file: str | None,
                check_hostname: bool) -> dict[str, Any]:
    """Keyword arguments for a ``rediss://`` client (none for other urls): verify the server's certificate against
    ``ca_file`` (else the system's CAs) and its name against the url's host, and present a client certificate when
    one is given. Files not given fall back to ``$DYNAMIQ_REDIS_CKPT_TLS_CA``, ``_TLS_CERT`` and ``_TLS_KEY``."""
    if urlsplit(url).scheme != "rediss":
        if ca_file or cert_file or key_file:
            raise ConfigurationError(f"tls_* options need a rediss:// url, got {mask_url(url)!r}")
        return {}
    ca_file = ca_file or os.environ.get(TLS_CA_ENV) or None
    cert_file = cert_file or os.environ.get(TLS_CERT_ENV) or None
    key_file = key_file or os.environ.get(TLS_KEY_ENV) or None
    if key_file and not cert_file:
        raise ConfigurationError("tls_key_file is set without tls_cert_file: give the client certificate too")
    for option, path in (("tls_ca_file", ca_file), ("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if path and not os.path.isfile(path):
            raise ConfigurationError(f"{option} {path!r} is not a readable file")
    return {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": check_hostname,
        "ssl_ca_certs": ca_file,
        "ssl_certfile": cert_file,
        "ssl_keyfile": key_file,  # None with a certificate: the key is in the certificate's file
    }


def check_client(client: Any) -> None:
    """Refuse a client that decodes replies: checkpoints are binary."""
    if connection_kwargs(client).get("decode_responses"):
        raise ConfigurationError("the redis client must be created with decode_responses=False")


def async_twin(client: Any) -> Any:
    """An asyncio client talking to the same server as a given sync client (fakeredis included), without its socket
    timeout: the async driver bounds each request with that timeout instead."""
    if cluster.is_cluster(client):
        return _async_cluster_twin(client)
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["socket_timeout"] = None
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    if manager is not None:  # redis.sentinel's master_for(): the same sentinels, asked from asyncio
        AsyncSentinel = _sentinel_classes()[1]

        if not client.connection_pool.is_master:
            raise ConfigurationError("a Sentinel client for a replica (slave_for) cannot store checkpoints")
        sentinels = [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
                     for s in manager.sentinels]  # fmt: skip
        for sentinel_only in ("connection_pool", "connection_class", "retry", "redis_connect_func",
                              "credential_provider", "host", "port"):  # fmt: skip
            kwargs.pop(sentinel_only, None)
        async_manager = AsyncSentinel(sentinels, sentinel_kwargs=dict(manager.sentinel_kwargs))
        return async_manager.master_for(client.connection_pool.service_name,
                                        max_connections=client.connection_pool.max_connections, **kwargs)
    if "server" in kwargs:  # fakeredis: share the in-process server
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=kwargs["server"])
    classes = {
        redis.SSLConnection: redis.asyncio.SSLConnection,
        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
    }
    connection_class = classes.get(client.connection_pool.connection_class, redis.asyncio.Connection)
    for sync_only in ("retry", "redis_connect_func", "credential_provider"):
        kwargs.pop(sync_only, None)
    for tls_sync_only in ("ssl_ca_path", "ssl_password", "ssl_validate_ocsp", "ssl_validate_ocsp_stapled",
                          "ssl_ocsp_context", "ssl_ocsp_expected_cert"):  # fmt: skip
        if kwargs.pop(tls_sync_only, None):
            raise ConfigurationError(f"the client's {tls_sync_only} has no redis.asyncio equivalent: the async "
                                     f"methods could not connect the same way")  # fmt: skip
    pool = redis.asyncio.ConnectionPool(
        connection_class=connection_class, max_connections=client.connection_pool.max_connections, **kwargs
    )
    return redis.asyncio.Redis(connection_pool=pool)


def _async_cluster_twin(client: Any) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    kwargs = dict(client.nodes_manager.connection_kwargs)
    kwargs["socket_timeout"] = None
    ssl = kwargs.pop("connection_class", None) is redis.SSLConnection
    for sync_only in ("retry", "redis_connect_func", "credential_provider", "host", "port", "health_check_interval",
                      "connection_pool", "ssl_ca_path", "ssl_password", "ssl_validate_ocsp"):  # fmt: skip
        kwargs.pop(sync_only, None)
    nodes = [ClusterNode(node.host, node.port) for node in client.get_nodes()]
    return RedisCluster(startup_nodes=nodes, ssl=ssl, **kwargs)
