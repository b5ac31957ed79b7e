"""Runs the workers look after, in one style: ``leases`` (live leases), ``orphans`` (leases that ran out: a worker
will claim them), ``timers`` (paused runs with a due time) and ``dead`` (list, retry or drop dead-lettered runs).

Each lists one page (``--limit``, ``--cursor``) of one flow (``FLOW``) or of every flow with such runs (read from
the wake and dead-flow shards, never a scan of the keyspace); times come from the Redis server's clock. ``--json``
rows carry times as epoch seconds (``expires_at``, ``due_at``, ``since``) besides the table's relative ones.
"""

from __future__ import annotations

import argparse

from dynamiq_redis_ckpt.cli.common import (
    BadInput, Column, NotFound, Output, connect, page_options, span, store_options)  # fmt: skip


def register(commands) -> None:
    """leases, orphans, timers, dead."""
    leases = commands.add_parser("leases", help="runs holding a live lease: owner, fencing token, expiry")
    _listing(leases)
    leases.set_defaults(handler=_leases)

    orphans = commands.add_parser("orphans", help="runs whose lease ran out or was handed back: a worker claims them")
    _listing(orphans)
    orphans.set_defaults(handler=_orphans)

    timers = commands.add_parser("timers", help="paused runs with a due time (resume_at, or a person's answer)")
    _listing(timers)
    timers.set_defaults(handler=_timers)

    dead = commands.add_parser("dead", help="list, retry or drop runs whose recovery kept failing")
    store_options(dead)
    page_options(dead)
    dead.add_argument("action", choices=["list", "retry", "drop"])
    dead.add_argument("flow", nargs="?", help="the run's flow id (list: only this flow's; retry, drop: required)")
    dead.add_argument("run", nargs="?", help="the run's wf_run_id (retry, drop)")
    dead.set_defaults(handler=_dead)


def _listing(parser: argparse.ArgumentParser) -> None:
    store_options(parser)
    page_options(parser)
    parser.add_argument("flow", nargs="?", help="only this flow's runs")


def _span_ms(ms: float) -> str:
    return span(ms / 1000)


def _in(ms):
    return "-" if ms is None else f"in {_span_ms(ms)}" if ms > 0 else f"{_span_ms(ms)} ago"


def _ago(ms):
    return "-" if ms is None else f"{_span_ms(ms)} ago"


def _blank(value):
    return value if value else "-"


def _page(args: argparse.Namespace, op, **options):
    """Run a listing op for the flow given (its homes) or every flow, on a backend that takes no leases; a bad
    cursor is bad input (found before Redis is asked)."""
    from dynamiq_redis_ckpt.watch import decode_cursor

    try:
        decode_cursor(args.cursor)
    except ValueError as e:
        raise BadInput(str(e)) from None
    from dynamiq_redis_ckpt.keys import flow_homes

    backend = connect(args, leases=False)
    homes = flow_homes(args.flow, backend.store.buckets) if args.flow is not None else None
    return backend.execute(op(backend.store.keys, homes=homes, cursor=args.cursor, limit=args.limit, **options))


def _leases(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import leases_op

    page = _page(args, leases_op, orphaned=False)
    rows = [{"run": r.run, "flow": r.flow, "owner": r.owner or None, "token": r.token,
             "expires_at": r.expires_ms / 1000, "expires_in": (r.expires_ms - page.now_ms) / 1000,
             "state": "held" if r.owner else "backing off", "head": r.head, "attempts": r.attempts}
            for r in page.items]  # fmt: skip
    Output(args).table([
        Column("run", "run"), Column("flow", "flow"), Column("owner", "owner"),
        Column("token", "token", justify="right"), Column("expires_in", "expires", lambda s: _in(s * 1000)),
        Column("state", "state"), Column("head", "head checkpoint"), Column("attempts", "attempts", justify="right"),
    ], rows, next_cursor=page.next_cursor, empty="no live leases")  # fmt: skip
    return 0


def _orphans(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import leases_op

    page = _page(args, leases_op, orphaned=True)
    # A score of 0: put back by `dead retry` (claimable at once, no expiry to tell).
    rows = [{"run": r.run, "flow": r.flow, "expired_at": r.expires_ms / 1000 if r.expires_ms else None,
             "expired_for": (page.now_ms - r.expires_ms) / 1000 if r.expires_ms else None,
             "attempts": r.attempts, "head": r.head,
             "last_owner": r.owner or None, "token": r.token} for r in page.items]  # fmt: skip
    Output(args).table([
        Column("run", "run"), Column("flow", "flow"), Column("expired_for", "expired", _expired),
        Column("attempts", "attempts", justify="right"), Column("head", "head checkpoint"),
        Column("last_owner", "last owner", _blank),
    ], rows, next_cursor=page.next_cursor, empty="no orphans")  # fmt: skip
    return 0


def _expired(seconds: float | None) -> str:
    return "retried: now" if seconds is None else _ago(seconds * 1000)


def _timers(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import timers_op

    page = _page(args, timers_op)
    rows = [{"run": r.run, "flow": r.flow, "due_at": r.due_ms / 1000, "due_in": (r.due_ms - page.now_ms) / 1000,
             "reason": "answered" if r.answered else "timer", "checkpoint": r.checkpoint or None}
            for r in page.items]  # fmt: skip
    Output(args).table([
        Column("run", "run"), Column("flow", "flow"), Column("due_in", "due", _due), Column("reason", "why"),
        Column("checkpoint", "checkpoint"),
    ], rows, next_cursor=page.next_cursor, empty="no paused runs with a due time")  # fmt: skip
    return 0


def _due(seconds: float) -> str:
    return f"in {_span_ms(seconds * 1000)}" if seconds > 0 else f"overdue {_span_ms(seconds * 1000)}"


def _dead(args: argparse.Namespace) -> int:
    if args.action == "list":
        from dynamiq_redis_ckpt.watch import dead_op

        if args.run is not None:
            raise BadInput("dead list takes at most a FLOW")
        page = _page(args, dead_op)
        rows = [{"flow": r.flow, "run": r.run, "since": r.since_ms / 1000,
                 "dead_for": (page.now_ms - r.since_ms) / 1000, "attempts": r.attempts, "head": r.head or None}
                for r in page.items]  # fmt: skip
        Output(args).table([
            Column("flow", "flow"), Column("run", "run"), Column("dead_for", "since", lambda s: _ago(s * 1000)),
            Column("attempts", "attempts", justify="right"), Column("head", "head checkpoint"),
        ], rows, next_cursor=page.next_cursor, empty="no dead letters")  # fmt: skip
        return 0
    if not (args.flow and args.run):
        raise BadInput(f"dead {args.action} needs FLOW RUN")
    from dynamiq_redis_ckpt.worker import Recovery

    recovery = Recovery(connect(args, leases=False))
    act = recovery.retry_dead if args.action == "retry" else recovery.drop_dead
    if not act(args.flow, args.run):
        raise NotFound(f"run {args.run} of flow {args.flow} is not a dead letter")
    what = "put back: the next worker claims it" if args.action == "retry" else "dropped (its checkpoints stay)"
    Output(args).say(f"run {args.run} of flow {args.flow} {what}")
    return 0
