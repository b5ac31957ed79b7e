"""Prometheus metrics: what the store, the leases and the worker measure, the fleet read at scrape time, and the
worker's /metrics, /healthz and /readyz endpoint.

Collectors live on a registry passed in (nothing happens at import time), so a service mounts them on its own
registry or app; only layers that record import this module, and only when metrics are on. In prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` in the environment before prometheus-client is first imported)
every process writes its own files and one :class:`prometheus_client.multiprocess.MultiProcessCollector` adds them
up; the gauges say how.
The catalogue, with each metric's meaning, is the README's "Operating it" section.
"""

from __future__ import annotations

import sys
import threading
import time
import weakref
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from dynamiq_redis_ckpt.errors import ConfigurationError

PREFIX = "dynamiq_ckpt_"
# A loopback save takes ~0.2 ms and a slow one seconds: Prometheus's default buckets start at 5 ms.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SIZE_BUCKETS = tuple(256 * 4**i for i in range(10))  # 256 B .. 64 MiB
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
WAIT_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400, 7 * 86400)
RUN_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 7200)
SCAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

OPERATIONS = ("save", "load", "list", "delete", "cleanup")
SAVE_OUTCOMES = ("ok", "error", "fenced", "lease_lost", "too_large", "not_found", "canceled")
ERROR_KINDS = ("timeout", "connection", "auth", "readonly", "oom", "busy", "loading", "tryagain", "clusterdown",
               "masterdown", "noreplicas", "moved", "ask", "noscript", "wrongtype", "noperm", "tls",
               "other")  # fmt: skip
LOSS_REASONS = ("expired", "taken_over", "vanished", "self_fenced", "unconfirmed", "claimed", "handed_back",
                "superseded")  # fmt: skip
FLEET_STATES = ("leased", "orphaned", "scheduled", "due", "dead")
RESUME_TRIGGERS = ("orphan", "timer", "input")
RESUME_OUTCOMES = ("success", "failure", "canceled", "error", "lease_lost", "handed_back")


class StoreMetrics:
    """What every process that saves measures: call latency, sizes, outcomes, Redis errors, leases.

    Made once per registry (:meth:`on`); a backend records through it only when its ``metrics`` option is set.
    ``flow_label`` adds the flow id to the latency histogram and the saves counter: bounded only when a service has a
    bounded set of flows, so off by default.
    """

    _made: "weakref.WeakKeyDictionary[CollectorRegistry, StoreMetrics]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, registry: CollectorRegistry, *, flow_label: bool = False):
        self.registry = registry
        self.flow_label = flow_label
        extra = ["flow"] if flow_label else []
        on = {"registry": registry}
        self.duration = Histogram(PREFIX + "operation_duration_seconds", "Client time of one backend call, retries "
                                  "included", ["operation", *extra], buckets=LATENCY_BUCKETS, **on)  # fmt: skip
        self.saves = Counter(PREFIX + "saves", "Saves by how they ended", ["outcome", *extra], **on)
        self.encoded_bytes = Histogram(PREFIX + "checkpoint_encoded_bytes", "A saved checkpoint's msgpack size, "
                                       "before dedup and compression", buckets=SIZE_BUCKETS, **on)  # fmt: skip
        self.added_bytes = Histogram(PREFIX + "save_added_bytes", "Compressed bytes one save added to Redis",
                                     buckets=SIZE_BUCKETS, **on)  # fmt: skip
        self.content_bytes = Counter(PREFIX + "content_bytes", "New content the saves stored, before (raw) and after "
                                     "(compressed) zstd", ["stage"], **on)  # fmt: skip
        self.redis_errors = Counter(PREFIX + "redis_errors", "Failed Redis request attempts, retried or not, by kind",
                                    ["kind"], **on)  # fmt: skip
        self.renewals = Counter(PREFIX + "lease_renewals", "Heartbeat renewals of held leases by outcome",
                                ["outcome"], **on)  # fmt: skip
        self.leases_lost = Counter(PREFIX + "leases_lost", "Leases this process lost, by reason", ["reason"], **on)
        self.fenced = Counter(PREFIX + "fenced_writes", "Running flows' saves refused: another holder has the lease",
                              **on)  # fmt: skip
        self.damaged = Counter(PREFIX + "damaged_checkpoints", "Stored checkpoints a load or list found damaged "
                               "(never returned as data)", **on)  # fmt: skip
        self.leases_held = Gauge(PREFIX + "leases_held", "Leases this process holds now", multiprocess_mode="livesum",
                                 **on)  # fmt: skip
        if not flow_label:  # every series exists from the start: rate() and alerts see the first one counted
            for outcome in SAVE_OUTCOMES:
                self.saves.labels(outcome)
        for kind in ERROR_KINDS:
            self.redis_errors.labels(kind)
        for reason in LOSS_REASONS:
            self.leases_lost.labels(reason)
        for outcome in ("ok", "lost", "error"):
            self.renewals.labels(outcome)
        for stage in ("raw", "compressed"):
            self.content_bytes.labels(stage)

    @classmethod
    def on(cls, registry: CollectorRegistry | None = None, *, flow_label: bool = False) -> "StoreMetrics":
        """The store metrics of ``registry`` (prometheus-client's default one when None), made on first use; every
        backend of a registry shares them, so ``flow_label`` is the registry's choice."""
        registry = REGISTRY if registry is None else registry
        with cls._lock:
            made = cls._made.get(registry)
            if made is None:
                made = cls._made[registry] = cls(registry, flow_label=flow_label)
        if made.flow_label != flow_label:
            raise ConfigurationError(f"this registry's store metrics were made with flow_label={made.flow_label}")
        return made

    # ---- what the layers below call (duck-typed: they never import this module) -------------------------------

    def call(self, operation: str, seconds: float, flow: str | None = None) -> None:
        """One backend call took ``seconds``."""
        labels = (operation, flow or "") if self.flow_label else (operation,)
        self.duration.labels(*labels).observe(seconds)

    def saved(self, outcome: str, flow: str | None = None, sizes: tuple[int, int, int] | None = None) -> None:
        """A save ended with ``outcome``; ``sizes`` = (encoded, new content raw, new content compressed) bytes."""
        self.saves.labels(*((outcome, flow or "") if self.flow_label else (outcome,))).inc()
        if outcome == "fenced":
            self.fenced.inc()
        if sizes is not None:
            encoded, raw, compressed = sizes
            self.encoded_bytes.observe(encoded)
            self.added_bytes.observe(compressed)
            if raw:
                self.content_bytes.labels("raw").inc(raw)
                self.content_bytes.labels("compressed").inc(compressed)

    def redis_error(self, kind: str) -> None:
        """A request attempt failed with an error of ``kind`` (one of :data:`ERROR_KINDS`)."""
        self.redis_errors.labels(kind).inc()

    def damaged_found(self) -> None:
        """A load or list found a damaged checkpoint."""
        self.damaged.inc()

    def renewed(self, outcome: str, count: int = 1) -> None:
        """``count`` lease renewals ended with ``outcome`` (ok, lost, error)."""
        self.renewals.labels(outcome).inc(count)

    def lease_lost(self, reason: str) -> None:
        """A held lease was lost for ``reason`` (one of :data:`LOSS_REASONS`)."""
        self.leases_lost.labels(reason).inc()

    def leases_now(self, count: int) -> None:
        """This process holds ``count`` live leases (set by the heartbeat)."""
        self.leases_held.set(count)


class WorkerMetrics:
    """What a worker measures: claims, recovery latency, timer lag, people's wait, resumes, scans, dead letters."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        on = {"registry": registry}
        self.claims = Counter(PREFIX + "worker_claims", "Claim attempts by trigger and outcome",
                              ["trigger", "outcome"], **on)  # fmt: skip
        self.recovery_latency = Histogram(PREFIX + "recovery_latency_seconds", "From an orphan's lease running out "
                                          "to the resumed run's first confirmed save", buckets=RECOVERY_BUCKETS, **on)
        self.timer_lag = Histogram(PREFIX + "timer_lag_seconds", "From a timer's due time (or a person's answer) to "
                                   "the resumed run's first confirmed save", buckets=RECOVERY_BUCKETS, **on)
        self.input_wait = Histogram(PREFIX + "human_input_wait_seconds", "From a run's pause for a person to its claim "
                                    "after the answer", buckets=WAIT_BUCKETS, **on)  # fmt: skip
        self.resumes = Counter(PREFIX + "resumes", "Resumed runs that returned, by trigger and outcome",
                               ["trigger", "outcome"], **on)  # fmt: skip
        self.resume_seconds = Histogram(PREFIX + "resume_duration_seconds", "From claim to the resumed run's end",
                                        buckets=RUN_BUCKETS, **on)  # fmt: skip
        self.running = Gauge(PREFIX + "runs_in_progress", "Runs this worker is resuming now",
                             multiprocess_mode="livesum", **on)  # fmt: skip
        self.scan_seconds = Histogram(PREFIX + "worker_scan_duration_seconds", "One poll pass: find and claim",
                                      buckets=SCAN_BUCKETS, **on)  # fmt: skip
        self.last_scan = Gauge(PREFIX + "worker_last_scan_timestamp_seconds", "Unix time the poll loop last completed "
                               "a pass", multiprocess_mode="livemax", **on)  # fmt: skip
        self.dead_letters = Counter(PREFIX + "dead_letters", "Runs this worker moved to dead letters", **on)
        for trigger in ("orphan", "due"):  # every series exists from the start (see StoreMetrics)
            for outcome in ("won", "lost_race", "dead_lettered"):
                self.claims.labels(trigger, outcome)
        for trigger in RESUME_TRIGGERS:
            for outcome in RESUME_OUTCOMES:
                self.resumes.labels(trigger, outcome)


class FleetCollector:
    """Fleet gauges read from Redis at scrape time by ``read`` (a ``leases.Fleet``, bounded work), at most once
    per ``cache_seconds`` however many scrapers ask, and the build info.

    Every worker replica reports the same fleet: aggregate with ``max`` across instances.
    """

    def __init__(self, read: Callable[[], Any], build: Callable[[], dict[str, str]], cache_seconds: float = 1.0):
        self._read = read
        self._build = build
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._last: tuple[float, Any] = (float("-inf"), None)  # (monotonic time read, the leases.Fleet)
        self._build_labels: dict[str, str] | None = None

    def _view(self) -> Any:
        with self._lock:
            at, view = self._last
            if time.monotonic() - at >= self._cache_seconds:
                try:
                    view = self._read()
                except Exception:  # Redis down: fleet_up says so, the scrape still answers
                    view = None
                self._last = (time.monotonic(), view)
            return view

    def collect(self):
        """Called by the registry at every scrape."""
        view = self._view()
        up = GaugeMetricFamily(PREFIX + "fleet_up", "1 when the last fleet read reached Redis, else 0")
        up.add_metric([], 1 if view is not None else 0)
        yield up
        if view is not None:
            runs = GaugeMetricFamily(PREFIX + "fleet_runs", "Runs by state, read from Redis", labels=["state"])
            for state in FLEET_STATES:
                runs.add_metric([state], view.runs.get(state, 0))
            yield runs
            yield GaugeMetricFamily(PREFIX + "fleet_oldest_orphan_age_seconds", "How long the oldest orphan has "
                                    "waited for a worker (0 when none)", value=view.oldest_orphan_seconds)
            yield GaugeMetricFamily(PREFIX + "fleet_flows", "Flows the fleet read looked at", value=view.flows)
            yield GaugeMetricFamily(PREFIX + "fleet_truncated", "1 when a shard held more flows than one fleet read "
                                    "looks at: the fleet counts are lower bounds", value=int(view.truncated))
        if self._build_labels is None or self._build_labels.get("redis_version") == "unknown":
            try:
                self._build_labels = self._build()
            except Exception:
                self._build_labels = None
        labels = self._build_labels or {}
        info = GaugeMetricFamily(PREFIX + "build_info", "Package version, Redis server version and mode",
                                 labels=["version", "redis_version", "redis_mode"])  # fmt: skip
        info.add_metric([labels.get("version", ""), labels.get("redis_version", "unknown"),
                         labels.get("redis_mode", "unknown")], 1)  # fmt: skip
        yield info


def catalogue() -> dict[str, str]:
    """Every metric family the package exports, as exposed (a counter's name ends in ``_total``) -> its type."""
    registry = CollectorRegistry()
    StoreMetrics(registry)
    WorkerMetrics(registry)
    view = SimpleNamespace(runs={}, oldest_orphan_seconds=0.0, flows=0, truncated=False)
    registry.register(FleetCollector(lambda: view, dict))
    return {f.name + ("_total" if f.type == "counter" else ""): f.type for f in registry.collect()}


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A scraper that hung up mid-answer (its timeout) is routine, not a traceback in the worker's log."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def serve(port: int, registry: CollectorRegistry, alive: Callable[[], bool], ready: Callable[[], bool],
          host: str = "0.0.0.0"):  # fmt: skip
    """Serve /metrics, /healthz (the worker loop runs) and /readyz (Redis answers) on a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path in ("/healthz", "/readyz"):
                ok = alive() if path == "/healthz" else ready()
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

    server = _QuietServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="dynamiq-redis-ckpt-metrics", daemon=True).start()
    return server
