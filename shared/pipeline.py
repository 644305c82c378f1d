"""Pipelines, the pure parts: what a step's output looks like to later steps, the scope references
read, what a failing step reports, and the item's result record built from its step records."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from shared.models import CallResult, ItemError, ResultRecord, StepRecord, StepSpec

CUT_BYTES = 1024  # argument values longer than this (as JSON) are cut in an error's context
CHECKPOINTED = ("succeeded", "degraded")


def step_output(result: CallResult) -> dict[str, Any]:
    """A step's OUTPUT as later steps' references see it."""
    return {"text": result.text(), "structured": result.structured_content, "content": result.content}


def degraded_output(fallback: Any) -> dict[str, Any]:
    """The OUTPUT of a non-critical step that failed: its fallback, as text and as structure."""
    return {"text": json.dumps(fallback), "structured": fallback, "content": [], "degraded": True}


def final_output(record: ResultRecord) -> dict[str, Any] | None:
    """An item's final OUTPUT, as later steps see a step's: its last step's, or its call's."""
    if record.steps:
        return record.steps[-1].output
    return step_output(record.result) if record.result is not None else None


def item_scope(
    item_input: Mapping[str, Any] | None,
    records: Mapping[str, StepRecord],
    needs: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``$from`` expressions are evaluated over: the item's input, the finished steps' outputs,
    (for an item with needs) its needs' final outputs, and its session's ``context`` ``{summary,
    window}`` (empty without a session)."""
    scope = {
        "input": dict(item_input or {}),
        "steps": {name: record.output for name, record in records.items() if record.output is not None},
        "context": dict(context) if context is not None else {"summary": None, "window": []},
    }
    if needs is not None:
        scope["needs"] = dict(needs)
    return scope


def unmet_need(needs: Mapping[str, ResultRecord | None]) -> ItemError | None:
    """The error of an item one of whose needs did not succeed (None when all did)."""
    for key, record in needs.items():
        if record is None or record.status != "succeeded":
            how = record.status if record is not None else "not settled"
            return ItemError(type="dependency_failed", message=f"need {key!r} {how}", retryable=False)
    return None


def cut(value: Any, limit: int = CUT_BYTES) -> Any:
    """``value`` itself if its JSON fits in ``limit`` bytes, else a marked head of that JSON."""
    text = json.dumps(value, default=str)
    size = len(text.encode())
    if size <= limit:
        return value
    return {"$cut": True, "bytes": size, "head": text.encode()[:limit].decode(errors="ignore")}


def step_context(completed: Sequence[str], arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a failing step's error carries: the steps completed before it, and its resolved
    arguments with values over 1 KB cut (None if they could not be resolved)."""
    return {
        "completed_steps": list(completed),
        "arguments": None if arguments is None else {key: cut(value) for key, value in arguments.items()},
    }


def pipeline_record(
    base: ResultRecord, steps: Sequence[StepSpec], records: Mapping[str, StepRecord]
) -> ResultRecord:
    """The item's record from its steps' records: failed if a step failed (its error is the
    item's), succeeded otherwise, with the degraded steps listed; ``result`` is the last step's
    result. Steps without a record did not run. ``base`` gives the item's identity and timing."""
    listed = [
        records.get(step.name)
        or StepRecord(name=step.name, server=step.server or "", tool=step.tool, status="not_run")
        for step in steps
    ]
    failed = next((record for record in listed if record.status == "failed"), None)
    degraded = [record.name for record in listed if record.status == "degraded"]
    last = listed[-1]
    result = None
    if last.status == "succeeded" and last.output is not None:
        result = CallResult(content=last.output["content"], structured_content=last.output["structured"])
    return base.model_copy(
        update={
            "status": "failed" if failed else "succeeded",
            "error": failed.error if failed else None,
            "result": result,
            "steps": listed,
            "degraded": degraded or None,
            "attempts": sum(record.attempts for record in listed),
            "tool": last.tool,
            "server": last.server,
        }
    )


def failed_step(
    step: StepSpec,
    error: ItemError,
    attempts: int,
    duration_ms: float,
    completed: Sequence[str],
    arguments: Mapping[str, Any] | None,
) -> StepRecord:
    """The record of a step that failed after its retries: ``failed`` if it is critical (its error
    names it and carries the context), else ``degraded`` with the fallback as its output."""
    error = error.model_copy(update={"step": step.name, "context": step_context(completed, arguments)})
    return StepRecord(
        name=step.name,
        server=step.server or "",
        tool=step.tool,
        status="failed" if step.critical else "degraded",
        attempts=attempts,
        duration_ms=duration_ms,
        output=None if step.critical else degraded_output(step.fallback),
        error=error,
    )
