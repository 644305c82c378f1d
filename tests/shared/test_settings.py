"""Typed settings: the toml file, environment overrides, and one-line ConfigErrors naming the key."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.settings import CONFIG_ENV, DEFAULT_CONFIG_FILE, Settings, config_path, load_settings

STDIO = '[servers.x]\ntransport = "stdio"\ncommand = "python"\n'

FULL = """
namespace = "ns-file"
redis_url = "redis://file-host:6379/0"
broker_url = "redis://file-host:6379/1"

[worker]
chunk_size = 7
chunks_in_flight = 3

[servers.local]
transport = "stdio"
command = "python"
args = ["-m", "workers.demo_server"]
env = { DEMO = "1" }
max_concurrency = 5
timeout_s = 2.5

[servers.local.retry]
attempts = 2
initial_backoff_s = 0

[servers.remote]
transport = "http"
url = "http://127.0.0.1:9/mcp"
headers = { Authorization = "Bearer t" }
transient_error_codes = [-32603]
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No TOOLSWARM_* variable from the caller's shell, and no ./toolswarm.toml in the working dir."""
    for name in list(os.environ):
        if name.startswith("TOOLSWARM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def write(tmp_path: Path, body: str, name: str = "toolswarm.toml") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def test_file_values_are_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL, "custom.toml"))
    assert settings.namespace == "ns-file"
    assert settings.redis_url == "redis://file-host:6379/0"
    assert settings.broker_url == "redis://file-host:6379/1"
    assert (settings.worker.chunk_size, settings.worker.chunks_in_flight) == (7, 3)
    assert settings.worker.calls_in_flight == 32, "unset keys keep their defaults"
    local, remote = settings.server("local"), settings.server("remote")
    assert local.transport == "stdio" and local.args == ["-m", "workers.demo_server"]
    assert local.env == {"DEMO": "1"} and local.max_concurrency == 5 and local.timeout_s == 2.5
    assert (local.retry.attempts, local.retry.initial_backoff_s, local.retry.max_backoff_s) == (2, 0, 5.0)
    assert remote.url == "http://127.0.0.1:9/mcp" and remote.headers == {"Authorization": "Bearer t"}
    assert remote.transient_error_codes == [-32603]
    assert local.transient_error_codes == [-32001, -32603, -32000]


def test_no_file_and_no_env_gives_defaults() -> None:
    settings = load_settings()
    assert settings.redis_url is None and settings.broker_url is None
    assert settings.namespace == "toolswarm" and settings.servers == {}
    assert settings.worker.chunk_size == 50


@pytest.mark.parametrize(
    ("explicit", "env", "default_exists", "expected"),
    [
        ("given.toml", "env.toml", True, "given.toml"),
        (None, "env.toml", True, "env.toml"),
        (None, None, True, DEFAULT_CONFIG_FILE),
        (None, None, False, None),
    ],
    ids=["explicit-wins", "env-over-default", "default-file", "none"],
)
def test_config_path_precedence(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    explicit: str | None,
    env: str | None,
    default_exists: bool,
    expected: str | None,
) -> None:
    if env:
        monkeypatch.setenv(CONFIG_ENV, env)
    if default_exists:
        write(tmp_path, STDIO, DEFAULT_CONFIG_FILE)
    found = config_path(explicit)
    assert (str(found) if found else None) == expected


def test_default_file_in_working_dir_is_loaded(tmp_path: Path) -> None:
    write(tmp_path, 'namespace = "from-cwd"\n', DEFAULT_CONFIG_FILE)
    assert load_settings().namespace == "from-cwd"


def test_config_env_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(write(tmp_path, 'namespace = "from-env-file"\n', "other.toml")))
    assert load_settings().namespace == "from-env-file"


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("TOOLSWARM_REDIS_URL", "redis://env-host:1/2", lambda s: s.redis_url),
        ("TOOLSWARM_BROKER_URL", "amqp://env-host//", lambda s: s.broker_url),
        ("TOOLSWARM_NAMESPACE", "ns-env", lambda s: s.namespace),
        ("TOOLSWARM_WORKER__CHUNK_SIZE", "99", lambda s: s.worker.chunk_size),
    ],
    ids=["redis-url", "broker-url", "namespace", "worker-chunk-size"],
)
def test_environment_overrides_the_file(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    variable: str,
    value: str,
    read: Callable[[Settings], object],
) -> None:
    path = write(tmp_path, FULL)
    before = load_settings(path)
    monkeypatch.setenv(variable, value)
    after = load_settings(path)
    assert read(before) != read(after)
    assert str(read(after)) == value


def test_nested_env_override_keeps_the_files_sibling_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOOLSWARM_WORKER__CHUNK_SIZE", "99")
    settings = load_settings(write(tmp_path, FULL))
    assert settings.worker.chunk_size == 99
    assert settings.worker.chunks_in_flight == 3, "the file's other [worker] keys survive the override"
    assert set(settings.servers) == {"local", "remote"}


def test_api_token_from_env_is_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOOLSWARM_API_TOKEN", "s3cret-token")
    settings = load_settings(write(tmp_path, FULL))
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "s3cret-token"
    assert "s3cret-token" not in repr(settings) and "s3cret-token" not in str(settings)


def test_unknown_server_names_the_known_ones(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FULL))
    with pytest.raises(ConfigError, match=r"unknown server 'nope' \(known: local, remote\)"):
        settings.server("nope")
    with pytest.raises(ConfigError, match=r"known: none configured"):
        Settings().server("nope")


BAD_CONFIGS = [
    pytest.param(
        STDIO + "max_concurrency = 0\n",
        "servers.x.max_concurrency",
        "greater than or equal to 1",
        id="max-concurrency-zero",
    ),
    pytest.param(STDIO + "timeout_s = 0\n", "servers.x.timeout_s", "greater than 0", id="timeout-zero"),
    pytest.param(STDIO + "pool_size = 65\n", "servers.x.pool_size", "less than or equal to 64", id="pool"),
    pytest.param(
        '[servers.x]\ntransport = "stdio"\n', "servers.x", "a stdio server needs 'command'", id="stdio-no-cmd"
    ),
    pytest.param(
        STDIO + 'url = "http://h/mcp"\n',
        "servers.x",
        "a stdio server takes 'command', not 'url'",
        id="stdio-url",
    ),
    pytest.param(
        '[servers.x]\ntransport = "http"\n', "servers.x", "a http server needs 'url'", id="http-no-url"
    ),
    pytest.param(
        '[servers.x]\ntransport = "sse"\nurl = "http://h/sse"\ncommand = "python"\n',
        "servers.x",
        "a sse server takes 'url', not 'command'",
        id="sse-with-command",
    ),
    pytest.param(
        '[servers.x]\ntransport = "ftp"\ncommand = "python"\n',
        "servers.x.transport",
        "'stdio', 'http' or 'sse'",
        id="bad-transport",
    ),
    pytest.param(
        STDIO + 'comand = "typo"\n', "servers.x.comand", "Extra inputs are not permitted", id="typo"
    ),
    pytest.param(
        STDIO + "[servers.x.retry]\nattempts = 0\n",
        "servers.x.retry.attempts",
        "greater than or equal to 1",
        id="retry-attempts",
    ),
    pytest.param("bogus = 1\n", "bogus", "Extra inputs are not permitted", id="unknown-top-level"),
    pytest.param("[worker]\nchunk_size = 0\n", "worker.chunk_size", "greater than or equal to 1", id="chunk"),
    pytest.param('[worker]\nchunk_size = "many"\n', "worker.chunk_size", "valid integer", id="chunk-type"),
    pytest.param('namespace = "has space"\n', "namespace", "should match pattern", id="namespace"),
    pytest.param(
        "global_events_maxlen = 5\n", "global_events_maxlen", "greater than or equal to 100", id="maxlen"
    ),
]


@pytest.mark.parametrize(("body", "key", "reason"), BAD_CONFIGS)
def test_bad_value_fails_with_dotted_key_and_reason(tmp_path: Path, body: str, key: str, reason: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    assert message.startswith(f"config file {path}: ")
    assert f"{key}: " in message, message
    assert reason in message, message
    assert "\n" not in message, "one line"
    assert raised.value.error_type == "config_error" and raised.value.retryable is False


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\n[worker]\nchunk_size = 0\n" + STDIO + "max_concurrency = 0\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    problems = str(raised.value).removeprefix(f"config file {path}: ").split("; ")
    assert sorted(p.split(":")[0] for p in problems) == [
        "bogus",
        "servers.x.max_concurrency",
        "worker.chunk_size",
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("namespace = \n", "invalid TOML"),
        ("[servers.x\n", "invalid TOML"),
        ('namespace = "a"\nnamespace = "b"\n', "invalid TOML"),
    ],
    ids=["no-value", "unclosed-table", "duplicate-key"],
)
def test_invalid_toml(tmp_path: Path, body: str, fragment: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=rf"^config file {path}: {fragment}"):
        load_settings(path)


def test_missing_config_file_explicit(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=rf"^config file {missing} does not exist$"):
        load_settings(missing)


def test_missing_config_file_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "gone.toml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    with pytest.raises(ConfigError, match=rf"^config file {missing} does not exist$"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "key", "reason"),
    [
        ("TOOLSWARM_WORKER__CHUNK_SIZE", "0", "worker.chunk_size", "greater than or equal to 1"),
        ("TOOLSWARM_WORKER__CHUNK_SIZE", "lots", "worker.chunk_size", "valid integer"),
        ("TOOLSWARM_NAMESPACE", "a:b", "namespace", "should match pattern"),
    ],
    ids=["chunk-zero", "chunk-not-int", "namespace-colon"],
)
def test_bad_env_value_names_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, key: str, reason: str
) -> None:
    path = write(tmp_path, FULL)
    load_settings(path)  # the file alone is fine
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert f"{key}: " in str(raised.value) and reason in str(raised.value)
