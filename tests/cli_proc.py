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
