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
    # One parser per action (not `action flow run` positionals): Python 3.11's argparse fills optional positionals
    # with nothing when options come first, so `dead list --json FLOW` refused FLOW as an unrecognized argument.
    actions = dead.add_subparsers(dest="action", metavar="{list,retry,drop}", required=True)
    for action, help in (("list", "dead-lettered runs (of FLOW)"), ("retry", "put FLOW RUN back: a worker claims it"),
                         ("drop", "forget FLOW RUN (its checkpoints stay)")):  # fmt: skip
        parser = actions.add_parser(action, help=help)
        store_options(parser)
        if action == "list":
            page_options(parser)
        parser.add_argument("flow", nargs="?", help="the run's flow id (list: only this flow's; retry, drop: required)")
        if action != "list":
            parser.add_argument("run", nargs="?", help="the run's wf_run_id")
        parser.set_defaults(handler=_dead)


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
             "expires_at": _seconds(r.expires_ms), "expires_in": _seconds(r.expires_ms, page.now_ms),
             "state": "held" if r.owner else "backing off", "head": r.head, "attempts": r.attempts}
            for r in page.items]  # fmt: skip
    Output(args).table([
        Column("run", "run"), Column("flow", "flow"), Column("owner", "owner"),
        Column("token", "token", _damaged, justify="right"),
        Column("expires_in", "expires", lambda s: _damaged(s) if s is None else _in(s * 1000)),
        Column("state", "state"), Column("head", "head checkpoint"),
        Column("attempts", "attempts", _damaged, justify="right"),
    ], rows, next_cursor=page.next_cursor, empty="no live leases")  # fmt: skip
    return 0


def _orphans(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import leases_op

    page = _page(args, leases_op, orphaned=True)
    # A score of 0: put back by `dead retry` (claimable at once, no expiry to tell); None: not a number (damaged).
    rows = [{"run": r.run, "flow": r.flow, "expired_at": _seconds(r.expires_ms or None),
             "expired_for": -_seconds(r.expires_ms, page.now_ms) if r.expires_ms else None,
             "attempts": r.attempts, "head": r.head,
             "last_owner": r.owner or None, "token": r.token} for r in page.items]  # fmt: skip
    out = Output(args)
    for row, r in zip(rows, page.items) if not out.json else ():  # what the table shows, not part of the JSON row
        row["expired"] = "retried: now" if r.expires_ms == 0 else _damaged(row["expired_for"], _ago)
    out.table([
        Column("run", "run"), Column("flow", "flow"), Column("expired", "expired"),
        Column("attempts", "attempts", _damaged, justify="right"), Column("head", "head checkpoint"),
        Column("last_owner", "last owner", _blank),
    ], rows, next_cursor=page.next_cursor, empty="no orphans")  # fmt: skip
    return 0


def _seconds(ms: int | None, since_ms: int = 0) -> float | None:
    """Epoch ms (less ``since_ms``) as seconds; None stays None (a score that is not a number: damaged)."""
    return None if ms is None else (ms - since_ms) / 1000


def _damaged(value, show=None) -> str:
    """A number from Redis, or 'damaged' where the stored field or score is not one (None)."""
    if value is None:
        return "damaged"
    return show(value * 1000) if show else str(value)


def _timers(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.watch import timers_op

    page = _page(args, timers_op)
    rows = [{"run": r.run, "flow": r.flow, "due_at": _seconds(r.due_ms), "due_in": _seconds(r.due_ms, page.now_ms),
             "reason": "answered" if r.answered else "timer", "checkpoint": r.checkpoint or None}
            for r in page.items]  # fmt: skip
    Output(args).table([
        Column("run", "run"), Column("flow", "flow"), Column("due_in", "due", _due), Column("reason", "why"),
        Column("checkpoint", "checkpoint"),
    ], rows, next_cursor=page.next_cursor, empty="no paused runs with a due time")  # fmt: skip
    return 0


def _due(seconds: float | None) -> str:
    if seconds is None:
        return "damaged"
    return f"in {_span_ms(seconds * 1000)}" if seconds > 0 else f"overdue {_span_ms(seconds * 1000)}"


def _dead(args: argparse.Namespace) -> int:
    if args.action == "list":
        from dynamiq_redis_ckpt.watch import dead_op

        page = _page(args, dead_op)
        rows = [{"flow": r.flow, "run": r.run, "since": _seconds(r.since_ms),
                 "dead_for": None if r.since_ms is None else (page.now_ms - r.since_ms) / 1000,
                 "attempts": r.attempts, "head": r.head or None} for r in page.items]  # fmt: skip
        Output(args).table([
            Column("flow", "flow"), Column("run", "run"), Column("dead_for", "since", lambda s: _damaged(s, _ago)),
            Column("attempts", "attempts", _damaged, justify="right"), Column("head", "head checkpoint"),
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
