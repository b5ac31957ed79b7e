"""Commands that run things: ``demo`` (kill a flow mid-run, a worker recovers it; :mod:`dynamiq_redis_ckpt.demo`),
``worker`` (recover runs whose lease ran out or whose timer is due; :mod:`dynamiq_redis_ckpt.worker`) and ``resume``
(answer a run that waits for a person; the first answer stands, a later one exits with code 3).
"""

from __future__ import annotations

import argparse
import gc
import logging

from dynamiq_redis_ckpt.cli.common import BadInput, NotFound, Output, Refused, connect, store_options


def register(commands) -> None:
    """The commands that run things: demo, worker, resume."""
    demo = commands.add_parser("demo", help="kill a flow mid-run; a worker recovers the run by itself")
    demo.add_argument("--url", help="Redis to use (default $DYNAMIQ_REDIS_CKPT_URL, else a private redis-server)")
    demo.set_defaults(handler=_demo)

    worker = commands.add_parser("worker", help="claim and resume orphaned and due runs until SIGTERM")
    store_options(worker, json_output=False)
    source = worker.add_mutually_exclusive_group(required=True)
    source.add_argument("--flows", help="module:attr, a callable flow_id -> Flow or a dict flow_id -> factory")
    source.add_argument("--yaml", help="a Dynamiq YAML workflow file holding the flows")
    worker.add_argument("--concurrency", type=int, default=4, help="runs resumed at once (threads)")
    worker.add_argument("--lease-ttl", type=float, default=15.0, help="lease ttl in seconds (heartbeat: a third)")
    worker.add_argument("--max-attempts", type=int, default=5, help="failed recoveries before a dead letter")
    worker.add_argument("--poll", type=float, default=0.5, help="seconds between looks for work")
    worker.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port")
    worker.add_argument("--allow-eviction", action="store_true",
                        help="start even if Redis's maxmemory-policy may evict checkpoint keys (not recommended)")  # fmt: skip
    worker.add_argument("--stall-seconds", type=float, default=60.0,
                        help="/healthz fails when the poll loop has not completed a pass for this long")  # fmt: skip
    worker.add_argument("--metrics-flow-label", action="store_true",
                        help="label save/load metrics with the flow id (only for a bounded set of flows)")  # fmt: skip
    worker.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="log lines as text, or as one JSON object per line with the run's ids as fields")  # fmt: skip
    worker.set_defaults(handler=_worker)

    resume = commands.add_parser("resume", help="answer a run that waits for a person; a worker resumes it")
    store_options(resume)
    resume.add_argument("run", help="the run's wf_run_id")
    resume.add_argument("--input", required=True, help="the answer, as JSON")
    resume.add_argument("--node", help="the waiting node (needed when several wait)")
    resume.add_argument("--flow", help="the run's flow id (found from the run when left out)")
    resume.set_defaults(handler=_resume)


def _demo(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt import demo  # imported on use: it loads Dynamiq's flows

    return demo.main(["--url", args.url] if args.url else [])


def _worker(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt import logs

    logs.configure(args.log_format)  # before Dynamiq is imported: its import logs and warns

    from dynamiq_redis_ckpt.errors import ConfigurationError, TLSError

    try:
        return _run_worker(args)
    except (ConfigurationError, TLSError) as e:  # waiting or restarting does not fix these
        logging.getLogger(__name__).error("worker cannot start: %s", e)
        return 2


def _run_worker(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.config import mask_url, resolve_url
    from dynamiq_redis_ckpt.worker import Recovery, Worker, load_flow_factory

    log = logging.getLogger(__name__)
    registry = None
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry()
    # A worker writes runs on: it keeps the namespace's bucket count check (no adopting; see flow_buckets).
    backend = connect(args, adopt_flow_buckets=False, lease_ttl_seconds=args.lease_ttl, metrics=registry,
                      allow_eviction=args.allow_eviction, metrics_flow_label=args.metrics_flow_label)
    log.info("worker on %s, prefix %s", mask_url(backend.url or resolve_url(None)), backend.prefix)
    factory = load_flow_factory(flows=args.flows, yaml_path=args.yaml)
    metrics = None
    if registry is not None:
        from dynamiq_redis_ckpt.metrics import WorkerMetrics

        metrics = WorkerMetrics(registry)
    worker = Worker(Recovery(backend, max_attempts=args.max_attempts), factory, concurrency=args.concurrency,
                    poll_seconds=args.poll, metrics=metrics, stall_seconds=args.stall_seconds)  # fmt: skip
    worker.install_signal_handlers()
    if registry is not None:
        _serve_worker(args, registry, worker)
    if not _wait_for_redis(backend, worker, log):
        return 0  # stopped (SIGTERM) before Redis answered
    worker.warm_up()
    # Dynamiq's imports leave a large heap that never goes away: frozen, it is not walked by every full collection,
    # nor by the one at exit (which took 5-6 s after SIGTERM, most of a pod's termination grace period).
    gc.freeze()
    log.info("worker ready: concurrency %d, lease ttl %.1f s", args.concurrency, args.lease_ttl)
    worker.run()
    log.info("worker stopped after resuming %d runs", worker.resumed)
    return 0


def _serve_worker(args: argparse.Namespace, registry, worker) -> None:
    """/metrics (the worker's and its backend's metrics, the fleet read from Redis at scrape time, the process's),
    /healthz and /readyz."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    from dynamiq_redis_ckpt import __version__, leases
    from dynamiq_redis_ckpt.metrics import FleetCollector, serve
    from dynamiq_redis_ckpt.requests import Each, cmd

    # Readiness and the fleet read ask Redis with their own short deadline, no retries: a frozen Redis answers 503
    # within a second, and a scrape is never held up for long.
    probe = connect(args, adopt_flow_buckets=False, socket_timeout=0.5, socket_connect_timeout=0.5, retries=0,
                    leases=False, allow_eviction=args.allow_eviction)  # not ready on a Redis that may evict

    def server_info():
        return (yield Each(cmd("INFO", "server")))[0]  # a cluster's first primary

    def build() -> dict[str, str]:
        info = probe.execute(server_info())
        return {"version": __version__, "redis_version": str(info.get("redis_version", "unknown")),
                "redis_mode": str(info.get("redis_mode", "standalone"))}  # fmt: skip

    registry.register(FleetCollector(lambda: probe.execute(leases.fleet_op(probe.store.keys)), build))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    serve(args.metrics_port, registry, lambda: worker.alive, _pinger(probe))


def _wait_for_redis(backend, worker, log) -> bool:
    """Wait (not ready, still alive) until Redis answers, as a pod in a restarting cluster must; False if stopped."""
    from dynamiq_redis_ckpt.errors import CheckpointStoreError

    from dynamiq_redis_ckpt.errors import ConfigurationError, TLSError

    delay = 0.5
    while worker.alive:
        try:
            return backend.ping()
        except (ConfigurationError, TLSError):
            raise
        except CheckpointStoreError as e:
            log.warning("Redis does not answer yet (%s); trying again in %.1f s", e, delay)
        worker.idle(delay)
        delay = min(delay * 2, 5.0)
    return False


def _resume(args: argparse.Namespace) -> int:
    import json

    from dynamiq_redis_ckpt.errors import AlreadyAnsweredError, RunNotWaitingError
    from dynamiq_redis_ckpt.worker import Recovery

    try:
        answer = json.loads(args.input)
    except json.JSONDecodeError as e:
        raise BadInput(f"--input is not JSON: {e}") from e
    try:
        node = Recovery(connect(args)).deliver_input(args.run, answer, node_id=args.node, flow=args.flow)
    except AlreadyAnsweredError as e:
        raise Refused(str(e)) from e
    except RunNotWaitingError as e:
        raise (Refused(str(e)) if e.running else NotFound(str(e))) from e
    out = Output(args)
    if out.json:
        out.document({"run": args.run, "node": node, "stored": True})
    else:
        out.say(f"answer stored for node {node} of run {args.run}; a worker resumes it")
    return 0


def _pinger(backend):
    def ready() -> bool:
        try:
            return backend.ping()
        except Exception:
            return False

    return ready
