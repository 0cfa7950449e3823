"""Deadlines on one timer: each fires on time unless discarded, whatever order they come in."""

import asyncio

import pytest

from corral.supervisor.deadlines import Deadlines


def recorder():
    """A Deadlines whose firings are recorded as (key, value, loop time)."""
    fired = []
    deadlines = Deadlines(on_due=lambda key, value: fired.append((key, value, asyncio.get_running_loop().time())))
    return deadlines, fired


async def test_a_deadline_fires_once_unless_discarded():
    deadlines, fired = recorder()
    start = asyncio.get_running_loop().time()
    deadlines.add("kept", 0.05, "v")
    deadlines.add("dropped", 0.05)
    deadlines.discard("dropped")
    await asyncio.sleep(0.2)
    assert [(k, v) for k, v, _ in fired] == [("kept", "v")]
    assert fired[0][2] - start >= 0.05 - 0.002  # uvloop's clock ticks in milliseconds
    assert len(deadlines) == 0


async def test_later_deadlines_fire_after_the_first_one_finished_early():
    deadlines, fired = recorder()
    deadlines.add("first", 0.05)
    await asyncio.sleep(0.02)
    deadlines.add("second", 0.05)
    deadlines.discard("first")  # the timer still fires at first's time and re-arms for second
    await asyncio.sleep(0.2)
    assert [k for k, _, _ in fired] == ["second"]


async def test_a_shorter_deadline_added_later_is_not_late():
    deadlines, fired = recorder()
    start = asyncio.get_running_loop().time()
    deadlines.add("long", 5.0)
    deadlines.add("short", 0.05)
    await asyncio.sleep(0.2)
    assert [k for k, _, _ in fired] == ["short"]
    assert fired[0][2] - start < 1.0
    deadlines.close()


async def test_an_on_due_that_raises_does_not_stop_the_others():
    fired = []

    def on_due(key, value):
        fired.append(key)
        if key == "bad":
            raise RuntimeError("boom")

    deadlines = Deadlines(on_due=on_due)
    loop = asyncio.get_running_loop()
    errors = []
    loop.set_exception_handler(lambda loop, context: errors.append(context["exception"]))
    deadlines.add("bad", 0.02)
    deadlines.add("good", 0.02)
    await asyncio.sleep(0.2)
    assert fired == ["bad", "good"] and len(errors) == 1


@pytest.mark.parametrize("count", [1, 50])
async def test_close_stops_every_pending_deadline(count):
    deadlines, fired = recorder()
    for key in range(count):
        deadlines.add(key, 0.02)
    deadlines.close()
    await asyncio.sleep(0.1)
    assert fired == [] and len(deadlines) == 0
