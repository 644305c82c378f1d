"""Outcome classification and retries of one call: pure functions and call_item over a fake ToolCaller."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent

from shared.calls import error_of, retrying, tool_error_of
from shared.errors import (
    AuthFailed,
    CallTimeout,
    ConfigError,
    PermanentError,
    ProtocolError,
    RetriesExhausted,
    ServerError,
    ServerUnavailable,
    ToolFailed,
    ToolswarmError,
    TransientError,
    UnknownTool,
)
from shared.execution import ExecutionContext
from shared.executor import call_item
from shared.mcp_client import classify_mcp_error, describe, to_call_result
from shared.models import CallResult, ItemSpec
from shared.settings import RetryPolicy, ServerConfig, Settings
from shared.store import Claim


def server_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(transport="stdio", command="python", **overrides)


def text_result(text: str, *, is_error: bool) -> CallResult:
    return CallResult(content=[{"type": "text", "text": text}], is_error=is_error)


# --- classify_mcp_error ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "transient_codes", "expected"),
    [
        (-32001, [-32001, -32603, -32000], CallTimeout),
        (-32001, [], CallTimeout),
        (-32603, [-32001, -32603, -32000], ServerError),
        (-32000, [-32001, -32603, -32000], ServerError),
        (-32602, [-32001, -32603, -32000], ProtocolError),
        (-32601, [-32001, -32603, -32000], ProtocolError),
        (-32603, [], ProtocolError),
        (-32602, [-32602], ServerError),
        (42, [42], ServerError),
    ],
    ids=[
        "timeout",
        "timeout-regardless-of-list",
        "internal-error",
        "generic-server-error",
        "invalid-params",
        "method-not-found",
        "internal-not-listed",
        "invalid-params-listed",
        "custom-code-listed",
    ],
)
def test_classify_mcp_error(code: int, transient_codes: list[int], expected: type[ToolswarmError]) -> None:
    config = server_config(transient_error_codes=transient_codes, timeout_s=7)
    error = classify_mcp_error(MCPError(code, "went wrong"), config)
    assert type(error) is expected
    assert error.retryable is issubclass(expected, TransientError)
    assert "went wrong" in error.message
    if expected is CallTimeout:
        assert "after 7.0s" in error.message
    else:
        assert str(code) in error.message


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [
        (CallTimeout, True),
        (ServerUnavailable, True),
        (ServerError, True),
        (UnknownTool, False),
        (ToolFailed, False),
        (ProtocolError, False),
    ],
)
def test_retryability_lives_on_the_type(error_type: type[ToolswarmError], retryable: bool) -> None:
    error = error_type("m")
    assert error.retryable is retryable
    assert isinstance(error, TransientError if retryable else PermanentError)
    assert isinstance(error, ToolswarmError) and error.message == "m"


def test_retries_exhausted_is_retryable_but_not_retried() -> None:
    """The cause was transient, so resubmitting may help; but the retry loop must stop on it."""
    error = RetriesExhausted("m")
    assert error.retryable is True
    assert not isinstance(error, TransientError)


# --- tool_error_of ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected_type", "expected_message"),
    [
        ([{"type": "text", "text": "Unknown tool: frob"}], UnknownTool, "unknown tool 'frob'"),
        ([{"type": "text", "text": "disk full"}], ToolFailed, "disk full"),
        (
            [
                {"type": "text", "text": "first"},
                {"type": "image", "data": "x"},
                {"type": "text", "text": "second"},
            ],
            ToolFailed,
            "first\nsecond",
        ),
        ([{"type": "text", "text": "error: Unknown tool: frob"}], ToolFailed, "error: Unknown tool: frob"),
        ([], ToolFailed, "tool 'frob' reported an error"),
        ([{"type": "image", "data": "x"}], ToolFailed, "tool 'frob' reported an error"),
    ],
    ids=["unknown-tool", "plain-text", "text-blocks-joined", "unknown-not-prefix", "no-content", "no-text"],
)
def test_tool_error_of(
    content: list[dict[str, Any]], expected_type: type[ToolswarmError], expected_message: str
) -> None:
    error = tool_error_of(CallResult(content=content, is_error=True), "frob")
    assert type(error) is expected_type
    assert error.message == expected_message
    assert error.retryable is False


# --- error_of --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "attempts", "budget", "expected_type", "message_part"),
    [
        (ServerError("server error -32603: boom"), 3, 3, "retries_exhausted", "gave up after 3 attempts: "),
        (
            CallTimeout("call timed out"),
            5,
            3,
            "retries_exhausted",
            "gave up after 5 attempts: call timed out",
        ),
        (ServerUnavailable("down"), 1, 1, "retries_exhausted", "gave up after 1 attempts: down"),
        (ServerError("boom"), 2, 3, "server_error", "boom"),
        (UnknownTool("unknown tool 'x'"), 3, 3, "unknown_tool", "unknown tool 'x'"),
        (ProtocolError("bad params"), 1, 3, "protocol_error", "bad params"),
        (ToolFailed("nope"), 4, 4, "tool_error", "nope"),
    ],
    ids=[
        "transient-at-budget",
        "transient-over-budget",
        "budget-of-one",
        "transient-under-budget",
        "permanent-at-budget",
        "protocol",
        "tool-failed-at-budget",
    ],
)
def test_error_of(
    exc: ToolswarmError, attempts: int, budget: int, expected_type: str, message_part: str
) -> None:
    error = error_of(exc, attempts, RetryPolicy(attempts=budget))
    assert error.type == expected_type
    assert message_part in error.message
    assert exc.message in error.message
    assert error.step == "call"
    if expected_type != "retries_exhausted":
        assert error.retryable is exc.retryable


# --- describe --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (None, "unknown error"),
        (ValueError("bad value"), "ValueError: bad value"),
        (ConnectionResetError(), "ConnectionResetError"),
        (ExceptionGroup("outer", [OSError("refused")]), "OSError: refused"),
        (
            ExceptionGroup("outer", [ExceptionGroup("inner", [TimeoutError("slow")]), ValueError("second")]),
            "TimeoutError: slow",
        ),
        (BaseExceptionGroup("base", [KeyboardInterrupt()]), "KeyboardInterrupt"),
    ],
    ids=["none", "plain", "no-message", "group", "nested-group", "base-group"],
)
def test_describe(exc: BaseException | None, expected: str) -> None:
    assert describe(exc) == expected


def test_to_call_result() -> None:
    result = to_call_result(
        CallToolResult(
            content=[TextContent(type="text", text="hi")], structured_content={"a": 1}, is_error=True
        )
    )
    assert result == CallResult(
        content=[{"type": "text", "text": "hi"}], structured_content={"a": 1}, is_error=True
    )
    assert result.text() == "hi"


# --- retrying and call_item with a fake ToolCaller ----------------------------------------------


def test_retrying_builds_without_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retrying(RetryPolicy())


@pytest.mark.parametrize(
    ("policy", "expected_waits"),
    [
        (RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=10, jitter_s=0), [0.1, 0.2, 0.4, 0.8]),
        (RetryPolicy(attempts=5, initial_backoff_s=0.5, max_backoff_s=1.2, jitter_s=0), [0.5, 1.0, 1.2, 1.2]),
        (RetryPolicy(attempts=3, initial_backoff_s=0, max_backoff_s=0, jitter_s=0), [0.0, 0.0]),
    ],
    ids=["doubles", "capped", "zero"],
)
def test_retrying_backoff_and_stop(policy: RetryPolicy, expected_waits: list[float]) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def go() -> int:
        calls = 0
        retry = retrying(policy).copy(sleep=sleep)
        with pytest.raises(ServerError):
            async for attempt in retry:
                with attempt:
                    calls += 1
                    raise ServerError("again")
        return calls

    assert asyncio.run(go()) == policy.attempts
    assert waits == pytest.approx(expected_waits)


Step = CallResult | ToolswarmError


class FakeCaller:
    """A ToolCaller that plays a script: each call returns or raises the next step (the last repeats)."""

    def __init__(self, *steps: Step) -> None:
        self.steps = list(steps)
        self.calls: list[tuple[str, str, dict[str, Any], float]] = []
        self.metas: list[dict[str, Any] | None] = []

    async def input_schema(self, server: str, tool: str) -> dict[str, Any] | None:
        return None

    async def call(
        self,
        server: str,
        tool: str,
        arguments: dict[str, Any],
        timeout: float,
        meta: dict[str, Any] | None = None,
    ) -> CallResult:
        self.calls.append((server, tool, arguments, timeout))
        self.metas.append(meta)
        step = self.steps[min(len(self.calls), len(self.steps)) - 1]
        if isinstance(step, ToolswarmError):
            raise step
        return step


class Unused:
    """Stands in for the store and committer: call_item must not touch them, except to record
    (once, before the first call) that the item's call started."""

    def __init__(self) -> None:
        self.marked: list[tuple[str, int, int]] = []

    async def mark_calling(self, entries: list[tuple[str, int, int]]) -> list[None]:
        self.marked.extend(entries)
        return [None] * len(entries)

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"call_item used {name!r} of the store/committer")


OK = text_result("done", is_error=False)
ATTEMPTS = 4


def run_call(caller: FakeCaller, *, spec: ItemSpec | None = None) -> Any:
    settings = Settings(
        servers={
            "srv": server_config(
                timeout_s=3,
                retry=RetryPolicy(attempts=ATTEMPTS, initial_backoff_s=0, max_backoff_s=0, jitter_s=0),
            )
        }
    )
    ctx = ExecutionContext(
        settings=settings,
        store=Unused(),
        caller=caller,
        committer=Unused(),
        worker_id="w-test",  # type: ignore[arg-type]
    )
    claim = Claim(
        index=5, epoch=2, spec=spec or ItemSpec(tool="echo", arguments={"t": 1}, server="srv", key="k")
    )
    return asyncio.run(call_item(ctx, "job9", claim))


def test_success_on_first_attempt() -> None:
    caller = FakeCaller(OK)
    record = run_call(caller)
    assert record.status == "succeeded" and record.attempts == 1 and record.error is None
    assert record.result == OK
    assert (record.item_id, record.job_id, record.index, record.key) == ("job9:5", "job9", 5, "k")
    assert (record.tool, record.server, record.worker) == ("echo", "srv", "w-test")
    assert record.duration_ms >= 0 and record.finished_at_ms > 0
    assert caller.calls == [("srv", "echo", {"t": 1}, 3.0)]
    assert caller.metas == [{"io.toolswarm/idempotency-key": "job9:5:call"}]


@pytest.mark.parametrize(
    "make_transient",
    [lambda: ServerError("e -32603"), lambda: CallTimeout("slow"), lambda: ServerUnavailable("down")],
    ids=["server-error", "timeout", "unavailable"],
)
@pytest.mark.parametrize("failures", [1, ATTEMPTS - 1])
def test_transient_errors_are_retried_then_succeed(
    make_transient: Callable[[], ToolswarmError], failures: int
) -> None:
    caller = FakeCaller(*[make_transient() for _ in range(failures)], OK)
    record = run_call(caller)
    assert record.status == "succeeded" and record.error is None
    assert record.attempts == failures + 1 == len(caller.calls)
    assert record.result == OK


@pytest.mark.parametrize(
    ("error", "expected_type"),
    [
        (UnknownTool("unknown tool 'echo' on server 'srv'"), "unknown_tool"),
        (ProtocolError("server error -32602: invalid params"), "protocol_error"),
        (ToolFailed("failed"), "tool_error"),
    ],
    ids=["unknown-tool", "protocol", "tool-failed"],
)
def test_permanent_error_is_not_retried(error: ToolswarmError, expected_type: str) -> None:
    caller = FakeCaller(error, OK)
    record = run_call(caller)
    assert record.status == "failed" and record.attempts == 1 and len(caller.calls) == 1
    assert record.error is not None
    assert (record.error.type, record.error.message, record.error.retryable) == (
        expected_type,
        error.message,
        False,
    )
    assert record.result is None


def test_transient_errors_until_the_budget_runs_out() -> None:
    caller = FakeCaller(ServerError("server error -32603: boom"))
    record = run_call(caller)
    assert record.status == "failed"
    assert record.attempts == ATTEMPTS == len(caller.calls)
    assert record.error is not None and record.error.type == "retries_exhausted"
    assert record.error.message == f"gave up after {ATTEMPTS} attempts: server error -32603: boom"


def test_transient_then_permanent_stops_at_the_permanent_one() -> None:
    caller = FakeCaller(CallTimeout("slow"), UnknownTool("unknown tool 'echo'"), OK)
    record = run_call(caller)
    assert record.status == "failed" and record.attempts == 2
    assert record.error is not None and record.error.type == "unknown_tool"


@pytest.mark.parametrize(
    ("text", "expected_type"),
    [("Unknown tool: echo", "unknown_tool"), ("division by zero", "tool_error")],
)
def test_is_error_result_fails_without_retry(text: str, expected_type: str) -> None:
    returned = text_result(text, is_error=True)
    caller = FakeCaller(returned)
    record = run_call(caller)
    assert record.status == "failed" and record.attempts == 1 and len(caller.calls) == 1
    assert record.error is not None and record.error.type == expected_type and record.error.retryable is False
    assert record.result == returned, "the tool's own error result is kept"


def test_unknown_server_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown server 'elsewhere'"):
        run_call(FakeCaller(OK), spec=ItemSpec(tool="echo", server="elsewhere"))


class _Response:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


class _HTTPError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.response = _Response(status_code)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_HTTPError(400), ProtocolError),
        (_HTTPError(401), AuthFailed),
        (_HTTPError(403), AuthFailed),
        (_HTTPError(404), ProtocolError),
        (_HTTPError(429), ServerUnavailable),
        (_HTTPError(500), ServerError),
        (_HTTPError(503), ServerError),
        (ExceptionGroup("g", [_HTTPError(502)]), ServerError),
        (ConnectionRefusedError("refused"), ServerUnavailable),
        (ExceptionGroup("g", [OSError("reset")]), ServerUnavailable),
    ],
)
def test_transport_errors_are_classified_by_http_status(
    exc: BaseException, expected: type[Exception]
) -> None:
    from shared.mcp_client import classify_transport_error

    error = classify_transport_error("s", exc)
    assert type(error) is expected
    assert error.retryable is (expected not in (ProtocolError, AuthFailed))
