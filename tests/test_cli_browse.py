"""The browse commands (flows, runs, checkpoints, show, chain, stats) on a real redis-server, over checkpoints that
real Dynamiq flows wrote: a finished run, a run resumed from an older snapshot of it (a branch), a run interrupted
mid-way (its lease still live), and a second flow. Each command runs once as a real process (several at a time, to
keep the wall time short) with the server's command counters read around them: no SCAN, no KEYS. Paging and the
figures are checked in-process through the same ``main``."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import redis
import redis.cluster

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.cli import main
from dynamiq_redis_ckpt.codec import encode_checkpoint
from tests.cli_proc import cli
from tests.flows import RunInterrupted, chain_flow
from tests.redis_proc import free_port


@pytest.fixture(scope="module")
def history(redis_server, tmp_path_factory):
    """Three runs of flow 'orders' (A finished; B resumed from A's snapshot after two nodes, so that snapshot has two
    children; C interrupted at its third node, holding a live lease) and one run of flow 'other'."""
    prefix = f"browse{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix, lease_ttl_seconds=3600)
    chain_flow(backend, 4, flow_id="orders", words=40).run_sync({"order": 1})
    first = backend.get_list_by_flow("orders", limit=None)
    fork_point = next(cp for cp in first if len(cp.completed_node_ids) == 2)
    chain_flow(backend, 4, flow_id="orders", words=40).run_sync(None, resume_from=fork_point.id)
    run_a = first[0].wf_run_id
    run_b = next(cp.wf_run_id for cp in backend.get_list_by_flow("orders", limit=None) if cp.wf_run_id != run_a)
    stop = tmp_path_factory.mktemp("browse") / "interrupted"
    with pytest.raises(RunInterrupted):
        chain_flow(backend, 4, flow_id="orders", words=40, interrupt_once={"s02": str(stop)}).run_sync({"order": 2})
    run_c = backend.get_latest_by_flow("orders").wf_run_id
    chain_flow(backend, 2, flow_id="other", words=20).run_sync({"order": 3})
    everything = backend.get_list_by_flow("orders", limit=None)
    others = len(backend.get_list_by_flow("other", limit=None))
    yield SimpleNamespace(url=redis_server.url, prefix=prefix, backend=backend, fork_point=fork_point.id,
                          root=first[-1].id, runs={"a": run_a, "b": run_b, "c": run_c}, checkpoints=everything,
                          others=others)  # fmt: skip
    backend.clear()


def in_process(capsys, history, *args: str) -> tuple[int, str]:
    """``main`` in this process (the same code the process runs): exit code and stdout."""
    code = main([*args, "--url", history.url, "--prefix", history.prefix])
    return code, capsys.readouterr().out


def page_through(capsys, history, *args: str) -> list[dict]:
    """Every item of a listing, page by page with the cursor each page printed."""
    items, cursor, pages = [], "", 0
    while True:
        code, out = in_process(capsys, history, *args, "--json", *(("--cursor", cursor) if cursor else ()))
        assert code == 0, out
        page = json.loads(out)
        items += page["items"]
        pages += 1
        assert pages <= 50, "the cursor does not advance"
        if not page["next"]:
            return items
        cursor = page["next"]


def scans(backend) -> int:
    """SCAN and KEYS calls the server (every primary of a cluster) has answered so far."""
    client = backend.redis
    if isinstance(client, redis.cluster.RedisCluster):
        found = client.info("commandstats", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        per_node = list(found.values())
    else:
        per_node = [client.info("commandstats")]
    return sum(node.get(f"cmdstat_{name}", {}).get("calls", 0) for node in per_node for name in ("scan", "keys"))


@pytest.mark.slow
def test_each_command_as_a_process_without_scanning_the_keyspace(history):
    ids = {cp.id: cp for cp in history.checkpoints}
    fork_point = history.fork_point
    in_b = next(cp.id for cp in history.checkpoints if cp.wf_run_id == history.runs["b"])
    commands = {
        "flows": ("flows",),
        "runs": ("runs", "orders", "--json"),
        "checkpoints": ("checkpoints", "orders", "--run", history.runs["c"]),
        "show": ("show", fork_point),
        "chain": ("chain", in_b, "--json"),
        "stats": ("stats", "--json"),
        "unknown id": ("show", "no-such-checkpoint"),
        "bad cursor": ("checkpoints", "orders", "--cursor", "not-a-cursor"),
    }
    before = scans(history.backend)
    with ThreadPoolExecutor(max_workers=4) as pool:  # two cores in CI: each process is mostly imports
        closed = f"redis://127.0.0.1:{free_port()}/0"
        unreachable = pool.submit(cli, "runs", "orders", "--url", closed, "--prefix", history.prefix)
        futures = {name: pool.submit(cli, *args, "--url", history.url, "--prefix", history.prefix)
                   for name, args in commands.items()}  # fmt: skip
        done = {name: future.result() for name, future in futures.items()}
    assert scans(history.backend) == before, "a browse command sent SCAN or KEYS"
    for name, proc in done.items():
        assert proc.returncode == {"unknown id": 4, "bad cursor": 2}.get(name, 0), (name, proc.stderr)
    assert unreachable.result().returncode == 5 and "unreachable" in unreachable.result().stderr

    flows = done["flows"].stdout.splitlines()
    orders = next(line for line in flows if line.split()[:1] == ["orders"]).split()
    assert orders[1:3] == [str(len(ids)), "1"]  # checkpoints, runs with a live lease (C)
    assert any(line.split()[:3] == ["other", str(history.others), "0"] for line in flows)

    runs = {row["run"]: row for row in json.loads(done["runs"].stdout)["items"]}
    assert set(runs) == set(history.runs.values())
    for run in history.runs.values():
        own = [cp for cp in history.checkpoints if cp.wf_run_id == run]
        assert runs[run]["checkpoints"] == len(own) and runs[run]["stored_bytes"] > 0
        assert runs[run]["newest_checkpoint"] == own[0].id and runs[run]["status"] == own[0].status.value
    assert runs[history.runs["c"]]["lease"]["live"] and runs[history.runs["c"]]["lease"]["owner"]
    assert not runs[history.runs["a"]]["lease"]["live"]

    rows = [line.split() for line in done["checkpoints"].stdout.splitlines() if line.split()[:1] and
            line.split()[0] in ids]  # fmt: skip
    assert [r[0] for r in rows] == [cp.id for cp in history.checkpoints if cp.wf_run_id == history.runs["c"]]
    assert rows[0][1:4] == [history.runs["c"], "active", "2/4"] and "(live)" in rows[0][-1]

    shown = done["show"].stdout
    assert "children" in shown and any(line.split() == ["children", "2"] for line in shown.splitlines())
    assert any(line.split()[:2] == ["nodes", "completed"] and line.split()[2] == "2/4" for line in shown.splitlines())

    tree = json.loads(done["chain"].stdout)["tree"]
    branch = find(tree, fork_point)
    assert tree["id"] == history.root
    assert {child["run"] for child in branch["children"]} == {history.runs["a"], history.runs["b"]}
    assert [n["id"] for n in walk(tree) if n["this"]] == [in_b]
    assert {n["id"] for n in walk(tree)} == {cp.id for cp in history.checkpoints if cp.wf_run_id != history.runs["c"]}

    stats = {row["flow"]: row for row in json.loads(done["stats"].stdout)["items"]}
    assert {"orders", "other"} <= set(stats) and stats["orders"]["checkpoints"] == len(ids)  # (and "ties", later)
    assert stats["orders"]["runs"] == 3


def find(node: dict, cp_id: str) -> dict | None:
    return next((n for n in walk(node) if n["id"] == cp_id), None)


def walk(node: dict):
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        todo += n["children"]


def test_the_tree_and_the_whole_checkpoint_for_people_and_scripts(history, capsys):
    in_b = next(cp for cp in history.checkpoints if cp.wf_run_id == history.runs["b"])
    code, out = in_process(capsys, history, "chain", in_b.id)
    lines = out.splitlines()
    assert code == 0 and "<- this one" in next(line for line in lines if in_b.id in line)
    assert sum("<- this one" in line for line in lines) == 1
    fork = next(i for i, line in enumerate(lines) if history.fork_point in line)
    depth = lines[fork].index(history.fork_point)
    children = [line for line in lines[fork + 1 :] if len(line) > depth + 4 and line[depth + 4 : depth + 5].isalnum()
                and line[depth : depth + 1] in "├└"]  # fmt: skip
    assert len(children) == 2  # the fork point's two branches, drawn one level below it
    code, out = in_process(capsys, history, "show", in_b.id, "--full")
    assert code == 0 and json.loads(out) == in_b.model_dump(mode="json")


def test_paging_visits_every_run_and_checkpoint_once(history, capsys):
    runs = page_through(capsys, history, "runs", "orders", "--limit", "1")
    assert sorted(r["run"] for r in runs) == sorted(history.runs.values())
    checkpoints = page_through(capsys, history, "checkpoints", "orders", "--limit", "4")
    assert [c["id"] for c in checkpoints] == [cp.id for cp in history.checkpoints]  # newest first, each once
    active = page_through(capsys, history, "checkpoints", "orders", "--status", "active", "--limit", "3")
    assert [c["id"] for c in active] == [cp.id for cp in history.checkpoints if cp.status.value == "active"]
    only_c = page_through(capsys, history, "runs", "orders", "--status", "active", "--limit", "1")
    assert [r["run"] for r in only_c] == [history.runs["c"]]


def test_paging_through_equal_timestamps(history, capsys, redis_server):
    """Checkpoints saved with one created_at (one index score): a page boundary between them neither repeats nor
    drops one."""
    writer = RedisCheckpointBackend(url=redis_server.url, prefix=history.prefix, leases=False)
    model = history.checkpoints[0]
    copies = [model.model_copy(update={"id": f"tie-{i}", "flow_id": "ties", "wf_run_id": f"run-{i % 3}",
                                       "run_id": f"run-{i % 3}", "parent_checkpoint_id": None}) for i in range(7)]
    for copy in copies:
        writer.save(copy)
    checkpoints = page_through(capsys, history, "checkpoints", "ties", "--limit", "2")
    assert sorted(c["id"] for c in checkpoints) == sorted(c.id for c in copies)
    runs = page_through(capsys, history, "runs", "ties", "--limit", "1")
    assert sorted(r["run"] for r in runs) == ["run-0", "run-1", "run-2"]
    assert sum(r["checkpoints"] for r in runs) == 7


def test_stats_adds_up(history, capsys):
    code, out = in_process(capsys, history, "stats", "orders", "--json")
    assert code == 0
    (row,) = json.loads(out)["items"]
    raw = history.backend.redis
    loaded = [history.backend.load(cp.id) for cp in history.checkpoints]
    assert row["logical_bytes"] == sum(encode_checkpoint(cp).raw_size for cp in loaded)
    packs = [key for pattern in (f"{history.prefix}:pack:{{orders}}:*", f"{history.prefix}:pack:{{orders%b*")
             for key in raw.scan_iter(pattern)]  # the flow's own home, and its buckets' on a cluster
    assert row["packs"] == len(packs) and row["pack_bytes"] == sum(raw.strlen(key) for key in packs)
    assert row["stored_bytes"] == row["pack_bytes"] + row["hash_bytes"]
    # APPEND snapshots share unchanged node states, and zstd against the parent's pack shrinks the rest
    assert row["dedup"] > 1.5 and row["compression"] > 1.5
    assert row["raw_bytes"] < row["logical_bytes"]
    code, out = in_process(capsys, history, "stats", "orders")
    assert code == 0 and out.splitlines()[2].split()[:3] == ["orders", str(len(loaded)), "3"]


def test_malformed_input_and_unknown_names(history, capsys):
    assert in_process(capsys, history, "chain", "no-such-checkpoint")[0] == 4
    assert in_process(capsys, history, "stats", "no-such-flow")[0] == 4
    assert in_process(capsys, history, "checkpoints", "no-such-flow")[0] == 4
    assert in_process(capsys, history, "runs", "no-such-flow")[0] == 4
    assert in_process(capsys, history, "checkpoints", "orders", "--run", "no-such-run")[0] == 4
    assert in_process(capsys, history, "show", "")[0] == 2
    assert in_process(capsys, history, "runs", "orders", "--cursor", "eyJ4IjoxfQ")[0] == 2  # JSON, not a position
    with pytest.raises(SystemExit) as exit:  # argparse: an unknown status
        in_process(capsys, history, "runs", "orders", "--status", "sleeping")
    assert exit.value.code == 2


def test_stats_and_chain_page_by_position_while_retention_deletes(redis_server, capsys, monkeypatch):
    """stats and chain's downward walk read a flow index a page at a time: when the oldest checkpoint is deleted
    between two pages (retention deletes oldest first), paging by offset would shift every later entry down one and
    skip one; by position, every checkpoint present throughout is still read."""
    from dynamiq_redis_ckpt import history as history_ops

    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"browse{uuid.uuid4().hex[:8]}")
    try:
        chain_flow(backend, 3, flow_id="orders", words=20).run_sync({"order": 1})
        oldest_first = [cp.id for cp in reversed(backend.get_list_by_flow("orders", limit=None))]
        raw = {i: int(backend.redis.hget(backend.store.keys.checkpoint("orders", i), "raw")) for i in oldest_first}
        monkeypatch.setattr(history_ops, "CHUNK", 2)  # the same race at any page size, with 5 checkpoints
        real_page = history_ops.ascending_page

        def page_then_retention_deletes(*args):
            pages.append((yield from real_page(*args)))
            if len(pages) == 1:
                backend.delete(oldest_first[0])  # read on the first page, gone before the next
            return pages[-1]

        monkeypatch.setattr(history_ops, "ascending_page", page_then_retention_deletes)
        pages = []
        code, out = in_process(capsys, backend, "stats", "orders", "--json")
        assert code == 0 and len(pages) > 2
        (row,) = json.loads(out)["items"]
        throughout = oldest_first[1:]  # the deleted one's hash is read after the delete: not counted
        assert row["checkpoints"] == len(throughout) and row["logical_bytes"] == sum(raw[i] for i in throughout)

        chain_flow(backend, 3, flow_id="orders", words=20).run_sync({"order": 2})
        oldest_first = [cp.id for cp in reversed(backend.get_list_by_flow("orders", limit=5))]  # the new run
        pages = []
        code, out = in_process(capsys, backend, "chain", oldest_first[0], "--json")
        assert code == 0 and len(pages) > 2
        assert json.loads(out)["checkpoints"] == len(oldest_first)  # the whole run, its root read before the delete
    finally:
        backend.clear()


def test_stats_of_a_truncated_pack_says_the_data_is_damaged(redis_server, capsys):
    """A pack cut short cannot be measured: stats says it is damaged (not '-', which means sealed without the key)."""
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"browse{uuid.uuid4().hex[:8]}")
    try:
        chain_flow(backend, 2, flow_id="orders", words=20).run_sync({"order": 1})
        newest = backend.get_latest_by_flow("orders").id
        pack = backend.redis.hget(backend.store.keys.checkpoint("orders", newest), "pk").decode().split(",")[0]
        key = backend.store.keys.pack("orders", pack)
        backend.redis.set(key, backend.redis.get(key)[:20])
        code, out = in_process(capsys, backend, "stats", "orders", "--json")
        (row,) = json.loads(out)["items"]
        assert code == 0 and row["raw_bytes"] is None and key in row["damaged"]
        code, out = in_process(capsys, backend, "stats", "orders")
        assert code == 0 and "DAMAGED" in out.splitlines()[2] and key in out
    finally:
        backend.clear()
