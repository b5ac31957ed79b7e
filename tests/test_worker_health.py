"""The worker's health tells the truth, on real processes: it waits for a Redis that is down at start (alive, not
ready), answers /readyz within a second while Redis is frozen, and fails /healthz when its loop stalls."""

from __future__ import annotations

import time
import uuid
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import pytest

from tests.redis_proc import RedisProcess, free_port
from tests.test_worker import start_worker, stop, wait_for

pytestmark = pytest.mark.slow


def status(port: int, path: str) -> int | None:
    """The HTTP status of a GET, None while nothing listens."""
    try:
        return urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except HTTPError as e:
        return e.code
    except URLError:
        return None


def test_a_worker_started_while_redis_is_down_waits_alive_and_not_ready(tmp_path):
    redis = RedisProcess()  # its port is chosen, nothing listens there yet
    port, log = free_port(), tmp_path / "worker.log"
    worker = start_worker(redis, f"hz{uuid.uuid4().hex[:6]}", log, metrics_port=port)
    try:
        wait_for(lambda: status(port, "/healthz") == 200, timeout=120)
        assert status(port, "/readyz") == 503
        time.sleep(2.0)
        assert worker.poll() is None, f"the worker exited while Redis was down:\n{log.read_text()[-2000:]}"
        assert status(port, "/healthz") == 200 and "does not answer yet" in log.read_text()
        redis.start()
        wait_for(lambda: "worker ready" in log.read_text(), timeout=60)
        assert status(port, "/readyz") == 200
    finally:
        code = stop(worker)
        redis.kill()
    assert code == 0


def test_readyz_answers_within_a_second_and_healthz_fails_when_the_loop_stalls(own_redis, tmp_path):
    """--stall-seconds 2: with Redis frozen a pass of the loop blocks (4 tries of 2 s), which is a stall."""
    port, log = free_port(), tmp_path / "worker.log"
    worker = start_worker(own_redis, f"hz{uuid.uuid4().hex[:6]}", log, metrics_port=port, flags=("--stall-seconds", "2"))
    try:
        wait_for(lambda: "worker ready" in log.read_text(), timeout=120)
        assert status(port, "/readyz") == 200 and status(port, "/healthz") == 200
        own_redis.pause()
        started = time.monotonic()
        assert status(port, "/readyz") == 503
        answered = time.monotonic() - started
        print(f"\n[health] /readyz answered 503 in {answered:.2f} s with Redis frozen")
        assert answered < 1.0
        wait_for(lambda: status(port, "/healthz") == 503, timeout=20, every=0.5)
        own_redis.resume()
        wait_for(lambda: status(port, "/healthz") == 200, timeout=30, every=0.5)
        assert status(port, "/readyz") == 200
    finally:
        own_redis.resume()
        code = stop(worker)
    assert code == 0
