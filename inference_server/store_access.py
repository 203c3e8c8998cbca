"""The engine's way to its session store: one thread, and whether it works.

Every call runs on one thread of its own, in the order of the calls, so a
clear and a finishing turn of one session cannot cross, and nothing of the
store (SQLite, PostgreSQL) ever blocks the event loop. A write (or a read a
turn cannot do without) that fails with ``SessionStoreError`` marks the store
unavailable: ``problem`` says why, health says NOT_SERVING, and the store is
tried again every ``PROBE_INTERVAL_S`` until a write succeeds. Clears and
reads go on meanwhile, so that space can be freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ParamSpec, TypeVar

from .errors import EngineNotReady, SessionStoreError
from .sessions import SessionStore

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

# While the session store cannot be written, how often it is tried again.
PROBE_INTERVAL_S = 2.0


class StoreAccess:
    """Runs calls on ``store`` from its own thread; ``on_health_change`` is
    called (on the event loop) when ``problem`` changes."""

    def __init__(self, store: SessionStore, on_health_change: Callable[[], None]) -> None:
        self._store = store
        self._on_health_change = on_health_change
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="session-store")
        self._refusing = False
        self._probe: asyncio.Task[None] | None = None
        self.problem: str | None = None
        """Why the store cannot be written now; ``None`` when it can."""

    async def call(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``call`` on the store's thread, after the calls before it.
        Raises ``EngineNotReady`` once the engine is closing."""
        if self._refusing:
            raise EngineNotReady()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(call, *args, **kwargs))

    async def read(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``call`` for a read that a turn needs: a ``SessionStoreError`` (the
        database is gone) marks the store unavailable as a failed write does;
        a success proves nothing of writes, so it clears nothing."""
        try:
            return await self.call(call, *args, **kwargs)
        except SessionStoreError as error:
            self._failed(str(error))
            raise

    async def write(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """``call`` for a call that writes: a ``SessionStoreError`` marks the
        store unwritable (and starts trying it again), a success clears that."""
        try:
            result = await self.call(call, *args, **kwargs)
        except SessionStoreError as error:
            self._failed(str(error))
            raise
        self._writable()
        return result

    def refuse(self) -> None:
        """Refuse calls from now on (the engine is closing); stop probing."""
        self._refusing = True
        if self._probe is not None:
            self._probe.cancel()

    async def close(self) -> None:
        """Close the store after the calls already queued (what they commit is
        kept), and stop its thread."""
        self.refuse()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._store.close)
        self._thread.shutdown()

    def _failed(self, problem: str) -> None:
        if self.problem is None:
            log.error("%s; health says NOT_SERVING until a write succeeds", problem)
        self.problem = problem
        self._on_health_change()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_writable())

    def _writable(self) -> None:
        if self.problem is not None:
            log.info("the session store can be written again")
            self.problem = None
            self._on_health_change()

    async def _probe_until_writable(self) -> None:
        while self.problem is not None:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.call(self._store.check_writable)
            except SessionStoreError as error:
                self.problem = str(error)
            except EngineNotReady:
                return  # closing
            else:
                self._writable()
