"""Review of the read commands (flows, runs, checkpoints, show, chain, stats, diff, export): what they report and
their exit codes when the data is damaged, sealed, bucketed, or changing under a listing that pages.

Each test sets up its own namespace with real Dynamiq flows on the session's redis-server, damages it the way an
operator could find it, and runs the command through ``main`` (the code the process runs): a command must end with
a documented exit code (an exception escaping ``main`` is the traceback a user would see), never report healthy data
as damaged, and page through everything present throughout exactly once.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.cli import main
from tests.flows import chain_flow

KEY = b"k" * 32


def namespace(redis_server, **options) -> RedisCheckpointBackend:
    return RedisCheckpointBackend(url=redis_server.url, prefix=f"rev2{uuid.uuid4().hex[:8]}", **options)


def run_cli(capsys, backend, *args: str) -> tuple[int, str, str]:
    """``main`` on ``backend``'s namespace: exit code, stdout, stderr. An exception escaping is a test failure."""
    code = main([*args, "--url", backend.url, "--prefix", backend.prefix])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def orders(redis_server):
    """A namespace holding one finished run of flow 'orders' (3 nodes: 5 checkpoints, newest first)."""
    backend = namespace(redis_server)
    chain_flow(backend, 3, flow_id="orders", words=20).run_sync({"order": 1})
    ids = [cp.id for cp in backend.get_list_by_flow("orders", limit=None)]
    yield SimpleNamespace(backend=backend, ids=ids, url=backend.url, prefix=backend.prefix, redis=backend.redis,
                          keys=backend.store.keys, load=backend.load)  # fmt: skip
    backend.clear()


# ---- damaged data: a clear error and a documented exit code, never a traceback ------------------------------------


def test_diff_of_a_checkpoint_missing_a_hash_field_is_an_error_not_a_traceback(orders, capsys):
    newest, older = orders.ids[0], orders.ids[1]
    orders.redis.hdel(orders.keys.checkpoint("orders", newest), "root")
    code, out, err = run_cli(capsys, orders, "diff", newest, older, "--json")  # raised CheckpointCorruptedError
    assert code == 1 and "corrupted" in err and out == ""


def test_export_of_a_flow_with_a_truncated_pack_is_an_error_not_a_traceback(orders, capsys, tmp_path):
    newest = orders.ids[0]
    pack = orders.redis.hget(orders.keys.checkpoint("orders", newest), "pk").decode().split(",")[0]
    key = orders.keys.pack("orders", pack)
    orders.redis.set(key, orders.redis.get(key)[:20])
    code, _, err = run_cli(capsys, orders, "export", "orders", "-o", str(tmp_path / "out.jsonl"))
    assert code == 1 and newest in err  # raised CheckpointCorruptedError out of main


def test_diff_and_export_of_a_sealed_namespace_without_the_key_are_errors_not_tracebacks(
        redis_server, capsys, tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.delenv("DYNAMIQ_REDIS_CKPT_ENCRYPTION_KEYS", raising=False)
    sealed = namespace(redis_server, encryption_keys=lambda: ({"k1": KEY}, "k1"))
    chain_flow(sealed, 2, flow_id="orders", words=20).run_sync({"order": 1})
    a, b = [cp.id for cp in sealed.get_list_by_flow("orders", limit=None)][:2]
    try:
        code, out, err = run_cli(capsys, sealed, "diff", a, b, "--json")  # raised EncryptionKeyError
        assert code in (1, 2) and "encrypted" in err and out == ""
        code, _, err = run_cli(capsys, sealed, "export", "orders", "-o", str(tmp_path / "out.jsonl"))
        assert code in (1, 2) and "encrypted" in err
    finally:
        sealed.clear()


def test_a_forged_cursor_is_bad_input_not_a_traceback(orders, capsys):
    import base64

    nan = base64.urlsafe_b64encode(b'["nan", "x"]').decode().rstrip("=")
    code, out, err = run_cli(capsys, orders, "flows", "--json", "--cursor", nan)  # Redis: min or max is not a float
    assert code == 2 and out == ""
    code, out, err = run_cli(capsys, orders, "stats", "--json", "--cursor", nan)
    assert code == 2 and out == ""


# ---- a key of the wrong type -------------------------------------------------------------------------------------


def test_a_wrong_type_lease_key_does_not_make_a_healthy_checkpoint_unreadable(orders, capsys):
    """The lease is decoration in show/checkpoints/runs; one key of the wrong type refuses the whole flow (exit 3)."""
    newest = orders.ids[0]
    run = orders.load(newest).wf_run_id
    lease = orders.keys.lease("orders", run)
    orders.redis.delete(lease)
    orders.redis.set(lease, "x")
    code, out, err = run_cli(capsys, orders, "show", newest, "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == newest
    code, out, err = run_cli(capsys, orders, "checkpoints", "orders", "--json")
    assert code == 0, err
    assert [row["id"] for row in json.loads(out)["items"]] == orders.ids


def test_a_wrong_type_error_names_the_key(orders, capsys):
    """'keys: ()': the operator is told a key is of the wrong type, not which one among thousands."""
    damaged = orders.keys.checkpoint("orders", orders.ids[2])
    orders.redis.delete(damaged)
    orders.redis.set(damaged, "garbage")
    for args in (("checkpoints", "orders"), ("runs", "orders"), ("stats", "orders")):
        code, _, err = run_cli(capsys, orders, *args)
        assert code == 3
        assert damaged in err, (args, err)


# ---- ids the store accepts -------------------------------------------------------------------------------------


def test_a_flow_with_an_empty_id_that_flows_lists_can_be_browsed(redis_server, capsys):
    backend = namespace(redis_server)
    try:
        chain_flow(backend, 2, flow_id="", words=5).run_sync({"order": 1})
        stored = [cp.id for cp in backend.get_list_by_flow("", limit=None)]
        code, out, _ = run_cli(capsys, backend, "flows", "--json")
        assert code == 0 and [f["flow"] for f in json.loads(out)["items"]] == [""]
        code, out, err = run_cli(capsys, backend, "checkpoints", "", "--json")  # 'the flow id is empty', exit 2
        assert code == 0, err
        assert [row["id"] for row in json.loads(out)["items"]] == stored
    finally:
        backend.clear()


def test_a_bucketed_namespace_can_be_read_from_the_command_line(redis_server, capsys, monkeypatch):
    """The namespace records its bucket count; the command line has no --flow-buckets, and the error tells the user
    to 'set flow_buckets=4', which no option of the command sets."""
    monkeypatch.delenv("DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS", raising=False)
    backend = namespace(redis_server, flow_buckets=4)
    try:
        chain_flow(backend, 2, flow_id="orders", words=5).run_sync({"order": 1})
        code, out, err = run_cli(capsys, backend, "checkpoints", "orders", "--json")
        assert code == 0 or "DYNAMIQ_REDIS_CKPT_FLOW_BUCKETS" in err, err
    finally:
        backend.clear()


# ---- paging while writers save --------------------------------------------------------------------------------


def page_all(capsys, backend, *args: str, between=None) -> list[dict]:
    items, cursor, pages = [], "", 0
    while True:
        code, out, err = run_cli(capsys, backend, *args, "--json", "--limit", "2",
                                 *(("--cursor", cursor) if cursor else ()))  # fmt: skip
        assert code == 0, err
        page = json.loads(out)
        items += page["items"]
        pages += 1
        assert pages <= 20
        if not page["next"]:
            return items
        if pages == 1 and between:
            between()
        cursor = page["next"]


def test_flows_paging_keeps_a_flow_saved_again_between_pages(redis_server, capsys):
    """The catalog orders flows by their last registration: a flow on a later page that another process saves
    (and so registers again) jumps ahead of the cursor and is never listed."""
    backend = namespace(redis_server)
    names = ["f1", "f2", "f3", "f4"]
    try:
        for name in names:
            chain_flow(backend, 1, flow_id=name, words=5).run_sync({"order": 1})
            time.sleep(0.01)  # distinct registration times (ms)

        def another_process_saves_the_oldest():
            other = RedisCheckpointBackend(url=redis_server.url, prefix=backend.prefix)  # its own registrations
            chain_flow(other, 1, flow_id="f1", words=5).run_sync({"order": 2})

        seen = [item["flow"] for item in page_all(capsys, backend, "flows", between=another_process_saves_the_oldest)]
        assert sorted(seen) == names, seen
    finally:
        backend.clear()


def test_runs_paging_keeps_a_run_that_saves_between_pages(redis_server, capsys):
    """Runs are listed at their newest checkpoint: a run on a later page that saves a checkpoint between pages moves
    ahead of the cursor and is never listed."""
    backend = namespace(redis_server)
    try:
        for i in range(4):
            chain_flow(backend, 1, flow_id="orders", words=5).run_sync({"order": i})
        oldest = backend.get_list_by_flow("orders", limit=None)[-1]
        runs = {cp.wf_run_id for cp in backend.get_list_by_flow("orders", limit=None)}

        def the_oldest_run_saves():
            now = datetime.now(timezone.utc)
            later = oldest.model_copy(update={"id": str(uuid.uuid4()), "parent_checkpoint_id": oldest.id,
                                              "created_at": now, "updated_at": now})  # fmt: skip
            backend.save(later)

        seen = [item["run"] for item in page_all(capsys, backend, "runs", "orders", between=the_oldest_run_saves)]
        assert sorted(seen) == sorted(runs), seen
    finally:
        backend.clear()


def test_checkpoint_paging_while_writers_save_and_delete(redis_server, capsys):
    """Held: every checkpoint present throughout appears exactly once while others are saved and deleted."""
    backend = namespace(redis_server)
    try:
        for i in range(3):
            chain_flow(backend, 2, flow_id="orders", words=5).run_sync({"order": i})
        before = [cp.id for cp in backend.get_list_by_flow("orders", limit=None)]
        doomed = before[3]  # on page 2 with --limit 2

        def churn():
            backend.delete(doomed)
            chain_flow(backend, 2, flow_id="orders", words=5).run_sync({"order": 9})

        seen = [item["id"] for item in page_all(capsys, backend, "checkpoints", "orders", between=churn)]
        throughout = [i for i in before if i != doomed]
        assert len(seen) == len(set(seen))
        assert [i for i in seen if i in throughout] == throughout
    finally:
        backend.clear()


# ---- a damaged checkpoint among healthy ones ----------------------------------------------------------------------


def test_a_non_numeric_hash_field_is_an_error_not_a_traceback(orders, capsys):
    """int('abc') of a damaged 'size' escapes checkpoints and show as a ValueError; runs calls it bad input (exit 2)
    because the ValueError surfaces inside the cursor check."""
    damaged = orders.ids[1]
    orders.redis.hset(orders.keys.checkpoint("orders", damaged), "size", "abc")
    for args in (("checkpoints", "orders", "--json"), ("show", damaged, "--json"), ("runs", "orders", "--json")):
        code, out, err = run_cli(capsys, orders, *args)
        assert code in (0, 1), (args, code, err)
        if code == 0:
            json.loads(out)


def test_a_checkpoint_missing_its_status_and_time_is_not_listed_as_healthy_data(orders, capsys):
    """Listed with status null and created_at 0.0 (shown '20787d ago'), exit 0, nothing in the JSON saying so."""
    damaged = orders.ids[0]
    orders.redis.hdel(orders.keys.checkpoint("orders", damaged), "st", "ts")
    code, out, err = run_cli(capsys, orders, "checkpoints", "orders", "--json")
    rows = {row["id"]: row for row in json.loads(out)["items"]} if code == 0 else {}
    assert damaged not in rows or rows[damaged].get("damaged"), rows.get(damaged)


def test_one_damaged_pack_does_not_blank_the_healthy_rows_of_its_page(orders, capsys):
    """The page is decoded as one batch: a pack of the wrong type under the newest checkpoint makes the node counts
    of every row unknown ('?'), though each older checkpoint still loads (show prints it)."""
    newest = orders.ids[0]
    pack = orders.redis.hget(orders.keys.checkpoint("orders", newest), "pk").decode().split(",")[0]
    key = orders.keys.pack("orders", pack)
    orders.redis.delete(key)
    orders.redis.hset(key, "a", "b")
    code, out, err = run_cli(capsys, orders, "checkpoints", "orders", "--json")
    assert code == 0, err
    rows = {row["id"]: row for row in json.loads(out)["items"]}
    oldest = orders.ids[-1]
    assert run_cli(capsys, orders, "show", oldest, "--json")[0] == 0  # healthy (3 = refused before this, too)
    assert rows[oldest]["nodes_completed"] is not None, rows[oldest]


def test_chain_of_a_cycle_of_parent_links_is_an_error_not_a_traceback(orders, capsys):
    """lineage_op raises CheckpointStoreError('its parent links form a cycle'), which run() does not map."""
    oldest, newest = orders.ids[-1], orders.ids[0]
    orders.redis.hset(orders.keys.checkpoint("orders", oldest), "par", newest)
    code, out, err = run_cli(capsys, orders, "chain", orders.ids[2], "--json")
    assert code == 1 and "cycle" in err and out == ""


# ---- export while retention deletes ------------------------------------------------------------------------------


def test_export_keeps_every_checkpoint_present_throughout_while_old_ones_are_deleted(orders, capsys, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """The export lists a flow's index by offset (ZRANGE i..i+page): when an older checkpoint is deleted between two
    pages (retention does exactly that, oldest first), every later entry shifts down one and one checkpoint that was
    there all along is skipped; the export still says it exported everything (exit 0, 'vanished': 0)."""
    from dynamiq_redis_ckpt import transfer

    oldest_first = list(reversed(orders.ids))
    monkeypatch.setattr(transfer, "_PAGE", 2)  # the same race at any page size, with 5 checkpoints instead of 2000
    real_pairs, pages = transfer.score_pairs, []

    def pairs_then_retention_deletes_the_oldest(reply):
        pages.append(reply)
        if len(pages) == 1:
            orders.backend.delete(oldest_first[0])  # between the first page and the next
        return real_pairs(reply)

    monkeypatch.setattr(transfer, "score_pairs", pairs_then_retention_deletes_the_oldest)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(capsys, orders, "export", "orders", "-o", str(out))
    assert code == 0, err
    exported = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(exported) == len(set(exported))
    assert set(exported) == set(oldest_first[1:]), f"missing: {set(oldest_first[1:]) - set(exported)}"
