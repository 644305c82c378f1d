"""compose/ cannot be run here (no Docker engine), so its parts are checked against the code they
drive: every service's command line parses as the CLI it runs, every environment variable it sets
is one toolswarm reads, the config it mounts loads, and the image builds from files that exist."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel

from cli.main import app
from shared.settings import CONFIG_ENV, Settings, load_settings
from workers.demo_server import argument_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
EXAMPLE_ENV = dict(
    line.split("=", 1)
    for line in (COMPOSE / ".env.example").read_text().splitlines()
    if line and not line.startswith("#")
)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")


def interpolate(value: Any) -> Any:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from compose/.env.example."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda m: EXAMPLE_ENV[m["name"]], value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return {name: interpolate(body) for name, body in document["services"].items()}


def toolswarm_services() -> dict[str, dict[str, Any]]:
    return {name: body for name, body in services().items() if body.get("image") == "toolswarm:local"}


def check_toolswarm_command(argv: list[str]) -> None:
    """Parse argv as `toolswarm ...` would, without running it: a bad command or option raises."""
    group: Any = typer.main.get_command(app)  # typer's own (vendored) click types
    ctx = group.context_class(group, info_name="toolswarm")
    name, *rest = argv
    while True:
        command = group.get_command(ctx, name)
        assert command is not None, f"toolswarm has no command {name!r}"
        if not hasattr(command, "get_command"):
            command.make_context(name, rest, parent=ctx)
            return
        group, ctx = command, command.context_class(command, info_name=name, parent=ctx)
        name, *rest = rest


def read_by_toolswarm(variable: str) -> bool:
    if variable == CONFIG_ENV:
        return True
    prefix = Settings.model_config.get("env_prefix", "")
    if not variable.startswith(prefix):
        return False
    model: type[BaseModel] = Settings
    *parents, leaf = variable.removeprefix(prefix).lower().split("__")
    for part in parents:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return leaf in model.model_fields


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_every_toolswarm_service_runs_a_valid_command_line() -> None:
    roles = toolswarm_services()
    assert {"worker", "api", "gateway", "flower", "demo-mcp"} <= set(roles)
    for name, body in roles.items():
        entrypoint = body.get("entrypoint", ["toolswarm"])
        if entrypoint == ["toolswarm"]:
            check_toolswarm_command(body["command"])
        else:
            assert entrypoint == ["python", "-m", "workers.demo_server"], name
            argument_parser().parse_args(body["command"])


def test_bad_command_lines_are_caught_by_the_check() -> None:
    with pytest.raises(Exception, match="No such option"):
        check_toolswarm_command(["worker", "--no-such-flag"])
    with pytest.raises(AssertionError):
        check_toolswarm_command(["wroker"])
    check_toolswarm_command(["context", "show", "00000000-0000-4000-8000-000000000000"])


def test_every_environment_variable_is_one_toolswarm_reads_and_the_config_loads() -> None:
    for name, body in toolswarm_services().items():
        variables = body.get("environment", {})
        if body.get("entrypoint") is not None:
            continue  # not a toolswarm command (the demo MCP server): it reads no toolswarm settings
        unknown = [v for v in variables if not read_by_toolswarm(v)]
        assert not unknown, f"service {name} sets variables toolswarm does not read: {unknown}"
        mounted = {
            target: COMPOSE / source.removeprefix("./")
            for source, target, *_ in (volume.split(":") for volume in body.get("volumes", []))
        }
        config = mounted[variables.get(CONFIG_ENV, "/etc/toolswarm/toolswarm.toml")]
        with environment({k: str(v) for k, v in variables.items()}):
            settings = load_settings(config)
        assert settings.redis_url and "@redis:6379" in settings.redis_url


def test_variable_check_knows_nested_and_unknown_names() -> None:
    assert read_by_toolswarm("TOOLSWARM_WORKER__CHUNK_SIZE")
    assert read_by_toolswarm("TOOLSWARM_REDIS_URL")
    assert not read_by_toolswarm("TOOLSWARM_WORKER__NO_SUCH")
    assert not read_by_toolswarm("TOOLSWARM_REDIS_URL__X")
    assert not read_by_toolswarm("REDIS_URL")


def test_the_config_names_servers_the_compose_file_runs() -> None:
    with environment({"TOOLSWARM_REDIS_URL": "redis://redis:6379/0"}):
        settings = load_settings(COMPOSE / "toolswarm.toml")
    demo_mcp = services()["demo-mcp"]["command"]
    port = demo_mcp[demo_mcp.index("--port") + 1]
    http = [server.url for server in settings.servers.values() if server.url]
    assert f"http://demo-mcp:{port}/mcp" in http


def test_the_worker_service_scales() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_published_ports_are_the_ports_each_service_listens_on() -> None:
    for name, body in services().items():
        for mapping in body.get("ports", []):
            host_ip, _, container_port = mapping.split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes beyond loopback: {mapping}"
            command = body.get("command", [])
            if name in toolswarm_services():
                assert container_port in command, f"{name} publishes {container_port}, listens elsewhere"


def test_the_image_is_multi_stage_non_root_and_copies_files_that_exist() -> None:
    lines = [line.split() for line in (COMPOSE / "Dockerfile").read_text().splitlines() if line.strip()]
    instructions = [words for words in lines if not words[0].startswith("#")]
    stages = [words for words in instructions if words[0] == "FROM"]
    assert len(stages) >= 2
    users = [words[1] for words in instructions if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    for words in instructions:
        if words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            for source in words[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
