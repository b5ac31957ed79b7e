"""Runs the workers look after: ``dead`` (list, retry or drop dead-lettered runs)."""

from __future__ import annotations

import argparse
import sys

from dynamiq_redis_ckpt.cli.common import connect, store_options


def register(commands) -> None:
    """dead."""
    dead = commands.add_parser("dead", help="list, retry or drop runs whose recovery kept failing")
    store_options(dead)
    dead.add_argument("action", choices=["list", "retry", "drop"])
    dead.add_argument("flow", nargs="?", help="the run's flow id (retry, drop)")
    dead.add_argument("run", nargs="?", help="the run's wf_run_id (retry, drop)")
    dead.set_defaults(handler=_dead)


def _dead(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.worker import Recovery

    recovery = Recovery(connect(args))
    if args.action == "list":
        for letter in recovery.dead_letters():
            print(f"{letter.flow}\t{letter.run}\t{letter.since_ms}")
        return 0
    if not (args.flow and args.run):
        print("dead retry|drop needs FLOW RUN", file=sys.stderr)
        return 2
    done = recovery.retry_dead(args.flow, args.run) if args.action == "retry" else recovery.drop_dead(args.flow, args.run)
    print("ok" if done else "not found")
    return 0 if done else 1


