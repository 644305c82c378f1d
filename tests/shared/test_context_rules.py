"""Conversation context, the pure rules: session ids, the window rule, summaries, record cuts."""

# ruff: noqa: RUF001  (summaries count calls with the multiplication sign, U+00D7)

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.context import (
    RECORD_CUT_BYTES,
    ToolCallRecord,
    combine_summaries,
    compact,
    compaction_size,
    cut_json,
    cut_text,
    summarize_records,
    validate_session_id,
)
from shared.errors import InvalidSessionId, ToolswarmError

VALID = "0b6f2c1e-8a4d-4f3b-9c2e-7d5a1b3c4e6f"


def record(tool: str = "fetch", arguments: Any = None, is_error: bool = False) -> ToolCallRecord:
    return ToolCallRecord(tool=tool, server="demo", arguments=arguments, is_error=is_error, at_ms=1)


# --- session ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_id", "canonical"),
    [
        (VALID, VALID),
        (VALID.upper(), VALID),
        ("0B6F2C1E-8a4d-4F3B-9c2e-7D5A1B3C4E6F", VALID),
        ("00000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000000"),
    ],
)
def test_valid_session_ids_come_back_lowercase(given_id: str, canonical: str) -> None:
    assert validate_session_id(given_id) == canonical


def test_any_uuid4_is_valid() -> None:
    session = uuid.uuid4()
    assert validate_session_id(str(session)) == str(session)


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "a:b",
        "",
        "x" * 40,
        f"{{{VALID}}}",
        f"{VALID[:-1]}}}",
        f"{VALID}\n",
        f" {VALID[1:]}",
        VALID.replace("-", ""),
        VALID.replace("-", ":"),
        VALID[:-1] + "g",
        "../../../../etc/passwd-00000000000000",
        "a" * 10_000,
        "٠" * 8 + VALID[8:],  # Arabic-Indic digits are not hex
    ],
)
def test_bad_session_ids_are_refused_naming_the_id(bad: str) -> None:
    with pytest.raises(InvalidSessionId) as raised:
        validate_session_id(bad)
    message = str(raised.value)
    assert isinstance(raised.value, ToolswarmError)
    assert raised.value.error_type == "invalid_session_id"
    assert repr(bad)[:20] in message
    assert "UUID" in message
    assert len(message) < 200, "a huge id is shown truncated"


@pytest.mark.parametrize("bad", [None, 42, b"0b6f2c1e-8a4d-4f3b-9c2e-7d5a1b3c4e6f", uuid.UUID(VALID)])
def test_non_strings_are_refused(bad: object) -> None:
    with pytest.raises(InvalidSessionId):
        validate_session_id(bad)


# --- the window rule ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "max_window", "summarized"),
    [
        (0, 20, 0),
        (19, 20, 0),
        (20, 20, 0),
        (21, 20, 10),
        (22, 20, 11),  # overflowed by two (concurrent appends): the extra one goes too
        (40, 20, 29),  # what is kept is what one compaction of 21 keeps: 11
        (21, 21, 0),
        (22, 21, 10),
        (3, 2, 1),
        (4, 3, 1),
        (6, 5, 2),
    ],
)
def test_compact_summarizes_the_oldest_half_once_over(length: int, max_window: int, summarized: int) -> None:
    window = list(range(length))
    to_summarize, kept = compact(window, max_window)
    assert to_summarize == window[:summarized]
    assert kept == window[summarized:]
    assert compaction_size(length, max_window) == summarized


@given(st.integers(0, 200), st.integers(2, 50))
def test_compact_loses_nothing_keeps_order_and_fits(length: int, max_window: int) -> None:
    window = list(range(length))
    to_summarize, kept = compact(window, max_window)
    assert to_summarize + kept == window
    assert len(kept) <= max_window
    if length > max_window:
        assert len(kept) == max_window + 1 - max_window // 2


@pytest.mark.parametrize(
    ("summary", "new", "combined"),
    [
        (None, "B.", "B."),
        ("", "B.", "B."),
        ("A.", "B.", "A. Then: B."),
        ("A. Then: B.", "C.", "A. Then: B. Then: C."),
        ("A.", "  B.\n", "A. Then: B."),
        ("A.", "", "A."),
        (None, "", None),
    ],
)
def test_summaries_combine_a_then_b(summary: str | None, new: str, combined: str | None) -> None:
    assert combine_summaries(summary, new) == combined


# --- the deterministic summarizer ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "summary"),
    [
        ([], "0 calls."),
        ([record()], "1 call: fetch ×1."),
        (
            [
                record("fetch", {"doc_id": 4}),
                record("fetch", {"doc_id": 7}),
                record("parse", {"doc_id": 4}, is_error=True),
            ],
            "3 calls: fetch ×2, parse ×1 (1 error); doc_id=4, 7.",
        ),
        (
            [record("a", is_error=True), record("b", is_error=True)],
            "2 calls: a ×1, b ×1 (2 errors).",
        ),
        (
            [record("search", {"query": "best pizza", "limit": 5, "user_id": "u1"})],
            '1 call: search ×1; user_id=u1; query="best pizza"; limit=5.',
        ),
        (
            [record("get", {"id": i}) for i in range(8)],
            "8 calls: get ×8; id=0, 1, 2, 3, 4 (+3 more).",
        ),
        (
            [record("put", {"blob": "x" * 5000, "nested": {"a": 1}, "flag": True})],
            "1 call: put ×1.",  # a cut argument names nothing
        ),
        (
            [record("put", {"text": "y" * 41, "nested": [1], "n": 1.5, "ok": False})],
            "1 call: put ×1; n=1.5; ok=false.",
        ),
    ],
)
def test_deterministic_summary(records: list[ToolCallRecord], summary: str) -> None:
    assert summarize_records(records) == summary
    assert summarize_records(records) == summarize_records(list(records)), "deterministic"


# --- record cuts -------------------------------------------------------------------------------


def test_small_arguments_and_text_are_kept_whole() -> None:
    arguments = {"doc_id": 4, "text": "é" * 100}
    kept = ToolCallRecord(tool="t", server="s", arguments=arguments, result_text="ok", at_ms=1)
    assert kept.arguments == arguments
    assert kept.result_text == "ok"


@pytest.mark.parametrize(
    "arguments",
    [
        {"text": "x" * 2000},
        ["é" * 600],  # 1200 bytes of UTF-8 in 600 characters
        "z" * 1023,  # with its quotes: 1025 bytes
        {"nested": [{"a": "b" * 100}] * 20},
        "😀" * 300,  # the worst head: 4 bytes a character
        '"\\' * 400,  # escapes, escaped again in the head
    ],
)
def test_arguments_over_1kb_are_cut_to_a_marked_head(arguments: Any) -> None:
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    cut_record = ToolCallRecord(tool="t", server="s", arguments=arguments, at_ms=1)
    assert cut_record.arguments == {"$cut": True, "bytes": len(text.encode()), "head": text[:200]}
    stored = json.loads(cut_record.model_dump_json())["arguments"]
    assert len(json.dumps(stored, separators=(",", ":"), ensure_ascii=False).encode()) < RECORD_CUT_BYTES


def test_arguments_of_exactly_1kb_are_kept() -> None:
    arguments = "z" * (RECORD_CUT_BYTES - 2)  # with its quotes: 1024 bytes
    assert cut_json(arguments) == arguments
    assert isinstance(cut_json(arguments + "z"), dict)


@pytest.mark.parametrize("text", ["x" * 1025, "é" * 1000, "日本" * 400, "a" + "😀" * 300])
def test_result_text_over_1kb_is_cut_within_1kb(text: str) -> None:
    cut = ToolCallRecord(tool="t", server="s", result_text=text, at_ms=1).result_text
    assert len(cut.encode()) <= RECORD_CUT_BYTES
    assert cut.endswith(f"[cut: {len(text.encode())} bytes]")
    assert text.startswith(cut.split("... [cut:")[0])


def test_result_text_of_exactly_1kb_is_kept() -> None:
    assert cut_text("x" * RECORD_CUT_BYTES) == "x" * RECORD_CUT_BYTES


def test_a_record_survives_its_json_unchanged() -> None:
    original = ToolCallRecord(tool="t", server="s", arguments={"blob": "x" * 5000}, result_text="y" * 5000)
    assert ToolCallRecord.model_validate_json(original.model_dump_json()) == original
