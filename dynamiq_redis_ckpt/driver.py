"""Run store operations on a real client: ``redis.Redis`` (sync) or ``redis.asyncio.Redis`` (async).

The two drivers differ only in I/O. Both retry a request that failed to reach Redis (connection refused, reset,
timed out) or that the server refused for a passing reason (out of memory under ``noeviction``, a replica that is
read-only after a failover, loading its data, busy with a script) a bounded number of times with exponential
backoff, then raise :class:`StoreUnavailableError` naming the cause. Retrying is safe because every request an
operation yields is idempotent: reads, SET/SADD of the same values, and scripts that compare the stored state
before they write. An error is thrown into the operation, which may handle it (a fenced save retries while its
lease lasts) or let it propagate.
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
import weakref
from typing import Any, Callable

import redis
import redis.asyncio
from redis.exceptions import AskError, AuthenticationError, BusyLoadingError, DataError, MovedError, NoScriptError
from redis.exceptions import OutOfMemoryError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ClusterDownError, NoPermissionError, ReadOnlyError, ResponseError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dynamiq_redis_ckpt import cluster, scripts
from dynamiq_redis_ckpt.errors import CheckpointStoreError, StoreUnavailableError, TLSError, WrongKeyTypeError
from dynamiq_redis_ckpt.requests import Batch, Command, Each, Script, Sleep

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without hiredis: the connection's own packer
    _hiredis_pack = None

if sys.version_info >= (3, 11, 3):  # as redis-py: asyncio.timeout before 3.11.3 could swallow a cancellation
    from asyncio import timeout as _deadline
else:
    from async_timeout import timeout as _deadline

# A cluster client's RedisClusterException says no node answered or no node serves a slot (mid-failover): passing.
_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError, RedisClusterException)
# Error replies that say "not now" rather than "never": nothing was written, and the same request may succeed later.
# redis-py turns some into their own classes and drops the code from the message; the others keep it. (LOADING
# comes as BusyLoadingError, a ConnectionError, so it is transient above.)
_REFUSED_CLASSES = {OutOfMemoryError: "OOM", ReadOnlyError: "READONLY", TryAgainError: "TRYAGAIN",
                    ClusterDownError: "CLUSTERDOWN"}  # fmt: skip
_REFUSED_CODES = ("BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS")


# What OpenSSL says when a certificate check fails (the server's, in the client; the client's, in the server's alert).
# redis-py wraps them in a ConnectionError; no retry can fix them.
_TLS_FAILURES = ("certificate verify failed", "certificate_verify_failed", "alert unknown ca", "alert bad certificate",
                 "alert certificate required", "alert certificate expired", "wrong_version_number")  # fmt: skip


def tls_failure(error: BaseException) -> bool:
    """Whether a connection error is a TLS certificate failure (permanent: not retried)."""
    if not isinstance(error, (RedisConnectionError, OSError)):
        return False
    text = str(error).lower()
    return any(marker in text for marker in _TLS_FAILURES)


def _tls_advice(error: BaseException) -> str:
    text = str(error).lower()
    if "alert certificate expired" in text:
        return "the server says the client certificate has expired (tls_cert_file)"
    if "expired" in text or "not yet valid" in text:
        return "the server's certificate has expired or is not yet valid"
    if "mismatch" in text:
        return "the server's certificate is not valid for the host in the url (use a name it was issued for)"
    if "verify failed" in text:
        return "the server's certificate is not signed by the trusted CA (tls_ca_file)"
    if "certificate required" in text:
        return "the server requires a client certificate (set tls_cert_file and tls_key_file)"
    if "wrong_version_number" in text:
        return "the server does not speak TLS on this port (a redis:// port given a rediss:// url?)"
    return "the server refused the client certificate (tls_cert_file; is it signed by a CA the server trusts?)"


def _refusal(error: Exception) -> str | None:
    """The Redis error code of a refusal worth retrying, None for any other error."""
    for kind, code in _REFUSED_CLASSES.items():
        if isinstance(error, kind):
            return code
    if isinstance(error, AskError):  # MOVED or ASK still after cluster.MAX_REDIRECTS rounds: the map is settling
        return "MOVED" if isinstance(error, MovedError) else "ASK"
    code = str(error).split(" ", 1)[0]
    return code if isinstance(error, ResponseError) and code in _REFUSED_CODES else None


def error_kind(error: Exception) -> str:
    """The kind a metric counts a failed request under (``dynamiq_ckpt_redis_errors_total{kind}``)."""
    if isinstance(error, (RedisTimeoutError, TimeoutError)):
        return "timeout"
    if tls_failure(error):
        return "tls"
    if isinstance(error, AuthenticationError):
        return "auth"
    if isinstance(error, BusyLoadingError):
        return "loading"
    if isinstance(error, NoScriptError):
        return "noscript"
    if isinstance(error, NoPermissionError):
        return "noperm"
    if isinstance(error, (RedisConnectionError, ConnectionError, OSError)):
        return "connection"
    if (code := _refusal(error)) is not None:
        return code.lower()
    first = str(error).split(" ", 1)[0]
    if isinstance(error, ResponseError) and first in ("MOVED", "ASK", "WRONGTYPE", "NOAUTH", "WRONGPASS"):
        return {"NOAUTH": "auth", "WRONGPASS": "auth"}.get(first, first.lower())
    return "other"


class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    def __init__(self, retries: int, backoff: float, cap: float = 1.0):
        self.retries = retries
        self.backoff = backoff
        self.cap = cap

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        base = min(self.cap, self.backoff * (2**attempt))
        return base / 2 + random.random() * base / 2


def _translate(error: Exception, request: Any, hint: str | None = None) -> Exception:
    if tls_failure(error):
        return TLSError(f"TLS certificate problem talking to Redis, not retried: {_tls_advice(error)}: {error}")
    index = getattr(error, "request_index", None)
    if isinstance(request, Batch) and isinstance(index, int) and index < len(request.commands):
        request = request.commands[index]
    keys = getattr(request, "keys", ()) or tuple(a for a in getattr(request, "args", ())[1:2] if isinstance(a, str))
    if isinstance(error, ResponseError) and "WRONGTYPE" in str(error):
        return WrongKeyTypeError(str(error), tuple(keys))
    if isinstance(error, _TRANSIENT):
        return StoreUnavailableError(f"Redis unavailable after retries: {error}" + (f" ({hint})" if hint else ""))
    if (code := _refusal(error)) is not None:
        text = str(error) if str(error).startswith(code) else f"{code} {error}"
        return StoreUnavailableError(f"Redis refused the request after retries: {text}")
    if isinstance(error, redis.RedisError):
        return CheckpointStoreError(f"Redis error: {error}")
    return error


def _wire(request: Command | Script) -> tuple:
    """The command a request is sent as: itself, or EVALSHA of its script (whose sha :mod:`scripts` knows)."""
    if isinstance(request, Script):
        return ("EVALSHA", scripts.sha(request.name), len(request.keys), *request.keys, *request.args)
    return request.args


def _scripts_of(request: Script | Batch) -> set[str]:
    parts = request.commands if isinstance(request, Batch) else (request,)
    return {part.name for part in parts if isinstance(part, Script)}


class ReplicaAckError(ResponseError):
    """A request the primary applied but fewer replicas than required acknowledged in time (``WAIT``): under
    asynchronous replication it could be lost in a failover, so it is not reported done. It starts like the server's
    own NOREPLICAS refusal, so it is retried (a retry reconnects: behind Sentinel, to the primary the sentinels name)."""


def _with_wait(wired: list[tuple], acks: int, timeout_ms: int) -> list[tuple]:
    return [*wired, ("WAIT", acks, timeout_ms)] if acks else wired


def _check_acks(replies: list, acks: int) -> list:
    """The replies without WAIT's; raises ReplicaAckError when it counted fewer replicas than ``acks``."""
    if not acks:
        return replies
    counted = replies.pop()
    if isinstance(counted, Exception) or counted < acks:
        raise ReplicaAckError(f"NOREPLICAS {counted} of {acks} replicas acknowledged the write in time")
    return replies


def _check_failed(op, error: BaseException) -> None:
    """The check before a backend's first operation failed. Redis unreachable: the check waits for the next
    operation and this one meets the outage itself (a running flow's save retries while its lease lasts). Anything
    else (an unsafe policy, a certificate) ends the operation with the check's error."""
    if isinstance(error, StoreUnavailableError) and not isinstance(error, TLSError):
        return
    op.close()
    raise error


def _refresh_sync(client: Any) -> None:
    """Read a cluster's slot map again after a failed attempt (a primary gone, a failover, a reshard)."""
    try:
        client.nodes_manager.initialize()
    except (redis.RedisError, *_TRANSIENT):  # no node answers yet: the next attempt fails and tries again
        pass


async def _refresh_async(client: Any) -> None:
    """:func:`_refresh_sync` for an asyncio cluster client."""
    try:
        await client.nodes_manager.initialize()
    except (redis.RedisError, *_TRANSIENT):
        pass


def _first_error(replies: list) -> list:
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            reply.request_index = i  # which command of a batch failed: its keys name the culprit (_translate)
            raise reply
    return replies


class SyncDriver:
    """Runs operations on a ``redis.Redis`` client (thread-safe: the client's pool serves every thread)."""

    def __init__(self, client: redis.Redis | None, policy: RetryPolicy, make_client: Callable[[], Any] | None = None):
        self._client = client
        self._make_client = make_client  # builds the client at first use when none is given (see client)
        self._client_lock = threading.Lock()
        self.cluster = cluster.is_cluster(client) if client is not None else True  # route each command by slot
        self.policy = policy
        self.observer = None  # a metrics.StoreMetrics when metrics are on: counts every failed attempt
        self.hint = None  # added to the message of a StoreUnavailableError (what to check in this configuration)
        self.preflight = None  # an eviction.EvictionCheck to pass before the first operation (None: nothing to do)
        self.replica_acks = 0  # WAIT for this many replicas after every request (0: do not wait)
        self.replica_ack_timeout_ms = 0

    @property
    def client(self) -> Any:
        """The client; a cluster client is built at first use (redis-py's connects in its constructor, and a backend
        is built without a connection). Raises RedisClusterException (retried) while no node answers."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    @property
    def built_client(self) -> Any:
        """The client if it was built (None for a cluster client before the first request)."""
        return self._client

    def run(self, op) -> Any:
        """Drive a store operation (a generator) to its result; a failed request's error is thrown into it."""
        if self.preflight is not None:
            self._preflight(op)
        return self._drive(op)

    def _drive(self, op) -> Any:
        try:
            request = next(op)
            while True:
                try:
                    reply = self._execute(request)
                except CheckpointStoreError as e:
                    request = op.throw(e)
                else:
                    request = op.send(reply)
        except StopIteration as done:
            return done.value

    def _preflight(self, op) -> None:
        check = self.preflight
        if not check.passed:
            try:
                self._drive(check.op())
            except BaseException as e:
                _check_failed(op, e)
        if check.passed:
            self.preflight = None

    def _execute(self, request: Any) -> Any:
        if isinstance(request, Sleep):
            time.sleep(request.seconds)
            return None
        for attempt in range(self.policy.retries + 1):
            try:
                return self._once(request)
            except (*_TRANSIENT, ResponseError) as e:
                if self.observer is not None:
                    self.observer.redis_error(error_kind(e))
                if attempt == self.policy.retries or not (isinstance(e, _TRANSIENT) or _refusal(e)) or tls_failure(e):
                    raise _translate(e, request, self.hint) from e
                time.sleep(self.policy.delay(attempt))
                if self.cluster and self._client is not None:
                    _refresh_sync(self._client)
            except redis.RedisError as e:
                if self.observer is not None:
                    self.observer.redis_error(error_kind(e))
                raise _translate(e, request, self.hint) from e

    def _once(self, request: Any) -> Any:
        try:
            return self._send(request)
        except NoScriptError:  # the server lost its scripts (restart, SCRIPT FLUSH): load them and send again
            if self.observer is not None:
                self.observer.redis_error("noscript")
            for name in _scripts_of(request):
                self.client.script_load(scripts.source(name))
            return self._send(request)

    def _send(self, request: Any) -> Any:
        if isinstance(request, (Command, Script)):
            return _first_error(self._exchange([_wire(request)]))[0]
        if isinstance(request, Batch):
            return _first_error(self._exchange([_wire(part) for part in request.commands]))
        if isinstance(request, Each):
            if not self.cluster:
                return _first_error(self._pipeline(self.client, [request.command.args]))
            return _first_error(self._route(cluster.each(self.client, request.command.args)))
        raise TypeError(f"unknown request {request!r}")

    def _exchange(self, wired: list[tuple]) -> list:
        if not self.cluster:
            return self._pipeline(self.client, wired)
        return self._route(cluster.exchange(self.client, wired, self.observer))

    def _route(self, routing) -> list:
        """Drive a :mod:`cluster` routing: one pipeline per primary it names, in turn."""
        try:
            sends = next(routing)
            while True:
                sends = routing.send([self._pipeline(node.redis_connection, wired) for node, wired in sends])
        except StopIteration as done:
            return done.value

    def _pipeline(self, client: redis.Redis, wired: list[tuple]) -> list:
        # redis-py's Pipeline object (and, less so, execute_command's wrappers) cost more CPU than the round trip
        # itself on this path; this is their core: send every command in one write, then read one reply each,
        # parsed by the client's own response callbacks. Used for single commands too.
        # With replica_acks, a WAIT ends the exchange; a shortfall drops the connection (see ReplicaAckError).
        pool = client.connection_pool
        conn = pool.get_connection(wired[0][0])
        wired = _with_wait(wired, self.replica_acks, self.replica_ack_timeout_ms)
        try:
            conn.send_packed_command(conn.pack_commands(wired))
            replies = []
            for args in wired:
                try:
                    replies.append(client.parse_response(conn, args[0]))
                except ResponseError as e:
                    replies.append(e)
            return _check_acks(replies, self.replica_acks)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)


async def _close_at_loop_shutdown(client: Any):
    """Suspended for the life of an event loop; ``loop.shutdown_asyncgens()`` (run by ``asyncio.run`` before it
    closes the loop) resumes it into ``finally``, which closes the loop's connections while the loop still runs."""
    try:
        yield
    finally:
        await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:  # a client built on an explicit pool does not close it itself
            await pool.disconnect()
        for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):  # behind Sentinel
            await sentinel.aclose()


def _packed_async(wired: list[tuple]) -> list[bytes] | None:
    """The commands packed by hiredis, or None without it (the connection packs them then). redis.asyncio packs in
    Python, argument by argument, where the sync client uses hiredis: 9% of an async save."""
    if _hiredis_pack is None:
        return None
    try:
        return [b"".join(_hiredis_pack(args) for args in wired)]
    except TypeError as e:  # as the sync client's packer
        raise DataError(str(e)) from e


class AsyncDriver:
    """Runs operations on ``redis.asyncio`` clients, one per event loop.

    An asyncio connection belongs to the loop that opened it, so a client is made for each loop that calls
    (``asyncio.run`` per request, a test framework's loop per test) and dropped with its loop. ``make_client``
    builds clients without a socket timeout; ``timeout`` (seconds, None for none) bounds each request instead,
    and ``connect_timeout`` more when the request must open its connection.
    """

    def __init__(self, make_client: Callable[[], Any], policy: RetryPolicy, timeout: float | None,
                 connect_timeout: float | None = None):
        self._make_client = make_client
        self.policy = policy
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.observer = None  # as SyncDriver.observer
        self.hint = None  # as SyncDriver.hint
        self.preflight = None  # as SyncDriver.preflight
        self.replica_acks = 0  # as SyncDriver.replica_acks
        self.replica_ack_timeout_ms = 0
        self.cluster: bool | None = None  # whether the clients are Redis Cluster clients (known at the first request)
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref, Any] | None = None  # the last loop's client, without a dictionary lookup

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        found = self._per_loop.get(loop)
        if found is None:
            client = self._make_client()
            closer = _close_at_loop_shutdown(client)
            await closer.__anext__()
            found = (client, closer)
            self._per_loop[loop] = found
        self._last = (weakref.ref(loop), found[0])
        return found[0]

    async def run(self, op) -> Any:
        """Drive a store operation (a generator) to its result; a failed request's error is thrown into it."""
        if self.preflight is not None:
            check = self.preflight
            if not check.passed:
                try:
                    await self._drive(check.op())
                except BaseException as e:
                    _check_failed(op, e)
            if check.passed:
                self.preflight = None
        return await self._drive(op)

    async def _drive(self, op) -> Any:
        try:
            request = next(op)
            while True:
                try:
                    reply = await self._execute(request)
                except CheckpointStoreError as e:
                    request = op.throw(e)
                else:
                    request = op.send(reply)
        except StopIteration as done:
            return done.value

    async def _execute(self, request: Any) -> Any:
        if isinstance(request, Sleep):
            await asyncio.sleep(request.seconds)
            return None
        for attempt in range(self.policy.retries + 1):
            try:
                return await self._once(request)
            except (*_TRANSIENT, ResponseError) as e:
                if self.observer is not None:
                    self.observer.redis_error(error_kind(e))
                if attempt == self.policy.retries or not (isinstance(e, _TRANSIENT) or _refusal(e)) or tls_failure(e):
                    raise _translate(e, request, self.hint) from e
                await asyncio.sleep(self.policy.delay(attempt))
                if self.cluster:
                    await _refresh_async(await self._client())
            except redis.RedisError as e:
                if self.observer is not None:
                    self.observer.redis_error(error_kind(e))
                raise _translate(e, request, self.hint) from e

    async def _once(self, request: Any) -> Any:
        client = await self._client()
        if self.cluster is None:
            self.cluster = cluster.is_cluster(client)
        if self.cluster and client._initialize:  # its first request, or after a failed one (see _execute)
            await client.initialize()
        try:
            return await self._send(client, request)
        except NoScriptError:
            if self.observer is not None:
                self.observer.redis_error("noscript")
            loads = [("SCRIPT", "LOAD", scripts.source(name)) for name in _scripts_of(request)]
            _first_error(await self._pipeline(client, loads))
            return await self._send(client, request)

    async def _send(self, client: Any, request: Any) -> Any:
        if isinstance(request, (Command, Script)):
            return _first_error(await self._exchange(client, [_wire(request)]))[0]
        if isinstance(request, Batch):
            return _first_error(await self._exchange(client, [_wire(part) for part in request.commands]))
        if isinstance(request, Each):
            if not self.cluster:
                return _first_error(await self._pipeline(client, [request.command.args]))
            return _first_error(await self._route(cluster.each(client, request.command.args)))
        raise TypeError(f"unknown request {request!r}")

    async def _exchange(self, client: Any, wired: list[tuple]) -> list:
        if not self.cluster:
            return await self._pipeline(client, wired)
        return await self._route(cluster.exchange(client, wired, self.observer))

    async def _route(self, routing) -> list:
        """Drive a :mod:`cluster` routing: one pipeline per primary it names, all at once when they only read, one
        after another (in the request's order) when one writes."""
        try:
            sends = next(routing)
            while True:
                if cluster.writes(sends):
                    received = [await self._node_pipeline(node, wired) for node, wired in sends]
                else:
                    received = await asyncio.gather(*(self._node_pipeline(node, wired) for node, wired in sends))
                sends = routing.send(list(received))
        except StopIteration as done:
            return done.value

    async def _node_pipeline(self, node: Any, wired: list[tuple]) -> list:
        """:meth:`_pipeline` on a connection of one cluster node (``redis.asyncio.cluster.ClusterNode``)."""
        conn = node.acquire_connection()
        try:
            return await self._over(conn, node.parse_response, wired)
        finally:
            node._free.append(conn)

    async def _pipeline(self, client: Any, wired: list[tuple]) -> list:
        """:meth:`SyncDriver._pipeline` on an asyncio client, under one deadline for the whole exchange:
        ``self.timeout``, plus ``self.connect_timeout`` when the connection must be opened first.

        The client is built without a socket timeout (see :class:`AsyncDriver`): redis.asyncio would otherwise start a
        task for every write and arm a timer for every reply (together about 8% of an async save, measured with py-spy).
        A connection is taken without the pool's check (a read under a zero timeout, another 5%), which found unread
        data and sockets the server had closed. Neither slips through: this driver disconnects any connection whose
        exchange did not finish, and one the server closed while it sat idle has its stream at EOF, so it is reopened.
        """
        pool = client.connection_pool
        take = getattr(pool, "get_available_connection", None)
        conn = take() if take is not None else await pool.get_connection(wired[0][0])
        try:
            return await self._over(conn, client.parse_response, wired)
        finally:
            await pool.release(conn)

    async def _over(self, conn: Any, parse: Callable, wired: list[tuple]) -> list:
        """Send ``wired`` on ``conn`` and read the replies (see :meth:`_pipeline`); the caller releases ``conn``."""
        timeout = self.timeout
        wired = _with_wait(wired, self.replica_acks, self.replica_ack_timeout_ms)
        packed = _packed_async(wired)
        try:
            stream = getattr(conn, "_reader", None)
            if stream is not None and stream.at_eof():
                await conn.disconnect(nowait=True)
            if not conn.is_connected and timeout is not None and self.connect_timeout is not None:
                timeout += self.connect_timeout
            async with _deadline(timeout):
                await conn.connect()  # returns at once when connected
                await conn.send_packed_command(packed or conn.pack_commands(wired))
                replies = []
                for args in wired:
                    try:
                        replies.append(await parse(conn, args[0]))
                    except ResponseError as e:
                        replies.append(e)
                return _check_acks(replies, self.replica_acks)
        except asyncio.TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(f"Redis request not completed within {timeout} s") from None
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    async def aclose(self) -> None:
        """Close the client of the running loop, if one was made."""
        found = self._per_loop.pop(asyncio.get_running_loop(), None)
        self._last = None
        if found is not None:
            await found[0].aclose()
            pool = getattr(found[0], "connection_pool", None)
            for sentinel in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):
                await sentinel.aclose()
