"""TLS on real processes: a redis-server with TLS only (client certificates required) and a throwaway CA made by
``openssl`` in a temporary directory. Saves, loads and lists work sync and async, a Dynamiq flow checkpoints over
TLS, the worker connects over TLS; a wrong CA, a host name the certificate is not for and a missing client
certificate each fail at once with a typed error that says it is a certificate problem."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import redis
from dynamiq.checkpoints.checkpoint import FlowCheckpoint

from dynamiq_redis_ckpt import RedisCheckpointBackend, StoreUnavailableError, TLSError
from dynamiq_redis_ckpt.errors import ConfigurationError
from tests.flows import PREFIX_ENV, chain_flow
from tests.redis_proc import SERVER_ENV, free_port
from tests.test_worker import ROOT, wait_for
from tests.test_worker_health import status
from tests.tls_certs import Certs, make_certs



class TLSRedis:
    """A redis-server listening with TLS only, on loopback, with the given certificate."""

    def __init__(self, certs: Certs, cert: str = "server"):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(certs.dir), "--tls-cert-file", certs.path(f"{cert}.crt"),
             "--tls-key-file", certs.path(f"{cert}.key"), "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "yes"],
            stdout=open(certs.dir / f"redis-{self.port}.log", "ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = self.client(certs, check_hostname=False)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    said = (certs.dir / f"redis-{self.port}.log").read_text(errors="replace")[-2000:]
                    if "tls" in said.lower() and os.environ.get(SERVER_ENV, "redis") != "redis":  # docs/servers.md
                        pytest.skip(f"{os.environ[SERVER_ENV]} is built without TLS (both PyPI wheels are): {said}")
                    raise RuntimeError(f"redis-server with TLS exited: {said}")
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def url(self, host: str = "127.0.0.1") -> str:
        return f"rediss://{host}:{self.port}/0"

    def client(self, certs: Certs, check_hostname: bool = True) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=certs.ca,
                           ssl_check_hostname=check_hostname, ssl_certfile=certs.path("client.crt"),
                           ssl_keyfile=certs.path("client.key"))  # fmt: skip

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    assert shutil.which("openssl"), "the openssl command line is missing: apt-get install openssl (.ci/run does)"
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_redis(certs):
    server = TLSRedis(certs)
    yield server
    server.kill()


def backend_for(url: str, certs: Certs, **options) -> RedisCheckpointBackend:
    options = {"tls_ca_file": certs.ca, "tls_cert_file": certs.path("client.crt"),
               "tls_key_file": certs.path("client.key"), **options}  # fmt: skip
    options.setdefault("retries", 3)
    return RedisCheckpointBackend(url=url, prefix=f"tls{uuid.uuid4().hex[:6]}", **options)


def checkpoint(flow: str = "f", run: str = "r") -> FlowCheckpoint:
    return FlowCheckpoint(flow_id=flow, run_id=run, wf_run_id=run)


def test_save_load_list_sync_and_async_over_tls(tls_redis, certs):
    backend = backend_for(tls_redis.url(), certs)
    assert backend.redis.connection_pool.connection_kwargs["ssl_check_hostname"] is True
    first = checkpoint()
    backend.save(first)
    assert backend.load(first.id).id == first.id
    assert [c.id for c in backend.get_list_by_flow("f")] == [first.id]

    async def on_async():
        second = checkpoint(run="r2")
        await backend.save_async(second)
        assert (await backend.load_async(second.id)).id == second.id
        assert {c.id for c in await backend.get_list_by_flow_async("f")} == {first.id, second.id}
        await backend.aclose()

    asyncio.run(on_async())
    # the TLS connections really are TLS: the server has no plain port
    assert tls_redis.client(certs).info("server")["redis_version"]
    backend.clear()


def test_a_passed_in_tls_client_serves_the_async_methods_too(tls_redis, certs):
    backend = RedisCheckpointBackend(client=tls_redis.client(certs), prefix=f"tls{uuid.uuid4().hex[:6]}")
    saved = checkpoint()
    backend.save(saved)
    assert asyncio.run(backend.load_async(saved.id)).id == saved.id
    backend.clear()


def test_tls_options_from_environment_and_their_checks(tls_redis, certs, monkeypatch):
    monkeypatch.setenv("DYNAMIQ_REDIS_CKPT_TLS_CA", certs.ca)
    monkeypatch.setenv("DYNAMIQ_REDIS_CKPT_TLS_CERT", certs.path("client.crt"))
    monkeypatch.setenv("DYNAMIQ_REDIS_CKPT_TLS_KEY", certs.path("client.key"))
    assert RedisCheckpointBackend(url=tls_redis.url(), prefix="tlsenv").ping()
    with pytest.raises(ConfigurationError, match="rediss://"):
        RedisCheckpointBackend(url="redis://127.0.0.1:1/0", tls_ca_file=certs.ca)
    with pytest.raises(ConfigurationError, match="not a readable file"):
        RedisCheckpointBackend(url=tls_redis.url(), tls_ca_file=str(certs.dir / "missing.crt"))
    with pytest.raises(ConfigurationError, match="client passed in"):
        RedisCheckpointBackend(client=tls_redis.client(certs), tls_ca_file=certs.ca)


def test_a_dynamiq_flow_checkpoints_over_tls(tls_redis, certs):
    backend = backend_for(tls_redis.url("localhost"), certs)  # by name: the certificate is for both
    flow = chain_flow(backend, 4, flow_id="tls-chain", words=30)
    result = flow.run_sync(input_data={})
    assert result.status.value == "success"
    stored = backend.get_list_by_flow("tls-chain")
    assert stored and stored[0].status.value == "completed"
    assert set(stored[0].node_states) == {"s00", "s01", "s02", "s03"}
    backend.clear()


def _fails_fast(backend, match: str) -> float:
    """The typed error of a sync and an async call, and the slower call's duration."""
    started = time.monotonic()
    with pytest.raises(TLSError, match=match) as caught:
        backend.ping()
    took = time.monotonic() - started
    assert isinstance(caught.value, StoreUnavailableError) and "certificate" in str(caught.value)
    assert "refused" not in str(caught.value).split(":")[0]
    started = time.monotonic()
    with pytest.raises(TLSError, match=match):
        asyncio.run(backend.load_async("any"))
    return max(took, time.monotonic() - started)


def test_a_wrong_ca_fails_at_once_with_a_tls_error(tls_redis, certs):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    backend = backend_for(tls_redis.url(), certs, tls_ca_file=certs.other_ca, retries=5, retry_backoff_seconds=0.5,
                          metrics=registry)  # fmt: skip
    took = _fails_fast(backend, "not signed by the trusted CA")
    # one attempt each (sync, async), not six: counted as kind "tls", not "connection"
    assert registry.get_sample_value("dynamiq_ckpt_redis_errors_total", {"kind": "tls"}) == 2
    assert registry.get_sample_value("dynamiq_ckpt_redis_errors_total", {"kind": "connection"}) == 0
    print(f"\n[tls] wrong CA failed in {took * 1000:.0f} ms (a retried failure would take > 7 s)")
    assert took < 1.0


def test_a_host_name_the_certificate_is_not_for_fails_with_a_tls_error(certs):
    server = TLSRedis(certs, cert="otherhost")  # a certificate for other-host only
    try:
        for host in ("127.0.0.1", "localhost"):
            took = _fails_fast(backend_for(server.url(host), certs, retries=5, retry_backoff_seconds=0.5),
                               "not valid for the host")  # fmt: skip
            assert took < 1.0
        # the check can be turned off (a private network with IP urls); the CA is still checked
        assert backend_for(server.url(), certs, tls_check_hostname=False).ping()
    finally:
        server.kill()


def test_a_missing_client_certificate_fails_with_a_tls_error(tls_redis, certs):
    backend = backend_for(tls_redis.url(), certs, tls_cert_file=None, tls_key_file=None, retries=3)
    try:
        backend.ping()
    except TLSError as e:  # the server's "certificate required" alert reached the client
        assert "requires a client certificate" in str(e)
        print(f"\n[tls] no client certificate: {e}")
    except StoreUnavailableError as e:  # the server closed the connection before its alert was read
        assert "set tls_cert_file and tls_key_file" in str(e)  # the hint of a TLS url without a client cert
        print(f"\n[tls] no client certificate (untyped): {e}")
    else:
        raise AssertionError("connected without a client certificate")


@pytest.mark.slow
def test_the_worker_connects_over_tls_and_is_ready(tls_redis, certs, tmp_path):
    port, log, prefix = free_port(), tmp_path / "worker.log", f"tlsw{uuid.uuid4().hex[:6]}"
    env = {"DYNAMIQ_REDIS_CKPT_URL": tls_redis.url(), PREFIX_ENV: prefix, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "dynamiq_redis_ckpt.cli", "worker", "--url", tls_redis.url(), "--prefix", prefix,
            "--flows", "tests.flows:worker_flows", "--metrics-port", str(port), "--poll", "0.2",
            "--tls-ca", certs.ca, "--tls-cert", certs.path("client.crt"), "--tls-key", certs.path("client.key")]
    environ = os.environ | env
    worker = subprocess.Popen(args, cwd=ROOT, env=environ, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    # at the same time, one with the wrong CA: it does not wait for Redis forever, it says why and exits with code 2
    bad_args = [a if a != certs.ca else certs.other_ca for a in args if a not in ("--metrics-port", str(port))]
    bad = subprocess.Popen(bad_args, cwd=ROOT, env=environ,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_for(lambda: "worker ready" in log.read_text() or worker.poll() is not None, timeout=60)
        assert worker.poll() is None, log.read_text()[-2000:]
        assert status(port, "/readyz") == 200
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0
    output = bad.communicate(timeout=60)[0]
    assert bad.returncode == 2, output
    assert "not signed by the trusted CA" in output and "worker cannot start" in output


def test_a_tls_url_on_a_plain_port_says_what_to_check(redis_server, certs):
    url = redis_server.url.replace("redis://", "rediss://").replace("redis+cluster://", "rediss+cluster://")
    backend = backend_for(url, certs, retries=0, socket_connect_timeout=0.3, socket_timeout=0.3)
    with pytest.raises(StoreUnavailableError, match="is the port a TLS port"):
        backend.ping()


@pytest.mark.parametrize("message, advice", [
    ("certificate verify failed: certificate has expired", "has expired"),
    ("[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired", "client certificate has expired"),
    ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "refused the client certificate"),
    ("[SSL: WRONG_VERSION_NUMBER] wrong version number", "does not speak TLS"),
    ("Connection reset by peer", None),
    ("EOF occurred in violation of protocol", None),  # also what a restarting server does: retried
])  # fmt: skip
def test_certificate_failures_are_permanent_and_other_connection_errors_are_not(message, advice):
    from dynamiq_redis_ckpt.driver import _translate, error_kind

    translated = _translate(redis.ConnectionError(message), None)
    if advice is None:
        assert type(translated) is StoreUnavailableError and error_kind(redis.ConnectionError(message)) == "connection"
    else:
        assert isinstance(translated, TLSError) and advice in str(translated)
        assert error_kind(redis.ConnectionError(message)) == "tls"
