"""The job view as a pure fold of the job's events (the ``log`` state mode).

Events are flat string maps, as Redis streams carry them:
- ``job.submitted``   total
- ``job.started``
- ``item.settled``    index, status (succeeded | failed | cancelled), degraded ("1", optional),
                      failure ('["STEP","ERROR_TYPE"]', optional)
- ``job.completed``   state (finished | cancelled)
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.eventlog import Event
from shared.models import JobState


class JobView(BaseModel):
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    state: JobState = "pending"
    finished_at_ms: int | None = None
    events: int = 0
    degraded: int = 0
    failures: dict[str, int] = Field(default_factory=dict)  # '["STEP","ERROR_TYPE"]' -> items


def apply_job_event(view: JobView, event: Event) -> JobView:
    """One step of the fold. Pure: the same events always give the same view."""
    kind = event.get("type")
    update: dict[str, object] = {"events": view.events + 1}
    if kind == "job.submitted":
        update["total"] = int(event["total"])
    elif kind == "job.started" and view.state == "pending":
        update["state"] = "running"
    elif kind == "item.settled":
        status = event["status"]
        if status in ("succeeded", "failed", "cancelled"):
            update[status] = getattr(view, status) + 1
        if event.get("degraded") == "1":
            update["degraded"] = view.degraded + 1
        failure = event.get("failure")
        if failure:
            update["failures"] = {**view.failures, failure: view.failures.get(failure, 0) + 1}
        if view.state == "pending":
            update["state"] = "running"
    elif kind == "job.completed":
        update["state"] = event.get("state", "finished")
        if "at_ms" in event:
            update["finished_at_ms"] = int(event["at_ms"])
    return view.model_copy(update=update)
