"""Example app for the compose stack: runs the example order flow in a loop, checkpointed to Redis with metrics on,
and serves its /metrics (prometheus-client's default registry) for Prometheus.

    python example_app.py [--port 8000] [--runs N] [--pause SECONDS] [--crash-every N]

Every ``--crash-every``-th run (0: never) the process exits in the middle of that run, as a crashed pod would; the
compose stack restarts it, and a worker finishes the orphaned run within the lease ttl. ``--runs`` 0 runs forever.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
import uuid

from dynamiq.runnables import RunnableConfig
from prometheus_client import start_http_server

import example_flows

METRICS_PORT = 8000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("EXAMPLE_METRICS_PORT", METRICS_PORT)))
    parser.add_argument("--runs", type=int, default=0, help="runs to make, then exit (0: forever)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between runs")
    parser.add_argument("--crash-every", type=int, default=int(os.environ.get("EXAMPLE_CRASH_EVERY", "0")))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("example_app")

    start_http_server(args.port)
    log.info("serving /metrics on port %d", args.port)
    session = uuid.uuid4().hex[:8]
    counter = itertools.count(1) if args.runs == 0 else range(1, args.runs + 1)
    for n in counter:
        run_id = f"order-{session}-{n}"
        if args.crash_every and n % args.crash_every == 0:
            log.info("run %s will crash in its 'reserve' step; a worker finishes it", run_id)
            example_flows.CRASH_IN_RESERVE.set()
        flow = example_flows.order_flow()
        result = flow.run_sync({"order": {"id": run_id, "items": n % 5 + 1}}, config=RunnableConfig(run_id=run_id))
        log.info("run %s: %s", run_id, result.status.value)
        time.sleep(args.pause)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
