"""Items with a session: what a worker records of each call in the session's context, what a
step's ``context.*`` references read, and the MCP tool that may summarize a session's oldest
records (``[context] summarizer``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.calls import CallOutcome
from shared.context import ContextStore, ToolCallRecord
from shared.errors import ToolswarmError
from shared.mcp_client import ToolCaller
from shared.refs import compiled, find_references, scope_paths

CONTEXT_ROOT = "context"
SUMMARIZER_TIMEOUT_S = 60.0
MAX_SUMMARY_CHARS = 4096  # of one summary an MCP summarizer returns


def reads_context(arguments: Any) -> bool:
    """Whether a step's arguments refer to its session's context (so it is read only then)."""
    return any(
        path[0] == CONTEXT_ROOT
        for ref in find_references(arguments)
        if isinstance(ref.expression, str)
        for path in scope_paths(compiled(ref.expression).parsed)
    )


async def record_call(
    store: ContextStore | None,
    session: str | None,
    server: str,
    tool: str,
    arguments: Any,
    outcome: CallOutcome,
) -> None:
    """Append the call to the item's session (a call without a session records nothing)."""
    if store is None or session is None:
        return
    result_text = outcome.result.text() if outcome.result is not None else ""
    if not result_text and outcome.error is not None:
        result_text = outcome.error.message
    record = ToolCallRecord(
        tool=tool,
        server=outcome.answered_by or server,
        arguments=arguments,
        result_text=result_text,
        is_error=outcome.error is not None,
    )
    await store.append(session, record)


async def context_scope(store: ContextStore | None, session: str | None) -> dict[str, Any]:
    """What ``context.summary`` and ``context.window`` read: the session's context now."""
    if store is None or session is None:
        return {"summary": None, "window": []}
    found = await store.get(session)
    if found is None:
        return {"summary": None, "window": []}
    return {
        "summary": found.summary_before_window,
        "window": [record.model_dump(mode="json") for record in found.window],
    }


class ToolSummarizer:
    """Summarizes a session's oldest records with an MCP tool: it is called with ``{records,
    summary}`` and its text is the summary. A failing call falls back to the deterministic one,
    so a down summarizer never loses records."""

    def __init__(self, caller: ToolCaller, server: str, tool: str) -> None:
        self.caller = caller
        self.server = server
        self.tool = tool

    async def __call__(self, records: Sequence[ToolCallRecord], summary_so_far: str | None, /) -> str:
        from shared.context import deterministic_summarizer

        arguments = {"records": [r.model_dump(mode="json") for r in records], "summary": summary_so_far}
        try:
            result = await self.caller.call(self.server, self.tool, arguments, SUMMARIZER_TIMEOUT_S, {})
        except ToolswarmError:
            return await deterministic_summarizer(records, summary_so_far)
        text = result.text()
        if result.is_error or not text:
            return await deterministic_summarizer(records, summary_so_far)
        return text[:MAX_SUMMARY_CHARS]
