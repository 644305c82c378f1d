"""Items files in, resolved items and chunks out: the pure half of submit, no Redis."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import JobSpecError
from shared.jobs import MAX_REPORTED_ERRORS, parse_items_lines, plan_chunks, read_items_file, resolve_items
from shared.models import ItemSpec, JobSpec
from shared.settings import ServerConfig, Settings


def settings_with(*names: str) -> Settings:
    return Settings(servers={name: ServerConfig(transport="stdio", command="python") for name in names})


def line(**fields: Any) -> str:
    return json.dumps(fields)


# --- parse_items_lines -----------------------------------------------------------------------


def test_good_lines_parse_into_items() -> None:
    items = parse_items_lines(
        [
            line(tool="echo", arguments={"text": "a"}, server="s1", key="k1"),
            "",
            "   ",
            line(tool="add", arguments={"a": 1, "b": 2}),
            line(tool="ping"),
        ]
    )
    assert items == [
        ItemSpec(tool="echo", arguments={"text": "a"}, server="s1", key="k1"),
        ItemSpec(tool="add", arguments={"a": 1, "b": 2}),
        ItemSpec(tool="ping", arguments={}),
    ]


BAD_LINES = [
    pytest.param("{bad", "invalid JSON: Expecting property name", id="malformed-json"),
    pytest.param('{"tool": "echo"', "invalid JSON", id="truncated-json"),
    pytest.param(
        line(tool="echo", arguments=[1, 2]), "arguments: Input should be a valid dictionary", id="args-list"
    ),
    pytest.param(
        line(tool="echo", arguments="x=1"), "arguments: Input should be a valid dictionary", id="args-str"
    ),
    pytest.param(
        line(tool="echo", arguments=None), "arguments: Input should be a valid dictionary", id="args-null"
    ),
    pytest.param("[1, 2]", "expected a JSON object, got list", id="array-line"),
    pytest.param('"echo"', "expected a JSON object, got str", id="string-line"),
    pytest.param("42", "expected a JSON object, got int", id="number-line"),
    pytest.param("null", "expected a JSON object, got NoneType", id="null-line"),
    pytest.param(line(arguments={}), "tool: Field required", id="no-tool"),
    pytest.param(line(tool=""), "tool: String should have at least 1 character", id="empty-tool"),
    pytest.param(line(tool=5), "tool: Input should be a valid string", id="tool-int"),
    pytest.param(line(tool="echo", extra=1), "extra: Extra inputs are not permitted", id="unknown-field"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
@pytest.mark.parametrize("position", [1, 3])
def test_bad_line_is_reported_with_its_number(bad: str, reason: str, position: int) -> None:
    good = line(tool="echo", arguments={"text": "ok"})
    lines = [good] * (position - 1) + [bad, good]
    with pytest.raises(JobSpecError) as raised:
        parse_items_lines(lines)
    message = str(raised.value)
    assert message.startswith(f"line {position}: "), message
    assert reason in message, message
    assert raised.value.error_type == "job_spec_error" and raised.value.retryable is False


def test_blank_lines_count_toward_line_numbers() -> None:
    with pytest.raises(JobSpecError, match=r"^line 4: invalid JSON"):
        parse_items_lines([line(tool="a"), "", "  ", "{oops"])


def test_every_bad_line_is_reported() -> None:
    with pytest.raises(JobSpecError) as raised:
        parse_items_lines(["{x", line(tool="a"), "[]", line(tool="a", arguments=1)])
    reported = [part.split(":")[0] for part in str(raised.value).split("; ")]
    assert reported == ["line 1", "line 3", "line 4"]


def test_many_bad_lines_are_summarised() -> None:
    extra = 7
    with pytest.raises(JobSpecError) as raised:
        parse_items_lines(["{x"] * (MAX_REPORTED_ERRORS + extra))
    message = str(raised.value)
    assert message.count("invalid JSON") == MAX_REPORTED_ERRORS
    assert f"line {MAX_REPORTED_ERRORS}: " in message and f"line {MAX_REPORTED_ERRORS + 1}: " not in message
    assert message.endswith(f"; and {extra} more")


@pytest.mark.parametrize("lines", [[], [""], ["", "   ", "\t"]], ids=["nothing", "one-blank", "blanks"])
def test_no_items_is_an_error(lines: list[str]) -> None:
    with pytest.raises(JobSpecError, match=r"^no items: the items file is empty$"):
        parse_items_lines(lines)


@pytest.mark.parametrize(
    ("raw", "default_tool", "default_server", "expected_tool", "expected_server"),
    [
        ({"arguments": {}}, "echo", "s1", "echo", "s1"),
        ({"tool": "add"}, "echo", "s1", "add", "s1"),
        ({"tool": "add", "server": "s2"}, "echo", "s1", "add", "s2"),
        ({"tool": "add", "server": None}, None, "s1", "add", "s1"),
        ({"tool": "add"}, None, None, "add", None),
    ],
    ids=["both-filled", "own-tool", "own-server", "null-server-filled", "no-defaults"],
)
def test_defaults_fill_only_what_the_item_omits(
    raw: dict[str, Any],
    default_tool: str | None,
    default_server: str | None,
    expected_tool: str,
    expected_server: str | None,
) -> None:
    [item] = parse_items_lines([json.dumps(raw)], default_tool=default_tool, default_server=default_server)
    assert (item.tool, item.server) == (expected_tool, expected_server)


def test_missing_tool_without_default_tool_is_an_error() -> None:
    with pytest.raises(JobSpecError, match=r"^line 1: tool: Field required"):
        parse_items_lines([line(arguments={"x": 1})], default_server="s1")


# --- read_items_file -------------------------------------------------------------------------


def test_read_items_file_reads_jsonl_and_applies_defaults(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_text(line(arguments={"n": 1}) + "\n" + line(tool="b", server="other") + "\n", encoding="utf-8")
    items = read_items_file(path, default_tool="a", default_server="main")
    assert [(i.tool, i.server, i.arguments) for i in items] == [("a", "main", {"n": 1}), ("b", "other", {})]


def test_missing_items_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(JobSpecError, match=rf"^items file {missing} does not exist$"):
        read_items_file(missing)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"^no items: the items file is empty$"),
        (b"\n\n  \n", r"^no items: the items file is empty$"),
        (b'{"tool": "a"}\n\xff\xfe\n', r"^cannot read items file .*: 'utf-8' codec can't decode"),
        (b'{"tool": "a"}\r\n{bad\r\n', r"^line 2: invalid JSON"),
    ],
    ids=["empty", "blank", "not-utf8", "crlf-bad-line-2"],
)
def test_unusable_items_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(content)
    with pytest.raises(JobSpecError, match=message):
        read_items_file(path)


def test_items_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match=rf"^cannot read items file {tmp_path}: "):
        read_items_file(tmp_path)


def test_items_file_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + line(tool="a").encode() + b"\n")
    assert [i.tool for i in read_items_file(path)] == ["a"]


# --- resolve_items ---------------------------------------------------------------------------


def test_resolve_fills_job_server_and_keeps_item_server() -> None:
    spec = JobSpec(items=[ItemSpec(tool="a"), ItemSpec(tool="b", server="s2")], server="s1")
    resolved = resolve_items(spec, settings_with("s1", "s2"))
    assert [(i.tool, i.server) for i in resolved] == [("a", "s1"), ("b", "s2")]
    assert spec.items[0].server is None, "the spec itself is not modified"


@pytest.mark.parametrize(
    ("items", "job_server", "servers", "message"),
    [
        (
            [ItemSpec(tool="a")],
            None,
            ("s1",),
            r"^item 1: no server \(name one on the item or for the whole job\)$",
        ),
        (
            [ItemSpec(tool="a", server="nope")],
            None,
            ("s2", "s1"),
            r"^item 1: unknown server 'nope' \(known: s1, s2\)$",
        ),
        ([ItemSpec(tool="a")], "nope", ("s1",), r"^item 1: unknown server 'nope' \(known: s1\)$"),
        ([ItemSpec(tool="a")], "nope", (), r"^item 1: unknown server 'nope' \(known: none configured\)$"),
        (
            [ItemSpec(tool="a", server="s1"), ItemSpec(tool="b", server="x"), ItemSpec(tool="c")],
            None,
            ("s1",),
            r"^item 2: unknown server 'x' \(known: s1\); item 3: no server",
        ),
    ],
    ids=["no-server", "unknown-item-server", "unknown-job-server", "none-configured", "several"],
)
def test_resolve_refuses_bad_servers(
    items: list[ItemSpec], job_server: str | None, servers: tuple[str, ...], message: str
) -> None:
    with pytest.raises(JobSpecError, match=message):
        resolve_items(JobSpec(items=items, server=job_server), settings_with(*servers))


# --- plan_chunks -----------------------------------------------------------------------------


def test_plan_chunks_example() -> None:
    servers = ["a", "b", "a", "a", "b", "a", "c"]
    chunks = plan_chunks("job1", [ItemSpec(tool="t", server=s) for s in servers], 2)
    assert [(c.job_id, c.server, c.items) for c in chunks] == [
        ("job1", "a", [0, 2]),
        ("job1", "a", [3, 5]),
        ("job1", "b", [1, 4]),
        ("job1", "c", [6]),
    ]


@given(
    servers=st.lists(st.sampled_from(["alpha", "beta", "gamma", "delta"]), min_size=1, max_size=300),
    chunk_size=st.integers(min_value=1, max_value=40),
)
def test_plan_chunks_properties(servers: list[str], chunk_size: int) -> None:
    items = [ItemSpec(tool="t", server=s) for s in servers]
    chunks = plan_chunks("j", items, chunk_size)
    indexes = [i for c in chunks for i in c.items]
    assert sorted(indexes) == list(range(len(items))), "every index exactly once"
    for chunk in chunks:
        assert chunk.job_id == "j"
        assert 1 <= len(chunk.items) <= chunk_size
        assert {servers[i] for i in chunk.items} == {chunk.server}, "one server per chunk"
        assert chunk.items == sorted(chunk.items)
    for server in set(servers):
        count = servers.count(server)
        mine = [c for c in chunks if c.server == server]
        assert len(mine) == -(-count // chunk_size), "no more chunks than needed"
        assert all(len(c.items) == chunk_size for c in mine[:-1]), "only the last chunk of a server is short"
