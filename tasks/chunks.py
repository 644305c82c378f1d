"""Celery tasks: unpack ids, call shared/, map errors. No logic lives here."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject

from shared.execution import ChunkHandedBack
from shared.executor import REDIS_ERRORS
from shared.models import Chunk
from workers.app import RUN_CHUNK, runtime_of


@shared_task(name=RUN_CHUNK, bind=True, acks_late=True)
def run_chunk(
    self: Task,
    job_id: str,
    server: str,
    items: list[int],
    urgent: bool = False,
    isolated: bool = False,
    handoff: bool = False,
) -> dict[str, Any]:
    """Run one chunk of a job's items on this worker's event loop (the task id is the chunk id).

    While Redis is unreachable the runtime holds the message and tries again; only a worker that
    is shutting down hands it back to its queue."""
    runtime = runtime_of(self.app)
    chunk = Chunk(
        job_id=job_id,
        server=server,
        items=items,
        urgent=urgent,
        isolated=isolated,
        handoff=handoff,
        id=self.request.id,
    )
    delivery_tag = (self.request.properties or {}).get("delivery_tag")
    try:
        report = runtime.run_chunk(chunk, delivery_tag)
    except (ChunkHandedBack, *REDIS_ERRORS) as exc:
        raise Reject(exc, requeue=True) from exc
    return report.model_dump()
