"""Results out of Redis as a stream: JSON Lines (the whole record) or CSV (a flat row), written as
they are read, a batch of records at a time, so a million results take the memory of one batch."""

from __future__ import annotations

import csv
from typing import Literal, TextIO

from shared.models import ResultRecord
from shared.store import JobStore

ExportFormat = Literal["jsonl", "csv"]
CSV_COLUMNS = ("index", "key", "status", "error_type", "error", "output")


def csv_row(record: ResultRecord) -> tuple[str, ...]:
    """index, key, status, error type, error message, text output (empty where there is none)."""
    error = record.error
    return (
        str(record.index),
        record.key or "",
        record.status,
        error.type if error else "",
        error.message if error else "",
        record.result.text() if record.result else "",
    )


class ResultWriter:
    """Writes records to ``out`` in one format; counts them."""

    def __init__(self, out: TextIO, fmt: ExportFormat) -> None:
        self.out, self.fmt, self.written = out, fmt, 0
        self._csv = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
        if self._csv is not None:
            self._csv.writerow(CSV_COLUMNS)

    def write(self, record: ResultRecord) -> None:
        if self._csv is not None:
            self._csv.writerow(csv_row(record))
        else:
            self.out.write(record.model_dump_json(exclude_none=True) + "\n")
        self.written += 1


async def export_results(
    store: JobStore,
    job_id: str,
    out: TextIO,
    fmt: ExportFormat = "jsonl",
    status: str | None = None,
    step: str | None = None,
) -> int:
    """Write the job's settled results (optionally of one status, or failed at one step) to ``out``
    in item order; returns how many were written."""
    writer = ResultWriter(out, fmt)
    async for record in store.results(job_id):
        if record.matches(status, step):
            writer.write(record)
    out.flush()
    return writer.written
