"""The ``redis_cluster`` fixture: a real local Redis Cluster (3 masters + 3 replicas, :class:`ClusterSetup`).

Not in conftest.py: a test module that wants it imports it, ``from tests.cluster_fixtures import redis_cluster``
(pytest picks up a fixture imported into a test module).

Module-scoped: one cluster (~2 s to start, six redis-servers) per test module that uses it, stopped after the
module's last test. Its tests share it, so a test that changes it leaves the change for the next one: topology
questions (``masters()``, ``node_for_key()``, ...) ask the cluster and stay right after failovers and slot moves,
but a test that kills a node should ``restart()`` it (``kill_master`` returns the promoted port; the old one rejoins
as its replica) so the next test finds every master with a replica again. A test that needs a cluster of its own
uses ``with ClusterSetup() as cluster:``.
"""

from __future__ import annotations

import shutil

import pytest

from tests.cluster_proc import ClusterSetup


@pytest.fixture(scope="module")
def redis_cluster():
    """A started :class:`ClusterSetup` shared by the module's tests (skips where redis-cli is not installed)."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH (apt-get install redis-tools): it makes the cluster")
    cluster = ClusterSetup().start()
    print(f"\ncluster of {len(cluster.nodes)} nodes up in {cluster.startup_seconds:.2f} s")
    yield cluster
    cluster.stop()
