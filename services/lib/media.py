"""What the processes' interchangeable sources and sinks promise, as Protocols (like livekit's AudioOutput).

capture-audio reads an `AudioSource` (the microphone, or a file/tone/silence on a clock), playback
writes to an `AudioSink` (the sound card, or a WAV file/nowhere on a clock), capture-video grabs from
a `FrameSource` (a camera, file or stream that pushes frames, or the screen or test pattern that is
snapped on demand). The process code uses only these members, so a new kind (a network source, a
WebRTC sink...) needs only them; the checks are static (mypy/pyright), nothing is registered.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class AudioSource(Protocol):
    """Yields 16 kHz mono int16 chunks of exactly the chunk size (the last of a file may be shorter),
    each with the wall-clock ns of its first sample."""

    kind: str   # "device" | "file" | "tone" | "silence": the heartbeat's `source`

    def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]: ...

    def close(self) -> None: ...

    def metrics(self) -> dict[str, Any]:
        """Fields merged into the heartbeat."""
        ...


@runtime_checkable
class AudioSink(Protocol):
    """Pulls one period at a time from playback's jitter buffer (on the device's clock, or its own)."""

    kind: str                 # "device" | "file" | "null"
    has_device_buffer: bool   # audio queued beyond our buffer, that an interrupt must drop (reset())
    rate: int                 # Hz the sink plays at (the jitter buffer holds this rate)
    period_frames: int
    latency_s: float          # output latency after a period leaves us
    jb: Any                   # playback's JitterBuffer, which the sink pulls periods from

    def start(self) -> None: ...

    def reset(self) -> None:
        """Drop what the device still holds (an interrupt); no-op without a device buffer."""
        ...

    @property
    def alive(self) -> bool: ...

    def close(self) -> None: ...

    def metrics(self) -> dict[str, Any]: ...


@runtime_checkable
class FrameSource(Protocol):
    """A picture source of capture-video. `open()` raises a one-line error if it cannot be used;
    width and height are known after it (0 = not yet)."""

    name: str      # for the log and the heartbeat, e.g. "camera 0", "screen 1", "test pattern"
    live: bool     # False for a file (it ends, or loops); True for what has no end
    width: int
    height: int

    def open(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PullFrameSource(FrameSource, Protocol):
    """A source read on demand, at the tick (screen, test pattern)."""

    def snap(self) -> np.ndarray:
        """The picture now, BGR."""
        ...


@runtime_checkable
class PushFrameSource(FrameSource, Protocol):
    """A source that produces frames at its own pace (camera, video file, stream; cv2.VideoCapture):
    a grabber thread keeps only the newest."""

    frame_interval: float   # files: seconds per frame for real-time pacing (0 = live)

    def grab(self) -> bool: ...

    def retrieve(self) -> np.ndarray | None: ...

    def rewind(self) -> bool:
        """Back to the first frame (a looping file); False if the source cannot."""
        ...
