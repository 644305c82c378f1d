"""What the HTTP API and the MCP gateway take and give: one set of wire models for both faces."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.models import (
    ItemSpec,
    JobSpec,
    JobStatus,
    PipelineSpec,
    ReduceSpec,
    ResultRecord,
    StateMode,
    StepSpec,
)
from shared.settings import RetryPolicy


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tool: str | None = Field(default=None, min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    server: str | None = None
    key: str | None = None
    input: dict[str, Any] | None = None
    steps: list[StepSpec] | None = None
    needs: list[str] | None = Field(
        default=None,
        description='Keys of items that must settle first; their outputs are in scope as needs."KEY".',
    )
    session: str | None = Field(default=None, description="A conversation session (UUID) to record calls in.")


class JobIn(BaseModel):
    """A job: items, with ``server`` and ``tool`` filling in items that name none."""

    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1)
    server: str | None = None
    tool: str | None = None
    pipeline: PipelineSpec | None = Field(default=None, description="Steps applied to every item's input.")
    reduce: ReduceSpec | None = Field(default=None, description="One call over the job summary, at the end.")
    chunk_size: int | None = Field(default=None, ge=1, le=10_000)
    state_mode: StateMode | None = None
    retry: RetryPolicy | None = Field(default=None, description="Overrides the servers' retry policies.")
    validate_arguments: bool = Field(default=True, description="Check arguments against the tools' schemas.")


class Submitted(BaseModel):
    job_id: str
    total: int
    existing: bool


class ResultsPage(BaseModel):
    results: list[ResultRecord]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end.")


class JobsPage(BaseModel):
    jobs: list[JobStatus]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end.")


class InvalidJob(Exception):
    """A job body with field errors, each ``{"loc": [...], "msg": ...}`` as FastAPI reports them."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors))
        self.errors = errors


def to_job_spec(body: JobIn, idempotency_key: str | None) -> JobSpec:
    """Fill defaults, reporting every item without a tool by its field path."""
    errors = [
        {"loc": ["body", "items", i, "tool"], "msg": "no tool (name one on the item or for the whole job)"}
        for i, item in enumerate(body.items)
        if not (item.tool or body.tool or item.steps is not None or body.pipeline is not None)
    ]
    if errors:
        raise InvalidJob(errors)
    items: list[ItemSpec] = []
    item_errors: list[dict[str, Any]] = []
    for i, item in enumerate(body.items):
        fields = item.model_dump(exclude_unset=True)
        if item.steps is None and body.pipeline is None:
            fields["tool"] = item.tool or body.tool
        try:
            items.append(ItemSpec.model_validate(fields))
        except ValidationError as exc:
            item_errors += [{"loc": ["body", "items", i, *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
    if item_errors:
        raise InvalidJob(item_errors)
    try:
        return JobSpec(
            items=items,
            server=body.server,
            tool=body.tool,
            pipeline=body.pipeline,
            reduce=body.reduce,
            chunk_size=body.chunk_size,
            state_mode=body.state_mode,
            idempotency_key=idempotency_key,
            retry=body.retry,
            validate_arguments=body.validate_arguments,
        )
    except ValidationError as exc:
        raise InvalidJob([{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]) from None
