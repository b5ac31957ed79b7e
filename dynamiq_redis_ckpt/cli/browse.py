"""Commands that look around a namespace: ``flows``, ``runs FLOW``, ``checkpoints FLOW``, ``show ID``, ``chain ID`` and
``stats [FLOW]``. They only read (the operations are in :mod:`dynamiq_redis_ckpt.history`); listings page by cursor,
never scanning the keyspace.

Damaged data is listed as damaged, never as data: a listing still exits 0 (the healthy rows are the answer), and a
damaged row carries ``"damaged": reason`` in JSON and shows DAMAGED in the table, its reason printed below it.
A command that cannot answer at all (``show`` of an undecodable checkpoint, ``chain`` through a cycle of parent
links) exits 1 with the reason.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from dynamiq_redis_ckpt.cli.common import (
    BadInput, Column, CommandError, NotFound, Output, age, connect, page_options, size, store_options)  # fmt: skip

STATUSES = ("active", "paused", "pending_input", "completed", "failed", "canceled")  # Dynamiq's CheckpointStatus


def register(commands) -> None:
    """flows, runs, checkpoints, show, chain, stats."""
    flows = commands.add_parser("flows", help="the flows of the namespace: checkpoints, live runs, newest save")
    store_options(flows)
    page_options(flows)
    flows.set_defaults(handler=_flows)

    runs = commands.add_parser("runs", help="a flow's runs, the latest started first (by their oldest checkpoint "
                               "still stored, so a run saving while you page keeps its place): status, checkpoints, "
                               "bytes, lease")  # fmt: skip
    runs.add_argument("flow", help="the flow id")
    runs.add_argument("--status", choices=STATUSES, help="only runs whose newest checkpoint has this status")
    store_options(runs)
    page_options(runs)
    runs.set_defaults(handler=_runs)

    checkpoints = commands.add_parser("checkpoints", help="a flow's checkpoints, newest first")
    checkpoints.add_argument("flow", help="the flow id")
    checkpoints.add_argument("--run", help="only this run's (its wf_run_id, or a run_id)")
    checkpoints.add_argument("--status", choices=STATUSES, help="only checkpoints with this status")
    store_options(checkpoints)
    page_options(checkpoints)
    checkpoints.set_defaults(handler=_checkpoints)

    show = commands.add_parser("show", help="one checkpoint: summary, or with --full the whole of it as JSON")
    show.add_argument("id", help="the checkpoint id")
    show.add_argument("--full", action="store_true", help="print the whole decoded checkpoint as JSON")
    store_options(show)
    show.set_defaults(handler=_show)

    chain = commands.add_parser("chain", help="a checkpoint's history as a tree of snapshots, branches included")
    chain.add_argument("id", help="the checkpoint id")
    store_options(chain)
    chain.set_defaults(handler=_chain)

    stats = commands.add_parser("stats", help="per flow: checkpoints, runs, bytes stored, compression and dedup")
    stats.add_argument("flow", nargs="?", help="one flow (default: every flow, a page at a time)")
    store_options(stats)
    page_options(stats, limit=20)
    stats.set_defaults(handler=_stats)


def _backend(args: argparse.Namespace):
    return connect(args, leases=False)


@contextmanager
def _cursor_checked():
    """A cursor no page printed is bad input (exit 2)."""
    try:
        yield
    except ValueError as e:
        raise BadInput(str(e)) from None


def _known_flow(backend, flow: str) -> None:
    from dynamiq_redis_ckpt.history import flow_exists_op

    if not backend.execute(flow_exists_op(backend.store, flow)):
        raise NotFound(f"no flow {flow!r} in namespace {backend.prefix!r}")


def _lease_text(lease: dict | None) -> str:
    if lease and lease.get("damaged"):
        return "damaged"
    if not lease or not lease.get("owner"):
        return "-"
    return f"{lease['owner']} ({'live' if lease['live'] else 'expired'})"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _damaged_table(out: Output, columns: list, rows: list[dict], *, name: str, mark: str = "status",
                   next_cursor: str = "", empty: str) -> None:  # fmt: skip
    """A listing whose damaged rows show DAMAGED in column ``mark`` (in the table; JSON rows carry ``damaged``),
    each with its reason below the table."""
    if not out.json:
        for row in rows:
            if row.get("damaged"):
                row[mark] = "DAMAGED"
    out.table(columns, rows, next_cursor=next_cursor, empty=empty)
    if not out.json:
        for row in rows:
            if row.get("damaged"):
                out.console.print(f"damaged: {name} {row[name]}: {row['damaged']}", style="bold red",
                                  highlight=False, markup=False)  # fmt: skip


# ---- flows, runs, checkpoints ----------------------------------------------------------------------------------


def _flows(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.catalog import flows_op
    from dynamiq_redis_ckpt.history import flow_summaries_op

    backend = _backend(args)
    with _cursor_checked():
        flows, next_cursor = backend.execute(flows_op(backend.store.keys, args.cursor, args.limit))
    summaries = backend.execute(flow_summaries_op(backend.store, flows))
    columns = [Column("flow", "FLOW"), Column("checkpoints", "CHECKPOINTS", justify="right"),
               Column("live_runs", "LIVE RUNS", justify="right"), Column("newest_at", "NEWEST", age)]  # fmt: skip
    Output(args).table(columns, [s.as_dict() for s in summaries], next_cursor=next_cursor, empty="no flows")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.history import runs_page_op

    backend = _backend(args)
    _known_flow(backend, args.flow)
    with _cursor_checked():
        rows, next_cursor = backend.execute(runs_page_op(backend.store, args.flow, cursor=args.cursor,
                                                         limit=args.limit, status=args.status))  # fmt: skip
    columns = [Column("run", "RUN"), Column("status", "STATUS"),
               Column("checkpoints", "CHECKPOINTS", justify="right"),
               Column("stored_bytes", "STORED", size, justify="right"), Column("started_at", "STARTED", age),
               Column("created_at", "LAST SAVE", age), Column("lease", "LEASE", _lease_text)]  # fmt: skip
    _damaged_table(Output(args), columns, [r.as_dict() for r in rows], name="run", next_cursor=next_cursor,
                   empty="no runs")  # fmt: skip
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.history import checkpoints_page_op

    backend = _backend(args)
    _known_flow(backend, args.flow)
    with _cursor_checked():
        rows, next_cursor = backend.execute(checkpoints_page_op(
            backend.store, args.flow, run=args.run, status=args.status, cursor=args.cursor, limit=args.limit))
    if args.run is not None and not rows and not args.cursor and args.status is None:
        raise NotFound(f"no run {args.run!r} in flow {args.flow!r}")
    out = Output(args)
    shown = [r.as_dict() for r in rows]
    if not out.json:
        for row in shown:
            done, total = row["nodes_completed"], row["nodes_total"]
            row["nodes"] = "?" if total is None else f"{done}/{total}"
    columns = [Column("id", "ID"), Column("run", "RUN"), Column("status", "STATUS"), Column("nodes", "NODES"),
               Column("stored_bytes", "STORED", size, justify="right"), Column("created_at", "AGE", age),
               Column("lease", "LEASE", _lease_text)]  # fmt: skip
    _damaged_table(out, columns, shown, name="id", next_cursor=next_cursor, empty="no checkpoints")
    return 0


# ---- one checkpoint --------------------------------------------------------------------------------------------


def _checkpoint_id(text: str) -> str:
    if not text or not text.strip():
        raise BadInput("the checkpoint id is empty")
    return text


def _show(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.history import checkpoint_op

    from dynamiq_redis_ckpt.errors import CheckpointCorruptedError, EncryptionKeyError, UnsupportedFormatError

    backend = _backend(args)
    try:
        info = backend.execute(checkpoint_op(backend.store, _checkpoint_id(args.id)))
    except (CheckpointCorruptedError, EncryptionKeyError, UnsupportedFormatError) as e:
        raise CommandError(f"checkpoint {args.id!r} cannot be decoded: {e}") from None
    if info is None:
        raise NotFound(f"no checkpoint {args.id!r}")
    out = Output(args)
    if args.full:
        out.document(info.checkpoint.model_dump(mode="json"))
        return 0
    record = info.as_dict()
    if out.json:
        out.document(record)
        return 0
    nodes = record.pop("nodes")
    if not record["damaged"]:
        record.pop("damaged")
    record["lease"] = _lease_text(record["lease"])
    record["nodes_completed"] = f"{record['nodes_completed']}/{record.pop('nodes_total')}"
    shown = {"created_at": age, "updated_at": age, "raw_bytes": size, "stored_bytes": size, "pack_bytes": size}
    labels = {"nodes_completed": "nodes completed", "raw_bytes": "raw", "stored_bytes": "stored (new content)",
              "pack_bytes": "packs it names", "created_at": "created", "updated_at": "updated"}  # fmt: skip
    out.fields(record, labels, shown)
    out.console.print()
    out.table([Column("id", "NODE"), Column("status", "STATUS"), Column("completed", "COMPLETED")], nodes,
              empty="no node states")


def _chain(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.history import field_damage
    from dynamiq_redis_ckpt.lineage import ParentCycleError, lineage_op

    backend = _backend(args)
    try:
        lineage = backend.execute(lineage_op(backend.store, _checkpoint_id(args.id)))
    except ParentCycleError as e:
        raise CommandError(str(e)) from None
    if lineage is None:
        raise NotFound(f"no checkpoint {args.id!r}")
    out = Output(args)
    if out.json:
        out.document(lineage.as_dict())
        return 0
    from rich.text import Text
    from rich.tree import Tree

    def label(node) -> Text:
        f = node.fields
        line = Text(node.id, style="bold" if node.id == lineage.marked else "")
        line.append(f"  run {(f.get('wf') or f.get('run'))}  {f.get('st')}  {age(node.created_at)}", style="dim")
        if damage := field_damage(f):
            line.append(f"  DAMAGED ({damage})", style="bold red")
        if node.id == lineage.marked:
            line.append("  <- this one", style="bold")
        return line

    top = f"flow {lineage.flow}: {lineage.size} checkpoints"
    if lineage.gone_parent:
        top += f" (the oldest names parent {lineage.gone_parent}, no longer stored)"
    tree = Tree(Text(top))
    todo = [(tree.add(label(lineage.root)), lineage.root)]
    while todo:  # no recursion: a run of thousands of checkpoints is a deep tree
        branch, node = todo.pop()
        for child in node.children:
            todo.append((branch.add(label(child)), child))
    out.console.print(tree)
    return 0


# ---- stats -----------------------------------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.flow_stats import flow_stats_op

    backend = _backend(args)
    if args.flow is not None:
        _known_flow(backend, args.flow)
        flows, next_cursor = [args.flow], ""
    else:
        from dynamiq_redis_ckpt.catalog import flows_op

        with _cursor_checked():
            flows, next_cursor = backend.execute(flows_op(backend.store.keys, args.cursor, args.limit))
    rows = [backend.execute(flow_stats_op(backend.store, flow)).as_dict() for flow in flows]
    columns = [Column("flow", "FLOW"), Column("checkpoints", "CHECKPOINTS", justify="right"),
               Column("runs", "RUNS", justify="right"), Column("packs", "PACKS", justify="right"),
               Column("stored_bytes", "STORED", size, justify="right"),
               Column("raw_bytes", "RAW", _size_or_mark, justify="right"),
               Column("logical_bytes", "LOGICAL", size, justify="right"),
               Column("compression", "COMPRESSION", _ratio_text, justify="right"),
               Column("dedup", "DEDUP", _ratio_text, justify="right")]  # fmt: skip
    _damaged_table(Output(args), columns, rows, name="flow", mark="raw_bytes", next_cursor=next_cursor,
                   empty="no flows")  # fmt: skip
    return 0


def _size_or_mark(value) -> str:
    return value if isinstance(value, str) else size(value)
