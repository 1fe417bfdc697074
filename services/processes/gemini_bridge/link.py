"""One websocket connection to the service and the client messages it may have to send again."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from typing import Any, Awaitable, Callable

import numpy as np

from livepipe.services.lib.vad import rms_of_dbfs
from livepipe.services.processes.gemini_bridge.settings import ACTIVITY_END, ACTIVITY_START, NAME

log = logging.getLogger(NAME)


def parse_duration_ms(text: str | None) -> int:
    """'10s' / '9.5s' / '1.000000001s' (protobuf Duration JSON) -> milliseconds (0 if unknown)."""
    if not text:
        return 0
    m = re.match(r"^\s*([0-9.]+)\s*s?\s*$", str(text))
    return int(float(m.group(1)) * 1000) if m else 0


VAD_FRAME = 480   # 30 ms at 16 kHz


def voiced_chunks(chunks: list[bytes]) -> list[bool]:
    """Whether each 16 kHz int16 chunk completes a voiced 30 ms frame, the frames cut from their
    concatenation: what a VoiceFramer(16000, 30, 2, floor -50 dBFS) fed the chunks one by one says
    (the same webrtcvad calls in the same order), with the level floor computed for all frames at once."""
    import webrtcvad
    samples = np.frombuffer(b"".join(chunks), "<i2")
    n = len(samples) // VAD_FRAME
    frames = samples[:n * VAD_FRAME].reshape(n, VAD_FRAME)
    f = frames.astype(np.float64)
    loud = np.sqrt(np.einsum("ij,ij->i", f, f) / VAD_FRAME) >= rms_of_dbfs(-50)   # exact sums for int16
    vad = webrtcvad.Vad(2)
    voiced = [bool(loud[k]) and vad.is_speech(frames[k].tobytes(), 16000) for k in range(n)]
    out, done, total = [], 0, 0
    for c in chunks:
        total += len(c) // 2
        upto = total // VAD_FRAME   # the frames complete once this chunk is in
        out.append(any(voiced[done:upto]))
        done = upto
    return out


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
        self.replace_why = ""                   # replaced on our own initiative (not a goAway): why
        self.retired = False                    # replaced: whatever it still says is ignored
        self.opened = time.monotonic()
        # Client messages are numbered as the service counts them (setup = 0). Audio sent and not yet
        # answered is kept (bounded): a resumed session is sent again what its handle does not cover
        # (index > covered_index); a fresh session, which heard nothing, all of it, so that speech
        # not answered yet is not lost, while what the model already answered is not said twice.
        self.sent_index = 0
        self.replay: deque[tuple[int, bytes | str, float]] = deque()
        self.replay_bytes = 0
        # Typed words sent (client message index, the send): kept until a reply to them completes, so a
        # resumed session not covering them, or a fresh one (only completed turns are seeded), gets them again.
        self.texts: list[tuple[int, Callable[[Any], Awaitable[None]]]] = []
        self.covered_index = 0
        self.last_audio_sent = 0.0
        self.resumed = False                    # opened with a resumption handle the service accepted
        self.history_version = 0                # the bus history it began with (Bridge.history_version)
        self.send_audio: Callable[[bytes], Awaitable[None]] | None = None   # wire.py, learned on first use

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
        if last_index is None:
            horizon = time.monotonic() - 0.2   # without an index, keep what may still be in flight
            last_index = max((i for i, _, t in self.replay if t < horizon), default=self.covered_index)
        self.covered_index = max(self.covered_index, last_index)

    def answered(self, upto_index: int, silence_bytes: int, markers: bool = False) -> int:
        """A model turn completed whose reply began after client message `upto_index`: the audio sent
        up to there was heard and answered, except speech still going on when the reply began (no
        `silence_bytes` of silence after it: the service's VAD had not closed it, so it is a new
        utterance; with `markers` (--vad off) the activityStart/End sent say where speech is).
        Forgets the answered audio and typed words; returns how many bytes of audio."""
        self.texts = [t for t in self.texts if t[0] > upto_index]
        cut = 0          # entries before this position are answered
        quiet = silence_bytes
        inside = False   # markers: between an activityStart and its activityEnd
        chunks: list[tuple[int, bytes]] = []   # (position, audio) up to upto_index
        for pos, (index, item, _) in enumerate(self.replay):
            if index > upto_index:
                break
            if markers:
                if item == ACTIVITY_START:
                    inside, cut = True, pos
                elif item == ACTIVITY_END or not inside:
                    inside, cut = False, pos + 1
                continue
            if isinstance(item, bytes):
                chunks.append((pos, item))
        for (pos, item), voiced in zip(chunks, voiced_chunks([c for _, c in chunks])):
            if voiced:
                if quiet >= silence_bytes:
                    cut = pos       # speech after a closing silence: answered only if it ends too
                quiet = 0
            else:
                quiet += len(item)
                if quiet >= silence_bytes:
                    cut = pos + 1
        dropped = 0
        for _ in range(cut):
            dropped += len(self.replay[0][1]) if isinstance(self.replay[0][1], bytes) else 0
            self._pop()
        return dropped

    def to_send_again(self, fresh: bool) -> list[bytes | str]:
        """What the next connection must be sent again: beyond what the handle covers when it
        resumes; all that is not answered when it is a fresh session, which heard nothing."""
        return [item for index, item, _ in self.replay if fresh or index > self.covered_index]

    def texts_to_send_again(self, fresh: bool) -> list[Callable[[Any], Awaitable[None]]]:
        """The typed words the next connection must be sent again, by the same rule as audio."""
        return [send for index, send in self.texts if fresh or index > self.covered_index]

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

