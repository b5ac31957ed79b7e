"""``fork ID``: time travel. A new run (new wf_run_id, new checkpoint ids) from any snapshot, optionally with nodes'
outputs replaced (``--set NODE.output=JSON``, or one key: ``--set NODE.output.KEY=JSON``); see
:mod:`dynamiq_redis_ckpt.fork`.

Without ``--flows``/``--yaml`` the new run is handed to the workers: a ``dynamiq-redis-ckpt worker`` claims and
resumes it. With them, this process runs it in the foreground (flows given as to the worker) and prints its result.
Prints the new run id and its first checkpoint's id. Exit codes: 4 no such snapshot; 2 a malformed ``--set``, a node
the snapshot has not completed, bad JSON, a flow the factory does not know; 1 a foreground run that failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from dynamiq_redis_ckpt.cli.common import FAILED, OK, BadInput, NotFound, Output, connect, store_options


def register(commands) -> None:
    """fork."""
    fork = commands.add_parser("fork", help="time travel: a new run from any snapshot, with outputs replaced at will")
    store_options(fork)
    fork.add_argument("id", help="the snapshot's checkpoint id")
    fork.add_argument("--set", action="append", default=[], metavar="NODE.output[.KEY]=JSON", dest="overrides",
                      help="replace a completed node's output (or a key of it) with this JSON; repeatable")  # fmt: skip
    source = fork.add_mutually_exclusive_group()
    source.add_argument("--flows", help="run it here: module:attr, a callable flow_id -> Flow or a dict of factories")
    source.add_argument("--yaml", help="run it here: a Dynamiq YAML workflow file holding the flow")
    fork.set_defaults(handler=_fork)


def parse_overrides(specs: list[str]) -> list:
    """The ``--set`` options as :class:`~dynamiq_redis_ckpt.fork.Override`; BadInput for a malformed one."""
    from dynamiq_redis_ckpt.fork import ForkError, Override

    overrides = []
    for spec in specs:
        target, sep, raw = spec.partition("=")
        if not sep:
            raise BadInput(f"--set {spec!r}: expected NODE.output=JSON or NODE.output.KEY=JSON")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadInput(f"--set {target}: the value is not JSON ({e}); quote strings: '\"text\"'") from None
        try:
            overrides.append(Override.parse(target, value))
        except ForkError as e:
            raise BadInput(f"--set {e}") from None
    return overrides


def _fork(args: argparse.Namespace) -> int:
    from dynamiq_redis_ckpt.fork import Fork, ForkError, fork_op, forked_checkpoint

    overrides = parse_overrides(args.overrides)  # before Redis is asked: bad input is bad whatever the store holds
    foreground = bool(args.flows or args.yaml)
    backend = connect(args)
    source = backend.load(args.id)
    if source is None:
        raise NotFound(f"no checkpoint {args.id}")
    _check_retention(backend, source.id)
    try:
        forked, stale = forked_checkpoint(source, overrides)
    except ForkError as e:
        raise BadInput(str(e)) from None
    flow = _flow(args, source.flow_id) if foreground else None  # a flow it cannot build: nothing is stored
    saved = backend.execute(fork_op(backend.store, forked, hand_to_workers=not foreground))
    made = Fork(source.id, source.flow_id, forked.wf_run_id, forked.id, saved.home, not foreground, stale)
    if stale:
        print(f"warning: {', '.join(stale)} completed after a replaced node in the snapshot and keep their outputs; "
              "fork the snapshot right after that node to have them run again", file=sys.stderr)
    out = Output(args)
    record = {"source": made.source, "flow": made.flow, "run": made.run, "checkpoint": made.checkpoint,
              "replaced": [o.target for o in overrides], "handed_to_workers": made.handed_to_workers}  # fmt: skip
    if not foreground:
        if out.json:
            out.document(record)
        else:
            out.fields(_shown(record))
            out.say("handed to the workers: a dynamiq-redis-ckpt worker claims and resumes it")
        return OK
    return _run_here(out, backend, flow, made, record)


def _check_retention(backend, checkpoint_id: str) -> None:
    """Refuse to fork, without --ttl, a snapshot that expires: a save without a ttl keeps what it names for ever, the
    source's content too (packs are shared), so the namespace's retention must be given."""
    from dynamiq_redis_ckpt.requests import cmd

    if backend.ttl_seconds:
        return
    left_ms = backend.execute(_pttl(cmd("PTTL", backend.store.keys.locator(checkpoint_id))))
    if left_ms is not None and int(left_ms) > 0:
        raise BadInput(f"checkpoint {checkpoint_id} expires (in {int(left_ms) / 1000:.0f} s): this namespace keeps "
                       "checkpoints for a ttl; give it with --ttl SECONDS (or $DYNAMIQ_REDIS_CKPT_TTL_SECONDS), or the "
                       "fork would keep the source's content for ever")  # fmt: skip


def _pttl(command):
    return (yield command)


def _flow(args: argparse.Namespace, flow_id: str):
    from dynamiq_redis_ckpt.worker import load_flow_factory

    try:
        factory = load_flow_factory(flows=args.flows, yaml_path=args.yaml)
    except (ImportError, AttributeError, OSError) as e:
        raise BadInput(f"cannot load the flows from {args.flows or args.yaml}: {e}") from None
    try:
        return factory(flow_id)
    except KeyError:
        raise BadInput(f"flow {flow_id!r} is not among {args.flows or args.yaml}") from None


def _run_here(out: Output, backend, flow, made, record: dict) -> int:
    """Resume the fork in this process, as a worker would (its saves hold the run's lease), and print the result."""
    from dynamiq.checkpoints.config import CheckpointConfig
    from dynamiq.runnables import RunnableConfig, RunnableStatus

    config = RunnableConfig(run_id=made.run, checkpoint=CheckpointConfig(resume_from=made.checkpoint, backend=backend))
    result = flow.run_sync(None, config=config)
    latest = backend.get_latest_by_flow_and_run(made.flow, made.run)
    record |= {"status": result.status.value, "last_checkpoint": latest.id if latest else None,
               "output": result.output}  # fmt: skip
    if out.json:
        out.document(record)
    else:
        output = record.pop("output")
        out.fields(_shown(record))
        out.console.print_json(json.dumps(output, default=str, ensure_ascii=False))
    return OK if result.status == RunnableStatus.SUCCESS else FAILED


def _shown(record: dict) -> dict:
    return {k: ", ".join(v) if isinstance(v, list) else v for k, v in record.items() if v not in ([], None)}
