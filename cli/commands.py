"""What the CLI commands do, as plain functions: settings in, models out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TextIO

from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from cli import display, export
from cli.export import ExportFormat
from shared import events
from shared.context import ContextStore, SessionContext, open_context_store, validate_session_id
from shared.doctor import Diagnosis, diagnose
from shared.embedded import redis_url
from shared.errors import ConfigError, JobSpecError
from shared.fleet import Fleet
from shared.fleet import fleet as read_fleet
from shared.holds import with_holds
from shared.jobs import (
    Enqueuer,
    Submitted,
    cancel_job,
    read_items_file,
    read_pipeline_file,
    read_reduce_file,
    resolve_items,
    retry_job,
    submit_job,
)
from shared.keys import Keys
from shared.models import JobSpec, JobState, JobStatus, ResultRecord
from shared.redaction import redacted_url
from shared.settings import Settings, describe_validation_error
from shared.store import JobStore, connect, ping

WATCH_REFRESH_S = 0.1  # progress redraws at most this often, however fast items settle


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[JobStore]:
    url = redis_url(settings)
    try:
        client = connect(url, socket_connect_timeout=5)
    except ValueError as exc:  # redis-py rejects a malformed URL with ValueError
        raise ConfigError(f"invalid Redis URL {redacted_url(url)!r}: {exc}") from None
    try:
        await ping(url)
        yield JobStore(client, Keys(settings.namespace), settings.global_events_maxlen)
    finally:
        await client.aclose()


def submit(
    settings: Settings,
    items_file: Path,
    *,
    pipeline_file: Path | None = None,
    reduce_file: Path | None = None,
    server: str | None = None,
    tool: str | None = None,
    idempotency_key: str | None = None,
    chunk_size: int | None = None,
    state_mode: str | None = None,
    validate: bool = True,
    retry_attempts: int | None = None,
) -> Submitted:
    pipeline = read_pipeline_file(pipeline_file) if pipeline_file is not None else None
    reduce = read_reduce_file(reduce_file) if reduce_file is not None else None
    items = read_items_file(
        items_file, default_server=server, default_tool=tool, pipeline=pipeline is not None
    )
    try:
        spec = JobSpec.model_validate(
            {
                "items": items,
                "pipeline": pipeline,
                "reduce": reduce,
                "server": server,
                "tool": tool,
                "idempotency_key": idempotency_key,
                "chunk_size": chunk_size,
                "state_mode": state_mode,
                "validate_arguments": validate,
                "retry": None if retry_attempts is None else {"attempts": retry_attempts},
            }
        )
    except ValidationError as exc:  # e.g. --chunk-size above the limit
        raise JobSpecError(describe_validation_error(exc)) from None
    resolve_items(spec, settings)  # refuse bad input before touching Redis or the broker

    async def go() -> Submitted:
        async with open_store(settings) as store:
            enqueuer = celery_enqueuer(settings, store)
            return await submit_job(spec, settings, store, enqueuer)

    return asyncio.run(go())


def check_connections(settings: Settings) -> None:
    """Fail at start, in one line naming the URL without its secret, when the state Redis or the
    broker cannot be reached or refuses the URL's credentials (a worker or the API would otherwise
    start and retry forever)."""
    from workers.app import CeleryEnqueuer, create_app

    asyncio.run(ping(redis_url(settings)))
    CeleryEnqueuer(create_app(settings), Keys(settings.namespace)).check()


def celery_enqueuer(settings: Settings, store: JobStore) -> Enqueuer:
    """The broker side of the commands that enqueue or read queues (imported late: Celery's app
    costs a second to import, and most commands never need it)."""
    from workers.app import CeleryEnqueuer, create_app

    return CeleryEnqueuer(create_app(settings), store.keys)


def doctor(settings: Settings, job_id: str | None) -> Diagnosis:
    async def go() -> Diagnosis:
        async with open_store(settings) as store:
            enqueuer = celery_enqueuer(settings, store)
            return await diagnose(store, enqueuer, settings, job_id)

    return asyncio.run(go())


def status(settings: Settings, job_id: str) -> JobStatus:
    async def go() -> JobStatus:
        async with open_store(settings) as store:
            return await with_holds(store, settings, await store.status(job_id))

    return asyncio.run(go())


def cancel(settings: Settings, job_id: str, run_reduce: bool = True) -> JobStatus:
    async def go() -> JobStatus:
        async with open_store(settings) as store:
            enqueuer = celery_enqueuer(settings, store)
            return await cancel_job(store, job_id, enqueuer, run_reduce=run_reduce)

    return asyncio.run(go())


def delete(settings: Settings, job_id: str, force: bool = False) -> JobStatus:
    """Delete a job now; its status just before it went."""
    from shared.retention import delete_job

    async def go() -> JobStatus:
        async with open_store(settings) as store:
            return await delete_job(store, job_id, force=force)

    return asyncio.run(go())


def jobs(settings: Settings, state: str | None, limit: int) -> list[JobStatus]:
    """Up to ``limit`` jobs newest first, of one state if asked (the pages GET /v1/jobs serves)."""
    wanted = TypeAdapter(JobState | None).validate_python(state)

    async def go() -> list[JobStatus]:
        found: list[JobStatus] = []
        cursor: str | None = None
        async with open_store(settings) as store:
            while len(found) < limit:
                page, cursor = await store.jobs_page(cursor, limit - len(found), wanted)
                found += page
                if cursor is None:
                    break
        return found

    return asyncio.run(go())


def retry(
    settings: Settings, job_id: str, status: str, error_type: str | None, step: str | None
) -> Submitted:
    async def go() -> Submitted:
        async with open_store(settings) as store:
            enqueuer = celery_enqueuer(settings, store)
            return await retry_job(
                store, settings, enqueuer, job_id, status=status, error_type=error_type, step=step
            )

    return asyncio.run(go())


def reduce_record(settings: Settings, job_id: str) -> ResultRecord | None:
    async def go() -> ResultRecord | None:
        async with open_store(settings) as store:
            return await store.reduce_record(job_id)

    return asyncio.run(go())


def export_results(
    settings: Settings,
    job_id: str,
    out: TextIO,
    fmt: ExportFormat = "jsonl",
    status_filter: str | None = None,
    step: str | None = None,
) -> int:
    """Stream the job's results to ``out`` (see cli/export.py); returns how many were written."""

    async def go() -> int:
        async with open_store(settings) as store:
            await store.status(job_id)  # an unknown job fails here, before anything is written
            return await export.export_results(store, job_id, out, fmt, status_filter, step)

    return asyncio.run(go())


async def watch_job(store: JobStore, job_id: str, console: Console) -> JobStatus:
    """Redraw the progress bar as the job's events move (at most every WATCH_REFRESH_S) until it ends."""
    started = time.monotonic()
    updates = store.follow(job_id, every_s=WATCH_REFRESH_S)
    job = await anext(updates)  # an unknown job fails here, before anything is drawn
    with display.job_progress(console) as progress:
        bar = progress.add_task(
            f"job {job_id}", total=job.total, completed=job.settled, **display.progress_fields(job, 0.0)
        )
        async for job in updates:
            progress.update(
                bar, completed=job.settled, **display.progress_fields(job, time.monotonic() - started)
            )
    return job


def watch(settings: Settings, job_id: str, console: Console) -> JobStatus:
    async def go() -> JobStatus:
        async with open_store(settings) as store:
            return await watch_job(store, job_id, console)

    return asyncio.run(go())


def fleet(settings: Settings) -> Fleet:
    """Every server's health, load and queue, and the live workers."""

    async def go() -> Fleet:
        async with open_store(settings) as store:
            return await read_fleet(store, settings)

    return asyncio.run(go())


def print_events(
    settings: Settings,
    *,
    job: str | None,
    follow: bool,
    group: str | None,
    consumer: str,
    as_json: bool,
    console: Console,
) -> None:
    """History then (with --follow) live events; a job's stream ends at its job.completed."""

    def show(entry_id: str, fields: dict[str, str]) -> None:
        if as_json:
            print(json.dumps({"id": entry_id, **fields}), flush=True)
        else:
            console.print(display.event_line(entry_id, fields), highlight=False)

    async def go() -> None:
        async with open_store(settings) as store:
            if job is not None:
                await store.status(job)  # JobNotFound for an unknown job
            stream = store.keys.job(job).events if job else store.keys.events
            if group:
                async for entry_id, fields in events.consume(store.client, stream, group, consumer):
                    show(entry_id, fields)
                return
            last = ""
            for entry_id, fields in await events.history(store.client, stream):
                show(entry_id, fields)
                last = entry_id
            if not follow or (job and (await store.status(job)).done):
                return
            async for entry_id, fields in events.follow(store.client, stream, last or "$"):
                show(entry_id, fields)
                if job and fields.get("type") == "job.completed":
                    return

    asyncio.run(go())


@asynccontextmanager
async def open_contexts(settings: Settings) -> AsyncIterator[ContextStore]:
    """The sessions' context store the workers use, from outside them."""
    if settings.context.store == "memory":
        raise ConfigError(
            "the memory context store lives inside each worker process: "
            "set [context] store to redis or sqlite to read or clear it from here"
        )
    async with open_store(settings) as store:
        contexts = open_context_store(settings, store.client)
        try:
            yield contexts
        finally:
            await contexts.close()


def context_show(settings: Settings, session: str) -> SessionContext | None:
    session = validate_session_id(session)

    async def go() -> SessionContext | None:
        async with open_contexts(settings) as contexts:
            return await contexts.get(session)

    return asyncio.run(go())


def context_clear(settings: Settings, session: str) -> bool:
    session = validate_session_id(session)

    async def go() -> bool:
        async with open_contexts(settings) as contexts:
            return await contexts.clear(session)

    return asyncio.run(go())
