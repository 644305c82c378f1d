"""MCP sessions behind a narrow protocol: pools of persistent sessions, one owner task each.

``ToolCaller.call(server, tool, arguments, timeout, meta)`` is all the executor sees. The pooled
implementation keeps ``pool_size`` persistent sessions per server; each session is opened and
closed by one dedicated task for its whole life (the SDK breaks when a session is closed from
another task) while calls from any task share it. A session whose transport breaks is dropped
and a fresh one is opened on the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping
from typing import Any, Protocol, cast

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import get_default_environment
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, RequestParamsMeta, Tool

from shared.errors import (
    AuthFailed,
    CallTimeout,
    PermanentError,
    ProtocolError,
    ServerError,
    ServerUnavailable,
    ToolswarmError,
    UnknownTool,
)
from shared.log_context import detached_context
from shared.models import CallResult
from shared.redaction import redacted
from shared.settings import ServerConfig

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_CODE = -32001
KEEPALIVE_S = 4.0
KEEPALIVE_CONNECTIONS = 6


class ToolCaller(Protocol):
    async def call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        timeout: float,
        meta: dict[str, Any] | None = None,
    ) -> CallResult:
        """Call a tool; ``meta`` goes in the request's ``_meta``."""

    async def input_schema(self, server: str, tool: str) -> dict[str, Any] | None:
        """The tool's input schema as the server lists it (None: no such tool)."""


def _python_command(command: str) -> str:
    # "python" in a config means the interpreter toolswarm runs on, so a venv install just works.
    return sys.executable if command in ("python", "python3") else command


def build_client(config: ServerConfig, http_client: httpx2.AsyncClient | None) -> Client:
    """An un-entered MCP client for one server of the registry."""
    if config.transport == "stdio":
        assert config.command is not None
        params = StdioServerParameters(
            command=_python_command(config.command),
            args=config.args,
            env={**get_default_environment(), **config.env},
            cwd=config.cwd,
        )
        return Client(params, read_timeout_seconds=config.timeout_s)
    assert config.url is not None
    if config.transport == "http":
        return Client(
            streamable_http_client(config.url, http_client=http_client), read_timeout_seconds=config.timeout_s
        )
    return Client(
        sse_client(config.url, headers=config.headers or None), read_timeout_seconds=config.timeout_s
    )


def classify_mcp_error(exc: MCPError, config: ServerConfig) -> ToolswarmError:
    if exc.code == REQUEST_TIMEOUT_CODE:
        return CallTimeout(f"call timed out after {config.timeout_s}s: {exc.message}")
    if exc.code in config.transient_error_codes:
        return ServerError(f"server error {exc.code}: {exc.message}")
    return ProtocolError(f"server error {exc.code}: {exc.message}")


AUTH_STATUSES = (401, 403)


def http_status_of(exc: BaseException) -> int | None:
    """The HTTP status behind a transport error, looking inside exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def classify_transport_error(server: str, exc: BaseException) -> ToolswarmError:
    """HTTP 4xx: the request is wrong, retrying cannot help. 5xx and everything else (refused
    connections, broken streams): transient, and the session is replaced."""
    status = http_status_of(exc)
    if status in AUTH_STATUSES:
        return AuthFailed(f"server {server!r} answered HTTP {status}: {describe(exc)}")
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return ProtocolError(f"server {server!r} answered HTTP {status}: {describe(exc)}")
    if status is not None and status >= 500:
        return ServerError(f"server {server!r} answered HTTP {status}: {describe(exc)}")
    return ServerUnavailable(f"server {server!r}: {describe(exc)}")


def to_call_result(result: CallToolResult) -> CallResult:
    return CallResult(
        content=[block.model_dump(mode="json", exclude_none=True) for block in result.content],
        structured_content=result.structured_content,
        is_error=bool(result.is_error),
    )


async def refuse_unauthorized(response: httpx2.Response) -> None:
    """Raise on HTTP 401/403: the SDK would turn them into a bare "Server returned an error
    response" and the status, which makes the failure an ``auth_error``, would be lost."""
    if response.status_code in AUTH_STATUSES:
        response.raise_for_status()


def http_client_for(config: ServerConfig) -> httpx2.AsyncClient:
    """The HTTP client of one server's sessions in one process."""
    return httpx2.AsyncClient(
        headers=config.headers,
        event_hooks={"response": [refuse_unauthorized]},
        timeout=httpx2.Timeout(config.connect_timeout_s, read=max(300.0, config.timeout_s)),
        limits=httpx2.Limits(
            max_connections=100,
            # httpcore probes every idle connection on each request it starts or finishes: with
            # twenty kept, a worker spent up to 1.6x the CPU per call of one that kept six.
            max_keepalive_connections=KEEPALIVE_CONNECTIONS,
            # Drop idle connections before the server does (uvicorn's and Node's default is 5 s):
            # a request sent as the server closes its end fails with a read error, and a read
            # error discards the whole session.
            keepalive_expiry=KEEPALIVE_S,
        ),
    )


class PooledSession:
    """One persistent MCP session, opened and closed by its own owner task."""

    def __init__(self, name: str, config: ServerConfig, http_client: httpx2.AsyncClient | None) -> None:
        self.name = name
        self.config = config
        self.http_client = http_client
        self.client: Client | None = None
        self.tools: dict[str, Tool] | None = None
        self.in_flight = 0
        self.error: BaseException | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._owner is not None and not self._owner.done() and not self._stop.is_set()

    async def open(self) -> None:
        self._owner = asyncio.create_task(
            self._own(), name=f"mcp-session:{self.name}", context=detached_context()
        )
        try:
            await asyncio.wait_for(self._ready.wait(), self.config.connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ServerUnavailable(
                f"server {self.name!r}: no session within {self.config.connect_timeout_s}s"
            ) from None
        if self.client is None:
            raise ServerUnavailable(f"server {self.name!r}: cannot open a session: {describe(self.error)}")

    async def _own(self) -> None:
        try:
            async with build_client(self.config, self.http_client) as client:
                listed = await client.list_tools()
                self.tools = {tool.name: tool for tool in listed.tools}
                self.client = client
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:  # the owner task is the top of this session: record, never raise
            self.error = exc
            log.warning("MCP session to %r ended: %s", self.name, describe(exc))
        finally:
            self.client = None
            self._stop.set()
            self._ready.set()

    def discard(self) -> None:
        """Ask the owner task to close the session; calls in flight fail and are retried elsewhere."""
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        if self._owner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(asyncio.shield(self._owner), 5)
                except TimeoutError:
                    self._owner.cancel()
                    await asyncio.gather(self._owner, return_exceptions=True)


def describe(exc: BaseException | None) -> str:
    """A one-line description, looking inside exception groups for the real cause."""
    if exc is None:
        return "unknown error"
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()  # one line: httpx appends a line of advice to its message
    return redacted(f"{type(exc).__name__}: {text[0]}") if text else type(exc).__name__


class ServerPool:
    """Up to ``pool_size`` sessions to one server; calls go to the least loaded live one."""

    def __init__(self, name: str, config: ServerConfig) -> None:
        self.name = name
        self.config = config
        self.sessions: list[PooledSession] = []
        self._lock = asyncio.Lock()
        self._http_client: httpx2.AsyncClient | None = None
        self.tools: Mapping[str, Tool] | None = None

    def _http(self) -> httpx2.AsyncClient | None:
        if self.config.transport != "http":
            return None
        if self._http_client is None:
            # One HTTP client per server per process: building one costs ~19 ms (SSL context).
            self._http_client = http_client_for(self.config)
        return self._http_client

    async def session(self) -> PooledSession:
        live = [s for s in self.sessions if s.alive]
        if len(live) < self.config.pool_size:
            async with self._lock:
                self.sessions = [s for s in self.sessions if s.alive]
                if len(self.sessions) < self.config.pool_size:
                    fresh = PooledSession(self.name, self.config, self._http())
                    await fresh.open()
                    self.sessions.append(fresh)
                    if fresh.tools is not None:
                        self.tools = fresh.tools
                live = self.sessions
        return min(live, key=lambda s: s.in_flight)

    async def input_schema(self, tool: str) -> dict[str, Any] | None:
        if self.tools is None:
            await self.session()
        listed = (self.tools or {}).get(tool)
        return listed.input_schema if listed is not None else None

    async def call(
        self, tool: str, arguments: dict[str, Any], timeout: float, meta: dict[str, Any] | None = None
    ) -> CallResult:
        session = await self.session()
        if self.tools is not None and tool not in self.tools:
            raise UnknownTool(f"unknown tool {tool!r} on server {self.name!r}")
        client = session.client
        if client is None:
            raise ServerUnavailable(f"server {self.name!r}: session closed")
        session.in_flight += 1
        try:
            result = await client.call_tool(
                tool,
                arguments,
                read_timeout_seconds=timeout,
                meta=cast(RequestParamsMeta, meta) if meta else None,
            )
        except MCPError as exc:
            raise classify_mcp_error(exc, self.config) from None
        except TimeoutError:
            raise CallTimeout(f"call timed out after {timeout}s") from None
        except PermanentError:
            raise
        except Exception as exc:  # transport failures surface as many types (anyio, httpx2, OSError)
            failure = classify_transport_error(self.name, exc)
            if isinstance(failure, ServerUnavailable):
                session.discard()
            raise failure from None
        finally:
            session.in_flight -= 1
        return to_call_result(result)

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
        self.sessions = []
        if self._http_client is not None:
            await self._http_client.aclose()
            self._http_client = None


class McpPool:
    """The ToolCaller of a worker process: a ServerPool per registered server, opened lazily."""

    def __init__(self, servers: Mapping[str, ServerConfig]) -> None:
        self.servers = servers
        self.pools: dict[str, ServerPool] = {}

    def pool(self, server: str) -> ServerPool:
        pool = self.pools.get(server)
        if pool is None:
            pool = self.pools[server] = ServerPool(server, self.servers[server])
        return pool

    async def call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        timeout: float,
        meta: dict[str, Any] | None = None,
    ) -> CallResult:
        return await self.pool(server).call(tool, arguments, timeout, meta)

    async def input_schema(self, server: str, tool: str) -> dict[str, Any] | None:
        return await self.pool(server).input_schema(tool)

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()), return_exceptions=True)
        self.pools = {}
