"""The catalog of flows: every save registers its flow; pages list each flow once; gc's forget keeps a flow a save
registered since; rebuild finds flows saved before the catalog existed."""

from __future__ import annotations

import redis
from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt import catalog
from dynamiq_redis_ckpt.backend import RedisCheckpointBackend
from dynamiq_redis_ckpt.keys import FLOW_SHARDS, Keys

ODD = ["plain", "with{brace}", "per%cent", "", "ünï code", "a%b", "%7B"]


def _save(backend, flow: str, run: str = "r") -> None:
    backend.save(FlowCheckpoint(flow_id=flow, run_id=run, wf_run_id=run))


def _drop_catalog(raw, keys: Keys) -> None:
    for shard in range(FLOW_SHARDS):
        raw.delete(keys.catalog(shard), keys.catalog_names(shard))


def _pages(backend, limit: int) -> list[list[str]]:
    pages, cursor = [], ""
    while True:
        flows, cursor = backend.execute(catalog.flows_op(backend.store.keys, cursor, limit))
        pages.append(flows)
        if not cursor:
            return pages


def test_every_saved_flow_is_listed_once_across_pages(backend):
    for i, flow in enumerate(ODD * 2):
        _save(backend, flow, f"r{i}")
    for limit in (1, 2, 3, 100):
        pages = _pages(backend, limit)
        listed = [f for page in pages for f in page]
        assert sorted(listed) == sorted(ODD), limit
        assert all(len(page) <= limit for page in pages)


def test_pages_go_in_id_order_and_a_flow_saved_again_keeps_its_place(backend):
    flows = [f"flow{i:02d}" for i in range(40)]
    for flow in flows:
        _save(backend, flow)
    keys = backend.store.keys
    first, cursor = backend.execute(catalog.flows_op(keys, "", 7))
    assert first == flows[:7]
    backend.store.registrations = catalog.Registrations()  # another process saves every flow again meanwhile
    for flow in reversed(flows):
        _save(backend, flow, "again")
    rest = []
    while cursor:
        page, cursor = backend.execute(catalog.flows_op(keys, cursor, 7))
        rest += page
    assert first + rest == flows


def test_a_process_registers_a_flow_once_per_period(backend, raw):
    keys = backend.store.keys
    _save(backend, "f", "r1")
    shard = keys.catalog(Keys.shard_of("f"))
    assert raw.zscore(shard, "f") is not None
    raw.zrem(shard, "f")
    _save(backend, "f", "r2")  # registered a moment ago by this process: not sent again
    assert raw.zscore(shard, "f") is None
    backend.store.registrations = catalog.Registrations()  # a new process
    _save(backend, "f", "r3")
    assert raw.zscore(shard, "f") is not None


def test_forget_keeps_a_flow_registered_since_it_was_read(backend, raw):
    keys = backend.store.keys
    _save(backend, "gone")
    [score] = backend.execute(catalog.scores_op(keys, ["gone"]))
    raw.zadd(keys.catalog(Keys.shard_of("gone")), {"gone": score + 1})  # a save registering it again
    assert backend.execute(catalog.forget_op(keys, "gone", score)) is False
    assert backend.execute(catalog.forget_op(keys, "gone", score + 1)) is True
    assert backend.execute(catalog.all_flows_op(keys)) == []
    assert not catalog.forgettable(None) and not catalog.forgettable(score + 1, now_ms=score + 2)
    assert catalog.forgettable(score, now_ms=score + catalog.FORGET_AFTER * 1000 + 1)


def test_rebuild_finds_flows_saved_before_the_catalog(redis_server):
    prefix = "cat-rebuild"
    keyed = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, flow_buckets=8)
    try:
        for i, flow in enumerate(ODD):
            _save(keyed, flow, f"run{i}")
        raw = redis.Redis.from_url(redis_server.url) if "cluster" not in redis_server.url else None
        if raw is None:
            return  # the catalog shards live on several masters: dropped below through the backend instead
        _drop_catalog(raw, keyed.store.keys)
        assert keyed.execute(catalog.all_flows_op(keyed.store.keys)) == []
        assert keyed.execute(catalog.rebuild_op(keyed.store.keys, count=3)) == len(ODD)
        assert sorted(keyed.execute(catalog.all_flows_op(keyed.store.keys))) == sorted(ODD)
        assert keyed.execute(catalog.rebuild_op(keyed.store.keys)) == 0  # already there
    finally:
        keyed.clear()


def test_listing_flows_sends_no_scan(redis_server, real_backend):
    if "cluster" in redis_server.url:
        return
    for i in range(30):
        _save(real_backend, f"flow{i}")
    raw = redis.Redis.from_url(redis_server.url)

    def scans() -> int:
        stats = raw.info("commandstats")
        return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("scan", "keys"))

    before = scans()
    assert len(real_backend.execute(catalog.all_flows_op(real_backend.store.keys, page=7))) == 30
    assert scans() == before


def test_clear_removes_the_catalog(backend, raw):
    _save(backend, "f")
    backend.clear()
    assert backend.execute(catalog.all_flows_op(backend.store.keys)) == []
    assert not raw.keys(f"{backend.prefix}:*")


def test_gc_rebuilds_the_catalog_of_older_data_then_collects_it(redis_server, real_backend, capsys):
    from dynamiq_redis_ckpt.cli import main

    if "cluster" in redis_server.url:
        return
    for flow in ("old-a", "old{b}"):
        _save(real_backend, flow)
    raw = redis.Redis.from_url(redis_server.url)
    _drop_catalog(raw, real_backend.store.keys)  # as a version before the catalog left it
    where = ["--url", redis_server.url, "--prefix", real_backend.prefix]
    assert main(["gc", "--dry-run", "--no-lookups", *where]) == 0
    assert "(0 flows" in capsys.readouterr().out
    assert main(["gc", "--rebuild-catalog", "--dry-run", "--no-lookups", *where]) == 0
    out = capsys.readouterr().out
    assert "catalog: 2 flow(s) added" in out and "(2 flows" in out
    assert sorted(real_backend.execute(catalog.all_flows_op(real_backend.store.keys))) == ["old-a", "old{b}"]
