"""A PostgreSQL for one test: its own server (initdb and pg_ctl on a free port in a temporary directory), or, when
that cannot be, a database of its own on the machine's server at 127.0.0.1:5432 (trust auth, user postgres).

initdb refuses to run as root, so as root the server runs as ``nobody`` (through runuser). ``how`` says which one a
test got; when neither is possible, :meth:`PostgresServer.start` raises with what was tried (the test fails; it
does not skip).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

from tests.redis_proc import free_port

LOCAL = ("127.0.0.1", 5432)


class PostgresServer:
    """``dsn`` names a fresh, empty database; ``how`` says where it lives."""

    def __init__(self) -> None:
        self.dsn = ""
        self.how = ""
        self._dir: str | None = None
        self._as: list[str] = []
        self._local_db: str | None = None

    def start(self) -> "PostgresServer":
        tried = []
        try:
            self._start_own()
            return self
        except Exception as e:  # noqa: BLE001 - every reason is reported if the fallback fails too
            tried.append(f"own server: {e}")
            self._remove_dir()
        try:
            self._use_local()
            return self
        except Exception as e:  # noqa: BLE001
            tried.append(f"local server on {LOCAL[0]}:{LOCAL[1]}: {e}")
        raise RuntimeError("no PostgreSQL for this test; tried " + "; ".join(tried))

    def _start_own(self) -> None:
        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("initdb or pg_ctl is not on PATH")
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if not runuser:
                raise RuntimeError("running as root and runuser is missing (initdb refuses root)")
            pwd.getpwnam("nobody")
            self._as = [runuser, "-u", "nobody", "--"]
        self._dir = tempfile.mkdtemp(prefix="ckpt-pg-")
        os.chmod(self._dir, 0o777)  # the server's user creates its data directory and socket in it
        data, port = os.path.join(self._dir, "data"), free_port()
        self._run([initdb, "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        options = f"-p {port} -k {self._dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run([pg_ctl, "-D", data, "-o", options, "-l", os.path.join(self._dir, "log"), "-w", "-t", "60",
                   "start"])  # fmt: skip
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        user = "nobody" if self._as else "this user"
        self.how = f"its own server (initdb + pg_ctl as {user}) on 127.0.0.1:{port}"

    def _run(self, args: list[str]) -> None:
        done = subprocess.run(self._as + args, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(args[0])} failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def _use_local(self) -> None:
        import psycopg

        name = f"ckpt_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=LOCAL[0], port=LOCAL[1], user="postgres", dbname="postgres", autocommit=True,
                             connect_timeout=5) as conn:  # fmt: skip
            conn.execute(f'CREATE DATABASE "{name}"')
        self._local_db = name
        self.dsn = f"postgresql://postgres@{LOCAL[0]}:{LOCAL[1]}/{name}"
        self.how = f"the machine's server on {LOCAL[0]}:{LOCAL[1]}, database {name} of its own"

    def stop(self) -> None:
        if self._dir is not None and os.path.isdir(os.path.join(self._dir, "data")):
            subprocess.run(self._as + [shutil.which("pg_ctl") or "pg_ctl", "-D", os.path.join(self._dir, "data"),
                                       "-m", "immediate", "stop"], capture_output=True, timeout=60)  # fmt: skip
        self._remove_dir()
        if self._local_db is not None:
            import psycopg

            with psycopg.connect(host=LOCAL[0], port=LOCAL[1], user="postgres", dbname="postgres",
                                 autocommit=True) as conn:  # fmt: skip
                conn.execute(f'DROP DATABASE IF EXISTS "{self._local_db}" WITH (FORCE)')
            self._local_db = None

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def connection(self):
        """Dynamiq's PostgreSQL connection to this database (for Dynamiq's PostgreSQL checkpoint backend)."""
        import psycopg.conninfo
        from dynamiq.connections import PostgreSQL

        parts = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return PostgreSQL(host=parts["host"], port=int(parts["port"]), database=parts["dbname"], user="postgres",
                          password="")  # fmt: skip
