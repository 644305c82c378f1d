"""The HTTP API: submit, follow and cancel jobs. Built by ``create_api(settings)``, never at import."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import read_cluster, render
from api.wire import InvalidJob, JobIn, JobsPage, ResultsPage, Submitted, to_job_spec
from shared import events
from shared.context import ContextStore, SessionContext, open_context_store
from shared.embedded import redis_url
from shared.errors import InvalidSessionId, JobNotFound, JobRunning, JobSpecError, RedisUnavailable
from shared.fleet import ServerView, WorkerLife, live_workers, server_views
from shared.holds import with_holds
from shared.jobs import Enqueuer, resolve_items, submit_job
from shared.keys import Keys
from shared.models import JobState, JobStatus, ResultRecord
from shared.settings import Settings
from shared.store import JobStore, connect, ping

MAX_RESULTS_PAGE = 1000
MAX_JOBS_PAGE = 200
SSE_BLOCK_MS = 1000


def problem(status: int, message: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": message}
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(status_code=status, content=body)


class BodyLimit:
    """Refuses request bodies over ``limit`` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await problem(413, f"request body over {self.limit} bytes")(scope, receive, send)
            return
        seen = 0
        refused = False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit and not refused:
                    refused = True
                    await problem(413, f"request body over {self.limit} bytes")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:  # the 413 has gone out; whatever the app answers is dropped
                await send(message)

        await self.app(scope, limited, unless_refused)


def create_api(
    settings: Settings,
    enqueuer_factory: Callable[[Settings, Keys], Enqueuer] | None = None,
    *,
    max_body_bytes: int = 16 * 1024 * 1024,
) -> FastAPI:
    keys = Keys(settings.namespace)
    url = redis_url(settings)  # a missing Redis fails here, at start, not on the first request
    state: dict[str, Any] = {"url": url}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client = connect(url, socket_connect_timeout=5)
        state["store"] = JobStore(client, keys, settings.global_events_maxlen)
        if enqueuer_factory is None:
            from workers.app import CeleryEnqueuer, create_app

            state["enqueuer"] = CeleryEnqueuer(create_app(settings), keys)
        else:
            state["enqueuer"] = enqueuer_factory(settings, keys)
        if settings.context.store != "memory":  # the memory store lives inside each worker
            state["contexts"] = open_context_store(settings, client)
        try:
            yield
        finally:
            if "contexts" in state:
                await state["contexts"].close()
            await client.aclose()

    api = FastAPI(
        title="toolswarm",
        version="0.1.0",
        description="Bulk MCP tool calls on a swarm of stateless workers.",
        lifespan=lifespan,
    )
    api.add_middleware(BodyLimit, limit=max_body_bytes)

    def store() -> JobStore:
        return state["store"]  # type: ignore[no-any-return]

    async def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        token = settings.api_token.get_secret_value() if settings.api_token else None
        if token is None:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    Auth = Depends(authorized)

    @api.exception_handler(JobNotFound)
    async def _not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return problem(404, exc.message)

    @api.exception_handler(JobRunning)
    async def _running(_: Request, exc: JobRunning) -> JSONResponse:
        return problem(409, exc.message)

    @api.exception_handler(JobSpecError)
    async def _bad_job(_: Request, exc: JobSpecError) -> JSONResponse:
        return problem(422, exc.message)

    @api.exception_handler(InvalidJob)
    async def _invalid(_: Request, exc: InvalidJob) -> JSONResponse:
        return problem(422, "invalid job", exc.errors)

    @api.exception_handler(InvalidSessionId)
    async def _bad_session(_: Request, exc: InvalidSessionId) -> JSONResponse:
        return problem(422, exc.message)

    @api.exception_handler(RedisUnavailable)
    async def _unavailable(_: Request, exc: RedisUnavailable) -> JSONResponse:
        return problem(503, exc.message)

    @api.post("/v1/jobs", status_code=201, response_model=Submitted, dependencies=[Auth])
    async def create_job(
        body: JobIn, idempotency_key: Annotated[str | None, Header(max_length=200)] = None
    ) -> Submitted:
        """Submit a job. The same ``Idempotency-Key`` returns the same job."""
        spec = to_job_spec(body, idempotency_key)
        resolve_items(spec, settings)
        submitted = await submit_job(spec, settings, store(), state["enqueuer"])
        return Submitted(job_id=submitted.job_id, total=submitted.total, existing=submitted.existing)

    @api.get("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=[Auth])
    async def get_job(job_id: str) -> JobStatus:
        return await with_holds(store(), settings, await store().status(job_id))

    @api.get("/v1/jobs/{job_id}/results", response_model=ResultsPage, dependencies=[Auth])
    async def get_results(
        job_id: str,
        status: Literal["succeeded", "failed", "cancelled"] | None = None,
        step: Annotated[str | None, Query(description="Only items that failed at this step.")] = None,
        cursor: Annotated[str | None, Query(pattern=r"^\d+$")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_PAGE)] = 100,
    ) -> ResultsPage:
        """Settled results in item order; ``cursor`` is opaque (the next item index)."""
        page, next_index = await store().results_page(job_id, int(cursor or 0), limit, status, step)
        return ResultsPage(results=page, next_cursor=None if next_index is None else str(next_index))

    @api.post("/v1/jobs/{job_id}/retry", status_code=201, response_model=Submitted, dependencies=[Auth])
    async def retry(
        job_id: str,
        status: Literal["failed", "cancelled"] = "failed",
        error_type: str | None = None,
        step: str | None = None,
    ) -> Submitted:
        """A new job of this job's failed (or cancelled) items, optionally of one error type or step."""
        from shared.jobs import retry_job

        submitted = await retry_job(
            store(), settings, state["enqueuer"], job_id, status=status, error_type=error_type, step=step
        )
        return Submitted(job_id=submitted.job_id, total=submitted.total, existing=False)

    @api.get("/v1/jobs/{job_id}/reduce", response_model=ResultRecord, dependencies=[Auth])
    async def get_reduce(job_id: str) -> ResultRecord:
        """The job's reduce record, once it has settled."""
        record = await store().reduce_record(job_id)
        if record is None:
            raise HTTPException(404, f"job {job_id} has no reduce, or it has not settled yet")
        return record

    @api.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, dependencies=[Auth])
    async def cancel(job_id: str, reduce: bool = True) -> JobStatus:
        """Cancel; ``reduce=false`` cancels the job's reduce too instead of running it."""
        from shared.jobs import cancel_job

        return await cancel_job(store(), job_id, state["enqueuer"], run_reduce=reduce)

    @api.delete("/v1/jobs/{job_id}", response_model=JobStatus, dependencies=[Auth])
    async def delete(job_id: str, force: bool = False) -> JobStatus:
        """Delete a job now (its keys, results and events); returns its status just before. 409
        while it is pending or running, unless ``force=true``, which cancels it first."""
        from shared.retention import delete_job

        return await delete_job(store(), job_id, force=force)

    @api.get("/v1/jobs/{job_id}/events", dependencies=[Auth], response_class=StreamingResponse)
    async def job_events(
        job_id: str, last_event_id: Annotated[str | None, Header(pattern=r"^\d+-\d+$")] = None
    ) -> StreamingResponse:
        """Server-sent events of the job until job.completed; resumable with ``Last-Event-ID``."""
        await store().status(job_id)
        return StreamingResponse(sse(job_id, last_event_id), media_type="text/event-stream")

    async def sse(job_id: str, after: str | None) -> AsyncIterator[str]:
        client = store().client
        stream = keys.job(job_id).events
        last = after or ""
        for entry_id, fields in await events.history(client, stream, last):
            yield sse_message(entry_id, fields)
            last = entry_id
            if fields.get("type") == "job.completed":
                return
        if (await store().status(job_id)).done:
            return
        async for entry_id, fields in events.follow(client, stream, last or "$", SSE_BLOCK_MS):
            yield sse_message(entry_id, fields)
            if fields.get("type") == "job.completed":
                return

    @api.get("/v1/jobs", response_model=JobsPage, dependencies=[Auth])
    async def list_jobs(
        state: JobState | None = None,
        cursor: Annotated[str | None, Query(pattern=r"^\d+:[\w-]+$")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_JOBS_PAGE)] = 50,
    ) -> JobsPage:
        """Jobs, newest first, optionally of one state; ``cursor`` is opaque. A filtered page may
        come back short (it looks at a bounded number of jobs) with a cursor to go on from."""
        jobs, next_cursor = await store().jobs_page(cursor, limit, state)
        return JobsPage(jobs=jobs, next_cursor=next_cursor)

    @api.get("/v1/servers", response_model=list[ServerView], dependencies=[Auth])
    async def servers() -> list[ServerView]:
        """Every configured server: health from its last probe, calls in flight, queued chunks."""
        return await server_views(store(), settings)

    @api.get("/v1/workers", response_model=list[WorkerLife], dependencies=[Auth])
    async def workers() -> list[WorkerLife]:
        """The live worker processes (their heartbeats in Redis)."""
        return await live_workers(store())

    def contexts() -> ContextStore:
        if "contexts" not in state:
            raise HTTPException(409, "the memory context store lives inside each worker: use redis or sqlite")
        return state["contexts"]  # type: ignore[no-any-return]

    @api.get("/v1/context/{session}", response_model=SessionContext, dependencies=[Auth])
    async def get_context(session: str) -> SessionContext:
        """A session's context: the summary before its window and the window's records."""
        found = await contexts().get(session)
        if found is None:
            raise HTTPException(404, f"session {session} has no context (never written, cleared, or evicted)")
        return found

    @api.delete("/v1/context/{session}", dependencies=[Auth])
    async def clear_context(session: str) -> dict[str, bool]:
        """Empty a session's context; ``cleared`` is false when it had none."""
        return {"cleared": await contexts().clear(session)}

    @api.get("/metrics", dependencies=[Auth], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics of the whole cluster, read from Redis now (the same bearer token as /v1)."""
        reading = await read_cluster(store(), settings)
        return Response(render(reading), media_type=CONTENT_TYPE_LATEST)

    @api.get("/healthz")
    async def healthz() -> dict[str, bool]:
        """The process is up."""
        return {"ok": True}

    @api.get("/readyz")
    async def readyz() -> JSONResponse:
        """Redis answers: the API can take jobs."""
        try:
            await ping(state["url"])
        except RedisUnavailable as exc:
            return problem(503, exc.message)
        return JSONResponse({"ok": True})

    # The dashboard: static files that read the routes above (with the same bearer token).
    @api.get("/ui", include_in_schema=False)
    async def ui_slash() -> RedirectResponse:
        return RedirectResponse("/ui/")

    api.mount("/ui", StaticFiles(directory=Path(__file__).parent / "ui", html=True), name="ui")

    return api


def sse_message(entry_id: str, fields: dict[str, str]) -> str:
    return f"id: {entry_id}\nevent: {fields.get('type', 'message')}\ndata: {json.dumps(fields)}\n\n"
