"""Protocol probes of registered servers, the tools cache, and the circuit breaker they drive.

A probe opens a fresh session (the initialize or discover handshake) and lists the tools. Its
outcome (ok, latency, error, tool count) and the tools' input schemas are stored in Redis,
shown by ``toolswarm servers`` and used to validate arguments at submit. Workers probe every
server on a schedule, one worker per server per interval (a lock with expiry); an unhealthy
server is probed again every few seconds. While a server is unhealthy its items are held:
they wait, without burning attempts, and resume when a probe finds it healthy again. A server
down for longer than its ``hold_timeout_s`` (counted from the first failed probe of the outage,
cluster-wide) holds nothing more: its items fail with ``server_unavailable``, or ``auth_error``
when the probe was refused with HTTP 401/403, naming the probe's error.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from typing import Any

from pydantic import BaseModel, Field, TypeAdapter

from shared.errors import AuthFailed, PermanentError, ServerDown
from shared.keys import Keys
from shared.log_context import detached_context
from shared.mcp_client import AUTH_STATUSES, build_client, describe, http_client_for, http_status_of
from shared.redaction import endpoint_of
from shared.settings import ServerConfig, Settings

HEALTH_CACHE_S = 0.5
TOOLS_CACHE_S = 10.0


class ToolInfo(BaseModel):
    """A tool as its server lists it: what the gateway's ``list_tools`` and submit's checks read."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)


class ProbeResult(BaseModel):
    server: str
    ok: bool
    latency_ms: float
    error: str | None = None
    # Of a failed probe: what its items fail with once held too long, and when the outage began.
    error_type: str | None = None
    down_since_ms: int | None = None
    tool_count: int = 0
    at_ms: int

    @property
    def outage_began_ms(self) -> int:
        """When the outage this failed probe belongs to began (records from before the field: this probe)."""
        return self.down_since_ms or self.at_ms

    def outage_error(self, hold_timeout_s: float, now_ms: int, endpoint: str = "") -> PermanentError | None:
        """The error held items fail with, once the server has been down for ``hold_timeout_s``."""
        if self.ok:
            return None
        down_s = (now_ms - self.outage_began_ms) / 1000
        if down_s < hold_timeout_s:
            return None
        message = (
            f"server {self.server!r}{f' ({endpoint})' if endpoint else ''} unavailable for {down_s:.0f}s "
            f"(hold_timeout_s={hold_timeout_s:g}); "
            f"last probe: {self.error or 'unknown error'}"
        )
        return AuthFailed(message) if self.error_type == AuthFailed.error_type else ServerDown(message)


CATALOG = TypeAdapter(list[ToolInfo])


async def probe(name: str, config: ServerConfig) -> tuple[ProbeResult, list[ToolInfo]]:
    """Handshake and list tools on a fresh session; returns the outcome and the tools listed."""
    started = time.perf_counter()
    tools: list[ToolInfo] = []
    error: str | None = None
    error_type: str | None = None
    try:
        async with asyncio.timeout(config.connect_timeout_s), AsyncExitStack() as stack:
            http = None
            if config.transport == "http":  # the workers' client: it tells a 401/403 apart
                http = await stack.enter_async_context(http_client_for(config))
            client = await stack.enter_async_context(build_client(config, http))
            listed = await client.list_tools()
        tools = [
            ToolInfo(name=tool.name, description=tool.description, input_schema=tool.input_schema or {})
            for tool in listed.tools
        ]
    except Exception as exc:  # any failure of a probe is its result, never an exception
        error = describe(exc)
        error_type = AuthFailed.error_type if http_status_of(exc) in AUTH_STATUSES else ServerDown.error_type
    result = ProbeResult(
        server=name,
        ok=error is None,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
        error=error,
        error_type=error_type,
        tool_count=len(tools),
        at_ms=int(time.time() * 1000),
    )
    return result, tools


async def in_outage(client: Any, keys: Keys, result: ProbeResult) -> ProbeResult:
    """A failed probe, dated from the first failure of the outage it belongs to."""
    previous = await last_probe(client, keys, result.server)
    began = previous.outage_began_ms if previous is not None and not previous.ok else None
    return result.model_copy(update={"down_since_ms": began or result.at_ms})


async def record(client: Any, keys: Keys, result: ProbeResult, tools: list[ToolInfo]) -> None:
    if not result.ok:
        result = await in_outage(client, keys, result)
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(keys.probe(result.server), result.model_dump_json())
        if result.ok:
            pipe.set(keys.tools(result.server), CATALOG.dump_json(tools))
        await pipe.execute()


async def last_probe(client: Any, keys: Keys, server: str) -> ProbeResult | None:
    raw = await client.get(keys.probe(server))
    return ProbeResult.model_validate_json(raw) if raw else None


async def tool_catalog(client: Any, keys: Keys, name: str, config: ServerConfig) -> list[ToolInfo]:
    """The server's tools: from the cache, else probed now (and cached)."""
    raw = await client.get(keys.tools(name))
    if raw:
        return CATALOG.validate_json(raw)
    result, tools = await probe(name, config)
    await record(client, keys, result, tools)
    if not result.ok:
        raise ProbeFailed(name, result.error or "unknown error")
    return tools


async def tool_schemas(client: Any, keys: Keys, name: str, config: ServerConfig) -> dict[str, Any]:
    """The server's tools and their input schemas, by name."""
    return {tool.name: tool.input_schema for tool in await tool_catalog(client, keys, name, config)}


class ProbeFailed(Exception):
    def __init__(self, server: str, error: str) -> None:
        super().__init__(f"cannot list the tools of server {server!r}: {error}")
        self.server = server


async def probe_due_servers(client: Any, keys: Keys, settings: Settings, worker_id: str) -> list[ProbeResult]:
    """Probe each server of this worker's pool whose turn it is; the lock's expiry is the probe
    interval (a pool may not reach the servers it does not serve)."""
    done = []
    served = settings.served()
    for name, config in settings.servers.items():
        if name not in served:
            continue
        previous = await last_probe(client, keys, name)
        healthy = previous is None or previous.ok
        interval = settings.probes.interval_s if healthy else settings.probes.unhealthy_interval_s
        if not await client.set(keys.probe_lock(name), worker_id, nx=True, px=int(interval * 1000)):
            continue
        result, tools = await probe(name, config)
        await record(client, keys, result, tools)
        done.append(result)
    return done


class Breaker:
    """Per-process view of every server's health, refreshed from Redis at most twice a second."""

    def __init__(self, client: Any, keys: Keys, settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        self._seen: dict[str, tuple[float, ProbeResult | None]] = {}
        self._reading: dict[str, asyncio.Task[ProbeResult | None]] = {}
        self._tools: dict[str, tuple[float, set[str]]] = {}
        self.holding: dict[str, tuple[str, str]] = {}  # item member -> (job id, the down server)

    async def healthy(self, server: str) -> bool:
        probed = await self.last_probe(server)
        return probed is None or probed.ok

    async def last_probe(self, server: str) -> ProbeResult | None:
        cached = self._seen.get(server)
        if cached is not None and time.monotonic() - cached[0] < HEALTH_CACHE_S:
            return cached[1]
        reading = self._reading.get(server)
        if reading is None:  # one read per expiry, however many calls are waiting on it
            reading = asyncio.create_task(self._read(server), context=detached_context())
            self._reading[server] = reading
            reading.add_done_callback(lambda _: self._reading.pop(server, None))
        return await asyncio.shield(reading)

    async def _read(self, server: str) -> ProbeResult | None:
        result = await last_probe(self.client, self.keys, server)
        self._seen[server] = (time.monotonic(), result)
        return result

    async def outage_error(self, server: str) -> PermanentError | None:
        """What the server's held items fail with now, if it has been down past its hold budget."""
        probed = await self.last_probe(server)
        if probed is None:
            return None
        config = self.settings.server(server)
        return probed.outage_error(config.hold_timeout_s, int(time.time() * 1000), endpoint_of(config))

    async def route(self, server: str, tool: str, item: tuple[str, str] | None = None) -> str:
        """The server to call now: this one while healthy, else its first healthy standby that
        lists the tool; while none is, wait (a call is never sent to a server whose probe fails),
        counting ``item`` (its member and job id) as held meanwhile. Raises the server's outage
        error once it has been down past its hold budget."""
        standby = self.settings.server(server).standby
        try:
            while True:
                if await self.healthy(server):
                    return server
                for name in standby:
                    if await self.healthy(name) and tool in await self.tools_of(name):
                        return name
                failure = await self.outage_error(server)
                if failure is not None:
                    raise failure
                if item is not None:
                    self.holding[item[0]] = (item[1], server)
                await asyncio.sleep(HEALTH_CACHE_S)
        finally:
            if item is not None:
                self.holding.pop(item[0], None)

    def held(self) -> dict[str, dict[str, int]]:
        """Items of this process waiting on a down server, by job and server (for its heartbeat)."""
        counts: dict[str, dict[str, int]] = {}
        for job_id, server in self.holding.values():
            by_server = counts.setdefault(job_id, {})
            by_server[server] = by_server.get(server, 0) + 1
        return counts

    async def tools_of(self, server: str) -> set[str]:
        """The tools a server listed at its last good probe (none before one)."""
        cached = self._tools.get(server)
        if cached is not None and time.monotonic() - cached[0] < TOOLS_CACHE_S:
            return cached[1]
        raw = await self.client.get(self.keys.tools(server))
        names = {tool.name for tool in CATALOG.validate_json(raw)} if raw else set()
        self._tools[server] = (time.monotonic(), names)
        return names

    async def wait_healthy(self, server: str) -> None:
        """Hold here while the server is unhealthy (no attempt is spent waiting), at most until it
        has been down past its hold budget (then the calls themselves fail, see :meth:`route`)."""
        # Health lives in Redis (written by probes in any process): polling it is the only signal.
        while not await self.healthy(server) and await self.outage_error(server) is None:  # noqa: ASYNC110
            await asyncio.sleep(HEALTH_CACHE_S)

    async def trip(self, server: str, error: str) -> None:
        """A call could not reach the server: mark it unhealthy until a probe finds it back."""
        result = ProbeResult(
            server=server,
            ok=False,
            latency_ms=0.0,
            error=error,
            error_type=ServerDown.error_type,
            at_ms=int(time.time() * 1000),
        )
        result = await in_outage(self.client, self.keys, result)
        await self.client.set(self.keys.probe(server), result.model_dump_json())
        await self.client.delete(self.keys.probe_lock(server))  # probe it again soon
        self._seen[server] = (time.monotonic(), result)
