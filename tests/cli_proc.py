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


def cli_all(*commands: tuple[str, ...], env: dict | None = None, timeout: float = 120
            ) -> list[subprocess.CompletedProcess]:  # fmt: skip
    """Run several commands at once (each process spends seconds importing Dynamiq), in the order given."""
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    procs = [(args, subprocess.Popen([sys.executable, "-m", "dynamiq_redis_ckpt.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for args in commands]  # fmt: skip
    return [_finished(args, p, timeout) for args, p in procs]


def _finished(args, proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
