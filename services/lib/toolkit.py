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

    if sample_width == 2:
        x = np.frombuffer(payload, dtype="<i2", count=len(payload) // 2).astype(np.float64) / 32768.0
    elif sample_width == 1:   # WAV convention: unsigned 8-bit
        x = (np.frombuffer(payload, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif sample_width == 3:
        raw = np.frombuffer(payload, dtype=np.uint8, count=len(payload) // 3 * 3).reshape(-1, 3)
        wide = np.zeros((len(raw), 4), dtype=np.uint8)
        wide[:, 1:] = raw     # left-align the 24-bit sample in an int32
        x = wide.view("<i4").ravel().astype(np.float64) / 2147483648.0
    elif sample_width == 4:
        x = np.frombuffer(payload, dtype="<i4", count=len(payload) // 4).astype(np.float64) / 2147483648.0
    else:
        raise ValueError(f"sample width {sample_width}")
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
