"""Retention's pure parts: what a delete does, how far back the global stream is kept, which stream
entries are a job's, and how `toolswarm jobs` shows progress and times. No Redis."""

from __future__ import annotations

import pytest

from cli.display import ago, progress_text
from shared.models import JobState
from shared.retention import DeleteAction, delete_action, events_of, global_events_horizon
from shared.settings import StateSettings


@pytest.mark.parametrize(
    ("state", "force", "expected"),
    [
        ("finished", False, "delete"),
        ("cancelled", False, "delete"),
        ("finished", True, "delete"),  # nothing to cancel: --force changes nothing
        ("running", False, "refuse"),
        ("pending", False, "refuse"),
        ("running", True, "cancel_then_delete"),
        ("pending", True, "cancel_then_delete"),
    ],
)
def test_delete_action(state: JobState, force: bool, expected: DeleteAction) -> None:
    assert delete_action(state, force) == expected


@pytest.mark.parametrize(
    ("now_ms", "ttl_s", "expected"),
    [
        (1_000_000, 0, None),  # 0 keeps everything
        (1_000_000, 2, "998000-0"),
        (1_000_000, 604_800, "0-0"),  # younger than the retention: nothing is old enough yet
        (700_000_000, 604_800, "95200000-0"),
    ],
)
def test_global_events_horizon(now_ms: int, ttl_s: int, expected: str | None) -> None:
    assert global_events_horizon(now_ms, ttl_s) == expected


def test_events_of_picks_the_jobs_entries_only() -> None:
    entries = [
        ("1-0", {"type": "job.submitted", "job_id": "a"}),
        ("2-0", {"type": "item.settled", "job_id": "b", "index": "0"}),
        ("3-0", {"type": "job.completed", "job_id": "a"}),
        ("4-0", {"type": "other"}),
        ("5-0", {"type": "item.settled", "job_id": "ab"}),
    ]
    assert events_of(entries, "a") == ["1-0", "3-0"]
    assert events_of(entries, "z") == []


def test_jobs_are_kept_a_week_unless_told() -> None:
    assert StateSettings().job_ttl_s == 7 * 24 * 3600
    assert StateSettings(job_ttl_s=0).job_ttl_s == 0
    with pytest.raises(ValueError, match="job_ttl_s"):
        StateSettings(job_ttl_s=-1)


@pytest.mark.parametrize(
    ("settled", "total", "expected"),
    [
        (0, 50, "0/50 (0%)"),
        (37, 50, "37/50 (74%)"),
        (999, 1000, "999/1000 (99%)"),  # rounded down: 100% only when every item settled
        (1000, 1000, "1000/1000 (100%)"),
        (0, 0, "0/0 (100%)"),
    ],
)
def test_progress_text(settled: int, total: int, expected: str) -> None:
    assert progress_text(settled, total) == expected


@pytest.mark.parametrize(
    ("at_ms", "now_ms", "expected"),
    [
        (10_000, 15_000, "5s ago"),
        (10_000, 10_000, "0s ago"),
        (0, 59_999, "59s ago"),
        (0, 60_000, "1m ago"),
        (0, 7_200_000, "2h ago"),
        (0, 3 * 86_400_000 + 5_000, "3d ago"),
        (604_800_000, 0, "in 7d"),
        (90_000, 0, "in 1m"),
    ],
)
def test_ago(at_ms: int, now_ms: int, expected: str) -> None:
    assert ago(at_ms, now_ms) == expected
