"""Prometheus metrics of the recovery worker, and its /metrics, /healthz and /readyz endpoint.

Collectors live on a registry passed in (nothing happens at import time), so an embedding service can put them on
its own registry or leave them out.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class WorkerMetrics:
    """What a worker counts: claims, resumes by outcome, dead letters, runs in progress, time to resume."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.claims = Counter("dynamiq_ckpt_claims", "Runs claimed by this worker", ["reason"], registry=registry)
        self.resumes = Counter(
            "dynamiq_ckpt_resumes", "Resumed runs that ended, by outcome", ["outcome"], registry=registry
        )
        self.dead_letters = Counter("dynamiq_ckpt_dead_letters", "Runs moved to dead letters", registry=registry)
        self.running = Gauge("dynamiq_ckpt_runs_in_progress", "Runs this worker is resuming now", registry=registry)
        self.resume_seconds = Histogram(
            "dynamiq_ckpt_resume_duration_seconds", "From claim to the resumed run's end", registry=registry,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
        )  # fmt: skip


def serve(port: int, registry: CollectorRegistry, alive: Callable[[], bool], ready: Callable[[], bool]):
    """Serve /metrics, /healthz (the worker loop runs) and /readyz (Redis answers) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path == "/metrics":
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif self.path in ("/healthz", "/readyz"):
                ok = alive() if self.path == "/healthz" else ready()
                body, status, kind = (b"ok\n" if ok else b"not ok\n"), (200 if ok else 503), "text/plain"
            else:
                body, status, kind = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="dynamiq-redis-ckpt-metrics", daemon=True).start()
    return server
