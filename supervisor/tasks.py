"""Coroutines run past their caller: kept until done, waited for at shutdown, failures logged."""

import asyncio


class TaskSet:
    """A registry of background tasks; what one raises is logged, never dropped unseen."""

    def __init__(self, log, *, expected: tuple[type[BaseException], ...] = ()):
        self._log = log
        self._expected = expected  # errors someone else already answered (a client, the event stream)
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` as a task kept until it is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        """Forget the task; log what it raised unless that was expected."""
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, self._expected):
            self._log.error("background_task_failed", error=repr(exc))

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the tasks running now."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
