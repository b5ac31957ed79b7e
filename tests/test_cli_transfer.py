"""``export`` and ``import`` as real processes: a Dynamiq FileSystem directory and a PostgreSQL table written by real
Dynamiq flows migrate into Redis, interrupted once by SIGKILL and resumed, then compared checkpoint by checkpoint with
Dynamiq's own load; export and import round-trip into another prefix; imported runs are left alone by a worker
running beside them unless handed over; malformed input and unreachable servers give their exit codes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import uuid

import pytest
from dynamiq.checkpoints.backends.filesystem import FileSystem
from dynamiq.checkpoints.types import CheckpointStatus

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.cli.transfer import PAUSE_ENV
from dynamiq_redis_ckpt.leases import lease_head_op
from dynamiq_redis_ckpt.sources import FileSystemSource, JsonLinesSource, SourceError
from dynamiq_redis_ckpt.transfer import Importer, flow_counts_op
from dynamiq_redis_ckpt.worker import Recovery
from tests.cli_proc import cli, cli_popen
from tests.flows import PREFIX_ENV, RunInterrupted, chain_flow
from tests.pg_proc import PostgresServer
from tests.redis_proc import free_port
from tests.test_worker import wait_for

NODES = 6  # chain-6-*: the test workers' flow registry (tests.flows.worker_flows) builds these flows too
WORDS = 60  # as worker_flows builds them


def write_history(backend, stem: str, tmp) -> dict:
    """Real Dynamiq runs checkpointing to ``backend``: flow a has two runs and a third branched from the middle of
    the first; b two runs; c one run and one interrupted mid-way (its newest checkpoint is active)."""
    a, b, c = (f"chain-{NODES}-{stem}{x}" for x in "abc")
    for flow_id, runs in ((a, 2), (b, 2), (c, 1)):
        for i in range(runs):
            result = chain_flow(backend, NODES, flow_id=flow_id, words=WORDS).run_sync({"ask": f"{flow_id} {i}"})
            assert result.status.value == "success"
    first_run = sorted(backend.get_list_by_flow(a), key=lambda cp: cp.created_at)[:NODES + 2]
    fork_point = first_run[3]
    branch = chain_flow(backend, NODES, flow_id=a, words=WORDS).run_sync(None, resume_from=fork_point.id)
    assert branch.status.value == "success"
    with pytest.raises(RunInterrupted):
        chain_flow(backend, NODES, flow_id=c, words=WORDS,
                   interrupt_once={"s03": str(tmp / f"{stem}-interrupt")}).run_sync({"ask": "interrupted"})
    flows = [a, b, c]
    everything = [cp for f in flows for cp in backend.get_list_by_flow(f)]
    children = [cp for cp in everything if cp.parent_checkpoint_id == fork_point.id]
    assert len(children) == 2  # the first run's next snapshot, and the branch's first
    leaf = max((cp for cp in everything if cp.flow_id == a), key=lambda cp: cp.created_at)
    interrupted = max((cp for cp in everything if cp.flow_id == c), key=lambda cp: cp.created_at)
    assert interrupted.status == CheckpointStatus.ACTIVE
    return {"flows": flows, "total": len(everything), "leaf": leaf.id, "fork_point": fork_point.id,
            "interrupted_flow": c, "interrupted_run": interrupted.wf_run_id or interrupted.run_id}  # fmt: skip


@pytest.fixture(scope="module")
def fs_store(tmp_path_factory):
    """A Dynamiq FileSystem checkpoint directory written by real runs."""
    tmp = tmp_path_factory.mktemp("fs-history")
    backend = FileSystem(base_path=str(tmp / "checkpoints"))
    return backend, write_history(backend, "fs", tmp)


@pytest.fixture(scope="module")
def pg_store(tmp_path_factory):
    """A Dynamiq PostgreSQL checkpoint table written by real runs, on a PostgreSQL of the test's own."""
    from dynamiq.checkpoints.backends.postgresql import PostgreSQL

    server = PostgresServer().start()
    print(f"PostgreSQL for this test: {server.how}")
    backend = PostgreSQL(connection=server.connection(), table_name="migrated_checkpoints")
    history = write_history(backend, "pg", tmp_path_factory.mktemp("pg-history"))
    yield server, backend, history
    backend.close()
    server.stop()


def stored(backend: RedisCheckpointBackend, flows: list[str]) -> int:
    """How many checkpoints the flows' indexes hold."""
    return sum(backend.execute(flow_counts_op(backend.store.keys, flows, backend.store.buckets)).values())


def import_killed_midway(source_args: list[str], url: str, prefix: str, flows: list[str], total: int) -> int:
    """Start an import slowed down by the tests' knob, SIGKILL it once some checkpoints are stored; how many are."""
    backend = RedisCheckpointBackend(url=url, prefix=prefix)
    proc = cli_popen("import", *source_args, "--url", url, "--prefix", prefix, env={PAUSE_ENV: "0.1"})
    wait_for(lambda: stored(backend, flows) >= 8 or proc.poll() is not None)
    proc.kill()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    found = stored(backend, flows)
    assert 8 <= found < total
    return found


def import_json(*args: str) -> dict:
    done = cli("import", *args, "--json")
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


def assert_same_as_source(source, redis_backend: RedisCheckpointBackend, flows: list[str]) -> int:
    """Every checkpoint of the source is in Redis, once, and Dynamiq's load of each gives the same checkpoint."""
    checked = 0
    for flow in flows:
        expected = source.get_list_by_flow(flow)
        in_redis = redis_backend.get_list_by_flow(flow)
        assert sorted(cp.id for cp in in_redis) == sorted(cp.id for cp in expected)  # nothing lost or duplicated
        for cp in expected:
            assert redis_backend.load(cp.id).model_dump() == source.load(cp.id).model_dump()
            checked += 1
    return checked


def chain_ids(backend, checkpoint_id: str) -> list[str]:
    return [cp.id for cp in backend.get_chain(checkpoint_id)]


@pytest.mark.slow
def test_filesystem_import_killed_midway_resumes_and_matches_dynamiq_load(redis_server, fs_store):
    source, history = fs_store
    flows, total, prefix = history["flows"], history["total"], f"fs{uuid.uuid4().hex[:6]}"
    args = ["--from-filesystem", source.base_path]
    before = import_killed_midway(args, redis_server.url, prefix, flows, total)

    resumed = import_json(*args, "--url", redis_server.url, "--prefix", prefix)
    totals = resumed["totals"]
    assert totals["source"] == total and totals["updated"] == 0
    assert totals["skipped"] >= before and totals["saved"] == total - totals["skipped"]
    assert resumed["verified"] and totals["verified"] == total and not resumed["mismatches"]
    assert {row["flow"]: row["in_redis"] for row in resumed["flows"]} == {
        f: len(source.get_list_by_flow(f)) for f in flows}  # fmt: skip

    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    assert assert_same_as_source(source, backend, flows) == total
    # the branch and the run it left from share their history up to the fork point
    assert chain_ids(backend, history["leaf"]) == chain_ids(source, history["leaf"])
    assert history["fork_point"] in chain_ids(backend, history["leaf"])
    # no run took a lease: a worker finds nothing to claim
    assert Recovery(backend).find_work() == []


@pytest.mark.slow
def test_postgres_import_killed_midway_resumes_and_matches_dynamiq_load(redis_server, pg_store):
    server, source, history = pg_store
    flows, total, prefix = history["flows"], history["total"], f"pg{uuid.uuid4().hex[:6]}"
    args = ["--from-postgres", server.dsn, "--table", "migrated_checkpoints"]
    before = import_killed_midway(args, redis_server.url, prefix, flows, total)

    resumed = import_json(*args, "--url", redis_server.url, "--prefix", prefix)
    totals = resumed["totals"]
    assert totals["skipped"] >= before and totals["saved"] == total - totals["skipped"], resumed
    assert totals["verified"] == total and not resumed["mismatches"] and not resumed["unreadable"]

    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    assert assert_same_as_source(source, backend, flows) == total
    assert chain_ids(backend, history["leaf"]) == chain_ids(source, history["leaf"])
    assert Recovery(backend).find_work() == []


@pytest.mark.slow
def test_export_then_import_into_another_prefix_round_trips(redis_server, fs_store, tmp_path):
    source, history = fs_store
    flows, total = history["flows"], history["total"]
    first, second = f"ex{uuid.uuid4().hex[:6]}", f"im{uuid.uuid4().hex[:6]}"
    original = RedisCheckpointBackend(url=redis_server.url, prefix=first)
    report = Importer(original).run(FileSystemSource(source.base_path))
    assert report.totals.saved == total

    dump = tmp_path / "all.jsonl"
    exported = cli("export", "-o", str(dump), "--url", redis_server.url, "--prefix", first)  # every flow
    assert exported.returncode == 0, exported.stderr
    assert f"exported {total} checkpoints of 3 flows" in exported.stdout
    lines = dump.read_text().splitlines()
    assert len(lines) == total
    position = {json.loads(line)["id"]: i for i, line in enumerate(lines)}
    for line in lines:  # parents before children
        parent = json.loads(line)["parent_checkpoint_id"]
        assert parent is None or position[parent] < position[json.loads(line)["id"]]

    run = history["interrupted_run"]
    one_run = cli("export", history["interrupted_flow"], "--run", run, "-o", "-", "--url", redis_server.url,
                  "--prefix", first)  # fmt: skip
    assert one_run.returncode == 0, one_run.stderr
    run_lines = [json.loads(line) for line in one_run.stdout.splitlines()]
    assert run_lines and {line["wf_run_id"] for line in run_lines} == {run}
    assert len(run_lines) == len(original.get_list_by_flow_and_run(history["interrupted_flow"], run))

    imported = import_json(str(dump), "--url", redis_server.url, "--prefix", second)
    assert imported["totals"]["saved"] == total and imported["totals"]["verified"] == total
    copy = RedisCheckpointBackend(url=redis_server.url, prefix=second)
    assert assert_same_as_source(original, copy, flows) == total
    assert chain_ids(copy, history["leaf"]) == chain_ids(source, history["leaf"])


@pytest.mark.slow
def test_imported_runs_are_left_alone_by_a_worker_unless_handed_over(redis_server, fs_store, tmp_path):
    source, history = fs_store
    flow, run, prefix = history["interrupted_flow"], history["interrupted_run"], f"hw{uuid.uuid4().hex[:6]}"
    log = tmp_path / "worker.log"
    worker = cli_popen("worker", "--url", redis_server.url, "--prefix", prefix, "--flows", "tests.flows:worker_flows",
                       "--lease-ttl", "2", "--poll", "0.1", stdout=open(log, "w"), stderr=subprocess.STDOUT,
                       env={"DYNAMIQ_REDIS_CKPT_URL": redis_server.url, PREFIX_ENV: prefix})  # fmt: skip
    try:
        args = ["--from-filesystem", source.base_path, "--flow", flow, "--url", redis_server.url, "--prefix", prefix]
        plain = import_json(*args)
        assert plain["totals"]["saved"] == len(source.get_list_by_flow(flow)) and plain["handed_to_workers"] == []
        backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
        assert Recovery(backend).find_work() == []
        assert backend.execute(lease_head_op(backend.store.keys, run, flow, backend.store.buckets)) == []
        wait_for(lambda: "worker ready" in log.read_text())

        again = cli("import", *args, "--hand-to-workers")  # a re-run: everything is stored already
        assert again.returncode == 0, again.stderr
        total = plain["totals"]["source"]
        assert f"{total} checkpoints of 1 flow: 0 saved, 0 updated, {total} skipped" in again.stdout
        assert f"verified: {total} of {total} equal in Redis" in again.stdout
        # the interrupted run goes to the workers; the completed one stays as it is
        assert f"handed to the workers: 1 run ({run})" in again.stdout
        done = wait_for(lambda: (cp := backend.get_latest_by_flow_and_run(flow, run)) is not None
                        and cp.status == CheckpointStatus.COMPLETED and cp)  # fmt: skip
        assert sorted(done.completed_node_ids) == [f"s{i:02d}" for i in range(NODES)]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    text = log.read_text()
    assert text.count("resuming run ") == 1 and f"resuming run {run} " in text
    assert "worker stopped after resuming 1 runs" in text


@pytest.mark.slow
def test_import_and_export_exit_codes(redis_server, fs_store, tmp_path):
    source, history = fs_store
    good = [cp.to_json() for cp in source.get_list_by_flow(history["flows"][1])[:3]]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join([*good, '{"id": "x", "flow_id": ', "not json at all"]) + "\n")
    prefix = f"bad{uuid.uuid4().hex[:6]}"
    url = ["--url", redis_server.url, "--prefix", prefix]
    cases = {  # run at once: each is mostly the interpreter starting
        "malformed line": (["import", str(broken), *url], 2, "line 4"),
        "malformed DSN": (["import", "--from-postgres", "postgresql://[::1", *url], 2, "malformed PostgreSQL DSN"),
        "PostgreSQL unreachable": (["import", "--from-postgres", f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                                    *url], 5, "connection"),  # fmt: skip
        "Redis unreachable": (["import", str(broken), "--url", f"redis://127.0.0.1:{free_port()}/0"], 5,
                              "Redis unreachable"),  # fmt: skip
        "no such flow": (["export", "no-such-flow", "-o", "-", *url], 4, "no checkpoints of flow no-such-flow"),
    }
    procs = {name: cli_popen(*args) for name, (args, _, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        _, code, says = cases[name]
        assert proc.returncode == code, (name, proc.returncode, out, err)
        assert says in err, (name, err)
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    assert list(backend.redis.scan_iter(f"{prefix}:*")) == []  # the malformed file wrote nothing


def test_a_missing_file_or_directory_is_bad_input(tmp_path):
    with pytest.raises(SourceError, match="missing.jsonl"):
        JsonLinesSource(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SourceError, match="no such directory"):
        FileSystemSource(str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()  # Dynamiq's FileSystem backend would have created it


def test_a_file_with_children_before_parents_imports_parents_first(redis_server, fs_store, tmp_path):
    source, history = fs_store
    flow = history["flows"][0]
    newest_first = source.get_list_by_flow(flow)  # children before their parents
    path = tmp_path / "reversed.jsonl"
    path.write_text("".join(cp.to_json() + "\n" for cp in newest_first))
    lines = JsonLinesSource(str(path))
    order = [cp.id for cp in lines.checkpoints()]
    assert sorted(order) == sorted(cp.id for cp in newest_first)
    for cp in newest_first:
        if cp.parent_checkpoint_id:
            assert order.index(cp.parent_checkpoint_id) < order.index(cp.id)
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"rv{uuid.uuid4().hex[:6]}")
    importer = Importer(backend)
    report = importer.verify(lines, importer.run(lines))
    assert report.totals.verified == len(newest_first) and not report.mismatches
    assert chain_ids(backend, history["leaf"]) == chain_ids(source, history["leaf"])
    backend.clear()


def test_a_file_dynamiq_cannot_read_is_reported_not_lost(redis_server, fs_store, tmp_path):
    source, history = fs_store
    flow = history["flows"][1]
    copy = tmp_path / "copy"
    shutil.copytree(f"{source.base_path}/{flow}", copy / flow)
    run_dir = next(d for d in (copy / flow).iterdir() if d.is_dir())
    damaged = run_dir / "2026-01-01T00-00-00-00__damaged.json"
    damaged.write_text('{"id": "damaged", "flow_id": ')
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=f"ur{uuid.uuid4().hex[:6]}")
    importer = Importer(backend)
    files = FileSystemSource(str(copy))
    report = importer.verify(files, importer.run(files))
    assert report.totals.verified == len(source.get_list_by_flow(flow))
    assert len(report.unreadable) == 1 and str(damaged) in report.unreadable[0]
    backend.clear()
