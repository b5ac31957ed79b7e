"""Run the command line as a real process: ``cli("leases", "--url", url) -> CompletedProcess`` (text, captured)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def env(**extra: str) -> dict:
    """The environment a command runs in: this checkout first on PYTHONPATH (never the installed package)."""
    return os.environ | {"PYTHONPATH": str(ROOT)} | extra


def command(*args: str) -> list[str]:
    """The argv of ``dynamiq-redis-ckpt <args>`` run from this checkout."""
    return [sys.executable, "-m", "dynamiq_redis_ckpt.cli", *map(str, args)]


def cli(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    """Run ``dynamiq-redis-ckpt <args>`` and wait for it."""
    return subprocess.run(command(*args), cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout)
