"""Cleaning up: ``delete`` (checkpoints by id, or a whole run) and ``gc`` (what no snapshot needs any more).

``delete`` goes through the store's delete (indexes, pack references, locators) and never breaks a run in flight:
the head checkpoint of a run whose lease is held, which waits in its flow's lease or timer index for a worker to
resume it from that head, or which is paused for a person, is refused (exit 3) unless ``--force``. ``gc`` is
:mod:`dynamiq_redis_ckpt.garbage`, safe while runs save (its docstring says why).
"""

from __future__ import annotations

import argparse

from dynamiq_redis_ckpt.cli.common import (
    BadInput, Column, NotFound, Output, Refused, age, connect, size, store_options)  # fmt: skip


def register(commands) -> None:
    """delete, gc."""
    delete = commands.add_parser("delete", help="delete checkpoints by id, or every checkpoint of a run")
    store_options(delete)
    delete.add_argument("ids", nargs="*", metavar="ID", help="checkpoint ids")
    delete.add_argument("--run", help="delete every checkpoint of this run (run_id or wf_run_id)")
    delete.add_argument("--flow", help="with --run: only the run's checkpoints of this flow")
    delete.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    delete.add_argument("--force", action="store_true", help="delete even the head of a run in flight")
    delete.set_defaults(handler=_delete)

    gc = commands.add_parser("gc", help="remove index entries, content and lookups no checkpoint needs any more")
    store_options(gc)
    gc.add_argument("flows", nargs="*", metavar="FLOW", help="flows to collect (default: every flow of the catalog)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")
    gc.add_argument("-v", "--verbose", action="store_true", help="list every thing removed (ids)")
    gc.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                    help="wait before removing a lookup, and require it untouched that long (default 10, min 3)")
    gc.add_argument("--no-lookups", action="store_true",
                    help="leave locators and run lookups alone (they need a SCAN of every lookup key)")  # fmt: skip
    gc.add_argument("--rebuild-catalog", action="store_true",
                    help="first add to the catalog every flow saved by a version before it (one SCAN of the keyspace; "
                    "it only adds, so it runs with --dry-run too)")  # fmt: skip
    gc.set_defaults(handler=_gc)


# ---- delete --------------------------------------------------------------------------------------------------------


_DELETED = [
    Column("id", "checkpoint"), Column("flow", "flow"), Column("run", "run"), Column("status", "status"),
    Column("created_at", "created", age), Column("bytes", "stored", size, "right"),
]  # fmt: skip


def _delete(args: argparse.Namespace) -> int:
    if bool(args.ids) == bool(args.run):
        raise BadInput("give checkpoint ids, or --run RUN (not both)")
    if args.flow and not args.run:
        raise BadInput("--flow goes with --run")
    backend = connect(args, leases=False)
    core = backend.store
    if args.run:
        targets = backend.execute(_run_targets_op(core, args.run, args.flow))
        if not targets:
            raise NotFound(f"no checkpoints of run {args.run!r}" + (f" in flow {args.flow!r}" if args.flow else ""))
    else:
        targets = backend.execute(_id_targets_op(core, list(dict.fromkeys(args.ids))))
        missing = [i for i, t in zip(dict.fromkeys(args.ids), targets) if t is None]
        if missing:
            raise NotFound(f"no checkpoint {', '.join(missing)} (nothing deleted)")
    if not args.force:
        in_flight = backend.execute(_in_flight_op(core.keys, targets))
        if in_flight:
            raise Refused("; ".join(in_flight) + " (nothing deleted; --force deletes it anyway)")
    out = Output(args)
    if args.dry_run:
        out.table(_DELETED, targets, title="would delete")
        return 0
    deleted = [t for t in targets if backend.execute(core.delete(t["id"]))]
    out.table(_DELETED, deleted, title="deleted", empty="nothing deleted (gone meanwhile)")
    return 0


def _row(cp_id: str, home: str, fields: dict) -> dict:
    from dynamiq_redis_ckpt.keys import flow_of
    from dynamiq_redis_ckpt.requests import text

    get = lambda name: text(fields.get(name.encode(), fields.get(name)))  # noqa: E731
    ts = get("ts")
    return {
        "id": cp_id, "flow": flow_of(home), "home": home, "run": get("wf") or get("run"), "status": get("st"),
        "created_at": int(ts) / 1e6 if ts.lstrip("-").isdigit() else None,
        "bytes": int(get("size")) if get("size").isdigit() else None,
    }  # fmt: skip


def _id_targets_op(core, ids: list[str]):
    """Per id, its row (home, run, status, ...) or None when it is not stored."""
    from dynamiq_redis_ckpt.requests import Batch, cmd, text

    homes = yield Batch(tuple(cmd("GET", core.keys.locator(i)) for i in ids))
    located = [(i, text(h)) for i, h in zip(ids, homes) if h is not None]
    found = (yield Batch(tuple(cmd("HGETALL", core.keys.checkpoint(h, i)) for i, h in located))) if located else []
    rows = {i: _row(i, h, f) for (i, h), f in zip(located, found) if f}
    return [rows.get(i) for i in ids]


def _run_targets_op(core, run: str, flow: str | None):
    """Rows of every stored checkpoint of ``run`` (of ``flow`` only, when given), newest first."""
    from dynamiq_redis_ckpt.leases import run_homes_op
    from dynamiq_redis_ckpt.requests import Batch, cmd, text

    homes = yield from run_homes_op(core.keys, run, flow, core.buckets)
    if not homes:
        return []
    members = yield Batch(tuple(cmd("ZREVRANGE", core.keys.run_index(h, run), 0, -1) for h in homes))
    pairs = [(text(m), h) for h, ids in zip(homes, members) for m in ids]
    if not pairs:
        return []
    found = yield Batch(tuple(cmd("HGETALL", core.keys.checkpoint(h, i)) for i, h in pairs))
    return [_row(i, h, f) for (i, h), f in zip(pairs, found) if f]


def _in_flight_op(keys, targets: list[dict]):
    """Why each target that is the head of a run in flight may not go: its run holds a live lease, waits in its
    flow's lease index (to be claimed by a worker) or timer index (to be resumed when due), is dead-lettered (a
    `dead retry` hands it to the workers again, from this head), or is paused for a person.
    Checked before the delete, not in its script: a run claimed in between loses its head (--force's outcome)."""
    from dynamiq_redis_ckpt.requests import Batch, cmd, server_ms, text

    reads = [cmd("TIME")]
    for t in targets:
        home, run = t["home"], t["run"]
        reads += [cmd("HMGET", keys.lease(home, run), "owner", "exp", "head"),
                  cmd("ZSCORE", keys.lease_index(home), run), cmd("ZSCORE", keys.due_index(home), run),
                  cmd("ZSCORE", keys.dead_index(home), run)]  # fmt: skip
    replies = yield Batch(tuple(reads))
    now_ms = server_ms(replies[0])
    reasons = []
    for i, t in enumerate(targets):
        (owner, exp, head), leased, due, dead = replies[1 + 4 * i : 5 + 4 * i]
        if text(head) != t["id"]:
            continue
        if owner and text(owner) and int(text(exp) or 0) > now_ms:
            why = f"held by {text(owner)}"
        elif leased is not None:
            why = "waiting for a worker to resume it"
        elif due is not None:
            why = "waiting for its timer"
        elif dead is not None:
            why = "dead-lettered, waiting for `dead retry` or `dead drop`"
        elif t["status"] in ("paused", "pending_input"):
            why = "paused, waiting for a person's answer"
        else:
            continue
        reasons.append(f"checkpoint {t['id']} is the head of run {t['run']} (flow {t['flow']}), "
                       f"which is in flight: {why}")
    return reasons


# ---- gc ------------------------------------------------------------------------------------------------------------


def _gc(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt import garbage

    grace = garbage.DEFAULT_GRACE_SECONDS if args.grace is None else args.grace
    if grace < garbage.MIN_GRACE_SECONDS:
        raise BadInput(f"--grace must be at least {garbage.MIN_GRACE_SECONDS:g} seconds, got {args.grace:g}")
    backend = connect(args, leases=False)
    core = backend.store
    out = Output(args)
    if args.rebuild_catalog:
        from dynamiq_redis_ckpt import catalog

        added = backend.execute(catalog.rebuild_op(core.keys))
        if not out.json:
            out.say(f"catalog: {added} flow(s) added")
    flows = list(dict.fromkeys(args.flows))
    if not flows:
        flows = _catalog_flows(backend)
    report = backend.execute(garbage.gc_op(core.keys, flows, core.buckets, dry_run=args.dry_run,
                                           grace_seconds=grace, lookups=not args.no_lookups))  # fmt: skip
    if out.json:
        out.document(report.to_dict(verbose=args.verbose))
        return 0
    rows = [{"kind": kind, "count": f.count, "bytes": f.bytes} for kind, f in report.kinds.items()]
    done = "would remove" if args.dry_run else "removed"
    out.table([Column("kind", "kind"), Column("count", done, justify="right"),
               Column("bytes", "bytes", size, "right")], rows,
              title=f"{done} ({len(flows)} flows, {report.homes} homes)")  # fmt: skip
    if args.verbose:
        for kind, f in report.kinds.items():
            for item in f.items:
                out.say(f"{kind}\t{item}")
    for note in report.skipped:
        out.say(f"skipped: {note}")
    return 0


def _catalog_flows(backend) -> list[str]:
    from dynamiq_redis_ckpt import catalog

    return backend.execute(catalog.all_flows_op(backend.store.keys))
