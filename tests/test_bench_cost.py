"""The benchmark's cost measurements count what they say they count (times are printed by the benchmark, never
asserted here): one save script per save, the commands a cold load sends, the bytes a raw GET floor reads."""

from __future__ import annotations

import pytest

from dynamiq_redis_ckpt import as_running_flow
from dynamiq_redis_ckpt.bench import cost
from dynamiq_redis_ckpt.bench.targets import RedisTarget
from dynamiq_redis_ckpt.bench.workloads import append_chain


@pytest.fixture
def target(own_redis):
    made = RedisTarget(own_redis.url, "t")
    yield made
    made.close()


def test_redis_cpu_counts_one_script_per_save_and_the_reads_of_a_cold_load(target):
    with as_running_flow():
        found = cost.redis_cpu(target, chains=3, loads=3, say=lambda _: None)
    incremental, cold = found["save_incremental"], found["load_cold"]
    assert incremental["ops"] == 3 * 10 and incremental["scripts_per_op"] == 1
    assert incremental["sent_per_op"]["evalsha"] == 1
    assert incremental["commandstats_us"] >= incremental["script_us"] > 0
    assert incremental["main_thread_us"] > 0
    # a cold load: the locator, one load script, then the packs down the chain in one batch (format 5)
    assert cold["sent_per_op"]["evalsha"] == 1
    assert "getrange" not in cold["sent_per_op"]
    assert cold["sent_per_op"]["get"] >= 2


def test_growth_and_saturation_report_each_size_and_client_count(target):
    with as_running_flow():
        grown = cost.growth(target, runs=1, say=lambda _: None)
        rows = cost.saturation(target, [1, 2], 0.5, [list(append_chain(s, 10)) for s in range(4)], lambda _: None)
    for side, at in (("agent_loop", cost.LOOP_AT), ("chain_50", cost.CHAIN_AT)):
        assert grown[side]["at"] == list(at)
        assert grown[side]["small"]["n"] == grown[side]["large"]["n"] > 0
        assert grown[side]["ratio"] == pytest.approx(grown[side]["large"]["p50_ms"] / grown[side]["small"]["p50_ms"])
    assert [row["clients"] for row in rows] == [1, 2]
    assert all(row["saves_per_s"] > 0 and row["server_us_per_save"] > 0 for row in rows)


def test_the_raw_get_floor_holds_every_byte_a_cold_load_reads(target):
    backend = target.make("floor")
    chain = list(append_chain(9, 6))
    for cp in chain:
        backend.save(cp)
    read = target.loaded_bytes("floor", chain[-1])
    keys = target.client.keys(f"{target.prefix('floor')}:pack:*")
    packs = [target.client.get(k) for k in keys]
    assert all(p in read for p in packs if p in read) and sum(len(p) for p in packs if p in read) > 0
    assert len(read) > max(len(p) for p in packs)
    backend.close()
