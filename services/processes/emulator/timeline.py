"""The per-turn timeline: one JSON line per event, appended where benchmarks can read it.

    {"session": "s3", "conn": 4, "turn": 2, "event": "first_byte", "t_ns": 1732550000123456789, ...}

`session` is the conversation (kept across resumption), `conn` the connection, `t_ns` wall-clock
nanoseconds (time.time_ns) so other processes' clocks compare. Lines are written with one
O_APPEND write each, so concurrent sessions (and processes) never interleave within a line.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("emulator")


class Timeline:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._failed = False

    def write(self, session: str, turn: int, event: str, t_ns: int | None = None, **fields: Any) -> None:
        if self._fd is None:
            return
        line = {"session": session, "turn": turn, "event": event, "t_ns": t_ns or time.time_ns(), **fields}
        try:
            os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())
        except OSError as e:          # a full disk must not take the sessions down
            if not self._failed:
                log.warning("timeline %s: %s (no more timeline lines)", self.path, e.strerror)
                self._failed = True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
