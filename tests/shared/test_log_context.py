"""The log context and the JSON line: fields bound per task, exceptions as one field, background
tasks not naming the item that started them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from shared.log_context import context_with, detached_context, log_context
from shared.log_format import json_handler


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    logger = logging.getLogger(f"test.log_context.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = json_handler(stream)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_has_the_standard_fields_and_the_bound_ones(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured
    logger.info("outside")
    with log_context(job_id="j1", chunk="c1", server="demo"):
        logger.warning("inside %s", "chunk", extra={"color_message": "\x1b[1minside\x1b[0m"})
        with log_context(item=7):
            logger.debug("inside item")
        logger.info("chunk again")
    first, chunk, item, again = lines(stream)
    assert first.keys() == {"timestamp", "level", "logger", "message"}
    assert first["timestamp"].endswith("+00:00") and first["level"] == "INFO"
    assert chunk == {**chunk, "message": "inside chunk", "job_id": "j1", "chunk": "c1", "server": "demo"}
    assert "color_message" not in chunk and "item" not in chunk
    assert (item["item"], item["job_id"], item["level"]) == (7, "j1", "DEBUG")
    assert "item" not in again


def test_an_exception_is_one_field_of_one_line(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad value")
    except ValueError:
        logger.exception("failed")
    assert len(stream.getvalue().splitlines()) == 1
    (record,) = lines(stream)
    assert record["message"] == "failed" and record["level"] == "ERROR"
    assert record["exception"].startswith("Traceback") and "ValueError: bad value" in record["exception"]


def test_each_item_task_names_its_own_item_and_a_detached_task_none(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = captured

    async def item() -> None:
        await asyncio.sleep(0)
        logger.info("item")

    async def background() -> None:
        logger.info("background")

    async def chunk() -> None:
        with log_context(job_id="j", chunk="c"):
            tasks = [asyncio.create_task(item(), context=context_with(item=i)) for i in range(3)]
            with log_context(item=99):  # as if an item started it
                tasks.append(asyncio.create_task(background(), context=detached_context()))
            await asyncio.gather(*tasks)

    asyncio.run(chunk())
    records = lines(stream)
    assert sorted(r["item"] for r in records if r["message"] == "item") == [0, 1, 2]
    assert all(r["job_id"] == "j" for r in records if r["message"] == "item")
    (detached,) = [r for r in records if r["message"] == "background"]
    assert not {"job_id", "chunk", "item"} & detached.keys()
