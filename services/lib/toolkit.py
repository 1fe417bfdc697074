"""Small helpers shared by the command-line tools (tap, top, record, replay, export, say).

Kept free of heavy imports: the tools must start fast and never pull in google-genai,
sounddevice or OpenCV.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from typing import Any, Sequence

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError
from livepipe.bus.topics import TOPICS


class StopFlag:
    """Set by SIGINT/SIGTERM. Tools poll it between short blocking waits instead of raising from
    the signal handler, so a signal never cuts a file write (or a record) in half."""

    def __init__(self) -> None:
        self.signal: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def dbfs(payload: bytes, sample_width: int, channels: int = 1) -> float:
    """RMS level of little-endian PCM relative to full scale, in dB (a full-scale square wave is
    0 dBFS, a full-scale sine -3 dBFS). -inf for digital silence or an empty chunk."""
    import numpy as np   # only when audio shows up: `livepipe tap text.in` stays light
    from livepipe.services.lib.audio import decode_pcm

    x = decode_pcm(payload, sample_width, dtype=np.float64)   # every sample of every channel
    if x.size == 0:
        return float("-inf")
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else float("-inf")


def clock(ns: int) -> str:
    """Local wall-clock time `HH:MM:SS.mmm` of an epoch-ns timestamp."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{rest // 1_000_000:03d}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def finite_or_none(x: float | None, digits: int = 2) -> float | None:
    """JSON has no -inf/nan: map them to null."""
    if x is None or math.isinf(x) or math.isnan(x):
        return None
    return round(x, digits)


def check_topics(names: Sequence[str]) -> None:
    """ConfigError naming any topic that bus/topics.py does not declare."""
    unknown = [t for t in names if t not in TOPICS]
    if unknown:
        raise ConfigError(f"unknown topic {', '.join(unknown)} (known: {', '.join(TOPICS)})")


NO_BROKER_AFTER_S = 1.0   # say so after this long, then keep waiting


def wait_for_broker(client: BusClient, tool: str, timeout: float | None, stop: StopFlag | None = None) -> bool:
    """Wait until the broker answers `client`; after 1 s say so in one line on stderr and keep
    waiting. False if a signal came first; BusTimeout after `timeout` seconds (None: no limit)."""
    started = time.monotonic()
    said = False
    while True:
        elapsed = time.monotonic() - started
        left = None if timeout is None else timeout - elapsed
        if left is not None and left <= 0:
            raise BusTimeout(f"no broker at {client.cfg.pub_endpoint} / {client.cfg.sub_endpoint} "
                             f"after {timeout:g} s")
        step = max(0.05, NO_BROKER_AFTER_S - elapsed) if not said else 0.25
        try:
            client.wait_ready(step if left is None else min(step, left))
        except BusTimeout:
            if stop:
                return False
            if not said and time.monotonic() - started >= NO_BROKER_AFTER_S:
                limit = "" if timeout is None else f" (up to {timeout:g} s)"
                print(f"livepipe {tool}: no broker answers at {client.cfg.pub_endpoint} / "
                      f"{client.cfg.sub_endpoint}; waiting{limit}: is `livepipe broker` running?",
                      file=sys.stderr, flush=True)
                said = True
            continue
        if said:
            print(f"livepipe {tool}: the broker answers", file=sys.stderr, flush=True)
        return True


def connect(name: str, cfg: BusConfig, topics: Sequence[str], timeout: float | None,
            stop: StopFlag | None = None) -> BusClient | None:
    """A BusClient subscribed to `topics` (all when empty) whose subscriptions are live; says after
    1 s that no broker answers and keeps waiting. BusTimeout if the broker does not answer within
    `timeout` seconds (None: wait); None if `stop` was set (a signal) meanwhile."""
    client = BusClient(name, cfg, topics, all_topics=not topics)
    try:
        if not wait_for_broker(client, name, timeout, stop):
            client.close()
            return None
    except BusTimeout:
        client.close()
        raise
    return client
