"""Turn detection on the 16 kHz input: webrtcvad frames -> speech start / speech end.

Decisions are made on audio time (20 ms frames), never on wall-clock time, so a client sending
faster than real time gets the same turns as one streaming a microphone. The setup's
realtimeInputConfig.automaticActivityDetection maps onto the detector like this:

  startOfSpeechSensitivity  HIGH -> webrtcvad mode 1, LOW -> mode 3, unset -> mode 2
  prefixPaddingMs           voiced time needed to commit a start (default HIGH 40, LOW 120, unset 60 ms)
  endOfSpeechSensitivity    default silence to end a turn: HIGH 300, LOW 1000, unset 500 ms
  silenceDurationMs         overrides that silence
  disabled: true            no detection: the client marks turns with activityStart/activityEnd

A frame is voiced when webrtcvad says so and its level is at least -55 dBFS (RMS 60). An utterance
runs from 40 ms before its first voiced frame (the pre-roll webrtcvad's onset misses) to the end
of its last voiced frame; the trailing silence is not part of it.

`hold()` / `restore()` carry what the detector holds but has not yet ended as an utterance (a
half-spoken utterance, the pre-roll of one about to start, a partial frame) across session
resumption, so a resumed session hears the whole utterance.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soxr

from livepipe.services.lib.vad import VoiceFramer

RATE = 16000
FRAME = 320                  # 20 ms at 16 kHz, a frame size webrtcvad accepts
PREROLL_FRAMES = 2
LEVEL_FLOOR = 60.0           # RMS of a 20 ms frame, about -55 dBFS: quieter is never speech


@dataclass(frozen=True)
class VadSettings:
    disabled: bool = False
    mode: int = 2
    start_frames: int = 3
    end_frames: int = 25
    interrupts: bool = True           # activityHandling != NO_INTERRUPTION

    @classmethod
    def from_setup(cls, realtime_input_config: dict[str, Any] | None) -> "VadSettings":
        """Settings from setup.realtime_input_config (keys already snake_case)."""
        cfg = realtime_input_config or {}
        aad = cfg.get("automatic_activity_detection") or {}
        start = str(aad.get("start_of_speech_sensitivity") or "")
        end = str(aad.get("end_of_speech_sensitivity") or "")
        mode, prefix_ms = (1, 40) if start.endswith("HIGH") else (3, 120) if start.endswith("LOW") else (2, 60)
        silence_ms = 300 if end.endswith("HIGH") else 1000 if end.endswith("LOW") else 500
        if aad.get("prefix_padding_ms") is not None:
            prefix_ms = int(aad["prefix_padding_ms"])
        if aad.get("silence_duration_ms") is not None:
            silence_ms = int(aad["silence_duration_ms"])
        return cls(disabled=bool(aad.get("disabled", False)), mode=mode,
                   start_frames=max(1, math.ceil(prefix_ms / 20)), end_frames=max(1, math.ceil(silence_ms / 20)),
                   interrupts=str(cfg.get("activity_handling") or "") != "NO_INTERRUPTION")

    @property
    def silence_ms(self) -> int:
        return self.end_frames * 20


@dataclass
class SpeechStart:
    at_sample: int                    # input position (16 kHz samples) where the start was committed


@dataclass
class SpeechEnd:
    audio: np.ndarray                 # the utterance, int16 at 16 kHz
    at_sample: int                    # input position where the end was detected
    last_voiced_sample: int           # input position where the last voiced frame ended
    manual: bool = False

    @property
    def seconds(self) -> float:
        return len(self.audio) / RATE


@dataclass(frozen=True)
class HeldInput:
    """An InputResampler's state for resumption: its recent input and how much went in and came out."""
    rate: int
    tail: np.ndarray
    fed: int
    out: int


class InputResampler:
    """Input at another rate -> 16 kHz, streaming (soxr). The filter holds some output back (about
    20 ms at 48 kHz, 65 ms at 8 kHz); a soxr stream cannot be copied, so for resumption it keeps its
    recent input: a new stream fed with that gives back exactly what the old one still held."""
    TAIL_S = 0.25                   # well over the filter's memory at every rate

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._stream = soxr.ResampleStream(rate, RATE, 1, dtype="int16")
        self._align = rate // math.gcd(rate, RATE)     # input steps that land on a whole output sample
        self._tail = np.zeros(0, np.int16)
        self._skip = 0              # output already delivered by the stream this one replaces
        self.fed = self.out = 0     # input samples in, output samples delivered, since the stream began

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.fed += len(samples)
        keep = int(self.rate * self.TAIL_S)
        keep += (self.fed - keep) % self._align if self.fed > keep else 0    # tail starts on an aligned input
        self._tail = np.concatenate([self._tail, samples])[-keep:] if keep else self._tail
        return self._deliver(self._stream.resample_chunk(samples))

    def flush(self) -> np.ndarray:
        """The input stream ended (activityEnd, audioStreamEnd): what the filter holds, now; a new
        stream starts with the next input."""
        held = self._deliver(self._stream.resample_chunk(np.zeros(0, np.int16), last=True))
        self.__init__(self.rate)
        return held

    def hold(self) -> HeldInput:
        return HeldInput(self.rate, self._tail.copy(), self.fed, self.out)

    @classmethod
    def restore(cls, held: HeldInput) -> tuple["InputResampler", np.ndarray]:
        """A resampler continuing `held`, and the output the old one held back (feed it first)."""
        r = cls(held.rate)
        start = (held.fed - len(held.tail)) * RATE // held.rate    # whole: the tail starts aligned
        r.fed, r.out, r._tail, r._skip = held.fed, held.out, held.tail.copy(), held.out - start
        return r, r._deliver(r._stream.resample_chunk(held.tail))

    def _deliver(self, y: np.ndarray) -> np.ndarray:
        if self._skip:
            cut = min(self._skip, len(y))
            self._skip -= cut
            y = y[cut:]
        self.out += len(y)
        return y


@dataclass(frozen=True)
class HeldAudio:
    """A detector's input state that is not yet part of an ended utterance (see TurnDetector.hold)."""
    position: int
    speaking: bool
    manual: bool                      # held by an activityStart (automatic detection disabled)
    pending: np.ndarray               # a partial frame
    recent: tuple[np.ndarray, ...]    # idle: pre-roll and voiced run
    run: int
    frames: tuple[np.ndarray, ...]    # speaking: the utterance so far
    voiced_len: int
    silence: int
    last_voiced_end: int

    @property
    def seconds(self) -> float:
        """Audio held that may still become part of an utterance."""
        kept = len(self.frames) if self.speaking else min(len(self.recent), self.run + PREROLL_FRAMES)
        return (kept * FRAME + len(self.pending)) / RATE


@dataclass
class TurnDetector:
    settings: VadSettings
    position: int = 0                                   # samples consumed so far
    speaking: bool = False
    _framer: VoiceFramer = field(init=False)            # 20 ms frames; its `pending` is the incomplete one
    _recent: deque = field(init=False)                  # idle: last frames (pre-roll + voiced run)
    _run: int = 0                                       # idle: consecutive voiced frames
    _frames: list = field(default_factory=list)         # speaking: frames of the utterance so far
    _voiced_len: int = 0                                # speaking: frames up to the last voiced one
    _silence: int = 0
    _last_voiced_end: int = 0
    ignored_samples: int = 0                            # manual mode: audio outside any activity

    def __post_init__(self) -> None:
        self._framer = VoiceFramer(RATE, FRAME * 1000 // RATE, self.settings.mode, LEVEL_FLOOR)
        self._recent = deque(maxlen=self.settings.start_frames + PREROLL_FRAMES)

    def feed(self, samples: np.ndarray) -> list[SpeechStart | SpeechEnd]:
        """Consume 16 kHz int16 samples; return the turn events they complete, in order."""
        events: list[SpeechStart | SpeechEnd] = []
        for frame in self._framer.cut(samples):
            self.position += FRAME
            if self.settings.disabled:
                if self.speaking:            # manual mode: everything between start and end counts
                    self._frames.append(frame)
                else:
                    self.ignored_samples += FRAME    # outside activityStart/End: not a turn (counted)
                continue
            # webrtcvad keeps calling frames voiced for up to 140 ms after speech (its hangover); a
            # level floor stops that on near-silence, so silenceDurationMs means silence after speech.
            voiced = self._framer.is_voiced(frame)
            if not self.speaking:
                self._recent.append(frame)
                self._run = self._run + 1 if voiced else 0
                if self._run >= self.settings.start_frames:
                    self.speaking = True
                    keep = min(len(self._recent), self._run + PREROLL_FRAMES)
                    self._frames = list(self._recent)[-keep:]
                    self._voiced_len, self._silence = len(self._frames), 0
                    self._last_voiced_end = self.position
                    self._recent.clear()
                    self._run = 0
                    events.append(SpeechStart(self.position))
            else:
                self._frames.append(frame)
                if voiced:
                    self._voiced_len, self._silence = len(self._frames), 0
                    self._last_voiced_end = self.position
                else:
                    self._silence += 1
                    if self._silence >= self.settings.end_frames:
                        events.append(self._finish())
        return events

    @property
    def speaking_seconds(self) -> float:
        """Length of the utterance in progress so far (0 when idle)."""
        return len(self._frames) * FRAME / RATE if self.speaking else 0.0

    def hold(self) -> HeldAudio:
        """A snapshot of the held input (frames are never written to after they are cut, so shared)."""
        return HeldAudio(self.position, self.speaking, self.settings.disabled, self._framer.pending.copy(),
                         tuple(self._recent), self._run, tuple(self._frames), self._voiced_len, self._silence,
                         self._last_voiced_end)

    def restore(self, held: HeldAudio) -> None:
        """Continue from `held` (a resumed session), under this detector's own settings."""
        self.position, self.speaking, self._framer.pending = held.position, held.speaking, held.pending.copy()
        self._recent.clear()
        self._recent.extend(held.recent)
        self._run = held.run
        self._frames = list(held.frames)
        self._silence, self._last_voiced_end = held.silence, held.last_voiced_end
        # An activity's frames are all kept (no voiced count): if the resumed session detects
        # turns automatically, all of them stay part of the utterance.
        self._voiced_len = len(self._frames) if held.manual and not self.settings.disabled else held.voiced_len

    def _finish(self, manual: bool = False) -> SpeechEnd:
        frames = self._frames if manual else self._frames[:self._voiced_len]
        if manual and len(self._framer.pending):
            frames = frames + [self._framer.pending]
            self._framer.pending = np.zeros(0, np.int16)
        audio = np.concatenate(frames) if frames else np.zeros(0, np.int16)
        end = SpeechEnd(audio, self.position, self.position if manual else self._last_voiced_end, manual)
        self.speaking, self._frames, self._voiced_len, self._silence = False, [], 0, 0
        return end

    def flush(self) -> SpeechEnd | None:
        """audioStreamEnd: the client stopped its stream, so an open utterance ends now."""
        if self.settings.disabled or not self.speaking:
            return None
        return self._finish()

    # manual activity (automatic detection disabled)
    def activity_start(self) -> SpeechStart | None:
        """None when an activity is already open: a repeated activityStart (a client resending what a
        resumption handle may not cover) must not throw away the audio held since the first."""
        if self.speaking:
            return None
        self.speaking, self._frames = True, []
        return SpeechStart(self.position)

    def activity_end(self) -> SpeechEnd | None:
        if not self.speaking:
            return None
        return self._finish(manual=True)
