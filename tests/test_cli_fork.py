"""``diff`` and ``fork`` as real processes against a real redis-server, on the snapshots of a real Dynamiq run: the
diff of two of them (text and --json), a fork a worker process completes with the replaced output downstream, a
fork run in the foreground with --flows, and the exit codes of bad ids, unreachable Redis and malformed --set."""

from __future__ import annotations

import json
import uuid

import pytest
from dynamiq.checkpoints.types import CheckpointStatus as S

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.cli import main
from dynamiq_redis_ckpt.worker import Recovery
from tests.cli_proc import cli, cli_all
from tests.flows import PREFIX_ENV, chain_flow, prose
from tests.redis_proc import free_port
from tests.test_worker import start_worker, stop, wait_for

FLOW = "chain-4"  # a flow tests.flows:worker_flows knows how to build (4 steps, 60 words each)


@pytest.fixture(scope="module")
def run(redis_server):
    """A completed run of a 4-step chain: its backend, its snapshots by completed nodes, all of them dumped."""
    prefix = f"fk{uuid.uuid4().hex[:8]}"
    backend = RedisCheckpointBackend(url=redis_server.url, prefix=prefix)
    result = chain_flow(backend, 4, flow_id=FLOW, words=60).run_sync({"q": "go"})
    assert result.status.value == "success"
    snapshots = backend.get_list_by_flow(FLOW, limit=50)
    after = {len(c.completed_node_ids): c.id for c in snapshots if c.status == S.ACTIVE}
    dumped = {c.id: c.model_dump(mode="json") for c in snapshots}
    yield backend, after, dumped, redis_server.url, prefix
    backend.clear()


def store(url: str, prefix: str) -> list[str]:
    return ["--url", url, "--prefix", prefix]


def unchanged(backend, dumped: dict) -> bool:
    """Whether every checkpoint of the original run loads as it was."""
    return all(backend.load(i).model_dump(mode="json") == before for i, before in dumped.items())


def test_diff_of_two_snapshots_text_and_json(run):
    backend, after, _, url, prefix = run
    text, documented = cli_all(("diff", after[1], after[3], *store(url, prefix)),
                               ("diff", after[1], after[3], "--json", "--exit-code", *store(url, prefix)))
    assert text.returncode == 0, text.stderr  # differences are not a failure without --exit-code
    assert "completed: s01, s02" in text.stdout
    assert "+ nodes.s02.output: " in text.stdout and "chars)" in text.stdout  # a long transcript, shortened
    assert documented.returncode == 1
    diff = json.loads(documented.stdout)
    assert (diff["a"], diff["b"], diff["completed"], diff["went_back"]) == (after[1], after[3], ["s01", "s02"], [])
    rows = {row["path"]: row for row in diff["changes"]}
    assert set(rows["nodes.s02.output"]) == {"node", "field", "path", "kind", "old", "new"}
    s02 = rows["nodes.s02.output"]
    assert (s02["node"], s02["field"], s02["kind"]) == ("s02", "output", "added")
    assert s02["new"]["content"] == prose(2, 60) == backend.load(after[3]).node_states["s02"].output_data["content"]
    assert "nodes.s00.output" not in rows and not any(p.startswith("nodes.s00.") for p in rows)


@pytest.mark.slow
def test_fork_to_a_worker_and_in_the_foreground(run, redis_server, tmp_path):
    """Two forks of the run at once (each process spends seconds importing Dynamiq): one handed to a worker process,
    one run in the foreground with --flows; both see their replaced output downstream, the original run unchanged."""
    backend, after, dumped, url, prefix = run
    worker = start_worker(redis_server, prefix, tmp_path / "worker.log")  # starts up while the forks are made
    here = cli_all(("fork", after[3], "--set", 's02.output.transcript=["ONE", "KEY", "ONLY"]', "--json",
                    "--flows", "tests.flows:worker_flows", *store(url, prefix)),
                   env={"DYNAMIQ_REDIS_CKPT_URL": url, PREFIX_ENV: prefix}, wait=False)  # fmt: skip
    try:
        replaced = {"content": "forked", "transcript": ["FORKED", "TWICE"], "step": 1}  # the longest upstream one
        made = cli("fork", after[2], "--set", f"s01.output={json.dumps(replaced)}", "--json", *store(url, prefix))
        assert made.returncode == 0, made.stderr
        fork = json.loads(made.stdout)
        assert fork["handed_to_workers"] and fork["source"] == after[2] and fork["replaced"] == ["s01.output"]
        first = backend.load(fork["checkpoint"])
        assert first.wf_run_id == fork["run"] != dumped[after[2]]["wf_run_id"]
        assert first.parent_checkpoint_id == after[2] and first.node_states["s01"].output_data == replaced

        def completed():
            latest = backend.get_latest_by_flow_and_run(FLOW, fork["run"])
            return latest if latest is not None and latest.status == S.COMPLETED else None

        last = wait_for(completed, timeout=120)
        foreground = here()[0]
    finally:
        assert stop(worker) == 0
    assert last.completed_node_ids == ["s00", "s01", "s02", "s03"]
    assert last.node_states["s02"].input_data["s01"]["output"] == replaced  # downstream read the replacement
    assert last.node_states["s03"].output_data["transcript"] == ["FORKED", "TWICE", prose(2, 60), prose(3, 60)]
    assert last.node_states["s01"].output_data == replaced  # s01 did not run again

    assert foreground.returncode == 0, foreground.stderr
    ran = json.loads(foreground.stdout)
    assert ran["status"] == "success" and not ran["handed_to_workers"] and ran["run"] != fork["run"]
    assert ran["output"]["s03"]["output"]["transcript"] == ["ONE", "KEY", "ONLY", prose(3, 60)]
    assert ran["output"]["s02"]["output"]["content"] == prose(2, 60)  # the output's other keys kept
    ran_last = backend.load(ran["last_checkpoint"])
    assert ran_last.status == S.COMPLETED and ran_last.wf_run_id == ran["run"]
    assert ran_last.node_states["s02"].output_data["transcript"] == ["ONE", "KEY", "ONLY"]

    assert unchanged(backend, dumped)
    original = backend.get_list_by_flow_and_run(FLOW, dumped[after[2]]["wf_run_id"], limit=50)
    assert sorted(c.id for c in original) == sorted(dumped)  # nothing joined the original run


def test_exit_codes(run, capsys):
    backend, after, _, url, prefix = run
    nowhere = ["--url", f"redis://127.0.0.1:{free_port()}/0", "--prefix", prefix]
    processes = {  # as real processes, at once
        ("fork", "no-such-id", *store(url, prefix)): 4,
        ("diff", after[1], after[2], *nowhere): 5,
        ("fork", after[1], "--set", "s00.output=[1", *store(url, prefix)): 2,  # bad JSON
    }
    for done, code in zip(cli_all(*processes), processes.values()):
        assert done.returncode == code, (done.args, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and not done.stdout
    in_process = {  # the same main() in this process: Dynamiq is imported already
        ("diff", after[1], "no-such-id", *store(url, prefix)): 4,
        ("fork", after[1], *nowhere): 5,
        ("fork", after[1], "--set", "s00.output", *store(url, prefix)): 2,  # no =JSON
        ("fork", after[1], "--set", "s00.result=1", *store(url, prefix)): 2,  # not NODE.output
        ("fork", after[1], "--set", "s02.output=1", *store(url, prefix)): 2,  # not completed in that snapshot
        ("fork", after[1], "--set", "s00.output.content.x=1", *store(url, prefix)): 2,  # a key inside a string
        ("fork", after[1], "--flows", "tests.no_such_module:flows", *store(url, prefix)): 2,
    }
    for args, code in in_process.items():
        assert main(list(args)) == code, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and not out, (args, out, err)
    assert len(backend.get_list_by_flow(FLOW, limit=50)) >= 6  # nothing was deleted or broken on the way


def test_fork_of_an_earlier_node_warns_of_the_nodes_after_it(run, capsys):
    backend, after, _, url, prefix = run
    assert main(["fork", after[3], "--set", 's00.output.content="early"', "--json", *store(url, prefix)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: s01, s02 completed after a replaced node")
    fork = json.loads(out)
    assert backend.load(fork["checkpoint"]).node_states["s00"].output_data["content"] == "early"
    assert (FLOW, fork["run"], "orphan") in Recovery(backend).find_work()  # claimable by any worker at once
