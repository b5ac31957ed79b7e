"""Connection options and the clients built from them."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio

from dynamiq_redis_ckpt.errors import ConfigurationError

URL_ENV = "DYNAMIQ_REDIS_CKPT_URL"
TLS_CA_ENV = "DYNAMIQ_REDIS_CKPT_TLS_CA"
TLS_CERT_ENV = "DYNAMIQ_REDIS_CKPT_TLS_CERT"
TLS_KEY_ENV = "DYNAMIQ_REDIS_CKPT_TLS_KEY"
DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_PREFIX = "dynamiq:ckpt"


def resolve_url(url: str | None) -> str:
    """The url given, else ``$DYNAMIQ_REDIS_CKPT_URL``, else ``redis://localhost:6379/0``."""
    url = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(f"url must start with redis://, rediss:// or unix://, got {mask_url(url)!r}")
    return url


_SECRET_PARAMS = {"password", "ssl_password"}  # redis-py reads a password from the query string too


def mask_url(url: str | None) -> str | None:
    """The url with any password (in its user part or its query string) replaced by ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query, True)],
                      safe="*")  # fmt: skip
    netloc = parts.netloc
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        netloc = f"{parts.username or ''}:***@{host}"
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
    pool = getattr(client, "connection_pool", None)
    if pool is not None and pool.connection_kwargs.get("decode_responses"):
        raise ConfigurationError("the redis client must be created with decode_responses=False")


def async_twin(client: Any) -> Any:
    """An asyncio client talking to the same server as a given sync client (fakeredis included), without its socket
    timeout: the async driver bounds each request with that timeout instead."""
    kwargs = dict(client.connection_pool.connection_kwargs)
    kwargs["socket_timeout"] = None
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
