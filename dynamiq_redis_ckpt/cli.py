"""Command line: ``python -m dynamiq_redis_ckpt.cli <command>``.

Commands:
    demo    crash a flow mid-run and resume it from Redis (see :mod:`dynamiq_redis_ckpt.demo`)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="dynamiq-redis-ckpt", description="Redis checkpoint store for Dynamiq.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo = commands.add_parser("demo", help="crash a flow mid-run and resume it from its checkpoints in Redis")
    demo.add_argument("--url", help="Redis to use (default $DYNAMIQ_REDIS_CKPT_URL, else a private redis-server)")
    demo.set_defaults(handler=_demo)
    # A "worker" command is planned; it registers here the same way.
    return parser


def _demo(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt import demo  # imported on use: it loads Dynamiq's flows

    return demo.main(["--url", args.url] if args.url else [])


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, and return its exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
