"""``delete`` and ``gc`` run as real processes against a real redis-server (read-only calls run side by side)."""

from __future__ import annotations

import json
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.leases import LeaseTicket
from tests.cli_proc import cli, cli_all
from tests.flows import chain_flow


def run_chain(store, flow_id: str, words: int) -> None:
    flow = chain_flow(store, 3, flow_id=flow_id, words=words)
    flow.checkpoint.max_checkpoints = 1000
    flow.run_sync(input_data={})


@pytest.mark.slow
def test_delete_and_gc_commands(redis_server):
    prefix = f"clean{uuid.uuid4().hex[:8]}"
    store = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, leases=False)
    r, keys = store.redis, store.store.keys
    for words in (150, 150, 90):
        run_chain(store, "d", words)
    by_run: dict[str, list] = {}
    for cp in store.get_list_by_flow("d", limit=None):
        by_run.setdefault(cp.wf_run_id, []).append(cp)
    leaked_run, deleted_run, kept_run = list(by_run)  # newest first: the 90-word run is leaked below
    one = by_run[kept_run][-1].id  # the kept run's oldest checkpoint
    live = by_run[kept_run][0].model_copy(update={"id": f"live-{uuid.uuid4().hex[:6]}", "wf_run_id": "live-run",
                                                  "status": CheckpointStatus.ACTIVE, "parent_checkpoint_id": None})
    store.execute(store.store.save(live, ticket=LeaseTicket("take", "pod-7", 0, 600_000)))  # a run holding a lease
    opts = ("--url", redis_server.url, "--prefix", prefix)

    unknown, refused, refused_run, dry, unreachable, bad = cli_all(
        ("delete", one, "no-such-id", *opts),
        ("delete", live.id, *opts),
        ("delete", "--run", "live-run", *opts),
        ("delete", "--run", deleted_run, "--dry-run", *opts),
        ("delete", one, "--url", "redis://127.0.0.1:1/0", "--prefix", prefix),
        ("gc", "d", "--grace", "1", *opts),
    )
    assert unknown.returncode == 4 and "no-such-id" in unknown.stderr, unknown
    assert refused.returncode == 3 and "pod-7" in refused.stderr and "--force" in refused.stderr, refused
    assert refused_run.returncode == 3, refused_run
    assert dry.returncode == 0 and "would delete" in dry.stdout, dry
    assert all(cp.id[:8] in dry.stdout for cp in by_run[deleted_run])
    assert unreachable.returncode == 5 and "unreachable" in unreachable.stderr, unreachable
    assert bad.returncode == 2 and "--grace" in bad.stderr, bad
    assert store.load(one) is not None and store.load(live.id) is not None
    assert all(store.load(cp.id) is not None for cp in by_run[deleted_run])

    forced, by_run_deleted, unknown_run = cli_all(
        ("delete", live.id, one, "--force", "--json", *opts),
        ("delete", "--run", deleted_run, *opts),
        ("delete", "--run", "no-such-run", *opts),
    )
    assert forced.returncode == 0, forced
    assert sorted(row["id"] for row in json.loads(forced.stdout)["items"]) == sorted([live.id, one])
    assert by_run_deleted.returncode == 0 and "deleted" in by_run_deleted.stdout, by_run_deleted
    assert unknown_run.returncode == 4, unknown_run
    fresh = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, leases=False)
    assert fresh.load(live.id) is None and fresh.load(one) is None
    assert not r.exists(keys.locator(one))
    assert all(fresh.load(cp.id) is None for cp in by_run[deleted_run])

    # garbage: the leaked run's hashes vanish (as on expiry), leaving index entries, packs and lookups
    r.delete(*(keys.checkpoint("d", cp.id) for cp in by_run[leaked_run]))
    survivors = {cp.id: cp.model_dump() for cp in by_run[kept_run] if cp.id != one}
    packs_before = sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:pack:*"))
    report = cli("gc", "--dry-run", "--json", "-v", *opts)  # every flow of the catalog
    assert report.returncode == 0, report
    found = json.loads(report.stdout)
    assert found["dry_run"] is True and found["flows"] == ["d"] and found["homes"] == 1
    kinds = found["kinds"]
    assert kinds["index"]["count"] >= 3 * len(by_run[leaked_run]) and kinds["pack"]["count"] >= 1
    assert kinds["locator"]["count"] == len(by_run[leaked_run])
    assert sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:pack:*")) == packs_before
    assert all(r.exists(keys.locator(cp.id)) for cp in by_run[leaked_run])

    done = cli("gc", "d", "--grace", "3", *opts)
    assert done.returncode == 0, done
    assert "removed" in done.stdout and "pack" in done.stdout and "locator" in done.stdout
    assert not any(r.exists(keys.locator(cp.id)) for cp in by_run[leaked_run])
    packs_after = sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:pack:*"))
    assert len(packs_after) == len(packs_before) - kinds["pack"]["count"]
    assert r.zcard(keys.flow_index("d")) == len(survivors)
    fresh = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, leases=False)
    assert {cp_id: fresh.load(cp_id).model_dump() for cp_id in survivors} == survivors
    store.clear()
