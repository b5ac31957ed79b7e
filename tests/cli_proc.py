"""Run the command line as a real process: ``python -m dynamiq_redis_ckpt.cli ...`` from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``dynamiq-redis-ckpt <args>`` (this checkout's code) and return what it printed and its exit code."""
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([sys.executable, "-m", "dynamiq_redis_ckpt.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kwargs)  # fmt: skip


def cli_all(*commands: tuple[str, ...], env: dict | None = None, timeout: float = 120, wait: bool = True):
    """Run several commands at once (each process spends seconds importing Dynamiq): their CompletedProcesses in
    the order given; with ``wait=False``, a function that waits for them and returns those."""
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    procs = [(args, subprocess.Popen([sys.executable, "-m", "dynamiq_redis_ckpt.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for args in commands]  # fmt: skip

    def finished() -> list[subprocess.CompletedProcess]:
        outputs = [p.communicate(timeout=timeout) for _, p in procs]
        return [subprocess.CompletedProcess(args, p.returncode, *out) for (args, p), out in zip(procs, outputs)]

    return finished() if wait else finished
