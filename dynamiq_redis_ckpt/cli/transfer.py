"""``export`` (checkpoints to JSON lines) and ``import`` (from JSON lines, a Dynamiq FileSystem directory or a Dynamiq
PostgreSQL table), with a progress bar on stderr when it is a terminal. The work is :mod:`dynamiq_redis_ckpt.transfer`.

An import stores with plain saves: imported runs take no lease and no worker resumes them, unless
``--hand-to-workers`` is given. It skips what Redis already holds identical, so running it again after an
interruption finishes the job; then it loads every checkpoint back and compares it with the source's (exit 1 and the
differences when they differ; ``--no-verify`` skips this).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

from dynamiq_redis_ckpt.cli.common import (
    UNREACHABLE, BadInput, Column, CommandError, NotFound, Output, Refused, connect, store_options)  # fmt: skip

# Tests set this to slow an import down (seconds after each checkpoint stored) so they can kill it midway.
PAUSE_ENV = "CKPT_TEST_IMPORT_PAUSE"


def register(commands) -> None:
    """export, import."""
    export = commands.add_parser("export", help="write checkpoints as JSON lines (one checkpoint a line)")
    store_options(export)
    export.add_argument("flows", nargs="*", metavar="FLOW", help="flows to export (default: every flow)")
    export.add_argument("--run", help="only this run's checkpoints (its run_id or wf_run_id)")
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="file to write (replaced when complete), or - for standard output")  # fmt: skip
    export.set_defaults(handler=_export)

    imp = commands.add_parser("import", help="store checkpoints from JSON lines, a Dynamiq FileSystem directory or "
                              "a Dynamiq PostgreSQL table; skips what is stored already, then verifies")  # fmt: skip
    store_options(imp)
    imp.add_argument("file", nargs="?", metavar="FILE.jsonl", help="JSON lines written by export (- : stdin)")
    imp.add_argument("--from-filesystem", metavar="DIR", help="a directory of Dynamiq's FileSystem backend")
    imp.add_argument("--from-postgres", metavar="DSN", help="a PostgreSQL DSN (postgresql://user@host/db)")
    imp.add_argument("--table", default="flow_checkpoints", help="the table (default: Dynamiq's flow_checkpoints)")
    imp.add_argument("--flow", action="append", default=[], metavar="F", help="only this flow (repeatable)")
    imp.add_argument("--no-verify", action="store_true", help="do not load every checkpoint back to compare")
    imp.add_argument("--overwrite", action="store_true",
                     help="replace a checkpoint Redis holds in another version (default: keep it, report a conflict, "
                     "exit 3), even one held under another flow id")  # fmt: skip
    imp.add_argument("--hand-to-workers", action="store_true",
                     help="runs whose newest checkpoint is active become orphans the workers resume; paused runs "
                     "wait for their timer or answer as paused runs do (default: imported runs are left alone)")
    imp.set_defaults(handler=_import)


@contextmanager
def _progress(description: str, total: int | None):
    """A rich progress bar on stderr when stderr is a terminal; yields ``advance(n)`` and ``phase(text, total)``."""
    if not sys.stderr.isatty():
        yield (lambda n: None), (lambda text, total: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)

        def phase(text: str, new_total: int | None) -> None:
            nonlocal task
            task = bar.add_task(text, total=new_total)

        yield (lambda n: bar.advance(task, n)), phase


# ---- export --------------------------------------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.transfer import Exporter, write_line

    to_stdout = args.output == "-"
    if to_stdout and args.json:
        raise BadInput("--json needs -o FILE: standard output carries the checkpoints")
    backend = connect(args, leases=False)
    exporter = Exporter(backend)
    flows = args.flows or (None if args.run else _all_flows(backend))
    entries = exporter.entries(flows, args.run)
    for flow in args.flows:
        if flow not in entries:
            what = f"run {args.run} of flow {flow}" if args.run else f"flow {flow}"
            raise NotFound(f"no checkpoints of {what}")
    if args.run and not entries:
        raise NotFound(f"no checkpoints of run {args.run}")
    written = 0
    out, temporary = (sys.stdout, None) if to_stdout else _temporary_beside(args.output)
    try:
        with _progress("exporting", sum(len(e) for e in entries.values())) as (advance, _):
            for flow in entries:
                for checkpoint in exporter.checkpoints(entries[flow]):
                    write_line(out, checkpoint)
                    written += 1
                    advance(1)
                advance(0)
        out.flush()
        if temporary is not None:
            os.fsync(out.fileno())
            out.close()
            os.replace(temporary, args.output)
            temporary = None
    finally:
        if temporary is not None:
            out.close()
            os.unlink(temporary)
    summary = {"exported": written, "flows": len(entries), "vanished": exporter.missing,
               "output": "-" if to_stdout else os.path.abspath(args.output)}  # fmt: skip
    where = "standard output" if to_stdout else args.output
    text = f"exported {_count(written, 'checkpoint')} of {_count(len(entries), 'flow')} to {where}"
    if exporter.missing:
        text += f" ({exporter.missing} listed were deleted or expired before they were read)"
    if to_stdout:
        print(text, file=sys.stderr)
    else:
        output = Output(args)
        output.document(summary) if output.json else output.say(text)
    return 0


def _all_flows(backend) -> list[str]:
    """Every flow of the namespace's catalog, in name order (the order the export writes them)."""
    from dynamiq_redis_ckpt import catalog

    return sorted(backend.execute(catalog.all_flows_op(backend.store.keys)))


def _temporary_beside(path: str):
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".export-", suffix=".jsonl.tmp")
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}") from e
    return os.fdopen(fd, "w", encoding="utf-8"), temporary


# ---- import --------------------------------------------------------------------------------------------------------


def _import(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.transfer import Importer, ImportReport

    given = [x for x in (args.file, args.from_filesystem, args.from_postgres) if x is not None]
    if len(given) != 1:
        raise BadInput("give one source: FILE.jsonl, --from-filesystem DIR or --from-postgres DSN")
    backend = connect(args, leases=False)
    backend.ping()  # an unreachable Redis is said before the source is read
    # Dynamiq's backends log their failures as they raise them; the import reports each one itself, once.
    logging.getLogger("dynamiq.utils.logger").setLevel(logging.CRITICAL)
    source = _source(args)
    try:
        if missing := source.missing_flows():
            raise NotFound(f"{source.name} holds no checkpoints of flow {', '.join(missing)}")
        report = ImportReport()
        with _progress("importing", source.total) as (advance, phase):
            pause = float(os.environ.get(PAUSE_ENV) or 0)
            importer = Importer(backend, progress=advance, pause=pause, overwrite=args.overwrite)
            with _source_errors():
                importer.run(source, report)
                if not args.no_verify:
                    phase("verifying", report.totals.source)
                    importer.verify(source, report)
        problems = report.unreadable + report.mismatches + report.refused
        # a run whose history differs from the source's is not handed to the workers
        if args.hand_to_workers and not problems and not report.conflicts:
            importer.hand_to_workers(report)
    finally:
        source.close()
    _print_import(args, source.name, report)
    if problems:
        unhanded = "; no run was handed to the workers" if args.hand_to_workers else ""
        raise CommandError(f"{_count(len(problems), 'problem')} (listed above): the source has checkpoints Dynamiq "
                           f"cannot read, or Redis does not hold every checkpoint as the source does{unhanded}")
    if report.conflicts:
        raise Refused(f"{_count(len(report.conflicts), 'checkpoint')} kept as Redis holds them, in another version "
                      "(listed above; --overwrite replaces them)")  # fmt: skip
    return 0


def _source(args: argparse.Namespace):
    from dynamiq_redis_ckpt.sources import FileSystemSource, JsonLinesSource, PostgresSource

    with _source_errors():
        if args.file is not None:
            return JsonLinesSource(args.file, args.flow)
        if args.from_filesystem is not None:
            return FileSystemSource(args.from_filesystem, args.flow)
        return PostgresSource(args.from_postgres, args.table, args.flow)


@contextmanager
def _source_errors():
    """A source's errors as exit codes: malformed 2, unreachable 5, not there 4."""
    from dynamiq_redis_ckpt.sources import SourceError, SourceNotFound, SourceUnavailable

    try:
        yield
    except SourceError as e:
        raise BadInput(str(e)) from e
    except SourceUnavailable as e:
        raise CommandError(str(e), UNREACHABLE) from e
    except SourceNotFound as e:
        raise NotFound(str(e)) from e


def _print_import(args: argparse.Namespace, source_name: str, report) -> None:
    output = Output(args)
    rows = [{"flow": flow, **vars(t)} for flow, t in sorted(report.flows.items())]
    if output.json:
        totals = vars(report.totals)
        totals.pop("in_redis")
        output.document({"source": source_name, "flows": rows, "totals": totals, "verified": report.verified,
                         "unreadable": report.unreadable, "mismatches": report.mismatches,
                         "conflicts": report.conflicts, "refused": report.refused,
                         "handed_to_workers": report.handed_over})  # fmt: skip
        return
    columns = [Column("flow", "flow"), Column("source", "source", justify="right"),
               Column("saved", "saved", justify="right"), Column("updated", "updated", justify="right"),
               Column("skipped", "skipped", justify="right")]  # fmt: skip
    if report.totals.conflicts:
        columns.append(Column("conflicts", "conflicts", justify="right"))
    if report.verified:
        columns += [Column("verified", "verified", justify="right"), Column("in_redis", "in Redis", justify="right")]
    output.table(columns, rows, title=f"import from {source_name}", empty="the source holds no checkpoints")
    t = report.totals
    line = (f"{_count(t.source, 'checkpoint')} of {_count(len(report.flows), 'flow')}: {t.saved} saved, "
            f"{t.updated} updated, {t.skipped} skipped (already stored identical)")  # fmt: skip
    if report.verified:
        line += f"; verified: {t.verified} of {t.source} equal in Redis"
    output.say(line)
    if report.handed_over:
        output.say(f"handed to the workers: {_count(len(report.handed_over), 'run')} "
                   f"({', '.join(report.handed_over[:10])}"
                   + (", ..." if len(report.handed_over) > 10 else "") + ")")
    for problem in report.unreadable:
        output.say(f"unreadable: {problem}")
    for problem in report.mismatches:
        output.say(f"mismatch: {problem}")
    for problem in report.conflicts:
        output.say(f"conflict: {problem}")
    for problem in report.refused:
        output.say(f"refused: {problem}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
