"""Pydantic models at every boundary: items in, result records and job views out."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from shared.errors import InvalidSessionId
from shared.refs import SCOPE_ROOTS, SUMMARY_ROOTS, check_reference, find_references
from shared.settings import RetryPolicy

ItemStatus = Literal["succeeded", "failed", "cancelled"]
StepStatus = Literal["succeeded", "failed", "degraded", "not_run"]
JobState = Literal["pending", "running", "finished", "cancelled"]
StateMode = Literal["cas", "log"]
# Step names go into JMESPath (steps.NAME, unquoted), Redis hash fields and idempotency keys:
# identifiers only.
STEP_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class StepSpec(BaseModel):
    """One step of a pipeline: a tool call whose arguments may refer to the input and earlier steps."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STEP_NAME_PATTERN)
    tool: str = Field(min_length=1)
    server: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    critical: bool = True
    fallback: Any = None  # a non-critical step that fails takes this as its output
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None
    # Handed off to another worker pool, this step's envelope carries only these earlier steps'
    # outputs (None: every earlier step's).
    carry: list[str] | None = None


def check_steps(steps: list[StepSpec], needs: Sequence[str] = ()) -> list[str]:
    """What is wrong with a chain of steps as written (no I/O): no steps, duplicate names, and
    references that are not JMESPath or that name a step not run before theirs (or, with
    ``needs``, a need the item does not have)."""
    if not steps:
        return ["steps: a pipeline needs at least one step"]
    problems: list[str] = []
    seen: list[str] = []
    for step in steps:
        if step.name in seen:
            problems.append(f"step {step.name!r}: duplicate step name")
        for carried in step.carry or ():
            if carried not in seen:
                problems.append(f"step {step.name!r}: carry names {carried!r}, not a step before it")
        for reference in find_references(step.arguments):
            problem = check_reference(
                reference, seen, (*SCOPE_ROOTS, "needs") if needs else SCOPE_ROOTS, needs
            )
            if problem:
                problems.append(f"step {step.name!r}: {problem}")
        seen.append(step.name)
    return problems


class PipelineSpec(BaseModel):
    """A chain of steps applied to every item of a job (each item then brings only its input)."""

    model_config = ConfigDict(extra="forbid")

    steps: list[StepSpec]

    @model_validator(mode="after")
    def _valid_chain(self) -> PipelineSpec:
        problems = check_steps(self.steps)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ReduceSpec(BaseModel):
    """A job's fan-in: one call after every item has settled, whatever failed, whose arguments may
    refer to the job summary ``{total, successful: [{index, key, output}], failed: [{index, key,
    error}]}``."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(min_length=1)
    server: str | None = None
    arguments: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = Field(default=None, gt=0)
    retry: RetryPolicy | None = None

    @model_validator(mode="after")
    def _valid_references(self) -> ReduceSpec:
        problems = [
            problem
            for reference in find_references(self.arguments)
            if (problem := check_reference(reference, (), SUMMARY_ROOTS))
        ]
        if problems:
            raise ValueError("reduce: " + "; ".join(problems))
        return self


class ItemSpec(BaseModel):
    """One line of an items file: a tool call (``tool``, ``arguments``), a pipeline of its own
    (``steps``), or, in a job with a job-wide pipeline, only its ``input``."""

    model_config = ConfigDict(extra="forbid")

    tool: str | None = Field(default=None, min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    server: str | None = None
    key: str | None = None
    input: dict[str, Any] | None = None
    steps: list[StepSpec] | None = None
    # Keys of other items of the job that must succeed before this one starts; their final outputs
    # are in scope as needs."KEY".
    needs: list[str] | None = None
    # A conversation session (UUID): every call made for the item is recorded in its context, and
    # steps may refer to context.summary and context.window.
    session: str | None = None
    # The line of the items file it came from, so that errors found later can name it.
    _line: int | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:  # where an item came from is not part of what it is
        return isinstance(other, ItemSpec) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]

    @field_validator("session")
    @classmethod
    def _session_is_a_uuid(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            canonical = str(uuid.UUID(value))
        except ValueError:
            canonical = ""
        if canonical != value.lower():
            raise ValueError(InvalidSessionId(value).message)
        return canonical

    def where(self, number: int) -> str:
        """How errors name the item: by its line in the items file, or by its number in the job."""
        return f"line {self._line}" if self._line is not None else f"item {number}"

    @model_validator(mode="after")
    def _call_or_steps(self) -> ItemSpec:
        needs = self.needs or ()
        if self.steps is None:
            roots = ("input", "needs") if needs else ()
            problems = [
                problem
                for reference in find_references(self.arguments)
                if (problem := check_reference(reference, (), roots or ("needs",), needs))
            ]
            if problems and not needs:
                problems = ["$from in a single call's arguments refers to its needs: give the item needs"]
            if problems:
                raise ValueError("; ".join(problems))
            return self
        if self.tool is not None or self.arguments:
            raise ValueError("an item carries either tool and arguments, or steps, not both")
        problems = check_steps(self.steps, needs)
        if problems:
            raise ValueError("; ".join(problems))
        return self


class JobSpec(BaseModel):
    """What a caller submits. ``server`` and ``tool`` fill in items that omit them; ``pipeline``
    applies one chain of steps to every item."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemSpec] = Field(min_length=1)
    server: str | None = None
    tool: str | None = None
    pipeline: PipelineSpec | None = None
    reduce: ReduceSpec | None = None
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
    # A pipeline step's failure: the steps completed before it and its resolved arguments.
    context: dict[str, Any] | None = None


class StepRecord(BaseModel):
    """What one step of a pipeline item did. ``output`` is what later steps' references read:
    ``{text, structured, content}`` (``degraded: true`` and the fallback for a degraded step)."""

    name: str
    server: str
    tool: str
    status: StepStatus
    attempts: int = 0
    duration_ms: float = 0.0
    output: dict[str, Any] | None = None
    error: ItemError | None = None
    answered_by: str | None = None  # the standby that answered, when ``server``'s breaker was open
    # How long committing this step's checkpoint took (absent for the last step: the item's
    # commit is its checkpoint, and for steps checkpointed by an earlier run of the item).
    checkpoint_ms: float | None = None


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
    answered_by: str | None = None  # the standby that answered, when ``server``'s breaker was open
    # Pipeline items only: every step's record, and the non-critical steps that fell back.
    steps: list[StepRecord] | None = None
    degraded: list[str] | None = None

    def matches(self, status: str | None = None, failed_step: str | None = None) -> bool:
        """Whether a results filter keeps this record: its status, and (``failed_step``) failed at
        that step (``call`` for a single-call item)."""
        if status is not None and self.status != status:
            return False
        if failed_step is None:
            return True
        return self.status == "failed" and self.error is not None and self.error.step == failed_step


class FailureCount(BaseModel):
    """How many items of a job failed at one step with one error type (``call`` for single calls)."""

    step: str
    error_type: str
    count: int


class ReduceStatus(BaseModel):
    """Where a job's reduce is: ``pending`` until every item has settled, then ``running`` while a
    worker holds it, then how it ended."""

    status: Literal["pending", "running", "succeeded", "failed", "cancelled"]
    attempts: int = 0
    result: CallResult | None = None
    error: ItemError | None = None


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
    expires_at_ms: int | None = None  # when an ended job's keys expire (None: kept, or not ended)
    servers: list[str] = Field(default_factory=list)
    state_mode: StateMode = "cas"
    # Items the coverage sweep found covered by nothing (no queued chunk, backlog or lease) and ran again.
    restored_items: int = 0
    # Items waiting on a server whose probes fail (as the workers' heartbeats report them), and why;
    # filled where a status is shown (shared/holds.py), 0 elsewhere.
    held: int = 0
    held_reason: str | None = None
    # Items that succeeded with a non-critical step degraded to its fallback.
    degraded: int = 0
    failures: list[FailureCount] = Field(default_factory=list)  # most frequent first
    reduce: ReduceStatus | None = None  # jobs with a reduce only
    retry_of: str | None = None  # the job whose failed items this one runs again
    retried_by: str | None = None  # the latest job that ran this one's failed items again

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
    # A pipeline item handed over from another worker pool: its envelope is read before it resumes.
    handoff: bool = False

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
    handed_off: int = 0  # pipeline items sent on to another worker pool
    succeeded: int
    failed: int


def item_id(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"
