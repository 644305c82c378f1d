"""The job view is a pure fold; a snapshot plus its tail folds to the same view as the whole log."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.eventlog import fold, next_stream_id
from shared.jobview import JobView, apply_job_event

STATUSES = ("succeeded", "failed", "cancelled")


@st.composite
def job_logs(draw: st.DrawFn) -> list[dict[str, str]]:
    total = draw(st.integers(min_value=0, max_value=60))
    statuses = draw(st.lists(st.sampled_from(STATUSES), min_size=total, max_size=total))
    events: list[dict[str, str]] = [{"type": "job.submitted", "total": str(total)}]
    if total and draw(st.booleans()):
        events.append({"type": "job.started"})
    events += [{"type": "item.settled", "index": str(i), "status": s} for i, s in enumerate(statuses)]
    if draw(st.booleans()):
        events.append(
            {
                "type": "job.completed",
                "state": draw(st.sampled_from(["finished", "cancelled"])),
                "at_ms": "1700000000000",
            }
        )
    return events


@given(job_logs(), st.data())
def test_fold_of_snapshot_plus_tail_equals_fold_of_whole_log(
    events: list[dict[str, str]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(events)))
    snapshot = fold(apply_job_event, JobView(), events[:cut])
    restored = JobView.model_validate_json(snapshot.model_dump_json())  # as stored in Redis
    assert fold(apply_job_event, restored, events[cut:]) == fold(apply_job_event, JobView(), events)


@given(job_logs())
def test_fold_counts_every_settled_item_once(events: list[dict[str, str]]) -> None:
    view = fold(apply_job_event, JobView(), events)
    settled = [e for e in events if e["type"] == "item.settled"]
    assert view.succeeded + view.failed + view.cancelled == len(settled) == view.total
    assert view.events == len(events)
    if events[-1]["type"] == "job.completed":
        assert view.state == events[-1]["state"]


def test_empty_log_is_a_pending_job() -> None:
    assert fold(apply_job_event, JobView(), []) == JobView(state="pending")


def test_settled_item_starts_a_pending_job() -> None:
    view = apply_job_event(JobView(total=2), {"type": "item.settled", "index": "0", "status": "failed"})
    assert view.state == "running" and view.failed == 1


def test_next_stream_id_is_the_smallest_greater_id() -> None:
    assert next_stream_id("1700000000000-0") == "1700000000000-1"
    assert next_stream_id("5-41") == "5-42"
