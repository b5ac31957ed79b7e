"""An application process for the dashboard test: runs Dynamiq flows on a backend with metrics on and serves them.

    python -m tests.dash_app URL PREFIX METRICS_PORT

What a service embedding the package does: ``RedisCheckpointBackend(..., metrics=True)`` puts the store's collectors
on prometheus_client's default registry, ``start_http_server`` serves it. The process completes a small chain flow
every second or so (saves of varied sizes, loads, lists, a cleanup now and then, now and then a long node), pauses
one run until a timer and one for a person, answers the person three seconds later, and leaves both resumptions to
the worker. It stops on SIGTERM.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import sys
import threading
import time

from dynamiq.runnables import RunnableConfig
from prometheus_client import start_http_server

from dynamiq_redis_ckpt import RedisCheckpointBackend
from dynamiq_redis_ckpt.worker import Recovery
from tests.flows import SLEEP_ENV, ask_flow, chain_flow, timer_flow

ASK_RUN = "wf-ask-dash"


def main() -> int:
    url, prefix, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    backend = RedisCheckpointBackend(url=url, prefix=prefix, metrics=True,
                                     lease_ttl_seconds=float(os.environ.get("CKPT_TEST_LEASE_TTL", "2")))  # fmt: skip
    start_http_server(port, addr="127.0.0.1")
    # What Dynamiq imports lazily on a run's first pause (seconds of CPU): paid here, not by the first paused run.
    importlib.import_module("dynamiq.nodes.agents.exceptions")
    print("app ready", flush=True)

    timer_flow(backend, "timer-dash", seconds=3.0).run_sync({"q": 1}, config=RunnableConfig(run_id="wf-timer-dash"))
    ask_flow(backend, "ask-dash").run_sync({"input": "Ship it?"}, config=RunnableConfig(run_id=ASK_RUN))
    asked_at, answered = time.monotonic(), False
    print("paused a timer and a question", flush=True)

    rng, i, step_sleep = random.Random(7), 0, os.environ.get(SLEEP_ENV, "0")
    while not stop.is_set():
        flow = chain_flow(backend, 4, flow_id="orders", words=rng.choice((30, 150, 600, 2500)))
        slow = i % 6 == 5  # now and then a node as long as a model call: the lease's heartbeat renews it meanwhile
        os.environ[SLEEP_ENV] = "1.5" if slow else step_sleep
        flow.run_sync({"question": f"order {i}"}, config=RunnableConfig(run_id=f"wf-orders-{i}"))
        latest = backend.get_latest_by_flow("orders")
        backend.load(latest.id)
        backend.get_list_by_flow("orders", limit=5)
        if i % 10 == 9:
            backend.cleanup_by_flow("orders", keep_count=20)
        if not answered and time.monotonic() - asked_at >= 3.0:
            Recovery(backend).deliver_input(ASK_RUN, {"choice": "ship"})
            answered = True
            print("answered the question", flush=True)
        i += 1
        stop.wait(0.25)
    print(f"app stopped after {i} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
