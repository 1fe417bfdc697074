"""The one webrtcvad segmenter: 16 kHz int16 audio -> fixed frames, each voiced or not.

Used by the bridge (--vad off marks activity itself), the emulator (turn detection) and the demo
(when the user spoke). Frames stay aligned across chunk boundaries (the rest waits in `pending`).
A frame is voiced when webrtcvad says so and, with a floor, its RMS is at least `floor_rms`:
webrtcvad's hangover keeps calling near-silence after speech voiced for up to 140 ms, a level floor
stops that.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


class _Vad:
    """webrtcvad.Vad on its C module directly: the package's __init__ reads its own version through
    importlib.metadata (which imports email, csv and more: +0.5-2 MB of RSS in capture-audio)."""

    def __init__(self, mode: int) -> None:
        import _webrtcvad   # the C part of the `webrtcvad` wheel
        self._c: Any = _webrtcvad
        self._vad = _webrtcvad.create()
        _webrtcvad.init(self._vad)
        _webrtcvad.set_mode(self._vad, mode)

    def is_speech(self, buf: bytes, sample_rate: int) -> bool:
        return bool(self._c.process(self._vad, sample_rate, buf, len(buf) // 2))


def make_vad(mode: int) -> Any:
    """A webrtcvad detector (`is_speech(bytes, rate)`); ImportError without webrtcvad."""
    try:
        return _Vad(mode)
    except (ImportError, AttributeError):   # another webrtcvad build: its own wrapper
        import webrtcvad
        return webrtcvad.Vad(mode)


def vad_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("_webrtcvad") is not None or importlib.util.find_spec("webrtcvad") is not None


def rms_of_dbfs(dbfs: float) -> float:
    """The int16 RMS of a level in dBFS (full scale = 32768): -50 dBFS -> 103.6."""
    return 32768.0 * 10 ** (dbfs / 20.0)


class VoiceFramer:
    """Cuts a mono int16 stream into `frame_ms` frames (10, 20 or 30: what webrtcvad accepts) and
    classifies them with webrtcvad `mode` (0 least to 3 most aggressive) and an optional level floor."""

    def __init__(self, rate: int = 16_000, frame_ms: int = 20, mode: int = 2, floor_rms: float | None = None) -> None:
        self.rate = rate
        self.frame = rate * frame_ms // 1000
        self.floor_rms = floor_rms
        self.vad = make_vad(mode)   # webrtcvad, the emulator/gemini extra: imported where it is used
        self.pending = np.zeros(0, np.int16)   # the start of the next frame (public: the emulator saves it)
        self._pending_ts = 0

    def is_voiced(self, frame: np.ndarray) -> bool:
        if self.floor_rms is not None:
            f = frame.astype(np.float64)   # mean square as one dot product: exact for int16, 3x cheaper than np.mean
            if math.sqrt(float(f.dot(f)) / len(f) if len(f) else 0.0) < self.floor_rms:
                return False
        return bool(self.vad.is_speech(frame.tobytes(), self.rate))

    def cut(self, samples: np.ndarray) -> list[np.ndarray]:
        """The whole frames that `samples` completes, after what was pending; keeps the rest."""
        buf = np.concatenate([self.pending, samples]) if len(self.pending) else samples
        n = len(buf) // self.frame
        frames = [buf[i * self.frame:(i + 1) * self.frame] for i in range(n)]
        self.pending = buf[n * self.frame:].copy()
        return frames

    def feed(self, samples: np.ndarray, ts_ns: int = 0) -> list[tuple[np.ndarray, int, bool]]:
        """(frame, capture ns of its first sample, voiced) for each frame completed; `ts_ns` is the
        capture time of samples[0] (frames carried over keep the time of their first chunk)."""
        if not len(self.pending):
            self._pending_ts = ts_ns
        frames = self.cut(samples)
        step = self.frame * 1_000_000_000 // self.rate
        out = [(f, self._pending_ts + i * step, self.is_voiced(f)) for i, f in enumerate(frames)]
        self._pending_ts += len(frames) * step
        return out
