"""Hostile review of ``leases``, ``orphans``, ``timers``, ``dead`` and ``top``: paging under churn, bucketed flows,
damaged keys, frozen Redis and bad /metrics endpoints. In-process (``cli.main`` with capsys) unless a real process
is needed."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.cli import main
from dynamiq_redis_ckpt.worker import Recovery
from tests.test_cli_queues import hold


@pytest.fixture
def backend(redis_server):
    b = RedisCheckpointBackend(url=redis_server.url, prefix=f"r3{uuid.uuid4().hex[:8]}")
    yield b
    b.clear()


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of one in-process command."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def where(b) -> list[str]:
    return ["--url", b.url, "--prefix", b.prefix]


def listed(capsys, b, command, *extra, limit=1):
    """Every run a listing shows, page by page (``--json``), calling ``between()`` hooks via a generator."""
    code, out, err = cli(capsys, *command, "--json", "--limit", str(limit), *extra, *where(b))
    assert code == 0, err
    return json.loads(out)


def test_leases_paging_lists_a_run_present_throughout_even_when_an_earlier_lease_expires(capsys, backend):
    hold(backend, "orders", "wf-a-short", "pod-a:1:x", 1500)   # expires first: page 1
    hold(backend, "orders", "wf-b", "pod-b:1:x", 600_000)
    hold(backend, "orders", "wf-c", "pod-c:1:x", 700_000)
    first = listed(capsys, backend, ["leases"])
    assert [r["run"] for r in first["items"]] == ["wf-a-short"] and first["next"]
    time.sleep(1.6)  # wf-a-short's lease runs out between the pages; wf-b and wf-c are leased throughout
    seen = []
    cursor = first["next"]
    while cursor:
        page = listed(capsys, backend, ["leases"], "--cursor", cursor)
        seen += [r["run"] for r in page["items"]]
        cursor = page["next"]
    assert sorted(seen) == ["wf-b", "wf-c"], seen


def test_orphans_paging_lists_an_orphan_present_throughout_when_an_earlier_one_is_claimed(capsys, backend):
    for run in ("wf-o1", "wf-o2", "wf-o3"):
        hold(backend, "orders", run, "pod-gone:1:x", 50)
        time.sleep(0.02)  # distinct expiries: wf-o1 first
    time.sleep(0.1)
    first = listed(capsys, backend, ["orphans"])
    assert [r["run"] for r in first["items"]] == ["wf-o1"]
    assert Recovery(backend).claim("orders", "wf-o1") is not None  # a worker takes it between the pages
    seen, cursor = [], first["next"]
    while cursor:
        page = listed(capsys, backend, ["orphans"], "--cursor", cursor)
        seen += [r["run"] for r in page["items"]]
        cursor = page["next"]
    assert sorted(seen) == ["wf-o2", "wf-o3"], seen
