"""Callbacks posted from another thread reach the event loop in order."""

from __future__ import annotations

import asyncio
import threading

from inference_server.loop_poster import LoopPoster


async def test_callbacks_from_another_thread_run_on_the_loop_in_order():
    loop = asyncio.get_running_loop()
    poster = LoopPoster(loop)
    seen: list[tuple[int, bool]] = []
    done = asyncio.Event()

    def note(value: int) -> None:
        seen.append((value, threading.get_ident() == loop_thread))
        if value == 999:
            done.set()

    def broken() -> None:
        raise ValueError("one callback fails")

    loop_thread = threading.get_ident()

    def producer() -> None:
        for value in range(1000):
            poster.post(note, value)
            if value == 500:
                poster.post(broken)  # logged; the others still run

    thread = threading.Thread(target=producer)
    thread.start()
    await asyncio.wait_for(done.wait(), 10)
    thread.join()
    assert [value for value, _ in seen] == list(range(1000))
    assert all(on_loop for _, on_loop in seen)
    await asyncio.to_thread(poster.close)


async def test_close_delivers_what_was_posted_before_it():
    loop = asyncio.get_running_loop()
    poster = LoopPoster(loop)
    seen: list[int] = []
    for value in range(50):
        poster.post(seen.append, value)
    await asyncio.to_thread(poster.close)
    await asyncio.sleep(0)  # the last wakeup's callbacks run now
    await asyncio.sleep(0)
    assert seen == list(range(50))
