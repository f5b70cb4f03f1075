"""Waiting for a condition on a local view without polling: views notify, waiters re-check."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    """Wakes every waiter when its owner says something changed (on the event loop's thread)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def until(self, predicate: Callable[[], bool], *, timeout: float) -> bool:
        """Wait until `predicate()` holds, re-checked at each change; False after `timeout`."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                while not predicate():
                    await self._event.wait()
        except TimeoutError:
            return predicate()
        return True
