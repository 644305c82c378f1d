"""The pure parts of pipelines, by tables: references, scopes, cut values, step and item records."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from shared.models import CallResult, ItemError, ResultRecord, StepRecord, StepSpec, check_steps
from shared.pipeline import cut, degraded_output, failed_step, item_scope, pipeline_record, step_output
from shared.refs import (
    Reference,
    check_reference,
    compiled,
    find_references,
    resolve,
    scope_paths,
    within_reference,
)

SCOPE = {
    "input": {"doc": 7, "tags": ["a", "b"]},
    "steps": {
        "fetch": {
            "text": "hello world",
            "structured": None,
            "content": [{"type": "text", "text": "hello world"}],
        },
        "parse": {"text": "{}", "structured": {"words": 2, "title": "hello"}, "content": []},
    },
}


@pytest.mark.parametrize(
    ("arguments", "resolved"),
    [
        ({"a": {"$from": "input.doc"}}, {"a": 7}),
        ({"a": {"$from": "steps.parse.structured.words"}, "b": 1}, {"a": 2, "b": 1}),
        ({"nested": {"deep": [{"$from": "input.tags[0]"}, "lit"]}}, {"nested": {"deep": ["a", "lit"]}}),
        ({"t": {"$from": "join(' ', steps.fetch.content[].text)"}}, {"t": "hello world"}),
        ({"t": {"$from": "steps.missing.text"}}, {"t": None}),
        ({"all": {"$from": "input"}}, {"all": {"doc": 7, "tags": ["a", "b"]}}),
        ({"plain": {"from": "input.doc"}}, {"plain": {"from": "input.doc"}}),
    ],
    ids=["input", "structured", "nested-list", "function", "missing-is-null", "whole-input", "not-a-ref"],
)
def test_resolve(arguments: dict[str, Any], resolved: dict[str, Any]) -> None:
    assert resolve(arguments, SCOPE) == resolved


def test_find_references_gives_paths() -> None:
    found = list(find_references({"a": {"$from": "input.x"}, "b": [1, {"$from": "steps.s.text", "k": 2}]}))
    assert found == [Reference(("a",), "input.x"), Reference(("b", 1), "steps.s.text", ("k",))]
    assert [r.where for r in found] == ["arguments.a", "arguments.b.1"]


@pytest.mark.parametrize(
    ("expression", "paths"),
    [
        ("steps.fetch.text", [["steps", "fetch", "text"]]),
        ('steps."quoted".text', [["steps", "quoted", "text"]]),
        ("@.steps.later.text", [["steps", "later", "text"]]),
        ("steps.{a: later.text, b: input}", [["steps"], ["steps", "later", "text"], ["steps", "input"]]),
        ("steps | later.text", [["steps", "later", "text"]]),
        ("length(steps.a.text) | to_string(@)", [["steps", "a", "text"]]),
        ("join(',', steps.a.content[].text)", [["steps", "a", "content"]]),
        ("[input.x, steps.b.text]", [["input", "x"], ["steps", "b", "text"]]),
        ("{x: steps.a.text, y: input.y}", [["steps", "a", "text"], ["input", "y"]]),
        ("input.items[?score > `3`].name", [["input", "items"]]),
        ("steps.a.text || input.default", [["steps", "a", "text"], ["input", "default"]]),
        ("input.list | [0]", [["input", "list"]]),
        ("`42`", []),
    ],
)
def test_scope_paths(expression: str, paths: list[list[str]]) -> None:
    assert list(scope_paths(compiled(expression).parsed)) == paths


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("steps.fetch.text", None),
        ("input.doc", None),
        ("steps", None),
        ("steps.later.text", "refers to step 'later', which does not run before this one"),
        ("@.steps.later.text", "refers to step 'later'"),
        ("steps.{a: later.text}", "refers to step 'later'"),
        ("steps | later.text", "refers to step 'later'"),
        ("steps.fetch.[", "is not valid JMESPath"),
        ("inptu.doc", "reads 'inptu', not in scope (use input, steps or context)"),
        ("", "must be a JMESPath expression"),
        (3, "must be a JMESPath expression"),
    ],
)
def test_check_reference(expression: Any, problem: str | None) -> None:
    found = check_reference(Reference(("x",), expression), ["fetch"])
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and found.startswith("arguments.x: ")


def test_check_steps_lists_every_problem() -> None:
    steps = [
        StepSpec(name="a", tool="t", arguments={"x": {"$from": "steps.b.text"}}),
        StepSpec(name="b", tool="t"),
        StepSpec(name="a", tool="t", arguments={"x": {"$from": "steps.a.text"}}),
    ]
    assert check_steps(steps) == [
        "step 'a': arguments.x: $from 'steps.b.text' refers to step 'b', which does not run before this one",
        "step 'a': duplicate step name",
    ]
    assert check_steps([]) == ["steps: a pipeline needs at least one step"]


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("short", True),
        ("x" * 1022, True),
        ("x" * 1023, False),
        ({"k": list(range(400))}, False),
        (None, True),
    ],
)
def test_cut(value: Any, kept: bool) -> None:
    result = cut(value)
    if kept:
        assert result == value
    else:
        assert result["$cut"] is True and result["bytes"] > 1024 and len(result["head"].encode()) <= 1024


def test_outputs_and_scope() -> None:
    result = CallResult(
        content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], structured_content={"n": 1}
    )
    assert step_output(result) == {"text": "a\nb", "structured": {"n": 1}, "content": result.content}
    assert degraded_output([1, 2]) == {
        "text": "[1, 2]",
        "structured": [1, 2],
        "content": [],
        "degraded": True,
    }
    done = StepRecord(name="s", server="x", tool="t", status="succeeded", output={"text": "t"})
    failed = StepRecord(name="f", server="x", tool="t", status="failed")
    assert item_scope(None, {"s": done, "f": failed}) == {
        "input": {},
        "steps": {"s": {"text": "t"}},
        "context": {"summary": None, "window": []},
    }


STEPS = [
    StepSpec(name="one", tool="echo", server="x"),
    StepSpec(name="two", tool="fail", server="y", critical=False, fallback={"v": 1}),
    StepSpec(name="three", tool="echo", server="x"),
]
BASE = ResultRecord(item_id="j:0", job_id="j", index=0, tool="?", server="?", status="succeeded")
OK = {"text": "ok", "structured": None, "content": [{"type": "text", "text": "ok"}]}
ERROR = ItemError(type="tool_error", message="no", step="call")


def ran(name: str, attempts: int = 1) -> StepRecord:
    spec = next(s for s in STEPS if s.name == name)
    return StepRecord(
        name=name, server=spec.server or "", tool=spec.tool, status="succeeded", attempts=attempts, output=OK
    )


def test_failed_step_is_degraded_when_not_critical() -> None:
    degraded = failed_step(STEPS[1], ERROR, 2, 5.0, ["one"], {"message": "x"})
    assert degraded.status == "degraded" and degraded.output == degraded_output({"v": 1})
    assert degraded.error is not None and degraded.error.step == "two"
    assert degraded.error.context == {"completed_steps": ["one"], "arguments": {"message": "x"}}
    critical = failed_step(STEPS[0], ERROR, 3, 5.0, [], None)
    assert critical.status == "failed" and critical.output is None and critical.attempts == 3
    assert critical.error is not None and critical.error.context == {"completed_steps": [], "arguments": None}


@pytest.mark.parametrize(
    ("records", "status", "error_step", "degraded", "statuses"),
    [
        (
            {"one": ran("one"), "two": ran("two"), "three": ran("three")},
            "succeeded",
            None,
            None,
            ["succeeded"] * 3,
        ),
        (
            {
                "one": ran("one"),
                "two": failed_step(STEPS[1], ERROR, 1, 0, ["one"], {}),
                "three": ran("three"),
            },
            "succeeded",
            None,
            ["two"],
            ["succeeded", "degraded", "succeeded"],
        ),
        (
            {"one": failed_step(STEPS[0].model_copy(update={"critical": True}), ERROR, 1, 0, [], {})},
            "failed",
            "one",
            None,
            ["failed", "not_run", "not_run"],
        ),
    ],
    ids=["all-succeeded", "degraded", "critical-failure"],
)
def test_pipeline_record(
    records: dict[str, StepRecord],
    status: str,
    error_step: str | None,
    degraded: list[str] | None,
    statuses: list[str],
) -> None:
    record = pipeline_record(BASE, STEPS, records)
    assert record.status == status
    assert (record.error.step if record.error else None) == error_step
    assert record.degraded == degraded
    assert [s.status for s in record.steps or []] == statuses
    assert record.attempts == sum(r.attempts for r in records.values())
    assert (record.tool, record.server) == ("echo", "x")
    assert (record.result is not None) == (status == "succeeded")


OPTIONAL_OPTIONS = {
    "type": "object",
    "properties": {
        "options": {
            "anyOf": [{"type": "object", "properties": {"url": {"type": "string"}}}, {"type": "null"}]
        },
        "count": {"type": "integer"},
    },
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("arguments", "kept"),
    [
        ({"options": {"url": {"$from": "input.url"}}}, []),  # anyOf judged a value holding a reference
        ({"count": {"$from": "input.n"}}, []),  # the reference itself
        ({"count": "three", "options": {"url": {"$from": "input.url"}}}, [("count",)]),
        ({"extra": 1, "count": {"$from": "input.n"}}, [()]),  # a literal key the schema does not allow
    ],
)
def test_schema_complaints_about_references_wait_for_run_time(
    arguments: dict[str, Any], kept: list[tuple[str, ...]]
) -> None:
    references = list(find_references(arguments))
    complaints = Draft202012Validator(OPTIONAL_OPTIONS).iter_errors(arguments)
    left = [tuple(e.path) for e in complaints if not within_reference(e.path, references, str(e.validator))]
    assert left == kept
