"""The README's first command: the demo runs, kills its own child mid-run, resumes, and passes its own checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_demo_passes_its_own_checks(redis_server):
    done = subprocess.run([sys.executable, "-m", "dynamiq_redis_ckpt.demo", "--url", redis_server.url], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0 and "All checks passed." in done.stdout, (done.stdout[-3000:], done.stderr[-3000:])
    assert "child killed by SIGKILL" in done.stdout and "0 demo:* keys left" in done.stdout
