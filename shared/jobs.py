"""Submit, cancel and read jobs: the one implementation behind the CLI, the API and the gateway."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jsonschema import Draft202012Validator
from pydantic import ValidationError

from shared.dag import plan_needs
from shared.errors import JobNotFound, JobSpecError
from shared.metrics import count_settled
from shared.models import (
    Chunk,
    ItemSpec,
    JobSpec,
    JobStatus,
    PipelineSpec,
    ReduceSpec,
    ResultRecord,
    StepSpec,
    item_id,
)
from shared.probes import ProbeFailed, tool_schemas
from shared.refs import find_references, within_reference
from shared.settings import Settings, describe_validation_error
from shared.store import JobStore, Settlement, now_ms

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20
CANCEL_BATCH = 1000
IDEMPOTENT_WAIT_S = 30.0


class Enqueuer(Protocol):
    """Puts chunks on the servers' queues (implemented with Celery in workers/)."""

    def check(self) -> None:
        """Raise RedisUnavailable when the broker cannot be reached."""

    def enqueue(self, chunks: Sequence[Chunk]) -> None:
        """Put chunks on their servers' queues; urgent ones (taken back from a dead worker) go
        ahead of new work."""

    def restore_orphans(self, older_than_s: float, live: set[str]) -> int:
        """Put back on their queues the chunk messages delivered more than ``older_than_s`` ago
        that are still unacknowledged and not in ``live`` (so their worker died before claiming
        their items); return how many."""

    def chunks_in_broker(self, servers: Iterable[str]) -> BrokerView | None:
        """The ids of the chunks whose messages the broker holds for these servers, queued or
        delivered and unacknowledged; None when the broker cannot be read that way."""


@dataclass(frozen=True)
class BrokerView:
    """Chunk ids (Celery task ids) of the messages a broker holds: waiting in a queue, or delivered
    to a consumer and not yet acknowledged."""

    queued: frozenset[str]
    delivered: frozenset[str]

    def holds(self, chunk_id: str) -> bool:
        return chunk_id in self.queued or chunk_id in self.delivered


@dataclass(frozen=True)
class Submitted:
    job_id: str
    total: int
    chunks: int
    existing: bool = False


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


PIPELINE_LINE_FIELDS = {"input", "key", "session"}


def parse_items_lines(
    lines: Iterable[str],
    *,
    default_server: str | None = None,
    default_tool: str | None = None,
    pipeline: bool = False,
) -> list[ItemSpec]:
    """Parse JSON Lines into items, filling in defaults; every bad line is reported with its number.
    With ``pipeline`` (the job has one) a line brings only its input and key."""
    items: list[ItemSpec] = []
    errors: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"line {number}: invalid JSON: {exc.msg} (column {exc.colno})")
            continue
        if not isinstance(raw, dict):
            errors.append(f"line {number}: expected a JSON object, got {type(raw).__name__}")
            continue
        if pipeline and set(raw) - PIPELINE_LINE_FIELDS:
            extra = ", ".join(sorted(set(raw) - PIPELINE_LINE_FIELDS))
            errors.append(
                f"line {number}: the job has a pipeline: a line carries only input, key and session, "
                f"not {extra}"
            )
            continue
        if not pipeline:
            if default_tool and raw.get("tool") is None and raw.get("steps") is None:
                raw["tool"] = default_tool
            if default_server and raw.get("server") is None:
                raw["server"] = default_server
        try:
            item = ItemSpec.model_validate(raw)
        except ValidationError as exc:
            errors.append(f"line {number}: {describe_validation_error(exc)}")
            continue
        if not pipeline and item.tool is None and item.steps is None:
            errors.append(f"line {number}: tool: Field required (or give the item steps)")
            continue
        item._line = number
        items.append(item)
    if errors:
        raise JobSpecError(_summarise(errors))
    if not items:
        raise JobSpecError("no items: the items file is empty")
    return items


def read_items_file(path: str | Path, **options: Any) -> list[ItemSpec]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JobSpecError(f"items file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"cannot read items file {path}: {exc}") from None
    return parse_items_lines(text.splitlines(), **options)


def read_json_file(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise JobSpecError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobSpecError(f"cannot read {what} file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise JobSpecError(f"{what} file {path}: invalid JSON: {exc.msg} (line {exc.lineno})") from None


def read_pipeline_file(path: str | Path) -> PipelineSpec:
    """A pipeline file: ``{"steps": [...]}``, checked as a whole (names, references)."""
    try:
        return PipelineSpec.model_validate(read_json_file(path, "pipeline"))
    except ValidationError as exc:
        raise JobSpecError(f"pipeline file {path}: {describe_validation_error(exc)}") from None


def read_reduce_file(path: str | Path) -> ReduceSpec:
    """A reduce file: ``{"tool", "server"?, "arguments", "timeout_s"?, "retry"?}``."""
    try:
        return ReduceSpec.model_validate(read_json_file(path, "reduce"))
    except ValidationError as exc:
        raise JobSpecError(f"reduce file {path}: {describe_validation_error(exc)}") from None


def resolve_steps(
    steps: Sequence[StepSpec], default_server: str | None, settings: Settings, where: str
) -> tuple[list[StepSpec], list[str]]:
    """Give every step its server (its own, else the item's or the job's), checked against the
    registry; returns the steps and what is wrong with them."""
    resolved: list[StepSpec] = []
    errors: list[str] = []
    for step in steps:
        server = step.server or default_server
        if not server:
            errors.append(f"{where}: step {step.name!r}: no server (name one on the step, item or job)")
        elif server not in settings.servers:
            errors.append(f"{where}: step {step.name!r}: {unknown_server(server, settings)}")
        resolved.append(step if step.server == server else step.model_copy(update={"server": server}))
    return resolved, errors


def unknown_server(server: str, settings: Settings) -> str:
    known = ", ".join(sorted(settings.servers)) or "none configured"
    return f"unknown server {server!r} (known: {known})"


def resolve_pipeline(spec: JobSpec, settings: Settings) -> PipelineSpec | None:
    """The job's pipeline with every step's server resolved; JobSpecError if one is unknown."""
    if spec.pipeline is None:
        return None
    steps, errors = resolve_steps(spec.pipeline.steps, spec.server, settings, "pipeline")
    if errors:
        raise JobSpecError(_summarise(errors))
    return PipelineSpec(steps=steps)


def resolve_reduce(spec: JobSpec, settings: Settings) -> ReduceSpec | None:
    """The job's reduce with its server resolved (its own, else the job's); JobSpecError if unknown."""
    if spec.reduce is None:
        return None
    server = spec.reduce.server or spec.server
    if not server:
        raise JobSpecError("reduce: no server (name one on the reduce or for the whole job)")
    if server not in settings.servers:
        raise JobSpecError(f"reduce: {unknown_server(server, settings)}")
    return spec.reduce.model_copy(update={"server": server})


def resolve_items(spec: JobSpec, settings: Settings) -> list[ItemSpec]:
    """Give every item (and every step) its server, checking servers against the registry (an
    allow-list). A pipeline item is queued for its first step's server."""
    pipeline = resolve_pipeline(spec, settings)
    resolve_reduce(spec, settings)
    resolved: list[ItemSpec] = []
    errors: list[str] = []
    for number, item in enumerate(spec.items, start=1):
        where = item.where(number)
        if pipeline is not None:
            if item.tool is not None or item.steps is not None or item.arguments or item.server or item.needs:
                errors.append(f"{where}: the job has a pipeline: an item carries only input and key")
                continue
            resolved.append(item.model_copy(update={"server": pipeline.steps[0].server}))
            continue
        if item.steps is not None:
            steps, problems = resolve_steps(item.steps, item.server or spec.server, settings, where)
            errors.extend(problems)
            resolved.append(item.model_copy(update={"steps": steps, "server": steps[0].server}))
            continue
        if item.tool is None and spec.tool is None:
            errors.append(f"{where}: no tool (name one on the item or for the whole job, or give steps)")
            continue
        if item.input is not None:
            errors.append(f"{where}: input is for pipeline items (give steps, or the job a pipeline)")
            continue
        server = item.server or spec.server
        if not server:
            errors.append(f"{where}: no server (name one on the item or for the whole job)")
            continue
        if server not in settings.servers:
            errors.append(f"{where}: {unknown_server(server, settings)}")
            continue
        update: dict[str, Any] = {"server": server}
        if item.tool is None:
            update["tool"] = spec.tool
        resolved.append(item if item.server == server and item.tool else item.model_copy(update=update))
    if pipeline is None and not errors:
        errors += plan_needs(resolved)[1]
    if errors:
        raise JobSpecError(_summarise(errors))
    return resolved


class ArgumentChecker:
    """Checks calls against the tools their servers list (from the tools cache the probes keep, or
    listed now): the tool exists and the literal part of its arguments fits its input schema (a
    ``$from`` reference is checked once resolved, at run time)."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self._schemas: dict[str, dict[str, Any]] = {}
        self._validators: dict[tuple[str, str], Draft202012Validator] = {}

    async def problems(self, server: str, tool: str, arguments: dict[str, Any], where: str) -> list[str]:
        if server not in self._schemas:
            try:
                self._schemas[server] = await tool_schemas(
                    self.store.client, self.store.keys, server, self.settings.server(server)
                )
            except ProbeFailed as exc:
                raise JobSpecError(f"{exc}; submit without validation to let the workers try later") from None
        schemas = self._schemas[server]
        if tool not in schemas:
            return [f"{where}: unknown tool {tool!r} on server {server!r}"]
        validator = self._validators.get((server, tool))
        if validator is None:
            validator = self._validators[(server, tool)] = Draft202012Validator(schemas[tool] or {})
        if validator.is_valid(arguments):  # the common case, without collecting errors
            return []
        references = list(find_references(arguments))
        found = []
        for problem in sorted(validator.iter_errors(arguments), key=lambda e: list(e.path)):
            if within_reference(problem.path, references, str(problem.validator)):
                continue
            location = ".".join(["arguments", *(str(p) for p in problem.path)])
            found.append(f"{where}: {location}: {problem.message}")
        return found

    async def steps(self, steps: Sequence[StepSpec], where: str) -> list[str]:
        found = []
        for step in steps:
            at = f"{where}: step {step.name!r}"
            found += await self.problems(step.server or "", step.tool, step.arguments, at)
        return found


async def validate_arguments(
    items: Sequence[ItemSpec],
    settings: Settings,
    store: JobStore,
    pipeline: PipelineSpec | None = None,
    reduce: ReduceSpec | None = None,
) -> None:
    """Check every call of the job (each item's, each step's, the pipeline's and the reduce's once)
    against its tool. Every bad item is reported."""
    checker = ArgumentChecker(settings, store)
    errors: list[str] = []
    if reduce is not None:
        errors += await checker.problems(reduce.server or "", reduce.tool, reduce.arguments, "reduce")
    if pipeline is not None:
        errors += await checker.steps(pipeline.steps, "pipeline")
    for number, item in enumerate(items, start=1):
        if item.steps is not None:
            errors += await checker.steps(item.steps, item.where(number))
        elif item.tool is not None:
            errors += await checker.problems(item.server or "", item.tool, item.arguments, item.where(number))
    if errors:
        raise JobSpecError(_summarise(errors))


def plan_chunks(job_id: str, items: Sequence[ItemSpec], chunk_size: int) -> list[Chunk]:
    """Group item indexes by server, then cut each group into chunks of ``chunk_size``. Items with
    needs are left out: the commit that settles their last need enqueues them."""
    by_server: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        if not item.needs:
            by_server[item.server or ""].append(index)
    return cut_chunks(job_id, by_server, chunk_size)


def cut_chunks(
    job_id: str, by_server: Mapping[str, Sequence[int]], size: int, *, urgent: bool = False
) -> list[Chunk]:
    """Each server's item indexes in chunks of ``size``."""
    return [
        Chunk(job_id=job_id, server=server, items=list(indexes[start : start + size]), urgent=urgent)
        for server, indexes in by_server.items()
        for start in range(0, len(indexes), size)
    ]


async def submit_job(spec: JobSpec, settings: Settings, store: JobStore, enqueuer: Enqueuer) -> Submitted:
    """Validate, record and enqueue a job. Nothing is written or enqueued unless all of it is valid."""
    items = resolve_items(spec, settings)
    pipeline = resolve_pipeline(spec, settings)
    reduce = resolve_reduce(spec, settings)
    if spec.validate_arguments:
        await validate_arguments(items, settings, store, pipeline, reduce)
    await asyncio.to_thread(enqueuer.check)
    job_id = new_job_id()
    if spec.idempotency_key:
        bound = await store.reserve_idempotency_key(spec.idempotency_key, job_id)
        if bound != job_id:
            status = await _bound_job(store, bound)
            return Submitted(job_id=bound, total=status.total, chunks=0, existing=True)
    try:
        state_mode = spec.state_mode or settings.state.mode
        servers = {item.server or "" for item in items}
        for item in items:
            servers.update(step.server or "" for step in item.steps or ())
        servers.update(step.server or "" for step in (pipeline.steps if pipeline else ()))
        if reduce is not None:
            servers.add(reduce.server or "")
        needs, problems = plan_needs(items)
        if problems:  # resolve_items refuses these; never write a job whose needs cannot settle
            raise JobSpecError(_summarise(problems))
        chunk_size = spec.chunk_size or settings.worker.chunk_size
        await store.create_job(
            job_id,
            items,
            servers,
            state_mode,
            spec.retry,
            pipeline,
            reduce,
            needs,
            chunk_size,
            ttl_s=settings.state.job_ttl_s,
            idempotency_key=spec.idempotency_key,
        )
        chunks = plan_chunks(job_id, items, chunk_size)
        window = await job_window(store, settings)
        await store.push_backlog(job_id, chunks[window:])
        await send_chunks(store, enqueuer, chunks[:window])
        await store.activate(job_id)
    except BaseException:
        # Leave nothing half-made behind: no job without its chunks, no key bound to a lost job.
        await store.discard_job(job_id, spec.idempotency_key)
        raise
    return Submitted(job_id=job_id, total=len(items), chunks=len(chunks))


async def job_window(store: JobStore, settings: Settings) -> int:
    """How many chunks of one job sit in the queues at once. The rest wait in the job's backlog
    and each finished chunk feeds one more, so a small job submitted behind a huge one queues
    behind at most this many chunks, while every worker thread still has work."""
    threads = await store.live_worker_count() * settings.worker.chunks_in_flight
    return max(settings.worker.job_window_chunks, 2 * threads)


async def send_chunks(store: JobStore, enqueuer: Enqueuer, chunks: Sequence[Chunk]) -> None:
    """Record the chunks as outstanding, then put them on their queues: a chunk the broker holds is
    always one the coverage sweep knows of (a record without its message is what it looks for)."""
    if chunks:
        await store.record_chunks(chunks)
        await asyncio.to_thread(enqueuer.enqueue, chunks)


async def feed_next(
    store: JobStore, enqueuer: Enqueuer, job_id: str, finished_chunk: str | None = None
) -> bool:
    """Enqueue the next chunk of the job's backlog (after one of its chunks, ``finished_chunk``,
    finished: its record is dropped on the way)."""
    head = await store.backlog_head(job_id, finished_chunk)
    if head is None:
        return False
    await send_chunks(store, enqueuer, [Chunk.model_validate_json(head)])
    await store.pop_backlog_head(job_id, head)
    return True


async def _bound_job(store: JobStore, job_id: str) -> JobStatus:
    """The job an idempotency key is bound to; a concurrent submitter may still be writing it."""
    deadline = time.monotonic() + IDEMPOTENT_WAIT_S
    while True:
        try:
            return await store.status(job_id)
        except JobNotFound:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


RETRYABLE_STATUSES = ("failed", "cancelled")


async def retry_job(
    store: JobStore,
    settings: Settings,
    enqueuer: Enqueuer,
    job_id: str,
    *,
    status: str = "failed",
    error_type: str | None = None,
    step: str | None = None,
) -> Submitted:
    """Submit a new job of the items of ``job_id`` that ended ``status`` (optionally with that
    error type, or failing at that step): the same specs, keys, pipeline, reduce and retry policy.
    The new job records ``retry_of``, the old one ``retried_by``; nothing runs again in the old job."""
    if status not in RETRYABLE_STATUSES:
        raise JobSpecError(f"retry takes failed or cancelled items, not {status!r}")
    plan = await store.job_plan(job_id)
    old = await store.status(job_id)
    chosen = [
        record.index
        async for record in store.results(job_id)
        if record.matches(status, step)
        and (error_type is None or (record.error is not None and record.error.type == error_type))
    ]
    if not chosen:
        raise JobSpecError(f"job {job_id} has no {status} items{_filters(error_type, step)} to retry")
    specs = await store.item_specs(job_id, chosen)
    retried_keys = {specs[i].key for i in chosen}
    outside = [
        (specs[i].key, need) for i in chosen for need in specs[i].needs or () if need not in retried_keys
    ]
    if outside:
        said = ", ".join(f"{key!r} needs {need!r}" for key, need in outside[:5])
        raise JobSpecError(
            f"cannot retry items whose needs are not retried with them ({said}): "
            "widen the filter to take their needs too"
        )
    items = [specs[i].model_copy(update={"server": None}) if plan.pipeline else specs[i] for i in chosen]
    spec = JobSpec(
        items=items,
        pipeline=plan.pipeline,
        reduce=plan.reduce,
        retry=plan.retry,
        state_mode=old.state_mode,
    )
    submitted = await submit_job(spec, settings, store, enqueuer)
    new_meta, old_meta = store.keys.job(submitted.job_id).meta, store.keys.job(job_id).meta
    await store.client.hset(new_meta, "retry_of", job_id)
    await store.write_live(old_meta, old_meta, "HSET", "retried_by", submitted.job_id)
    return submitted


def _filters(error_type: str | None, step: str | None) -> str:
    said = [f"error type {error_type!r}"] if error_type else []
    said += [f"failing at step {step!r}"] if step else []
    return f" with {' and '.join(said)}" if said else ""


async def send_ready(enqueuer: Enqueuer | None, chunks: Sequence[Chunk]) -> None:
    """Put what a commit made ready (a job's reduce, items whose needs settled) on its queues. The
    commit recorded these chunks as outstanding, so if this fails (or never happens: no enqueuer,
    a worker killed here) the coverage sweep sends them."""
    if enqueuer is None or not chunks:
        return
    try:
        await asyncio.to_thread(enqueuer.enqueue, chunks)
    except Exception as exc:  # the results committed are what matters; the sweep has the chunks
        log.warning(
            "job %s: could not enqueue %d ready chunks (%s); the sweep will",
            chunks[0].job_id,
            len(chunks),
            exc,
        )


async def cancel_job(
    store: JobStore, job_id: str, enqueuer: Enqueuer | None = None, *, run_reduce: bool = True
) -> JobStatus:
    """Stop a job: no item starts after this, and every unsettled item settles as cancelled. A
    job's reduce still runs over what settled (cancelled items among the failed), unless
    ``run_reduce`` is false: then it settles as cancelled too (and stays so, whoever finishes a
    cancel that died half-way)."""
    run_reduce = await store.request_cancel(job_id, cancel_reduce=not run_reduce) and run_reduce
    await store.client.delete(store.keys.job(job_id).backlog)
    status = await store.status(job_id)
    ready: Chunk | None = None
    for start in range(0, status.total, CANCEL_BATCH):
        indexes = await store.unsettled(job_id, range(start, min(start + CANCEL_BATCH, status.total)))
        if not indexes:
            continue
        specs = await store.item_specs(job_id, indexes)
        settlements = [
            Settlement(record=cancelled(job_id, index, spec), epoch=0) for index, spec in specs.items()
        ]
        outcome = await store.commit(job_id, settlements, force=True)
        await count_settled(store.client, store.keys, "cancelled", outcome.committed, outcome.refused)
        ready = outcome.reduce_chunk or ready
    if status.reduce is not None and not run_reduce:
        await _cancel_reduce(store, job_id, status.total)
    elif ready is not None:
        await send_ready(enqueuer, [ready])
    return await store.status(job_id)


async def _cancel_reduce(store: JobStore, job_id: str, index: int) -> None:
    specs = await store.item_specs(job_id, [index])
    if index not in specs or not await store.unsettled(job_id, [index]):
        return
    await store.commit(
        job_id, [Settlement(record=cancelled(job_id, index, specs[index]), epoch=0)], force=True
    )


def cancelled(job_id: str, index: int, spec: ItemSpec) -> ResultRecord:
    return ResultRecord(
        item_id=item_id(job_id, index),
        job_id=job_id,
        index=index,
        tool=spec.tool or "pipeline",
        server=spec.server or "",
        key=spec.key,
        status="cancelled",
        finished_at_ms=now_ms(),
    )


def _summarise(errors: list[str]) -> str:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")
