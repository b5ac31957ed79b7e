"""Throwaway certificates for TLS tests, made with the ``openssl`` command line in a temporary directory."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)  # fmt: skip


def _signed(d: Path, name: str, ca: str, cn: str, sans: str | None, usage: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)  # fmt: skip
    ext = f"extendedKeyUsage={usage}\n" + (f"subjectAltName={sans}\n" if sans else "")
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


@dataclass
class Certs:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def ca(self) -> str:
        return self.path("ca.crt")

    @property
    def other_ca(self) -> str:
        return self.path("other-ca.crt")


def make_certs(d: Path) -> Certs:
    """A CA; a server certificate for 127.0.0.1 and localhost (server.crt/key) and one only for other-host
    (otherhost.crt/key), both signed by it; a client certificate it signed (client.crt/key); an unrelated CA."""
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca", "localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth")
    _signed(d, "otherhost", "ca", "other-host", "DNS:other-host", "serverAuth")
    _signed(d, "client", "ca", "checkpoint-client", None, "clientAuth")
    return Certs(d)
