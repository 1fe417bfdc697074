"""Small helpers shared by the command-line tools (tap, top, record, replay, export, say).

Kept free of heavy imports: the tools must start fast and never pull in google-genai,
sounddevice or OpenCV.
"""
from __future__ import annotations

import math
import signal
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


def connect(name: str, cfg: BusConfig, topics: Sequence[str], timeout: float) -> BusClient:
    """A BusClient subscribed to `topics` (all when empty) whose subscriptions are live;
    BusTimeout if the broker does not answer within `timeout` seconds."""
    client = BusClient(name, cfg, topics, all_topics=not topics)
    try:
        client.wait_ready(timeout)
    except BusTimeout:
        client.close()
        raise
    return client
