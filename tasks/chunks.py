"""Celery tasks: unpack ids, call shared/, map errors. No logic lives here."""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.errors import RedisUnavailable
from shared.models import Chunk
from workers.app import RUN_CHUNK, runtime_of

REDIS_RETRY_COUNTDOWN_S = 2
REDIS_MAX_RETRIES = 30


@shared_task(name=RUN_CHUNK, bind=True, acks_late=True)
def run_chunk(self: Task, job_id: str, server: str, items: list[int], urgent: bool = False) -> dict[str, Any]:
    """Run one chunk of a job's items on this worker's event loop."""
    runtime = runtime_of(self.app)
    chunk = Chunk(job_id=job_id, server=server, items=items, urgent=urgent)
    delivery_tag = (self.request.properties or {}).get("delivery_tag")
    try:
        report = runtime.run_chunk(chunk, delivery_tag)
    except (RedisUnavailable, RedisConnectionError, RedisTimeoutError) as exc:
        raise self.retry(exc=exc, countdown=REDIS_RETRY_COUNTDOWN_S, max_retries=REDIS_MAX_RETRIES) from exc
    return report.model_dump()
