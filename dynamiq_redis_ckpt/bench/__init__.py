"""Benchmark of the Redis checkpoint backend against Dynamiq's InMemory, FileSystem and PostgreSQL backends.

Run it with ``python3 -m dynamiq_redis_ckpt.bench`` (``--quick`` for a smoke run, ``--help`` for the options).

Modules: :mod:`~dynamiq_redis_ckpt.bench.workloads` (deterministic checkpoints), :mod:`~.targets` (the backends
compared), :mod:`~.measure` (timing routines), :mod:`~.flow` (a real Flow for the per-node overhead),
:mod:`~.report` (tables, targets, chart) and ``__main__`` (command line and orchestration).
"""
