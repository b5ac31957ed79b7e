"""Dynamiq's own checkpoint tests, run against RedisCheckpointBackend in place of Dynamiq's checkpoint ``InMemory``.

The real upstream tests: the sdist of the installed ``dynamiq`` version is fetched with pip (sha256 pinned below,
cached in ``~/.cache/dynamiq-redis-ckpt/``), its ``tests/`` and ``examples/`` are extracted (not its ``dynamiq/``:
the installed package is the one under test) and run by pytest in a subprocess with ``tests/upstream/swap_plugin.py``
on a redis-server of our own, leases on (the default). The plugin counts the tests that called our backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import redis

from tests.cluster_proc import ClusterSetup
from tests.redis_proc import RedisProcess

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dynamiq-redis-ckpt"

# dynamiq version -> (sha256 of its sdist, fewest upstream tests that must drive our backend).
# The floor sits just under the count measured for that version, so a swap that stops reaching our backend fails.
PINNED = {
    "0.69.0": ("5cd21f19dde89975d803d9987f3e046c67a551cb558190c4769d55c1df5ba8b0", 180),
}

UPSTREAM_TESTS = [
    "tests/unit/checkpoints",
    "tests/integration/checkpoints",
    # Checkpoint tests elsewhere in Dynamiq's tree: they use the checkpoint InMemory or a CheckpointConfig.
    "tests/integration/cancellation",  # its conftest's checkpoint backend is InMemory
    "tests/integration/flows/test_error_edges.py",  # durable(): CheckpointConfig(backend=InMemory())
    "tests/integration/nodes/operators/test_delay.py",  # a Delay pauses the run through its checkpoint
    "tests/integration/nodes/operators/test_sub_workflow.py::test_the_parent_checkpoint_settings_do_not_reach_the_flow",
    "tests/unit/nodes/agents/test_hooks_agent.py"
    "::test_approval_timeout_checkpoint_preserves_owner_state_and_refunds_pending_calls",
]

DESELECT = {
    "tests/unit/checkpoints/test_backends.py::TestFileSystemBackend": "FileSystem's own tests (its directory layout)",
    "tests/integration/checkpoints/test_postgres_checkpoint_backend.py": "PostgreSQL's own tests (mocked psycopg)",
    "tests/unit/checkpoints/test_backends.py::TestInMemoryBackend::test_clear": "reads InMemory's private _checkpoints",
    "tests/unit/checkpoints/test_backends.py::TestInMemoryBackend::test_thread_safety": (
        "reads InMemory's private _checkpoints"
    ),
    "tests/unit/checkpoints/test_backends.py::TestInMemoryBackend::test_cleanup_by_count": (
        "deliberate difference (README, Guarantees: Retention): cleanup_by_flow never deletes the head of a chain "
        "that is active, paused or pending input; the test's 10 checkpoints are each the only, ACTIVE, checkpoint "
        "of its run, so all are kept"
    ),
}

PLUGINS = ("pytest_mock", "pytest_asyncio", "pytest_timeout")  # what Dynamiq's tests need: our `test` extra


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_sdist(version: str, expected: str) -> Path:
    """The sdist of dynamiq==version, from the cache or pip; its sha256 is checked every time."""
    tarball = CACHE / f"dynamiq-{version}.tar.gz"
    if tarball.exists() and sha256(tarball) == expected:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
        done = subprocess.run([*pip, f"dynamiq=={version}", "-d", tmp], capture_output=True, text=True, timeout=600)
        fetched = Path(tmp) / tarball.name
        assert done.returncode == 0 and fetched.exists(), f"pip download of dynamiq=={version} failed:\n{done.stderr}"
        got = sha256(fetched)
        assert got == expected, f"dynamiq-{version}.tar.gz has sha256 {got}, pinned {expected}: refusing to run it"
        os.replace(fetched, tarball)
    return tarball


def extract_tests(tarball: Path, version: str, dest: Path) -> Path:
    """Extract the sdist's tests/, examples/ and pyproject.toml (pytest's configuration) into dest."""
    root = f"dynamiq-{version}/"
    keep = {"tests", "examples", "pyproject.toml"}
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(root) and m.name[len(root) :].split("/")[0] in keep]
        tar.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest / root


@contextlib.contextmanager
def server_for(kind: str):
    """(url for the backend, a function counting the keys stored) of a fresh redis-server or Redis Cluster."""
    if kind == "cluster":
        cluster = ClusterSetup().start()
        try:
            yield cluster.ckpt_url, lambda: _cluster_keys(cluster)
        finally:
            cluster.stop()
        return
    server = RedisProcess().start()
    try:
        yield server.url, lambda: redis.Redis.from_url(server.url).dbsize()
    finally:
        server.kill()


def _cluster_keys(cluster) -> int:
    return sum(redis.Redis(host=host, port=port).dbsize() for host, port in cluster.masters())


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("kind", ["redis", "cluster"])
def test_dynamiq_checkpoint_suite_passes_on_redis(tmp_path, capsys, kind):
    """Every upstream checkpoint test but those in DESELECT passes with our backend as InMemory, and enough used it:
    on one redis-server and on a Redis Cluster of 3 masters and 3 replicas (redis+cluster://)."""
    version = importlib.metadata.version("dynamiq")
    if version not in PINNED:
        pytest.fail(
            f"dynamiq {version} is installed but PINNED in {Path(__file__).name} has no sdist sha256 for it: download "
            f"it (pip download --no-binary :all: --no-deps dynamiq=={version}), review it and pin its sha256"
        )
    expected_sha, floor = PINNED[version]
    missing = [name for name in PLUGINS if importlib.util.find_spec(name) is None]
    assert not missing, f"Dynamiq's tests need {missing}: pip install -e '.[test]'"

    upstream = extract_tests(verified_sdist(version, expected_sha), version, tmp_path / "sdist")
    report, log = tmp_path / "report.json", tmp_path / "upstream.log"
    with server_for(kind) as (url, count_keys):
        paths = [str(REPO), str(REPO / "tests" / "upstream"), os.environ.get("PYTHONPATH", "")]  # ours, the plugin
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)),
               "UPSTREAM_REDIS_URL": url, "UPSTREAM_REPORT": str(report)}  # fmt: skip
        command = [sys.executable, "-m", "pytest", "-p", "swap_plugin", "-p", "no:cacheprovider", "-q", "-rfE",
                   "--timeout=300", "--durations=10", "--disable-warnings", *UPSTREAM_TESTS,
                   *(f"--deselect={nodeid}" for nodeid in DESELECT)]  # fmt: skip
        started = time.monotonic()
        with open(log, "w") as out:
            try:
                code = subprocess.run(command, cwd=upstream, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      timeout=1800).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                code = "killed after 1800 s"
        elapsed = time.monotonic() - started
        keys = count_keys()

    lines = log.read_text(errors="replace").splitlines()
    summary = next((line for line in reversed(lines) if re.search(r"\b(passed|failed|errors?)\b.* in \d", line)), "?")
    drove = json.loads(report.read_text())["drove"] if report.exists() else []
    with capsys.disabled():
        print(f"\nupstream dynamiq {version} checkpoint tests ({elapsed:.0f} s, log {log}): {summary.strip('= ')}")
        print(f"upstream dynamiq tests that drove RedisCheckpointBackend: {len(drove)}")
    tail = "\n".join(lines[-150:])
    assert code == 0, f"Dynamiq's tests failed against our backend (exit {code}):\n{tail}"
    assert len(drove) >= floor, f"only {len(drove)} upstream tests drove our backend (expected >= {floor}):\n{tail}"
    assert keys > 0, "the upstream tests left nothing in our redis-server: they did not run on it"
