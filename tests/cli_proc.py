"""Run the command line as a real process: ``python -m dynamiq_redis_ckpt.cli`` from this checkout (never the
installed console script), with the repository root first on PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = (sys.executable, "-m", "dynamiq_redis_ckpt.cli")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a command runs in: this one, the repository root first on PYTHONPATH, and ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def command(*args) -> list[str]:
    """The argv of ``dynamiq-redis-ckpt ARGS...`` run from this checkout (for a terminal the test drives)."""
    return [*COMMAND, *map(str, args)]


def cli(*args: str, input: str | None = None, timeout: float = 120, env: dict | None = None,
        **popen) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``dynamiq-redis-ckpt ARGS...`` to its end; stdout and stderr captured as text."""
    return subprocess.run(command(*args), cwd=ROOT, env=cli_env(**(env or {})), input=input, text=True,
                          capture_output=True, timeout=timeout, **popen)  # fmt: skip


def cli_popen(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start ``dynamiq-redis-ckpt ARGS...`` and return at once (the caller waits, signals or kills it)."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(command(*args), cwd=ROOT, env=cli_env(**(env or {})), text=True, **popen)


def cli_all(*commands: tuple[str, ...], env: dict | None = None, timeout: float = 120, wait: bool = True):
    """Run several commands at once (each process spends seconds importing Dynamiq): their CompletedProcesses in
    the order given; with ``wait=False``, a function that waits for them and returns those."""
    procs = [(args, cli_popen(*args, env=env)) for args in commands]

    def finished() -> list[subprocess.CompletedProcess]:
        outputs = [p.communicate(timeout=timeout) for _, p in procs]
        return [subprocess.CompletedProcess(args, p.returncode, *out) for (args, p), out in zip(procs, outputs)]

    return finished() if wait else finished
