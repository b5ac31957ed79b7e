"""Command line: ``dynamiq-redis-ckpt <command>`` (or ``python -m dynamiq_redis_ckpt.cli <command>``).

Each module here registers a group of commands; :mod:`.common` holds what they share (the store options, exit codes,
tables and ``--json``). Run ``dynamiq-redis-ckpt --help`` for the list. argparse builds the commands (the standard
library; each command is a few options, and every group registers itself); rich draws tables, trees, progress bars
and the live view.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# In the order ``--help`` lists them.
GROUPS = ("service", "browse", "diff", "fork", "queues", "cleanup", "transfer", "top")


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="dynamiq-redis-ckpt", description="Redis checkpoint store for Dynamiq.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for group in GROUPS:
        importlib.import_module(f"{__name__}.{group}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, and return its exit code."""
    from dynamiq_redis_ckpt.cli.common import run

    if not sys.warnoptions:  # Dynamiq's imports warn of their own deprecated pydantic use: nothing an operator can do
        warnings.simplefilter("ignore", DeprecationWarning)
    args = build_parser().parse_args(argv)
    return run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
