"""Bad pipelines are refused at submit, naming the line and the step, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.cli.test_bad_input import GOOD, assert_nothing_written, assert_one_line_error, client, cluster
from tests.harness import Cluster

pytestmark = pytest.mark.integration
__all__ = ["client", "cluster"]  # fixtures


def step(name: str, tool: str = "echo", **arguments: Any) -> dict[str, Any]:
    return {"name": name, "tool": tool, "arguments": arguments or {"text": "x"}}


def steps_line(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


FETCH = step("fetch")


@pytest.mark.parametrize(
    ("lines", "fragments"),
    [
        pytest.param(
            [GOOD, steps_line(FETCH, step("parse", text={"$from": "steps.fecth.text"}))],
            ["line 2: step 'parse': arguments.text: $from 'steps.fecth.text' refers to step 'fecth'"],
            id="unknown-step",
        ),
        pytest.param(
            [steps_line(step("parse", text={"$from": "steps.fetch.text"}), FETCH)],
            ["line 1: step 'parse'", "refers to step 'fetch', which does not run before this one"],
            id="later-step",
        ),
        pytest.param(
            [steps_line(FETCH, step("parse", text={"$from": "steps.fetch.[text"}))],
            ["line 1: step 'parse': arguments.text: $from 'steps.fetch.[text' is not valid JMESPath"],
            id="bad-jmespath",
        ),
        pytest.param(
            [steps_line(FETCH, step("parse", text={"$from": "inptu.doc"}))],
            ["line 1: step 'parse'", "reads 'inptu', not in scope (use input, steps or context)"],
            id="unknown-root",
        ),
        pytest.param(
            [steps_line(FETCH, step("parse", text={"$from": "input.doc", "default": 1}))],
            ["$from must be the only key of its object (also: default)"],
            id="from-with-company",
        ),
        pytest.param(
            [GOOD, GOOD, steps_line(FETCH, step("fetch"))],
            ["line 3: step 'fetch': duplicate step name"],
            id="duplicate-names",
        ),
        pytest.param(
            [json.dumps({"steps": []})], ["line 1: steps: a pipeline needs at least one step"], id="empty"
        ),
        pytest.param(
            [steps_line({"name": "bad name", "tool": "echo"})],
            ["line 1: steps.0.name: String should match pattern"],
            id="bad-step-name",
        ),
        pytest.param(
            [json.dumps({"tool": "echo", "steps": [FETCH]})],
            ["line 1: an item carries either tool and arguments, or steps, not both"],
            id="tool-and-steps",
        ),
        pytest.param(
            [GOOD, steps_line(FETCH, step("lookup", tool="nope"))],
            ["line 2: step 'lookup': unknown tool 'nope' on server 'demo'"],
            id="unknown-tool",
        ),
        pytest.param(
            [
                steps_line(
                    FETCH,
                    {
                        **step("sum", tool="add", a={"$from": "input.n"}),
                        "arguments": {"a": {"$from": "input.n"}, "b": "two"},
                    },
                )
            ],
            ["line 1: step 'sum': arguments.b: 'two' is not of type 'number'"],
            id="literal-argument-type",
        ),
        pytest.param(
            [GOOD, json.dumps({"tool": "echo", "arguments": {"text": "x"}, "input": {"doc": 1}})],
            ["line 2: input is for pipeline items"],
            id="input-on-a-single-call",
        ),
        pytest.param(
            [steps_line(FETCH, {**step("elsewhere"), "server": "nope"})],
            ["line 1: step 'elsewhere': unknown server 'nope' (known: demo)"],
            id="unknown-server",
        ),
    ],
)
def test_bad_pipeline_items_are_refused(
    cluster: Cluster, tmp_path: Path, client: redis.Redis, lines: list[str], fragments: list[str]
) -> None:
    items = tmp_path / "items.jsonl"
    items.write_text("".join(line + "\n" for line in lines))
    assert_one_line_error(cluster.cli("submit", str(items), "--server", "demo"), *fragments)
    assert_nothing_written(client, cluster)


@pytest.mark.parametrize(
    ("pipeline", "lines", "fragments"),
    [
        pytest.param(
            {"steps": [FETCH, step("parse", text={"$from": "steps.nope"})]},
            [json.dumps({"input": {}})],
            ["pipeline.json: step 'parse'", "refers to step 'nope'"],
            id="unknown-step",
        ),
        pytest.param(
            {"steps": []}, [json.dumps({"input": {}})], ["a pipeline needs at least one step"], id="empty"
        ),
        pytest.param(
            {"steps": [FETCH]},
            [json.dumps({"input": {}}), GOOD],
            ["line 2: the job has a pipeline", "only input, key and session, not arguments, tool"],
            id="line-with-a-tool",
        ),
        pytest.param(
            {"steps": [step("x", tool="nope")]},
            [json.dumps({"input": {}})],
            ["pipeline: step 'x': unknown tool 'nope' on server 'demo'"],
            id="unknown-tool",
        ),
        pytest.param(
            "{not json", [json.dumps({"input": {}})], ["pipeline.json: invalid JSON"], id="bad-json"
        ),
    ],
)
def test_bad_job_pipelines_are_refused(
    cluster: Cluster,
    tmp_path: Path,
    client: redis.Redis,
    pipeline: Any,
    lines: list[str],
    fragments: list[str],
) -> None:
    pipeline_file = tmp_path / "pipeline.json"
    pipeline_file.write_text(pipeline if isinstance(pipeline, str) else json.dumps(pipeline))
    items = tmp_path / "items.jsonl"
    items.write_text("".join(line + "\n" for line in lines))
    result = cluster.cli("submit", str(items), "--pipeline", str(pipeline_file), "--server", "demo")
    assert_one_line_error(result, *fragments)
    assert_nothing_written(client, cluster)
