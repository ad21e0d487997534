"""Batching a stream: full batches at once, partial ones one window after their first event.

The stream here is a stand-in with the few Stream members :func:`batches`
uses; the agents' real streams are exercised by the integration tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.engine.batching import batches


class FakeStream:
    """Feeds values through the processors, the way Faust's passive drainer does."""

    def __init__(self) -> None:
        self.enable_acks = True
        self._processors: list[Callable[[Any], Awaitable[Any]]] = []
        self.current_event: Any = None
        self.should_stop = False
        self.wakeups = 0
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.channel = self  # batches() takes aiter(stream.channel)
        self._drainer: asyncio.Task[None] | None = None

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:  # never iterated here: the drainer reads the queue
        raise StopAsyncIteration

    def add_processor(self, processor: Callable[[Any], Awaitable[Any]]) -> None:
        self._processors.append(processor)

    def _enable_passive(self, channel: Any) -> None:
        self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while True:
            value = await self.queue.get()
            self.current_event = ("event", value)
            for processor in self._processors:
                await processor(value)

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def wait_for_stopped(self, event: asyncio.Event) -> None:
        self.wakeups += 1
        await event.wait()


async def test_batches_fill_up_then_wait_for_the_window() -> None:
    """A full batch comes at once, a partial one only when its window ends: with a 30 s
    window, the full one arriving at all shows it did not wait, and the partial one not
    arriving while the window is open shows that it does."""
    stream = FakeStream()
    got: list[list[Any]] = []
    full = asyncio.Event()

    async def take() -> None:
        async for events in batches(stream, 3, 30.0):
            got.append([v for _, v in events])
            full.set()

    task = asyncio.ensure_future(take())
    for n in range(5):
        await stream.queue.put(n)
    await asyncio.wait_for(full.wait(), 10)  # far sooner than the window
    await asyncio.sleep(0.2)  # the partial batch [3, 4] waits for its window meanwhile
    assert got == [[0, 1, 2]]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert stream.enable_acks and stream._processors == []  # put back as found


async def test_a_partial_batch_comes_when_its_window_ends() -> None:
    stream = FakeStream()

    async def first_batch() -> list[Any]:
        async for events in batches(stream, 3, 0.2):
            return [v for _, v in events]
        return []

    task = asyncio.ensure_future(first_batch())
    await stream.queue.put(7)
    started = time.monotonic()
    assert await asyncio.wait_for(task, 10) == [7]
    assert time.monotonic() - started >= 0.19  # not before its window ended


async def test_a_full_buffer_holds_the_stream_until_it_is_taken() -> None:
    stream = FakeStream()
    release = asyncio.Event()
    got: list[list[Any]] = []

    async def take() -> None:
        async for events in batches(stream, 2, 10.0):
            got.append([v for _, v in events])
            await release.wait()  # the agent is busy with this batch

    task = asyncio.ensure_future(take())
    for n in range(6):
        await stream.queue.put(n)
    await asyncio.sleep(0.1)
    # one batch taken, the next one full; the rest waits in the channel
    assert got == [[0, 1]] and stream.queue.qsize() == 2  # [2, 3] buffered, 4 and 5 wait
    release.set()
    await asyncio.sleep(0.1)
    assert got == [[0, 1], [2, 3], [4, 5]]
    task.cancel()


async def test_an_idle_stream_yields_nothing_and_arms_no_timer() -> None:
    stream = FakeStream()
    got: list[list[Any]] = []

    async def take() -> None:
        async for events in batches(stream, 10, 0.01):
            got.append(events)

    task = asyncio.ensure_future(take())
    await asyncio.sleep(0.2)  # twenty windows of 10 ms
    task.cancel()
    assert got == []
    assert stream.wakeups == 1  # waiting once, not polling every window


async def test_each_batch_acks_what_was_handled_and_leaves_a_failed_batch_unacked(
    monkeypatch: Any,
) -> None:
    """The one failure rule of every agent: a batch whose handler raised is logged and
    left unacked (read again after a heal), and the agent goes on with the next."""
    from app.engine import batching

    monkeypatch.setattr(batching, "RETRY_PAUSE_S", 0.0)
    stream = FakeStream()
    acked: list[Any] = []

    async def ack(event: Any) -> None:
        acked.append(event[1])

    stream.ack = ack  # type: ignore[attr-defined]
    handled: list[list[Any]] = []

    async def handle(events: list[Any]) -> None:
        handled.append([e[1] for e in events])
        if len(handled) == 1:
            raise RuntimeError("a bug")

    runner = asyncio.ensure_future(batching.each_batch(stream, handle, size=2, within=30))
    for value in ("a", "b", "c", "d"):
        await stream.queue.put(value)
    for _ in range(100):
        if len(handled) == 2 and len(acked) == 2:
            break
        await asyncio.sleep(0.01)
    runner.cancel()
    assert handled == [["a", "b"], ["c", "d"]]
    assert acked == ["c", "d"]  # a and b stay unacked: their partition is read again
