"""An operator in its own process, busy beside a live run (used by test_live_runs).

python -m tests.operator_churn URL PREFIX FLOW RUN OLD_RUN OUT_JSON

Until the run's lease is handed back at its end, it lists the flow, stamps ``metadata`` on every checkpoint of the
run with ``update()``, re-``save()``s the newest one, deletes the snapshots of an older run of the flow and runs
``cleanup_by_flow``; then writes what it did to OUT_JSON. Any exception ends it with a non-zero exit code.
"""

import json
import sys
import time

from dynamiq_redis_ckpt import RedisCheckpointBackend

if __name__ == "__main__":
    url, prefix, flow, run, old_run, out = sys.argv[1:7]
    backend = RedisCheckpointBackend(url=url, prefix=prefix)
    lease = backend.store.keys.lease(flow, run)
    stamps: dict[str, int] = {}
    done = {"updates": 0, "saves": 0, "deletes": 0, "cleanups": 0, "lists": 0}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        mine = backend.get_list_by_flow_and_run(flow, run)
        done["lists"] += 1
        for cp in mine:
            n = stamps.get(cp.id, 0) + 1
            cp.metadata = {**(cp.metadata or {}), "operator": "B", "stamp": n}
            backend.update(cp)
            stamps[cp.id] = n
            done["updates"] += 1
        if mine:
            backend.save(mine[0])
            done["saves"] += 1
        for cp in backend.get_list_by_flow_and_run(flow, old_run, limit=2):
            done["deletes"] += backend.delete(cp.id)
        backend.cleanup_by_flow(flow, keep_count=1000)
        done["cleanups"] += 1
        if backend.redis.hget(lease, "owner") == b"" and mine and mine[0].status.value != "active":
            break
    json.dump({"stamps": stamps, "done": done}, open(out, "w"))
