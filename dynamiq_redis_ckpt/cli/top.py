"""``top``: a live terminal view of the runs workers look after (like ``asynq dash``), redrawn every ``--interval``.

Totals by state (leased, orphaned, scheduled, due, dead), one row per flow (with its oldest orphan's wait and its
newest save's age), read from Redis in two bounded round trips (:func:`dynamiq_redis_ckpt.watch.snapshot_op`); and
the workers' recovery and save latency, p50 and p99 estimated from the histogram buckets of their Prometheus
endpoints (``--metrics URL``, repeatable: ``worker --metrics-port``), with their rates. ``q`` or Ctrl-C quits;
``--once`` prints one frame (``--json``: the snapshot) and exits. Redis going away while it runs is shown on screen
and read again next time; unreachable at the start, it exits with code 5.
"""

from __future__ import annotations

import argparse
import math
import os
import select
import sys
import time
from dataclasses import asdict

from dynamiq_redis_ckpt.cli.common import BadInput, Output, connect, span, store_options

HEADINGS = ("leased", "orphaned", "scheduled", "due", "dead")


def register(commands) -> None:
    """top."""
    top = commands.add_parser("top", help="live view: runs by state per flow, orphans, dead letters, latencies")
    store_options(top)
    top.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    top.add_argument("--metrics", action="append", default=[], metavar="URL",
                     help="a worker's Prometheus endpoint (http://host:port/metrics); repeat for each worker")
    top.add_argument("--once", action="store_true", help="print one frame (with --json: the snapshot) and exit")
    top.set_defaults(handler=_top)


def _check(args: argparse.Namespace) -> None:
    if not (args.interval > 0 and math.isfinite(args.interval)):
        raise BadInput(f"--interval must be a positive number of seconds, got {args.interval}")
    for url in args.metrics:
        if not url.startswith(("http://", "https://")):
            raise BadInput(f"--metrics takes an http(s):// url of a worker's /metrics, got {url!r}")
    if args.json and not args.once:
        raise BadInput("--json prints one snapshot: use it with --once")


def _top(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import LatencyScraper, snapshot_op

    _check(args)
    backend = connect(args, leases=False, retries=1, socket_timeout=1.0, socket_connect_timeout=1.0)
    read = lambda: backend.execute(snapshot_op(backend.store.keys, backend.store.buckets))  # noqa: E731
    scraper = LatencyScraper(args.metrics) if args.metrics else None
    snapshot = read()  # unreachable at the start: exit code 5 (common.run)
    scrape = scraper.scrape() if scraper else None
    if args.once:
        if args.json:
            document = asdict(snapshot)
            document["metrics"] = asdict(scrape) if scrape else None
            Output(args).document(_finite(document))
        else:
            Output(args).console.print(_frame(args, backend, snapshot, scrape, ""))
        return 0
    return _live(args, backend, read, scraper, snapshot, scrape)


def _finite(value):
    """``value`` with every NaN or infinity as None: JSON has neither (a worker's endpoint may report them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _live(args, backend, read, scraper, snapshot, scrape) -> int:
    from rich.console import Console
    from rich.live import Live

    from dynamiq_redis_ckpt.errors import CheckpointStoreError

    console = Console()
    error = ""
    keys = _Keys()
    try:
        with keys, Live(_frame(args, backend, snapshot, scrape, error, console.size.height), console=console,
                        screen=True, auto_refresh=False, transient=True) as live:  # fmt: skip
            while True:
                if keys.wait(args.interval):
                    return 0
                try:
                    snapshot, error = read(), ""
                except CheckpointStoreError as e:  # shown on screen; the last snapshot stays until Redis answers
                    error = f"Redis unreachable: {e}"
                scrape = scraper.scrape() if scraper else None
                live.update(_frame(args, backend, snapshot, scrape, error, console.size.height), refresh=True)
    except KeyboardInterrupt:
        return 0


class _Keys:
    """Reads single keys from the terminal (cbreak mode, restored on exit); without a terminal, only waits."""

    def __init__(self):
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self._saved = None

    def __enter__(self):
        if self.fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def wait(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when ``q`` was pressed."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready and os.read(self.fd, 1) in (b"q", b"Q"):
                return True
        return False


# ---- drawing ----------------------------------------------------------------------------------------------------


def _span(seconds: float | None) -> str:
    return "-" if seconds is None else span(seconds)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _frame(args, backend, snapshot, scrape, error: str, height: int | None = None):
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from dynamiq_redis_ckpt.config import mask_url, resolve_url

    when = time.strftime("%H:%M:%S", time.gmtime(snapshot.now_ms / 1000))
    title = Text.assemble(("dynamiq-redis-ckpt top", "bold"), f"  {mask_url(backend.url or resolve_url(None))}",
                          f"  prefix {backend.prefix}  server time {when} UTC  every {args.interval:g}s")  # fmt: skip
    parts: list = [title]
    if error:
        parts.append(Text(error, style="bold red"))
    totals = Table(box=box.SIMPLE_HEAD, show_edge=False, title="runs", title_justify="left")
    for name in HEADINGS:
        totals.add_column(name, justify="right")
    totals.add_column("oldest orphan", justify="right")
    totals.add_column("flows", justify="right")
    styles = {"orphaned": "yellow", "dead": "red"}
    totals.add_row(*[Text(str(snapshot.totals[n]), style=styles.get(n, "") if snapshot.totals[n] else "")
                     for n in HEADINGS], _span(snapshot.oldest_orphan_seconds if snapshot.totals["orphaned"] else None),
                   str(len(snapshot.flows)) + ("+" if snapshot.truncated else ""))  # fmt: skip
    parts.append(totals)
    parts.append(_latency_table(scrape))
    flows = Table(box=box.SIMPLE_HEAD, show_edge=False, title="flows", title_justify="left")
    for heading, justify in (("flow", "left"), ("leased", "right"), ("orphaned", "right"), ("timers", "right"),
                             ("due", "right"), ("dead", "right"), ("oldest orphan", "right"),
                             ("newest save", "right")):  # fmt: skip
        flows.add_column(heading, justify=justify, overflow="ellipsis", no_wrap=True)
    rows = sorted(snapshot.flows, key=lambda r: (-r.orphaned, -r.dead, -r.due, -r.leased, r.flow))
    room = max(3, (height or 10_000) - 24)  # what the rows above leave of the screen
    for row in rows[:room]:
        flows.add_row(Text(row.flow), str(row.leased), str(row.orphaned), str(row.scheduled + row.due), str(row.due),
                      str(row.dead), _span(row.oldest_orphan_seconds), _span(row.newest_save_seconds))  # fmt: skip
    parts.append(flows if rows else Text("flows: none with leases, orphans, timers or dead letters", style="dim"))
    if len(rows) > room:
        parts.append(Text(f"... {len(rows) - room} more flows", style="dim"))
    if not args.once:
        parts.append(Text("q quits", style="dim"))
    return Group(*parts)


def _latency_table(scrape):
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title="latency (workers' /metrics)", title_justify="left")
    for heading, justify in (("", "left"), ("p50", "right"), ("p99", "right"), ("rate", "right"),
                             ("over", "left")):  # fmt: skip
        table.add_column(heading, justify=justify)
    if scrape is None:
        for name in ("recovery", "save"):
            table.add_row(name, "-", "-", "-", "no --metrics URL given")
        return table
    if scrape.recovery is None:
        for name in ("recovery", "save"):
            table.add_row(name, "-", "-", "-", f"no endpoint answered ({scrape.error})")
        return table
    for name, latency, unit, per in (("recovery", scrape.recovery, "/min", 60), ("save", scrape.save, "/s", 1)):
        rate = "-" if latency.per_second is None else f"{latency.per_second * per:.1f}{unit}"
        window = "since start" if latency.window is None else f"last {_span(latency.window)}"
        over = f"{window}, {int(latency.count)} in all, {scrape.answered}/{scrape.endpoints} endpoints"
        table.add_row(name, _ms(latency.p50), _ms(latency.p99), rate, over)
    return table
