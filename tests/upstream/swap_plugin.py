"""Pytest plugin that runs Dynamiq's own tests with RedisCheckpointBackend in place of its checkpoint ``InMemory``.

Loaded as a top-level module (``-p swap_plugin``, with this folder on PYTHONPATH): Dynamiq's test tree is a package
named ``tests`` too. On import, before any test module is collected, it

- replaces ``dynamiq.checkpoints.backends.in_memory.InMemory`` with :class:`RedisInMemory` in every loaded module that
  imported it (``dynamiq.checkpoints.backends``, ``dynamiq.checkpoints.config``, ...), so test modules importing it
  later get ours;
- makes the original class construct a :class:`RedisInMemory` too, for references captured before the swap
  (``CheckpointConfig.backend``'s ``default_factory`` is the class itself, compiled into pydantic validators).

Each instance is a fresh, independent store (a unique ``prefix``) on the redis-server named by ``$UPSTREAM_REDIS_URL``,
with leases on (the default). Per test, it records whether any checkpoint method of such an instance was called, and
writes ``{"drove": [nodeid, ...], "instances": n, "calls": {method: n}}`` to ``$UPSTREAM_REPORT`` at session end.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading
import uuid
from collections import Counter

import pytest
from dynamiq.checkpoints.backends import in_memory
from dynamiq.checkpoints.backends.base import CheckpointBackend
from pydantic import Field

from dynamiq_redis_ckpt import RedisCheckpointBackend

URL_ENV = "UPSTREAM_REDIS_URL"
REPORT_ENV = "UPSTREAM_REPORT"

ORIGINAL = in_memory.InMemory
# Dynamiq's whole backend contract (sync and async), plus InMemory's clear().
TRACKED = [name for name, value in vars(CheckpointBackend).items() if callable(value) and not name.startswith("_")]
TRACKED = [name for name in TRACKED if name != "to_dict"] + ["clear", "clear_async"]

_lock = threading.Lock()
_current_test: str | None = None
_drove: set[str] = set()
_calls: Counter = Counter()
_instances = 0


def _record(method: str) -> None:
    with _lock:
        _calls[method] += 1
        if _current_test is not None:
            _drove.add(_current_test)


def _tracked(method):
    """Wrap a backend method so that calling it records the running test."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def wrapper(self, *args, **kwargs):
            _record(method.__name__)
            return await method(self, *args, **kwargs)

    else:

        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            _record(method.__name__)
            return method(self, *args, **kwargs)

    return wrapper


class RedisInMemory(RedisCheckpointBackend):
    """RedisCheckpointBackend standing in for Dynamiq's InMemory: takes InMemory's arguments, and each instance is an
    independent store (its own prefix) on the test redis-server."""

    url: str | None = Field(default_factory=lambda: os.environ[URL_ENV])
    prefix: str = Field(default_factory=lambda: f"upstream:{uuid.uuid4().hex}")

    def model_post_init(self, __context) -> None:
        global _instances
        super().model_post_init(__context)
        with _lock:
            _instances += 1


for _name in TRACKED:
    setattr(RedisInMemory, _name, _tracked(getattr(RedisCheckpointBackend, _name)))


def _swap() -> None:
    if URL_ENV not in os.environ:
        raise pytest.UsageError(f"swap_plugin needs ${URL_ENV}: the redis-server to run Dynamiq's tests on")
    for module in list(sys.modules.values()):
        if getattr(module, "InMemory", None) is ORIGINAL:
            module.InMemory = RedisInMemory
    ORIGINAL.__new__ = lambda cls, *args, **kwargs: RedisInMemory(*args, **kwargs)


_swap()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Attribute backend calls (setup, call and teardown, on any thread) to the test running."""
    global _current_test
    _current_test = item.nodeid
    try:
        yield
    finally:
        _current_test = None


def pytest_sessionfinish(session, exitstatus):
    """Write the report the outer test reads."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w") as f:
            json.dump({"drove": sorted(_drove), "instances": _instances, "calls": dict(_calls)}, f, indent=1)


def pytest_report_header(config):
    return f"swap_plugin: dynamiq InMemory checkpoints -> RedisCheckpointBackend at {os.environ.get(URL_ENV)}"
