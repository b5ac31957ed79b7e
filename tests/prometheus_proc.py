"""A real Prometheus (Debian's ``prometheus`` package) on a free loopback port, scraping the given targets every
second into a throw-away TSDB; owned by the test that started it."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

from dashboards.queries import PrometheusAPI
from tests.redis_proc import free_port

SCRAPE_SECONDS = 1


class PrometheusProcess:
    """``jobs`` maps a scrape job name to its ``host:port`` targets."""

    def __init__(self, jobs: dict[str, list[str]]):
        binary = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
        if binary is None:
            raise RuntimeError("prometheus is not on PATH: install it (apt-get install prometheus)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        self.jobs = jobs
        self.proc: subprocess.Popen | None = None
        self.api = PrometheusAPI(self.url)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = ["global:", f"  scrape_interval: {SCRAPE_SECONDS}s", f"  scrape_timeout: {SCRAPE_SECONDS}s",
                 f"  evaluation_interval: {SCRAPE_SECONDS}s", "scrape_configs:"]  # fmt: skip
        for job, targets in self.jobs.items():
            lines += [f"  - job_name: {json.dumps(job)}", "    static_configs:",
                      f"      - targets: {json.dumps(targets)}"]  # fmt: skip
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> "PrometheusProcess":
        (self.dir / "prometheus.yml").write_text(self.config())
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=open(self.dir / "prometheus.log", "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log()[-3000:]}")
            try:
                if urlopen(f"{self.url}/-/ready", timeout=1).status == 200:
                    return self
            except (URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout} s: {self.log()[-3000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text() if path.exists() else ""

    def targets_up(self) -> dict[str, str]:
        """scrape URL -> health (up, down, unknown) of every active target."""
        return {t["scrapeUrl"]: t["health"] for t in self.api.api("targets")["activeTargets"]}

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)
