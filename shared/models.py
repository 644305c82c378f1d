"""Pydantic models at every boundary: items in, result records and job views out."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.settings import RetryPolicy

ItemStatus = Literal["succeeded", "failed", "cancelled"]
JobState = Literal["pending", "running", "finished", "cancelled"]
StateMode = Literal["cas", "log"]


class ItemSpec(BaseModel):
    """One line of an items file: a tool call."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    server: str | None = None
    key: str | None = None


class JobSpec(BaseModel):
    """What a caller submits. ``server`` and ``tool`` fill in items that omit them."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemSpec] = Field(min_length=1)
    server: str | None = None
    tool: str | None = None
    idempotency_key: str | None = None
    chunk_size: int | None = Field(default=None, ge=1, le=10_000)
    state_mode: StateMode | None = None
    retry: RetryPolicy | None = None  # overrides the servers' retry policies for this job
    validate_arguments: bool = True  # check arguments against the tools' input schemas at submit


class CallResult(BaseModel):
    """What the MCP server returned for one call."""

    content: list[dict[str, Any]] = Field(default_factory=list)
    structured_content: dict[str, Any] | None = None
    is_error: bool = False

    def text(self) -> str:
        return "\n".join(str(block.get("text", "")) for block in self.content if block.get("type") == "text")


class ItemError(BaseModel):
    type: str
    message: str
    step: str | None = None
    retryable: bool = False


class ResultRecord(BaseModel):
    """The one result record every item ends with."""

    item_id: str
    job_id: str
    index: int
    tool: str
    server: str
    key: str | None = None
    status: ItemStatus
    attempts: int = 0
    result: CallResult | None = None
    error: ItemError | None = None
    worker: str | None = None
    duration_ms: float = 0.0
    finished_at_ms: int = 0


class JobStatus(BaseModel):
    job_id: str
    state: JobState
    total: int
    succeeded: int
    failed: int
    cancelled: int
    running: int
    pending: int
    created_at_ms: int
    finished_at_ms: int | None = None
    servers: list[str] = Field(default_factory=list)
    state_mode: StateMode = "cas"
    # Items the coverage sweep found covered by nothing (no queued chunk, backlog or lease) and ran again.
    restored_items: int = 0

    @property
    def settled(self) -> int:
        return self.succeeded + self.failed + self.cancelled

    @property
    def done(self) -> bool:
        return self.state in ("finished", "cancelled")


def new_chunk_id() -> str:
    return uuid.uuid4().hex


class Chunk(BaseModel):
    """What one Celery message carries: a job, a server, and item indexes. ``id`` is the Celery task
    id of its message, and names the job's record of it while it is outstanding (see coverage.py)."""

    job_id: str
    server: str
    items: list[int] = Field(min_length=1)
    id: str = Field(default_factory=new_chunk_id)
    # Taken back from a worker that died: ahead of new work in the queue and in the worker.
    urgent: bool = False
    # One item that lost its lease too often, run with nothing else in flight on its worker process:
    # only a loss of this run makes it poison (see reaper.py).
    isolated: bool = False

    def task_kwargs(self) -> dict[str, Any]:
        """The Celery task's kwargs: flags only when set, so a normal message stays small."""
        return self.model_dump(exclude={"id"}, exclude_defaults=True)


class ChunkReport(BaseModel):
    """What running a chunk did, returned by the task for Flower and logs."""

    job_id: str
    server: str
    claimed: int
    skipped: int
    committed: int
    refused: int
    released: int = 0
    succeeded: int
    failed: int


def item_id(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"
