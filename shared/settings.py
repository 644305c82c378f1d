"""Typed settings: ``toolswarm.toml`` overlaid by ``TOOLSWARM_*`` environment variables.

Precedence, highest first: environment (``TOOLSWARM_REDIS_URL``, ``TOOLSWARM_BROKER_URL``,
``TOOLSWARM_API_TOKEN``, ``TOOLSWARM_WORKER__CHUNK_SIZE`` ...), the config file, defaults.
The config file is ``--config PATH``, else ``$TOOLSWARM_CONFIG``, else ``./toolswarm.toml``
when it exists. A bad value fails at start with its key and the reason (:class:`ConfigError`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from shared.errors import ConfigError
from shared.interpolation import interpolate
from shared.redaction import register_secrets

CONFIG_ENV = "TOOLSWARM_CONFIG"
DEFAULT_CONFIG_FILE = "toolswarm.toml"

Transport = Literal["stdio", "http", "sse"]
# Query parameters of a rediss:// URL that name files (redis-py and kombu read the same names).
TLS_FILE_PARAMETERS = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})
LogFormat = Literal["text", "json"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetryPolicy(_Strict):
    """How transient failures of one call are retried: exponential backoff with jitter."""

    attempts: int = Field(default=4, ge=1, le=100)
    initial_backoff_s: float = Field(default=0.1, ge=0)
    max_backoff_s: float = Field(default=5.0, ge=0)
    jitter_s: float = Field(default=0.1, ge=0)


class ServerConfig(_Strict):
    """One MCP server of the registry. Callers name servers; only the config holds commands and URLs."""

    transport: Transport
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    max_concurrency: int = Field(default=16, ge=1)
    timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    pool_size: int = Field(default=2, ge=1, le=64)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # JSON-RPC error codes that mean "try again": request timeout, internal error, generic server error.
    # A tool error (is_error result) is permanent unless the server says its tool errors are worth retrying.
    tool_errors_retryable: bool = False
    transient_error_codes: list[int] = Field(default_factory=lambda: [-32001, -32603, -32000])
    # While this server's breaker is open (its probe failing), its calls go to the first healthy
    # server of this list that lists the same tool, instead of waiting.
    standby: list[str] = Field(default_factory=list)
    # While its probes fail, the server's items wait (held, spending no attempt); once it has been
    # down this long they fail instead (server_unavailable, or auth_error after a 401/403).
    hold_timeout_s: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _endpoint_matches_transport(self) -> ServerConfig:
        if self.transport == "stdio":
            if not self.command:
                raise ValueError("a stdio server needs 'command'")
            if self.url:
                raise ValueError("a stdio server takes 'command', not 'url'")
        else:
            if not self.url:
                raise ValueError(f"a {self.transport} server needs 'url'")
            if self.command:
                raise ValueError(f"a {self.transport} server takes 'url', not 'command'")
        return self


class WorkerSettings(_Strict):
    """How each worker process runs its share of the work."""

    chunk_size: int = Field(default=50, ge=1, le=10_000)
    chunks_in_flight: int = Field(default=2, ge=1, le=64)
    calls_in_flight: int = Field(default=32, ge=1, le=4096)
    commit_batch_size: int = Field(default=256, ge=1, le=10_000)
    # Fairness: at least this many chunks of a job are queued at once (more with more workers).
    job_window_chunks: int = Field(default=16, ge=1)
    # Leases: a worker holds each item it runs under a lease it renews every heartbeat; the reaper
    # takes back items whose lease expired (their worker died or stalled) and runs them again.
    lease_s: float = Field(default=5.0, gt=0)
    heartbeat_s: float = Field(default=1.0, gt=0)
    reaper_interval_s: float = Field(default=1.0, gt=0)
    max_lease_losses: int = Field(default=3, ge=1)
    # Coverage sweep: an unsettled item that no queued chunk, backlog entry or lease has covered
    # for this long is enqueued again (urgent).
    stranded_after_s: float = Field(default=10.0, gt=0)
    # A job's reduce reads the summary of all its items: past this size it fails, saying so.
    reduce_max_summary_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Broker backstop only (leases do the fast takeover): an unacked message is redelivered after
    # this. Keep it above the longest chunk; an early redelivery is harmless (claims skip live
    # leases) but wasted. It also bounds how long a message lost with a killed worker waits.
    visibility_timeout_s: int = Field(default=60, ge=10)
    # A worker pool: the servers whose queues this worker consumes (None: every configured one). A
    # pipeline step on a server the pool does not serve is handed off to that server's queue.
    servers: list[str] | None = None
    # A handoff between pools not picked up within this long fails its item (handoff_expired).
    handoff_ttl_s: int = Field(default=3600, ge=1)
    # Prometheus: each worker process serves /metrics here (None: not served). One port per process.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_address: str = "127.0.0.1"

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError("heartbeat_s must be at most half of lease_s, or live leases expire")
        return self


class StateSettings(_Strict):
    """How job state is kept (see README, "State in Redis")."""

    mode: Literal["cas", "log"] = "cas"
    snapshot_every_events: int = Field(default=500, ge=1)
    snapshot_every_s: float = Field(default=5.0, gt=0)
    # Retention: a finished or cancelled job (every key, its idempotency key, its place in the jobs
    # index) expires this long after it ends; 0 keeps jobs forever. A job keeps the value it was
    # submitted with.
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=0)


class ProbeSettings(_Strict):
    """Protocol probes (initialize + tools/list) of every registered server."""

    interval_s: float = Field(default=60.0, gt=0)
    unhealthy_interval_s: float = Field(default=2.0, gt=0)


class SummarizerTool(_Strict):
    """An MCP tool that summarizes a session's oldest records: called with ``{records, summary}``
    (the records as dicts, the summary so far or null); its text is the new summary."""

    server: str
    tool: str


class ContextSettings(_Strict):
    """Per-session conversation context (see README, "Conversation context")."""

    store: Literal["redis", "memory", "sqlite"] = "redis"
    window: int = Field(default=20, ge=2)  # records kept; past it the oldest half is summarized
    max_sessions: int = Field(default=500, ge=1)  # the cap, least recently used evicted first
    idle_ttl_s: float = Field(default=1800.0, gt=0)  # a session not touched this long is gone
    sqlite_path: str = "context.sqlite3"  # relative to state_dir
    summarizer: SummarizerTool | None = None  # None: the deterministic summary


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TOOLSWARM_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    redis_url: str | None = None
    broker_url: str | None = None
    namespace: str = Field(default="toolswarm", pattern=r"^[A-Za-z0-9_.\-]+$")
    api_token: SecretStr | None = None
    # The MCP gateway over HTTP: a bearer token every request must carry (none: no token asked),
    # and the Host names it answers to (empty: its bind address, 127.0.0.1 and localhost).
    gateway_token: SecretStr | None = None
    gateway_allowed_hosts: list[str] = Field(default_factory=list)
    global_events_maxlen: int = Field(default=100_000, ge=100)
    state_dir: str = ".toolswarm"
    # The embedded Valkey keeps an append-only file in state_dir/redis-data, so a restart loses nothing.
    embedded_appendonly: bool = False
    # Logs of worker, api and gateway: "text" (as Celery and uvicorn write them) or "json" (one
    # object per line with job_id, chunk, item and server where they apply; see log_format.py).
    log_format: LogFormat = "text"
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    probes: ProbeSettings = Field(default_factory=ProbeSettings)
    context: ContextSettings = Field(default_factory=ContextSettings)
    servers: dict[str, ServerConfig] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init kwargs; the environment must override them.
        return (env_settings, init_settings)

    @field_validator("redis_url", "broker_url")
    @classmethod
    def _tls_files_exist(cls, url: str | None) -> str | None:
        """A CA, certificate or key file that a ``rediss://`` URL names must exist here, or every
        connection fails with a bare "No such file or directory"."""
        for name, value in parse_qsl(urlsplit(url or "").query):
            if name in TLS_FILE_PARAMETERS and not Path(value).is_file():
                raise ValueError(f"{name} file {value} does not exist")
        return url

    @model_validator(mode="after")
    def _names_known_servers(self) -> Settings:
        known = ", ".join(sorted(self.servers)) or "none configured"
        unknown = sorted(set(self.worker.servers or ()) - set(self.servers))
        if unknown:
            raise ValueError(f"worker.servers names unknown servers {unknown} (known: {known})")
        for name, server in self.servers.items():
            unknown = sorted(set(server.standby) - set(self.servers))
            if unknown:
                raise ValueError(f"servers.{name}.standby names unknown servers {unknown} (known: {known})")
            if name in server.standby:
                raise ValueError(f"servers.{name}.standby names the server itself")
        return self

    def served(self) -> set[str]:
        """The servers this process's worker pool serves."""
        return set(self.servers) if self.worker.servers is None else set(self.worker.servers)

    def server(self, name: str) -> ServerConfig:
        try:
            return self.servers[name]
        except KeyError:
            known = ", ".join(sorted(self.servers)) or "none configured"
            raise ConfigError(f"unknown server {name!r} (known: {known})") from None


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The config file to read, or None when there is none (defaults and environment only)."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def load_settings(path: str | Path | None = None) -> Settings:
    """Read the config file (if any) and the environment into :class:`Settings`."""
    resolved = config_path(path)
    data: dict[str, Any] = {}
    if resolved is not None:
        try:
            data = tomllib.loads(resolved.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {resolved} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {resolved}: invalid TOML: {exc}") from None
        secrets: set[str] = set()
        try:
            data = interpolate(data, os.environ, read=secrets)
        except ConfigError as exc:
            raise ConfigError(f"config file {resolved}: {exc}") from None
        register_secrets(secrets)
    try:
        return Settings(**data)
    except ValidationError as exc:
        where = f"config file {resolved}" if resolved else "configuration"
        raise ConfigError(f"{where}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each as ``dotted.key: reason``."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if error["type"] == "value_error" and "error" in error.get("ctx", {}):
            message = str(error["ctx"]["error"])  # a validator's own words, without "Value error, "
        problems.append(f"{location}: {message}" if location else message)
    return "; ".join(problems)
