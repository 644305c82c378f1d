"""The MCP gateway: toolswarm as an MCP server, so an agent hands the swarm thousands of calls in
one tool call instead of holding thousands of sessions itself.

Built on the MCP SDK's server (stdio, or streamable HTTP at ``/mcp``), its tools call the same
functions of shared/ as the CLI and the HTTP API: submit, status, results, cancel and retry
have one implementation each. Bad input is a tool error naming the field (``ToolError``),
never a crash of the gateway or a JSON-RPC internal error.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel, Field, ValidationError

from api.wire import InvalidJob, ItemIn, JobIn, ResultsPage, Submitted, to_job_spec
from shared import jobs
from shared.context import ContextStore, SessionContext, open_context_store
from shared.embedded import redis_url
from shared.errors import ConfigError, JobNotFound, JobSpecError, RedisUnavailable, ToolswarmError
from shared.fleet import Fleet, fleet
from shared.handoff import HandoffEnvelope, HandoffReceipt, HandoffStore, receive, token_digest
from shared.holds import with_holds
from shared.jobs import Enqueuer, resolve_items
from shared.keys import Keys
from shared.models import ItemError, ItemSpec, JobSpec, JobState, JobStatus, PipelineSpec, ReduceSpec
from shared.probes import ProbeFailed, ToolInfo, tool_catalog
from shared.settings import Settings
from shared.store import JobStore, connect

MAX_RESULTS_PAGE = 1000
PROGRESS_EVERY_S = 0.25  # map_tool's progress notifications, at most this often

INSTRUCTIONS = """\
toolswarm runs bulk MCP tool calls on a swarm of workers. To make many calls of one tool, use
map_tool: one call returns every output and every failure. For bigger or longer work, submit_job,
then poll job_status and page job_results. list_servers and list_tools show what can be called."""


class ToolsOut(BaseModel):
    server: str
    tools: list[ToolInfo]


class ContextOut(BaseModel):
    session: str
    context: SessionContext | None = Field(description="Null: never written, cleared, or evicted.")


class ContextCleared(BaseModel):
    session: str
    cleared: bool = Field(description="False when the session had no context.")


class MapSuccess(BaseModel):
    index: int
    key: str | None = None
    output: Any = Field(description="The tool's structured content, else its text.")


class MapFailure(BaseModel):
    index: int
    key: str | None = None
    error: ItemError


class MapCounts(BaseModel):
    succeeded: int
    failed: int
    cancelled: int
    running: int
    pending: int


class MapResult(BaseModel):
    """A map of one tool over many arguments. ``successful`` and ``failed`` are null while the
    job is still running (``timeout_s`` passed first): poll ``job_status`` and page
    ``job_results`` with the ``job_id``."""

    job_id: str
    state: JobState
    total: int
    counts: MapCounts
    successful: list[MapSuccess] | None = None
    failed: list[MapFailure] | None = None


class StaticToken:
    """The SDK's ``TokenVerifier`` for one shared secret, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token=token, client_id="toolswarm", scopes=[])
        return None


def allowed_hosts(settings: Settings, bind: str) -> list[str]:
    return settings.gateway_allowed_hosts or list(dict.fromkeys([bind, "127.0.0.1", "localhost"]))


def transport_security(settings: Settings, bind: str) -> TransportSecuritySettings:
    """Host and Origin must be on the allow-list: a page in a browser (DNS rebinding) cannot drive
    the gateway. Each host is allowed on any port."""
    hosts = allowed_hosts(settings, bind)
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[pattern for host in hosts for pattern in (host, f"{host}:*")],
        allowed_origins=[
            pattern
            for host in hosts
            for scheme in ("http", "https")
            for pattern in (f"{scheme}://{host}", f"{scheme}://{host}:*")
        ],
    )


@contextmanager
def as_tool_errors() -> Iterator[None]:
    """The engine's refusals, as tool errors the calling model can read and act on."""
    try:
        yield
    except InvalidJob as exc:
        raise ToolError(f"invalid job: {exc}") from None
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ToolError(f"invalid input: {errors}") from None
    except JobNotFound as exc:
        raise ToolError(f"job_id: {exc.message}") from None
    except (JobSpecError, ConfigError, RedisUnavailable) as exc:
        raise ToolError(exc.message) from None
    except ToolswarmError as exc:  # a refused handoff, among others: its type leads the message
        raise ToolError(f"{exc.error_type}: {exc.message}") from None
    except ProbeFailed as exc:
        raise ToolError(str(exc)) from None


class Gateway:
    """The gateway's connections (Redis, the broker), made on first use in the serving loop."""

    def __init__(
        self, settings: Settings, enqueuer_factory: Callable[[Settings, Keys], Enqueuer] | None = None
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.url = redis_url(settings)  # a missing Redis fails at start, not on the first call
        self._enqueuer_factory = enqueuer_factory
        self._store: JobStore | None = None
        self._enqueuer: Enqueuer | None = None
        self._handoffs: HandoffStore | None = None
        self._contexts: ContextStore | None = None

    @property
    def store(self) -> JobStore:
        if self._store is None:
            client = connect(self.url, socket_connect_timeout=5)
            self._store = JobStore(client, self.keys, self.settings.global_events_maxlen)
        return self._store

    @property
    def enqueuer(self) -> Enqueuer:
        if self._enqueuer is None:
            if self._enqueuer_factory is None:
                from workers.app import CeleryEnqueuer, create_app

                self._enqueuer = CeleryEnqueuer(create_app(self.settings), self.keys)
            else:
                self._enqueuer = self._enqueuer_factory(self.settings, self.keys)
        return self._enqueuer

    async def close(self) -> None:
        if self._contexts is not None:
            await self._contexts.close()
        if self._store is not None:
            await self._store.client.aclose()
            self._store = None

    async def submit(self, spec: JobSpec) -> Submitted:
        resolve_items(spec, self.settings)
        submitted = await jobs.submit_job(spec, self.settings, self.store, self.enqueuer)
        return Submitted(job_id=submitted.job_id, total=submitted.total, existing=submitted.existing)

    async def catalog(self, server: str) -> list[ToolInfo]:
        if server not in self.settings.servers:
            known = ", ".join(sorted(self.settings.servers)) or "none configured"
            raise ToolError(f"server: unknown server {server!r} (known: {known})")
        return await tool_catalog(self.store.client, self.keys, server, self.settings.server(server))

    async def map_tool(
        self,
        server: str,
        tool: str,
        arguments: list[dict[str, Any]],
        keys: list[str] | None,
        timeout_s: float,
        ctx: Context,
    ) -> MapResult:
        if not arguments:
            raise ToolError("arguments: give at least one set of arguments")
        if keys is not None and len(keys) != len(arguments):
            raise ToolError(f"keys: {len(keys)} keys for {len(arguments)} sets of arguments")
        listed = [t.name for t in await self.catalog(server)]
        if tool not in listed:
            raise ToolError(
                f"tool: unknown tool {tool!r} on server {server!r} (it lists: {', '.join(listed)})"
            )
        items = [
            ItemSpec(server=server, tool=tool, arguments=args, key=keys[i] if keys else None)
            for i, args in enumerate(arguments)
        ]
        submitted = await self.submit(JobSpec(items=items, server=server, tool=tool))
        status = await self.follow(submitted.job_id, timeout_s, ctx)
        counts = MapCounts(
            succeeded=status.succeeded,
            failed=status.failed,
            cancelled=status.cancelled,
            running=status.running,
            pending=status.pending,
        )
        result = MapResult(job_id=status.job_id, state=status.state, total=status.total, counts=counts)
        if not status.done:
            return result
        result.successful, result.failed = [], []
        async for record in self.store.results(status.job_id):
            if record.status == "succeeded" and record.result is not None:
                structured = record.result.structured_content
                output = structured if structured is not None else record.result.text()
                result.successful.append(MapSuccess(index=record.index, key=record.key, output=output))
            elif record.error is not None:
                result.failed.append(MapFailure(index=record.index, key=record.key, error=record.error))
        return result

    @property
    def contexts(self) -> ContextStore:
        if self.settings.context.store == "memory":
            raise ToolError("context: the memory store lives inside each worker process; use redis or sqlite")
        if self._contexts is None:
            self._contexts = open_context_store(self.settings, self.store.client)
        return self._contexts

    async def receive_handoff(self, envelope: HandoffEnvelope) -> HandoffReceipt:
        if envelope.next_tool_hint is None:
            raise ToolError("envelope.next_tool_hint: name the tool to call on the target server")
        if envelope.summary_before_window and self.settings.context.store != "memory":
            # the receiving side starts the session from the sender's summary, not from its history
            await self.contexts.init_from_summary(str(envelope.session_id), envelope.summary_before_window)
        if self._handoffs is None:
            self._handoffs = HandoffStore(self.store.client, self.keys)
        return await receive(self._handoffs, envelope, self.settings.servers, self.run_handoff)

    async def run_handoff(self, envelope: HandoffEnvelope) -> dict[str, Any]:
        """The handed-off call, as a one-item job whose idempotency key is the handoff's token: a
        receiver that takes over from a dead one finds the same job instead of calling again."""
        item = ItemSpec(
            server=envelope.target_server,
            tool=envelope.next_tool_hint,
            arguments=envelope.accumulated_context,
            key=str(envelope.handoff_id),
        )
        key = f"handoff:{token_digest(envelope.idempotency_token)}"
        submitted = await self.submit(JobSpec(items=[item], idempotency_key=key))
        remaining_s = max(1.0, envelope.ttl_seconds - envelope.age_s())
        status = await self.store.wait_until_done(submitted.job_id, timeout_s=remaining_s)
        record = await anext(self.store.results(status.job_id))
        outcome: dict[str, Any] = {"job_id": status.job_id, "status": record.status}
        if record.result is not None:
            structured = record.result.structured_content
            outcome["output"] = structured if structured is not None else record.result.text()
        if record.error is not None:
            outcome["error"] = record.error.model_dump()
        return outcome

    async def follow(self, job_id: str, timeout_s: float, ctx: Context) -> JobStatus:
        """The job's status once it is done, or when ``timeout_s`` has passed; progress (settled of
        total) goes to the caller each time it moves, if the caller asked for progress."""
        status = await self.store.status(job_id)
        reported = -1
        with anyio.move_on_after(timeout_s):
            async for status in self.store.follow(job_id, every_s=PROGRESS_EVERY_S):
                if status.settled != reported:
                    reported = status.settled
                    await ctx.report_progress(status.settled, status.total, f"{status.settled} settled")
                if status.done:
                    break
        return status


def create_gateway(
    settings: Settings,
    enqueuer_factory: Callable[[Settings, Keys], Enqueuer] | None = None,
    *,
    http_url: str | None = None,
) -> tuple[MCPServer, Gateway]:
    """The MCP server and the connections it uses. ``http_url`` (served over HTTP) turns on the
    bearer token check when ``gateway_token`` is set."""
    gateway = Gateway(settings, enqueuer_factory)
    token = settings.gateway_token.get_secret_value() if settings.gateway_token else None
    auth: dict[str, Any] = {}
    if http_url is not None and token:
        auth = {
            "token_verifier": StaticToken(token),
            "auth": AuthSettings(issuer_url=http_url, resource_server_url=None),
        }
    server: MCPServer = MCPServer(
        "toolswarm", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING", **auth
    )
    register_tools(server, gateway)
    return server, gateway


JobId = Annotated[
    str, Field(min_length=1, max_length=200, description="A job id, as submit_job returned it.")
]
SessionId = Annotated[str, Field(max_length=100, description="A session id (UUID).")]


def register_tools(server: MCPServer, gateway: Gateway) -> None:
    @server.tool()
    async def submit_job(
        items: Annotated[
            list[ItemIn] | None,
            Field(
                description="The calls: {tool?, arguments, server?, key?}, or pipeline inputs {input, key?}."
            ),
        ] = None,
        pipeline: Annotated[
            PipelineSpec | None, Field(description="Steps applied to every item's input.")
        ] = None,
        server: Annotated[str | None, Field(description="Server of items that name none.")] = None,
        tool: Annotated[str | None, Field(description="Tool of items that name none.")] = None,
        reduce: Annotated[
            ReduceSpec | None, Field(description="One call over the job summary, at the end.")
        ] = None,
        idempotency_key: Annotated[
            str | None, Field(max_length=200, description="The same key returns the same job.")
        ] = None,
    ) -> Submitted:
        """Submit a job of tool calls (or pipeline inputs) to the swarm; returns at once. Items and
        pipeline are exactly as in the HTTP API's POST /v1/jobs. Follow it with job_status."""
        if not items:
            raise ToolError("items: give at least one item")
        with as_tool_errors():
            body = JobIn(items=items, pipeline=pipeline, server=server, tool=tool, reduce=reduce)
            return await gateway.submit(to_job_spec(body, idempotency_key))

    @server.tool()
    async def job_status(job_id: JobId) -> JobStatus:
        """A job's state and counts: succeeded, failed, cancelled, running, pending; its failures by
        step and error type; its reduce."""
        with as_tool_errors():
            return await with_holds(gateway.store, gateway.settings, await gateway.store.status(job_id))

    @server.tool()
    async def job_results(
        job_id: JobId,
        status: Literal["succeeded", "failed", "cancelled"] | None = None,
        cursor: Annotated[
            str | None, Field(pattern=r"^\d+$", description="next_cursor of the last page.")
        ] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_RESULTS_PAGE)] = 100,
        step: Annotated[str | None, Field(description="Only items that failed at this step.")] = None,
    ) -> ResultsPage:
        """A page of a job's settled results in item order, optionally of one status (or failed at
        one step: ``call`` for single calls)."""
        with as_tool_errors():
            start = int(cursor or 0)
            page, next_index = await gateway.store.results_page(job_id, start, limit, status, step)
            return ResultsPage(results=page, next_cursor=None if next_index is None else str(next_index))

    @server.tool()
    async def cancel_job(job_id: JobId) -> JobStatus:
        """Cancel a job: no item starts after this; unsettled items settle as cancelled."""
        with as_tool_errors():
            return await jobs.cancel_job(gateway.store, job_id, gateway.enqueuer)

    @server.tool()
    async def retry_job(
        job_id: JobId,
        status: Literal["failed", "cancelled"] = "failed",
        error_type: Annotated[str | None, Field(description="Only items that failed with this type.")] = None,
        step: Annotated[str | None, Field(description="Only items that failed at this step.")] = None,
    ) -> Submitted:
        """A new job of a job's failed (or cancelled) items; the old job records it as retried_by."""
        with as_tool_errors():
            submitted = await jobs.retry_job(
                gateway.store,
                gateway.settings,
                gateway.enqueuer,
                job_id,
                status=status,
                error_type=error_type,
                step=step,
            )
            return Submitted(job_id=submitted.job_id, total=submitted.total, existing=False)

    @server.tool()
    async def list_servers() -> Fleet:
        """The MCP servers the swarm calls: health and last probe, calls in flight against
        max_concurrency, chunks queued; and the live workers."""
        with as_tool_errors():
            return await fleet(gateway.store, gateway.settings)

    @server.tool()
    async def list_tools(
        server: Annotated[str, Field(description="A server name from list_servers.")],
    ) -> ToolsOut:
        """A server's tools: names, descriptions and input schemas (from the swarm's tools cache)."""
        with as_tool_errors():
            return ToolsOut(server=server, tools=await gateway.catalog(server))

    @server.tool()
    async def receive_handoff(envelope: HandoffEnvelope) -> HandoffReceipt:
        """Resume work handed off from another server: calls next_tool_hint on target_server with
        accumulated_context as its arguments, once per idempotency_token. A duplicate gets the stored
        result; one that arrives while the first is running gets status "processing" and
        retry_after_seconds. Refused when target_server is not served here or the envelope is older
        than ttl_seconds."""
        with as_tool_errors():
            return await gateway.receive_handoff(envelope)

    @server.tool()
    async def context_get(session: SessionId) -> ContextOut:
        """A session's context: the summary of what came before its window, and the window's
        records (tool, server, arguments, result text, is_error, at_ms), oldest first."""
        with as_tool_errors():
            return ContextOut(session=session, context=await gateway.contexts.get(session))

    @server.tool()
    async def context_clear(session: SessionId) -> ContextCleared:
        """Empty a session's context, so the next task of a long session starts clean."""
        with as_tool_errors():
            return ContextCleared(session=session, cleared=await gateway.contexts.clear(session))

    @server.tool()
    async def map_tool(
        server: Annotated[str, Field(description="A server name from list_servers.")],
        tool: Annotated[str, Field(description="A tool of that server (list_tools).")],
        arguments: Annotated[list[dict[str, Any]], Field(description="One arguments object per call.")],
        ctx: Context,
        keys: Annotated[
            list[str] | None, Field(description="A key per call, returned with its result.")
        ] = None,
        timeout_s: Annotated[float, Field(gt=0, le=86_400, description="Longest wait for the result.")] = 300,
    ) -> MapResult:
        """Call one tool once per arguments object, on the swarm, and return every output and every
        failure: {job_id, total, successful: [{index, key, output}], failed: [{index, key, error}]}.
        Sends progress (settled of total) while it waits. After timeout_s it returns state
        "running" with the counts so far instead: poll job_status, page job_results."""
        with as_tool_errors():
            return await gateway.map_tool(server, tool, arguments, keys, timeout_s, ctx)


async def serve_stdio(settings: Settings) -> None:
    server, gateway = create_gateway(settings)
    try:
        await server.run_stdio_async()
    finally:
        await gateway.close()


async def serve_http(settings: Settings, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    server, gateway = create_gateway(settings, http_url=f"http://{host}:{port}")
    app = server.streamable_http_app(
        streamable_http_path="/mcp", host=host, transport_security=transport_security(settings, host)
    )
    # JSON logs are set up by the caller: uvicorn's loggers must not get text handlers of their own.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=log_config, lifespan="on"
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await gateway.close()
