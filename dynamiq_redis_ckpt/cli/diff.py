"""``diff A B``: what changed from snapshot A to snapshot B (:mod:`dynamiq_redis_ckpt.snapshot_diff`).

Prints the nodes B completed that A had not (and those that went back), then each change at its path, node by node:
``+`` added, ``-`` removed, ``~`` changed, old -> new, long values shortened. ``--json``: the whole diff, its
``changes`` a list of {node, field, path, kind, old, new}. Exit code 0 whether or not they differ (as ``git diff``);
with ``--exit-code``, 1 when they differ.
"""

from __future__ import annotations

import argparse

from dynamiq_redis_ckpt.cli.common import FAILED, OK, NotFound, Output, connect, store_options

_MARKS = {"added": ("+", "green"), "removed": ("-", "red"), "changed": ("~", "yellow")}


def register(commands) -> None:
    """diff."""
    diff = commands.add_parser("diff", help="what changed between two snapshots: nodes completed, inputs, outputs, "
                               "internal states")  # fmt: skip
    store_options(diff)
    diff.add_argument("a", help="the first snapshot's checkpoint id (the older, usually)")
    diff.add_argument("b", help="the second snapshot's checkpoint id")
    diff.add_argument("--exit-code", action="store_true", help="exit with 1 when the snapshots differ, 0 when not")
    diff.set_defaults(handler=_diff)


def _diff(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.snapshot_diff import diff_snapshots

    backend = connect(args, leases=False)
    a, b = backend.load(args.a), backend.load(args.b)
    missing = [i for i, found in ((args.a, a), (args.b, b)) if found is None]
    if missing:
        raise NotFound(f"no checkpoint {', '.join(missing)}")
    result = diff_snapshots(a, b)
    out = Output(args)
    if out.json:
        out.document(result.as_dict())
    else:
        _print(out, result, a, b)
    return FAILED if args.exit_code and result.differ else OK


def _print(out: Output, result, a, b) -> None:
    from rich.text import Text

    from dynamiq_redis_ckpt.snapshot_diff import shorten

    console = out.console
    console.print(Text.assemble(("--- ", "bold"), a.id, f"  ({a.flow_id}, run {a.wf_run_id or a.run_id}, "
                                f"{len(a.completed_node_ids)} completed)"))  # fmt: skip
    console.print(Text.assemble(("+++ ", "bold"), b.id, f"  ({b.flow_id}, run {b.wf_run_id or b.run_id}, "
                                f"{len(b.completed_node_ids)} completed)"))  # fmt: skip
    if not result.differ:
        console.print("no differences")
        return
    if result.completed:
        console.print(Text.assemble(("completed: ", "bold green"), ", ".join(result.completed)))
    if result.went_back:
        console.print(Text.assemble(("went back: ", "bold red"), ", ".join(result.went_back)))
    heading = object()
    for change in result.changes:
        if change.node != heading:
            heading = change.node
            console.print(Text("run" if change.node is None else f"node {change.node}", style="bold"))
        mark, style = _MARKS[change.kind]
        line = Text(f"  {mark} ", style=style)
        line.append(change.path)
        if change.kind == "added":
            line.append(": " + shorten(change.new))
        elif change.kind == "removed":
            line.append(": " + shorten(change.old))
        else:
            line.append(f": {shorten(change.old)} -> {shorten(change.new)}")
        console.print(line, soft_wrap=True)
