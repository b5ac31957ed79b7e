"""Run the command line as a real process: ``python -m dynamiq_redis_ckpt.cli ...`` from the repository root, with
the repository first on PYTHONPATH (so a worktree's code runs, not an installed copy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, url: str, prefix: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``dynamiq-redis-ckpt <args> --url <url> --prefix <prefix>``; returns the finished process (text output)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    command = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", *args, "--url", url, "--prefix", prefix]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
