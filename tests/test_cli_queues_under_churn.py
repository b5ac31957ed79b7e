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
from tests.test_contract import make


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


@pytest.fixture
def bucketed(redis_server):
    """A namespace whose flows spread over 4 buckets on one server (flow_buckets=4, recorded on the first save)."""
    b = RedisCheckpointBackend(url=redis_server.url, prefix=f"r3b{uuid.uuid4().hex[:8]}", flow_buckets=4)
    yield b
    b.clear()


def test_a_flow_spread_over_four_buckets_lists_its_leases_orphans_and_dead_letters(capsys, bucketed):
    runs = [f"wf-{i}" for i in range(6)]
    for run in runs:
        hold(bucketed, "orders", run, "pod-a:1:x", 600_000)
    hold(bucketed, "orders", "wf-dead", "pod-gone:1:x", 50)
    time.sleep(0.1)
    recovery = Recovery(bucketed, max_attempts=1, backoff_seconds=0.01)
    assert recovery.hand_back(recovery.claim("orders", "wf-dead"), failed=True)
    time.sleep(0.05)
    assert recovery.claim("orders", "wf-dead") is None  # dead-lettered in its bucket home
    everything = listed(capsys, bucketed, ["leases"], limit=50)
    assert sorted(r["run"] for r in everything["items"]) == runs  # no flow filter: read from the wake shards
    of_flow = listed(capsys, bucketed, ["leases"], "orders", limit=50)
    assert sorted(r["run"] for r in of_flow["items"]) == runs, "leases FLOW must read all 4 homes of the flow"
    dead = listed(capsys, bucketed, ["dead", "list"], "orders", limit=50)
    assert [r["run"] for r in dead["items"]] == ["wf-dead"]


def test_top_once_shows_the_newest_save_of_an_idle_flow_in_a_four_bucket_namespace(capsys, bucketed):
    bucketed.save(make("idle-head", "idle", "r-idle", "wf-idle", S.COMPLETED))
    code, out, err = cli(capsys, "top", "--once", "--json", *where(bucketed))
    assert code == 0, err
    row = next(r for r in json.loads(out)["flows"] if r["flow"] == "idle")
    assert row["newest_save_seconds"] is not None, "the recent flow's homes are its 4 buckets, not its bare id"


def test_dead_retry_of_a_run_not_dead_is_not_found_and_of_one_dead_in_a_bucket_home_puts_it_back(capsys, bucketed):
    hold(bucketed, "orders", "wf-live", "pod-a:1:x", 600_000)
    hold(bucketed, "orders", "wf-dead", "pod-gone:1:x", 50)
    time.sleep(0.1)
    recovery = Recovery(bucketed, max_attempts=1, backoff_seconds=0.01)
    assert recovery.hand_back(recovery.claim("orders", "wf-dead"), failed=True)
    time.sleep(0.05)
    assert recovery.claim("orders", "wf-dead") is None
    assert cli(capsys, "dead", "retry", "orders", "wf-live", *where(bucketed))[0] == 4
    assert cli(capsys, "dead", "retry", "orders", "wf-nobody", *where(bucketed))[0] == 4
    assert cli(capsys, "dead", "retry", "orders", "wf-dead", *where(bucketed))[0] == 0
    assert cli(capsys, "dead", "retry", "orders", "wf-dead", *where(bucketed))[0] == 4  # only once
    orphans = listed(capsys, bucketed, ["orphans"], limit=50)
    assert [r["run"] for r in orphans["items"]] == ["wf-dead"]
    assert listed(capsys, bucketed, ["dead", "list"], limit=50)["items"] == []


def test_a_lease_hash_with_a_non_numeric_field_is_damaged_data_named_not_a_bug(capsys, backend):
    """One run's lease hash altered (token 'abc', attempts '1.5'): the listings either show the other runs or fail
    naming the damaged key as damaged data; today each fails as 'unexpected ValueError' (the message for a bug),
    naming no key, and one hash takes the whole listing of every flow down."""
    hold(backend, "orders", "wf-ok", "pod-a:1:x", 600_000)
    hold(backend, "orders", "wf-bad", "pod-a:1:x", 600_000)
    hold(backend, "billing", "wf-dead", "pod-gone:1:x", 50)
    time.sleep(0.1)
    recovery = Recovery(backend, max_attempts=1, backoff_seconds=0.01)
    assert recovery.hand_back(recovery.claim("billing", "wf-dead"), failed=True)
    time.sleep(0.05)
    assert recovery.claim("billing", "wf-dead") is None
    keys = backend.store.keys
    client = __import__("redis").Redis.from_url(backend.url)
    client.hset(keys.lease("orders", "wf-bad"), "token", "abc")
    client.hset(keys.lease("billing", "wf-dead"), "attempts", "1.5")
    for command, key in ((["leases"], keys.lease("orders", "wf-bad")),
                         (["dead", "list"], keys.lease("billing", "wf-dead"))):  # fmt: skip
        code, out, err = cli(capsys, *command, "--json", *where(backend))
        assert "Traceback" not in err
        if code == 0:
            assert json.loads(out)["items"], out
        else:
            assert "unexpected" not in err and key in err, (command, code, err)


BAD_METRICS = {
    "/html": "<html><body>Not Found</body></html>",
    "/gauge": "# TYPE dynamiq_ckpt_recovery_latency_seconds gauge\ndynamiq_ckpt_recovery_latency_seconds 3\n",
    "/no-le": "# TYPE dynamiq_ckpt_recovery_latency_seconds histogram\n"
              "dynamiq_ckpt_recovery_latency_seconds_bucket 3\ndynamiq_ckpt_recovery_latency_seconds_count 3\n",
    "/le-abc": "# TYPE dynamiq_ckpt_recovery_latency_seconds histogram\n"
               'dynamiq_ckpt_recovery_latency_seconds_bucket{le="abc"} 3\n',
    "/nan": "# TYPE dynamiq_ckpt_recovery_latency_seconds histogram\n"
            'dynamiq_ckpt_recovery_latency_seconds_bucket{le="1"} NaN\n'
            'dynamiq_ckpt_recovery_latency_seconds_bucket{le="+Inf"} NaN\n',
}


@pytest.fixture(scope="module")
def bad_endpoints():
    """An HTTP server answering each path of BAD_METRICS with its body (200, text/plain); and a port nobody
    listens on."""
    import http.server
    import socket
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = BAD_METRICS.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"
    yield f"http://127.0.0.1:{server.server_address[1]}", down
    server.shutdown()


def strict_json(out: str):
    """The document, refusing NaN and Infinity (not JSON: jq and every other parser reject them)."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(out, parse_constant=refuse)


@pytest.mark.parametrize("path", ["/html", "/gauge", "/no-le", "/le-abc", "/nan"])
def test_top_once_still_draws_when_a_metrics_endpoint_is_down_or_answers_garbage(capsys, backend, bad_endpoints,
                                                                                   path):
    base, down = bad_endpoints
    hold(backend, "orders", "wf-live", "pod-a:1:x", 600_000)
    urls = ["--metrics", base + path, "--metrics", down]
    code, out, err = cli(capsys, "top", "--once", *urls, *where(backend))
    assert code == 0 and "Traceback" not in err, err
    assert "orders" in out and "recovery" in out, out
    code, out, err = cli(capsys, "top", "--once", "--json", *urls, *where(backend))
    assert code == 0, err
    assert strict_json(out)["totals"]["leased"] == 1


def test_top_once_json_stays_json_when_an_endpoint_reports_nan_counts(capsys, backend, bad_endpoints):
    base, _ = bad_endpoints
    code, out, err = cli(capsys, "top", "--once", "--json", "--metrics", base + "/nan", *where(backend))
    assert code == 0, err
    assert strict_json(out)["metrics"]["answered"] == 1, out  # today: "p50": Infinity, "count": NaN


@pytest.mark.slow
def test_top_once_against_a_frozen_redis_exits_5_in_bounded_time(own_redis):
    from tests.cli_proc import cli as cli_process

    b = RedisCheckpointBackend(url=own_redis.url, prefix="frozen")
    hold(b, "orders", "wf-live", "pod-a:1:x", 600_000)
    own_redis.pause()
    try:
        done = cli_process("top", "--once", "--url", own_redis.url, "--prefix", "frozen", timeout=60)
    finally:
        own_redis.resume()
    assert done.returncode == 5, (done.returncode, done.stderr[-1500:])
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_resume_in_a_four_bucket_namespace_answers_once_and_json_stays_json(capsys, bucketed):
    from dynamiq.runnables import RunnableConfig

    from tests.flows import ask_flow

    paused = ask_flow(bucketed, "ask").run_sync({"input": "Ship it?"}, config=RunnableConfig(run_id="wf-h"))
    assert paused.status.value == "failure"  # paused for a person
    assert cli(capsys, "resume", "wf-h", "--input", "{", *where(bucketed))[0] == 2
    assert cli(capsys, "resume", "wf-nobody", "--input", "{}", *where(bucketed))[0] == 4
    code, out, err = cli(capsys, "resume", "wf-h", "--input", '{"choice": "blue"}', "--json", *where(bucketed))
    assert code == 0, err
    timers = listed(capsys, bucketed, ["timers"], limit=50)
    assert [(r["run"], r["reason"]) for r in timers["items"]] == [("wf-h", "answered")], timers
    assert cli(capsys, "resume", "wf-h", "--input", '{"choice": "red"}', *where(bucketed))[0] == 3
    json.loads(out)  # resume takes --json (store_options) but prints a sentence: "answer stored for node ask ..."


def test_the_fleet_and_top_agree_on_the_oldest_orphan_after_dead_retry(capsys, backend):
    """`dead retry` puts the run back with score 0 ('claimable now'): top reads past it; leases.fleet_op (the
    workers' /metrics oldest-orphan gauge) takes 0 as an expiry and reports an orphan waiting since 1970."""
    from dynamiq_redis_ckpt import leases
    from dynamiq_redis_ckpt.watch import snapshot_op

    hold(backend, "orders", "wf-orphan", "pod-gone:1:x", 50)
    hold(backend, "orders", "wf-dead", "pod-gone:1:x", 50)
    time.sleep(0.1)
    recovery = Recovery(backend, max_attempts=1, backoff_seconds=0.01)
    assert recovery.hand_back(recovery.claim("orders", "wf-dead"), failed=True)
    time.sleep(0.05)
    assert recovery.claim("orders", "wf-dead") is None
    assert cli(capsys, "dead", "retry", "orders", "wf-dead", *where(backend))[0] == 0
    fleet = backend.execute(leases.fleet_op(backend.store.keys))
    snapshot = backend.execute(snapshot_op(backend.store.keys, 1))
    assert fleet.runs == snapshot.totals == {"leased": 0, "orphaned": 2, "scheduled": 0, "due": 0, "dead": 0}
    assert snapshot.oldest_orphan_seconds < 3600
    assert fleet.oldest_orphan_seconds < 3600, fleet.oldest_orphan_seconds


@pytest.mark.parametrize("offset", [10**30, True])
def test_a_forged_cursor_is_bad_input_not_a_store_failure(capsys, backend, offset):
    import base64

    hold(backend, "orders", "wf-live", "pod-a:1:x", 600_000)
    cursor = base64.urlsafe_b64encode(json.dumps(["orders", offset]).encode()).decode().rstrip("=")
    code, out, err = cli(capsys, "leases", "--cursor", cursor, *where(backend))
    assert code == 2, (code, err)


@pytest.mark.parametrize("action", ["retry", "drop"])
def test_dead_retry_or_drop_in_a_bucket_home_after_the_run_lookup_expired(capsys, bucketed, action):
    """The run -> homes lookup (P:runflows:{run}) may expire before the dead letter does (run_homes_op then tries
    every home of the flow): the command must try the flow's 4 buckets, not its bare id."""
    hold(bucketed, "orders", "wf-dead", "pod-gone:1:x", 50)
    time.sleep(0.1)
    recovery = Recovery(bucketed, max_attempts=1, backoff_seconds=0.01)
    assert recovery.hand_back(recovery.claim("orders", "wf-dead"), failed=True)
    time.sleep(0.05)
    assert recovery.claim("orders", "wf-dead") is None
    client = __import__("redis").Redis.from_url(bucketed.url)
    assert client.delete(bucketed.store.keys.run_flows("wf-dead")) == 1
    code, out, err = cli(capsys, "dead", action, "orders", "wf-dead", *where(bucketed))
    assert code == 0, (code, err)
    assert listed(capsys, bucketed, ["dead", "list"], limit=50)["items"] == []


@pytest.mark.parametrize("command", [["leases"], ["top", "--once"]])
def test_ids_with_square_brackets_are_printed_as_they_are(capsys, backend, command):
    """Flow and run ids are the user's strings: rich must not read them as markup ('[/]' raises MarkupError: exit
    1; '[red]x' prints as 'x')."""
    hold(backend, "a[/]b", "wf-1", "pod-a:1:x", 600_000)
    hold(backend, "[red]evil", "wf-2", "pod-a:1:x", 600_000)
    code, out, err = cli(capsys, *command, *where(backend))
    assert code == 0, err
    assert "a[/]b" in out and "[red]evil" in out, out


def test_top_refuses_an_infinite_interval_as_bad_input(capsys, backend):
    code, out, err = cli(capsys, "top", "--interval", "inf", *where(backend))
    assert code == 2, err  # today: 'unexpected OverflowError: timestamp out of range', exit 1
