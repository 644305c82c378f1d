"""Bad input to the real CLI: a one-line error on stderr, a non-zero exit, and nothing written to Redis."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cli.processes import free_port
from shared.keys import Keys
from tests.harness import Cluster, make_cluster, server_toml, stdio_demo

pytestmark = pytest.mark.integration

GOOD = json.dumps({"tool": "echo", "arguments": {"text": "hi"}})


@pytest.fixture
def cluster(tmp_path: Path, redis_url: str) -> Cluster:
    return make_cluster(tmp_path, redis_url, {"demo": stdio_demo()})


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url, decode_responses=True)
    yield connection
    connection.close()


def written(client: redis.Redis, namespace: str) -> tuple[int, list[str]]:
    """Jobs recorded under the namespace, and every key holding its name except worker heartbeats
    and the servers' probe results and tools cache (validation at submit may fill them)."""
    keys = Keys(namespace)
    ignored = (keys.workers_pattern.removesuffix("*"), keys.probe(""), keys.tools(""))
    found = sorted(k for k in client.scan_iter(match=f"*{namespace}*") if not k.startswith(ignored))
    return int(client.zcard(keys.jobs)), found


def assert_nothing_written(client: redis.Redis, cluster: Cluster) -> None:
    assert written(client, cluster.namespace) == (0, [])


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert result.stdout == "", result.stdout
    return line


def write_items(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def test_valid_submit_is_visible_to_the_nothing_written_check(
    cluster: Cluster, tmp_path: Path, client: redis.Redis
) -> None:
    """The control for every test below: a good submit does write, and ``written`` sees it."""
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD, GOOD)), "--server", "demo", "--json")
    assert result.returncode == 0, result.stderr
    job_id = json.loads(result.stdout)["job_id"]
    jobs, keys = written(client, cluster.namespace)
    assert jobs == 1
    job_keys = Keys(cluster.namespace).job(job_id)
    assert {job_keys.meta, job_keys.items} <= set(keys)
    assert any(":celery:" in k for k in keys), f"the chunk was enqueued under the namespace: {keys}"


@pytest.mark.parametrize(
    ("lines", "options", "fragments"),
    [
        pytest.param(
            [GOOD, GOOD, '{"tool": "echo", "arguments": {'],
            ["--server", "demo"],
            ["line 3: invalid JSON"],
            id="malformed-json-line",
        ),
        pytest.param(
            [GOOD, json.dumps({"tool": "echo", "arguments": ["text", "hi"]})],
            ["--server", "demo"],
            ["line 2: arguments: Input should be a valid dictionary"],
            id="arguments-not-an-object",
        ),
        pytest.param(
            [GOOD, "", '["echo"]'],
            ["--server", "demo"],
            ["line 3: expected a JSON object, got list"],
            id="array",
        ),
        pytest.param(
            [GOOD, json.dumps({"tool": "echo", "server": "nope"})],
            ["--server", "demo"],
            ["line 2: unknown server 'nope'", "(known: demo)"],
            id="unknown-server-on-item",
        ),
        pytest.param(
            [GOOD],
            ["--server", "nope"],
            ["line 1: unknown server 'nope'", "(known: demo)"],
            id="unknown-server",
        ),
        pytest.param([GOOD], [], ["line 1: no server"], id="no-server"),
        pytest.param(
            [json.dumps({"arguments": {}})],
            ["--server", "demo"],
            ["line 1: tool: Field required"],
            id="no-tool",
        ),
        pytest.param([], ["--server", "demo"], ["no items: the items file is empty"], id="empty-file"),
        pytest.param(
            [GOOD],
            ["--server", "demo", "--chunk-size", "20000"],
            ["chunk_size:", "10000"],
            id="chunk-size-too-big",
        ),
    ],
)
def test_bad_items_are_refused(
    cluster: Cluster,
    tmp_path: Path,
    client: redis.Redis,
    lines: list[str],
    options: list[str],
    fragments: list[str],
) -> None:
    result = cluster.cli("submit", str(write_items(tmp_path, *lines)), *options)
    assert_one_line_error(result, *fragments)
    assert_nothing_written(client, cluster)


def test_missing_items_file(cluster: Cluster, tmp_path: Path, client: redis.Redis) -> None:
    missing = tmp_path / "nope.jsonl"
    assert_one_line_error(
        cluster.cli("submit", str(missing), "--server", "demo"), f"items file {missing} does not exist"
    )
    assert_nothing_written(client, cluster)


def test_unreachable_redis_names_the_url(cluster: Cluster, tmp_path: Path, client: redis.Redis) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cluster.env["TOOLSWARM_REDIS_URL"] = url
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD)), "--server", "demo")
    assert_one_line_error(result, f"cannot reach Redis at {url}")
    assert_nothing_written(client, cluster)


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("notaurl", ["invalid Redis URL 'notaurl'", "redis://"]),
        ("http://127.0.0.1:6379/0", ["invalid Redis URL 'http://127.0.0.1:6379/0'"]),
    ],
    ids=["no-scheme", "wrong-scheme"],
)
def test_malformed_redis_url(
    cluster: Cluster, tmp_path: Path, client: redis.Redis, url: str, fragments: list[str]
) -> None:
    cluster.env["TOOLSWARM_REDIS_URL"] = url
    for args in (["submit", str(write_items(tmp_path, GOOD)), "--server", "demo"], ["status", "abc"]):
        assert_one_line_error(cluster.cli(*args), *fragments)
    assert_nothing_written(client, cluster)


def test_no_redis_configured(cluster: Cluster, tmp_path: Path, client: redis.Redis) -> None:
    del cluster.env["TOOLSWARM_REDIS_URL"]
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD)), "--server", "demo")
    assert_one_line_error(result, "no Redis configured", "TOOLSWARM_REDIS_URL")
    assert_nothing_written(client, cluster)


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        pytest.param(
            server_toml("demo", **stdio_demo(max_concurrency=0)),
            ["servers.demo.max_concurrency: Input should be greater than or equal to 1"],
            id="max-concurrency-zero",
        ),
        pytest.param(
            '[servers.demo]\ntransport = "stdio"\n',
            ["servers.demo: ", "needs 'command'"],
            id="stdio-no-command",
        ),
        pytest.param(
            "bogus = 1\n" + server_toml("demo", **stdio_demo()),
            ["bogus: Extra inputs are not permitted"],
            id="unknown-top-level-key",
        ),
        pytest.param("[servers.demo\n", ["invalid TOML"], id="invalid-toml"),
        pytest.param(
            server_toml("demo", **stdio_demo(env={"DEMO_TOKEN": "${TOOLSWARM_TEST_UNSET_TOKEN}"})),
            ["servers.demo.env.DEMO_TOKEN: environment variable TOOLSWARM_TEST_UNSET_TOKEN is not set"],
            id="variable-not-set",
        ),
    ],
)
def test_bad_config_file_names_the_key(
    cluster: Cluster, tmp_path: Path, client: redis.Redis, body: str, fragments: list[str]
) -> None:
    cluster.config_file.write_text(f'namespace = "{cluster.namespace}"\n{body}', encoding="utf-8")
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD)), "--server", "demo")
    assert_one_line_error(result, f"config file {cluster.config_file}", *fragments)
    assert_nothing_written(client, cluster)


@pytest.mark.parametrize("how", ["option", "env"])
def test_missing_config_file(cluster: Cluster, tmp_path: Path, client: redis.Redis, how: str) -> None:
    missing = tmp_path / "missing.toml"
    items = str(write_items(tmp_path, GOOD))
    if how == "option":
        result = cluster.cli("--config", str(missing), "submit", items, "--server", "demo")
    else:
        cluster.env["TOOLSWARM_CONFIG"] = str(missing)
        result = cluster.cli("submit", items, "--server", "demo")
    assert_one_line_error(result, f"config file {missing} does not exist")
    assert_nothing_written(client, cluster)


def test_unreachable_broker_names_the_url(cluster: Cluster, tmp_path: Path, client: redis.Redis) -> None:
    broker = f"redis://127.0.0.1:{free_port()}/0"
    cluster.env["TOOLSWARM_BROKER_URL"] = broker
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD)), "--server", "demo")
    assert_one_line_error(result, f"cannot reach the broker at {broker}")
    assert_nothing_written(client, cluster)


def test_unreachable_rabbitmq_names_the_url_without_its_password(
    cluster: Cluster, tmp_path: Path, client: redis.Redis
) -> None:
    port = free_port()
    cluster.env["TOOLSWARM_BROKER_URL"] = f"amqp://guest:hunter2@127.0.0.1:{port}//"
    result = cluster.cli("submit", str(write_items(tmp_path, GOOD)), "--server", "demo")
    assert_one_line_error(result, f"cannot reach the broker at amqp://guest:***@127.0.0.1:{port}//")
    assert "hunter2" not in result.stderr
    assert_nothing_written(client, cluster)


def test_failed_submit_does_not_poison_its_idempotency_key(
    cluster: Cluster, tmp_path: Path, client: redis.Redis
) -> None:
    items = str(write_items(tmp_path, GOOD))
    good_env = dict(cluster.env)
    cluster.env["TOOLSWARM_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    failed = cluster.cli("submit", items, "--server", "demo", "--idempotency-key", "k1")
    assert_one_line_error(failed, "cannot reach the broker")
    cluster.env = good_env
    again = cluster.cli("submit", items, "--server", "demo", "--idempotency-key", "k1", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["existing"] is False
    assert written(client, cluster.namespace)[0] == 1


@pytest.mark.parametrize("command", ["status", "watch", "results", "cancel", "doctor"])
def test_unknown_job_id(cluster: Cluster, client: redis.Redis, command: str) -> None:
    assert_one_line_error(cluster.cli(command, "0123456789abcdef"), "job 0123456789abcdef does not exist")
    assert_nothing_written(client, cluster)


def test_results_with_a_bad_status_filter(cluster: Cluster, client: redis.Redis) -> None:
    result = cluster.cli("results", "0123456789abcdef", "--status", "done")
    assert_one_line_error(result, "--status must be succeeded, failed or cancelled, not 'done'")
    assert_nothing_written(client, cluster)
