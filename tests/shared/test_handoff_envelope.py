"""The handoff envelope's field rules (the article's schema), by table."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from shared.errors import HandoffExpired, HandoffMisdelivered
from shared.handoff import HandoffEnvelope, check_envelope

VALID: dict[str, Any] = {
    "session_id": str(uuid.uuid4()),
    "handoff_id": str(uuid.uuid4()),
    "idempotency_token": "job-1:step-2",
    "source_server": "extract",
    "target_server": "summarize",
    "accumulated_context": {"customer_id": 42},
    "created_at": "2026-12-03T10:00:00Z",
}


def test_a_valid_envelope_takes_the_defaults() -> None:
    envelope = HandoffEnvelope.model_validate(VALID)
    assert envelope.ttl_seconds == 300 and envelope.next_tool_hint is None and envelope.context_ref is None
    assert envelope.created_at == datetime(2026, 12, 3, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"session_id": "not-a-uuid"}, "session_id"),
        ({"handoff_id": "1234"}, "handoff_id"),
        ({"session_id": "../etc/passwd"}, "session_id"),
        ({"idempotency_token": ""}, "idempotency_token"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": -5}, "ttl_seconds"),
        ({"ttl_seconds": 1.5}, "ttl_seconds"),
        ({"created_at": "yesterday"}, "created_at"),
        ({"created_at": "2026-12-03T10:00:00"}, "created_at"),  # no timezone: ambiguous age
        ({"accumulated_context": ["a", "transcript"]}, "accumulated_context"),
        ({"target_server": None}, "target_server"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_field_rules(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        HandoffEnvelope.model_validate({**VALID, **change})
    assert {str(error["loc"][0]) for error in refused.value.errors()} == {field}


@pytest.mark.parametrize(
    "missing", ["session_id", "handoff_id", "idempotency_token", "target_server", "created_at"]
)
def test_required_fields(missing: str) -> None:
    with pytest.raises(ValidationError):
        HandoffEnvelope.model_validate({k: v for k, v in VALID.items() if k != missing})


def test_misdelivered_names_both_servers_and_expired_gives_its_age() -> None:
    now = datetime.now(UTC)
    envelope = HandoffEnvelope.model_validate({**VALID, "created_at": now.isoformat()})
    check_envelope(envelope, {"summarize"}, now)
    with pytest.raises(HandoffMisdelivered, match="intended 'summarize', got 'extract'"):
        check_envelope(envelope, {"extract"}, now)
    with pytest.raises(HandoffExpired, match="301s old, TTL was 300s"):
        check_envelope(envelope, {"summarize"}, now + timedelta(seconds=301))
