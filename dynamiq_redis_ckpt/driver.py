"""Run store operations on a real client: ``redis.Redis`` (sync) or ``redis.asyncio.Redis`` (async).

The two drivers differ only in I/O. Both retry a request that failed to reach Redis (connection refused, reset,
timed out) a bounded number of times with exponential backoff, then raise :class:`StoreUnavailableError`. Retrying
is safe because every request an operation yields is idempotent: reads, SET/SADD of the same values, and scripts
that compare the stored state before they write.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from typing import Any, Callable

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dynamiq_redis_ckpt import scripts
from dynamiq_redis_ckpt.errors import CheckpointStoreError, StoreUnavailableError, WrongKeyTypeError
from dynamiq_redis_ckpt.requests import Batch, Command, Script

_TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


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


def _translate(error: Exception, request: Any) -> Exception:
    keys = getattr(request, "keys", ()) or tuple(a for a in getattr(request, "args", ())[1:2] if isinstance(a, str))
    if isinstance(error, ResponseError) and "WRONGTYPE" in str(error):
        return WrongKeyTypeError(str(error), tuple(keys))
    if isinstance(error, _TRANSIENT):
        return StoreUnavailableError(f"Redis unavailable after retries: {error}")
    if isinstance(error, redis.RedisError):
        return CheckpointStoreError(f"Redis error: {error}")
    return error


class SyncDriver:
    """Runs operations on a ``redis.Redis`` client (thread-safe: the client's pool serves every thread)."""

    def __init__(self, client: redis.Redis, policy: RetryPolicy):
        self.client = client
        self.policy = policy
        self._scripts = {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}

    def run(self, op) -> Any:
        """Drive a store operation (a generator) to its result."""
        try:
            request = next(op)
            while True:
                request = op.send(self._execute(request))
        except StopIteration as done:
            return done.value

    def _execute(self, request: Any) -> Any:
        for attempt in range(self.policy.retries + 1):
            try:
                return self._once(request)
            except _TRANSIENT as e:
                if attempt == self.policy.retries:
                    raise _translate(e, request) from e
                time.sleep(self.policy.delay(attempt))
            except redis.RedisError as e:
                raise _translate(e, request) from e

    def _once(self, request: Any) -> Any:
        if isinstance(request, Command):
            return self.client.execute_command(*request.args)
        if isinstance(request, Script):
            return self._scripts[request.name](keys=request.keys, args=request.args, client=self.client)
        if isinstance(request, Batch):
            pipe = self.client.pipeline(transaction=False)
            for command in request.commands:
                pipe.execute_command(*command.args)
            return pipe.execute()
        raise TypeError(f"unknown request {request!r}")


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


class AsyncDriver:
    """Runs operations on ``redis.asyncio`` clients, one per event loop.

    An asyncio connection belongs to the loop that opened it, so a client is made for each loop that calls
    (``asyncio.run`` per request, a test framework's loop per test) and dropped with its loop.
    """

    def __init__(self, make_client: Callable[[], Any], policy: RetryPolicy):
        self._make_client = make_client
        self.policy = policy
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def _client(self) -> tuple[Any, dict]:
        loop = asyncio.get_running_loop()
        found = self._per_loop.get(loop)
        if found is None:
            client = self._make_client()
            closer = _close_at_loop_shutdown(client)
            await closer.__anext__()
            found = (client, {name: client.register_script(scripts.source(name)) for name in scripts.NAMES}, closer)
            self._per_loop[loop] = found
        return found

    async def run(self, op) -> Any:
        """Drive a store operation (a generator) to its result."""
        try:
            request = next(op)
            while True:
                request = op.send(await self._execute(request))
        except StopIteration as done:
            return done.value

    async def _execute(self, request: Any) -> Any:
        for attempt in range(self.policy.retries + 1):
            try:
                return await self._once(request)
            except _TRANSIENT as e:
                if attempt == self.policy.retries:
                    raise _translate(e, request) from e
                await asyncio.sleep(self.policy.delay(attempt))
            except redis.RedisError as e:
                raise _translate(e, request) from e

    async def _once(self, request: Any) -> Any:
        client, registered, _ = await self._client()
        if isinstance(request, Command):
            return await client.execute_command(*request.args)
        if isinstance(request, Script):
            return await registered[request.name](keys=request.keys, args=request.args, client=client)
        if isinstance(request, Batch):
            pipe = client.pipeline(transaction=False)
            for command in request.commands:
                pipe.execute_command(*command.args)
            return await pipe.execute()
        raise TypeError(f"unknown request {request!r}")

    async def aclose(self) -> None:
        """Close the client of the running loop, if one was made."""
        found = self._per_loop.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[0].aclose()
