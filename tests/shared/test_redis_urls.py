"""Redis URLs: what is shown of them, the broker's TLS options, and TLS files checked at load."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

from celeryconfig import broker_tls
from shared.errors import ConfigError
from shared.redaction import redacted_url
from shared.settings import load_settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6390/0", "redis://:***@127.0.0.1:6390/0"),
        ("redis://alice:pw@127.0.0.1:6390/0", "redis://alice:***@127.0.0.1:6390/0"),
        ("redis://alice:p@ss@h:1/0", "redis://alice:***@h:1/0"),  # an unquoted "@" in the password
        ("rediss://:pw@h:1/0?ssl_ca_certs=/etc/ca.pem", "rediss://:***@h:1/0?ssl_ca_certs=/etc/ca.pem"),
        ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
        ("amqp://guest:guest@h:5672//", "amqp://guest:***@h:5672//"),
        ("https://TOKEN@example.test/mcp", "https://***@example.test/mcp"),  # a lone user may be a token
        ("http://h/mcp?token=abc#part", "http://h/mcp?token=***#part"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://[::1", "*** (a URL that does not parse)"),
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("redis://:pw@h:1/0", None),
        ("amqp://guest:guest@h:5672//", None),
        ("rediss://h:1/0", {"ssl_cert_reqs": ssl.CERT_REQUIRED}),  # kombu alone would not verify
        (
            "rediss://h:1/0?ssl_ca_certs=/ca.pem",
            {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/ca.pem"},
        ),
        (
            "rediss://h:1/0?ssl_cert_reqs=none&ssl_certfile=/c.pem&ssl_keyfile=/k.pem",
            {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem"},
        ),
    ],
)
def test_broker_tls_options(url: str, options: dict[str, Any] | None) -> None:
    assert broker_tls(url) == options


def test_a_missing_ca_file_fails_at_load_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "ca.pem"
    monkeypatch.chdir(tmp_path)  # no toolswarm.toml here
    monkeypatch.delenv("TOOLSWARM_CONFIG", raising=False)
    monkeypatch.setenv("TOOLSWARM_REDIS_URL", f"rediss://:s3cret-9d@127.0.0.1:6390/0?ssl_ca_certs={missing}")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert f"redis_url: ssl_ca_certs file {missing} does not exist" in refused.value.message
    assert "s3cret-9d" not in refused.value.message
