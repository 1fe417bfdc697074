"""One websocket connection to the service and the client messages it may have to send again."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from typing import Any

from livepipe.services.processes.gemini_bridge.settings import NAME

log = logging.getLogger(NAME)


def parse_duration_ms(text: str | None) -> int:
    """'10s' / '9.5s' / '1.000000001s' (protobuf Duration JSON) -> milliseconds (0 if unknown)."""
    if not text:
        return 0
    m = re.match(r"^\s*([0-9.]+)\s*s?\s*$", str(text))
    return int(float(m.group(1)) * 1000) if m else 0


class Link:
    """One websocket connection (one `live.connect`) and its receive task."""

    def __init__(self, number: int, session: Any, stack: contextlib.AsyncExitStack) -> None:
        self.number = number
        self.session = session
        self.stack = stack
        self.task: asyncio.Task | None = None
        self.watchdog: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        self.go_away_ms: int | None = None
        self.retired = False                    # replaced: whatever it still says is ignored
        self.opened = time.monotonic()
        # Client messages are numbered as the service counts them (setup = 0). Audio sent since the
        # state the latest resumption handle covers is kept, to be sent again on the next connection.
        self.sent_index = 0
        self.replay: deque[tuple[int, bytes | str, float]] = deque()
        self.replay_bytes = 0
        self.last_audio_sent = 0.0

    def next_index(self) -> int:
        self.sent_index += 1
        return self.sent_index

    def sent_audio(self, index: int, item: bytes | str, limit_bytes: int) -> None:
        now = time.monotonic()
        self.replay.append((index, item, now))
        if isinstance(item, bytes):
            self.replay_bytes += len(item)
            self.last_audio_sent = now
        while self.replay_bytes > limit_bytes and len(self.replay) > 1:
            self._pop()

    def covered(self, last_index: int | None) -> None:
        """A resumption handle now covers messages up to last_index (None: up to about now)."""
        horizon = time.monotonic() - 0.2   # without an index, keep what may still be in flight
        while self.replay and (self.replay[0][0] <= last_index if last_index is not None
                               else self.replay[0][2] < horizon):
            self._pop()

    def _pop(self) -> None:
        _, item, _ = self.replay.popleft()
        if isinstance(item, bytes):
            self.replay_bytes -= len(item)

    async def close(self, timeout: float = 1.0) -> None:
        for task in (self.task, self.watchdog):
            if task is not None and not task.done():
                task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.stack.aclose(), timeout)

