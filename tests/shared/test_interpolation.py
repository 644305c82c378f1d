from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.errors import ConfigError
from shared.interpolation import interpolate
from shared.redaction import endpoint_of, redacted
from shared.settings import load_settings

ENVIRON = {"TOKEN": "s3cr3t", "HOST": "mcp.example", "EMPTY": ""}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${TOKEN}", "s3cr3t"),
        ("Bearer ${TOKEN}", "Bearer s3cr3t"),
        ("https://${HOST}/mcp?k=${TOKEN}", "https://mcp.example/mcp?k=s3cr3t"),
        ("${EMPTY}", ""),
        ("$${TOKEN}", "${TOKEN}"),
        ("$TOKEN and ${ not a reference", "$TOKEN and ${ not a reference"),
        ("no references", "no references"),
    ],
)
def test_strings(value: str, expected: str) -> None:
    assert interpolate(value, ENVIRON) == expected


def test_nested_values_and_non_strings() -> None:
    data = {
        "servers": {"gh": {"headers": {"Authorization": "Bearer ${TOKEN}"}, "args": ["--host", "${HOST}"]}}
    }
    data["servers"]["gh"]["pool_size"] = 2  # type: ignore[assignment]
    assert interpolate(data, ENVIRON) == {
        "servers": {
            "gh": {
                "headers": {"Authorization": "Bearer s3cr3t"},
                "args": ["--host", "mcp.example"],
                "pool_size": 2,
            }
        }
    }


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"servers": {"gh": {"headers": {"Authorization": "Bearer ${GH_TOKEN}"}}}},
            "servers.gh.headers.Authorization: environment variable GH_TOKEN is not set",
        ),
        (
            {"servers": {"gh": {"args": ["--token", "${GH_TOKEN}"]}}},
            "servers.gh.args[1]: environment variable GH_TOKEN is not set",
        ),
    ],
)
def test_a_variable_not_set_names_the_key_and_the_variable(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        interpolate(data, ENVIRON)
    assert str(caught.value) == message


def test_the_config_file_is_interpolated_when_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "toolswarm.toml"
    config.write_text(
        '[servers.gh]\ntransport = "http"\nurl = "https://${GH_HOST}/mcp"\n'
        'headers = { Authorization = "Bearer ${GH_TOKEN}" }\n'
    )
    monkeypatch.setenv("GH_HOST", "mcp.example")
    monkeypatch.setenv("GH_TOKEN", "s3cr3t")
    server = load_settings(config).servers["gh"]
    assert server.url == "https://mcp.example/mcp"
    assert server.headers == {"Authorization": "Bearer s3cr3t"}

    monkeypatch.delenv("GH_TOKEN")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert str(caught.value) == (
        f"config file {config}: servers.gh.headers.Authorization: environment variable GH_TOKEN is not set"
    )


def test_values_read_from_the_environment_are_masked_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "toolswarm.toml"
    config.write_text(
        '[servers.gh]\ntransport = "stdio"\ncommand = "gh-mcp"\nargs = ["--token", "${GH_TOKEN}"]\n'
        'env = { SHORT = "${GH_SHORT}" }\n'
    )
    monkeypatch.setenv("GH_TOKEN", "tok-8f2e91c4")
    monkeypatch.setenv("GH_SHORT", "ab")
    server = load_settings(config).servers["gh"]
    assert server.args == ["--token", "tok-8f2e91c4"]
    assert endpoint_of(server) == "gh-mcp --token ***"
    assert redacted("401 for https://api.example/mcp?token=zz (sent tok-8f2e91c4)") == (
        "401 for https://api.example/mcp?token=*** (sent ***)"
    )
    assert redacted("ab is too short to be masked") == "ab is too short to be masked"
    with caplog.at_level(logging.INFO):
        logging.getLogger("toolswarm.test").info("calling with %s", "tok-8f2e91c4")
    assert caplog.records[-1].getMessage() == "calling with ***"
