"""`livepipe playback`: model audio (audio.out) -> speaker, WAV file or nowhere, with an instant interrupt.

Design:
- A `JitterBuffer` holds the model's audio per turn. A turn starts playing once a small
  prebuffer is queued (or the prebuffer time has passed since its first chunk, or the turn is
  complete); bursts faster than real time are simply queued (minutes fit), and a turn that
  runs dry and then gets more audio counts an underrun.
- A turn is known by (publisher instance, turn number): a restarted bridge counts from 1
  again and is a new sequence, never "late". The buffer sees local keys, allocated in order
  of first arrival.
- A sound server's sink is played with libpulse directly (services/lib/pulseout.py): the
  server's write requests pull a period at a time from the buffer in libpulse's thread. Any
  other device, or `--portaudio`, is a sounddevice OutputStream in callback mode: the PortAudio
  thread pulls from the buffer under a lock. (A blocking write racing an abort crashes PortAudio, see
  docs on headless audio.) On `control: interrupt` for turn T from instance I we drop the
  turns <= T of I that we hold, ignore chunks of those turns published before the interrupt
  (an interrupt never reaches audio published after it: a forged turn=10**9 cuts nothing new),
  and flush the stream (PortAudio: abort + restart) so what the device already holds is
  dropped too: silence within one device period.
- `--file` and `--null` sinks pull from the same buffer on a real-time clock, so a WAV file
  holds exactly what a listener would have heard, silences between turns included.
- `playback` events say what was really heard: turn_started (wall-clock time of the first
  sample at the device), turn_finished (ms played, interrupted or not, when it went silent),
  underrun.

sounddevice is imported only when a device is used (not for a sound server's sink, unless --portaudio).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from livepipe.bus import Service, setup_logging
from livepipe.services.lib.audio import (OUT_RATE, AudioFileError, DeviceError, StreamResampler, WavWriter, import_sounddevice,
                       make_audio_thread_realtime,
                       print_device_list, parse_device, pick_channels, pick_rate, resolve_device, stream_delay_s)
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.devices import device_in_use, select_server_device
from livepipe.services.lib.media import AudioSink
from livepipe.services.lib.pulseloop import PulseUnavailable
from livepipe.services.lib.pulseout import PulseOutput
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb
from livepipe.bus.message import Message

log = logging.getLogger("playback")

EventSink = Callable[[str, dict], None]

PREBUFFER, PLAYING, STARVED = "prebuffer", "playing", "starved"

# Playback defaults, in one place (chosen with `livepipe bench pipeline`, see README Performance).
# The model streams faster than real time, so a turn starts at once (no prebuffer); each underrun
# grows the prebuffer by the gap heard (at least one step), up to the most, for the audio that follows.
DEFAULT_PREBUFFER_MS = 0.0
DEFAULT_PREBUFFER_MAX_MS = 60.0
PREBUFFER_STEP_MS = 20.0
DEFAULT_LATENCY_MS = 40.0
# Staleness (README): audio that fell further than this behind its playing schedule (a stalled
# process or device) is skipped, so the listener hears what is due now, not a backlog.
DEFAULT_MAX_LAG_MS = 1000.0
# A file/null sink descheduled longer than this was stalled: like a device, the listener heard
# silence meanwhile (shorter delays are caught up, so a busy CPU leaves no gap in the file).
SINK_STALL_S = 0.25


@dataclass
class TurnFinished:
    """A turn cut by an interrupt: how much of it was heard, and whether it was still sounding."""

    turn: int
    played_frames: int
    started: bool
    end_ns: int | None          # estimated wall time just after its last sample handed to the sink


class _Turn:
    __slots__ = ("turn", "chunks", "head", "queued", "pulled", "ended", "started", "state",
                 "wait_since", "dry_since", "gap_heard", "end_ns", "blocks", "arrived_ns")

    def __init__(self, turn: int, now: float, arrived_ns: int = 0) -> None:
        self.turn = turn
        self.arrived_ns = arrived_ns   # wall time of its first chunk: it cannot be due before that
        self.chunks: deque[np.ndarray] = deque()
        self.head = 0                  # read offset into chunks[0]
        self.queued = 0                # frames waiting to be played
        self.pulled = 0                # frames handed to the sink so far
        self.ended = False             # no more audio expected (turn_complete / generation_complete)
        self.started = False           # turn_started published
        self.state = PREBUFFER
        self.wait_since = now          # when it began waiting for its prebuffer
        self.dry_since = 0.0           # when it ran dry (STARVED)
        # Whether the sink has been handed silence since it ran dry: only then did the listener
        # hear a gap (a queue that empties exactly at a block's end and refills before the next
        # pull is not an underrun).
        self.gap_heard = False
        self.end_ns: int | None = None
        # (time its first sample sounds, frames) of recent pulls: what is still in the device
        self.blocks: deque[tuple[int, int]] = deque(maxlen=128)

    def heard_at(self, cut_ns: int, rate: int) -> int:
        """Frames that had sounded by wall time `cut_ns` (the rest was still in the device)."""
        heard = self.pulled
        for first_ns, count in self.blocks:
            if first_ns >= cut_ns:
                heard -= count
            else:
                sounded = (cut_ns - first_ns) * rate // 1_000_000_000
                if sounded < count:
                    heard -= count - sounded
        return max(0, heard)

    def drop(self, n: int) -> int:
        """Discard the next n queued frames; returns how many chunks were touched."""
        touched = 0
        while n and self.chunks:
            k = min(n, len(self.chunks[0]) - self.head)
            self.head += k
            self.queued -= k
            n -= k
            touched += 1
            if self.head == len(self.chunks[0]):
                self.chunks.popleft()
                self.head = 0
        return touched

    def take(self, out: np.ndarray, pos: int, n: int) -> None:
        """Copy n queued frames into out[pos:pos+n]."""
        while n:
            chunk = self.chunks[0]
            k = min(n, len(chunk) - self.head)
            out[pos:pos + k] = chunk[self.head:self.head + k]
            self.head += k
            pos += k
            n -= k
            self.queued -= k
            if self.head == len(chunk):
                self.chunks.popleft()
                self.head = 0


class JitterBuffer:
    """Per-turn playout buffer shared by the asyncio thread (push) and the sink thread (pull).

    Everything happens under one lock; events (turn_started, turn_finished, underrun) are
    handed to `on_event(kind, fields)` after the lock is released.
    """

    def __init__(self, rate: int = OUT_RATE, prebuffer_ms: float = DEFAULT_PREBUFFER_MS, turn_gap_ms: float = 1000.0,
                 max_buffer_s: float = 600.0, on_event: EventSink | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_ns: Callable[[], int] = time.time_ns,
                 prebuffer_max_ms: float | None = None, max_lag_ms: float = 1000.0) -> None:
        self.rate = rate
        # Staleness: audio playing this far behind its schedule (a stalled process) is skipped.
        self.max_lag_ns = int(max_lag_ms * 1e6) if max_lag_ms > 0 else None   # 0: never skip
        # Wall time the next queued frame is due to sound on the playing schedule: audio plays
        # back to back from when it started (a turn no earlier than its first chunk came);
        # None while nothing plays (silence because no audio was there is not lag).
        self._sched_ns: int | None = None
        self.prebuffer_frames = int(rate * prebuffer_ms / 1000)
        self.prebuffer_s = prebuffer_ms / 1000
        # Adaptive: an underrun grows the prebuffer (for later audio) by a step, up to this.
        self.prebuffer_max_ms = max(prebuffer_ms, DEFAULT_PREBUFFER_MAX_MS if prebuffer_max_ms is None
                                    else prebuffer_max_ms)
        self.turn_gap_s = turn_gap_ms / 1000
        self.max_frames = int(rate * max_buffer_s)
        self.on_event = on_event or (lambda kind, fields: None)
        self.clock, self.wall_ns = clock, wall_ns
        self._lock = threading.Lock()
        self._turns: OrderedDict[int, _Turn] = OrderedDict()   # in turn order; the first one plays
        self._finished: OrderedDict[int, tuple[int, int | None]] = OrderedDict()  # turn -> (pulled, end_ns)
        # Turns wholly handed to the sink whose last sample has not sounded yet: turn_finished
        # goes out when it has (what the user heard), or they become interrupted.
        self._finishing: OrderedDict[int, _Turn] = OrderedDict()
        self._cut: OrderedDict[int, None] = OrderedDict()   # interrupted turns: their audio is ignored
        self.highest_turn = 0
        self.segment = 0               # bumped by every interrupt
        self.queued_frames = 0
        self.last_audio_end_ns = 0     # when the last non-silent sample handed to the sink sounds
        self.started_handed_ns = 0     # when the newest turn's first sample was handed to the sink
        self.stats: dict[str, int] = dict(underruns=0, late_chunks=0, overflow_chunks=0, turns_started=0,
                                          turns_finished=0, interrupted_turns=0, dropped_on_interrupt_frames=0,
                                          pushed_frames=0, played_frames=0, stale_chunks=0, stale_frames=0,
                                          stale_skips=0)

    # ----------------------------------------------------------- producer side
    def push(self, turn: int, pcm: np.ndarray) -> bool:
        """Queue int16 mono samples of `turn`; False if they were dropped (late or overflow)."""
        if not len(pcm):
            return True
        events: list[tuple[str, dict]] = []
        with self._lock:
            if turn in self._cut or (turn < self.highest_turn and turn not in self._turns):
                self.stats["late_chunks"] += 1          # an interrupted or already finished turn
                return False
            if self.queued_frames + len(pcm) > self.max_frames:
                self.stats["overflow_chunks"] += 1
                return False
            now = self.clock()
            t = self._turns.get(turn)
            if t is None and turn in self._finishing:
                # More audio while its tail is still sounding: the same turn goes on.
                t = self._turns[turn] = self._finishing.pop(turn)
                t.state, t.wait_since = PREBUFFER, now
            elif t is None:
                t = self._turns[turn] = _Turn(turn, now, self.wall_ns())
                self.highest_turn = max(self.highest_turn, turn)
                if turn in self._finished:            # more audio after a long gap: same turn goes on
                    t.pulled, t.started = self._finished.pop(turn)[0], True
            elif t.state == STARVED and not t.gap_heard:
                t.state = PLAYING               # refilled before the sink missed a sample
            elif t.state == STARVED:
                # It ran dry, the sink played silence, and more audio came: the listener heard a gap.
                self.stats["underruns"] += 1
                events.append(("underrun", {"turn": turn}))
                self._grow_prebuffer((now - t.dry_since) * 1000)
                t.state, t.wait_since, t.gap_heard = PREBUFFER, now, False
            t.chunks.append(pcm)
            t.queued += len(pcm)
            self.queued_frames += len(pcm)
            self.stats["pushed_frames"] += len(pcm)
        self._emit(events)
        return True

    def _grow_prebuffer(self, gap_ms: float) -> None:
        """After an underrun whose gap lasted `gap_ms`: hold that much more (at least one step)
        before a turn (re)starts, up to prebuffer_max_ms, so a like gap is absorbed next time."""
        ms = min(self.prebuffer_max_ms, self.prebuffer_s * 1000 + max(PREBUFFER_STEP_MS, gap_ms))
        self.prebuffer_frames, self.prebuffer_s = int(self.rate * ms / 1000), ms / 1000

    @property
    def prebuffer_ms(self) -> float:
        return round(self.prebuffer_s * 1000, 1)

    def end_turn(self, turn: int) -> None:
        """No more audio will come for `turn` (turn_complete / generation_complete)."""
        events: list[tuple[str, dict]] = []
        with self._lock:
            t = self._turns.get(turn)
            if t is not None:
                t.ended = True
                if t.state == STARVED and t.queued == 0:
                    self._finish(t, events)
                    self._flush_finishing(events)
        self._emit(events)

    def is_cut(self, turn: int) -> bool:
        return turn in self._cut

    def interrupt(self, turn: int, cut_ns: int | None,
                  turns: set[int] | None = None) -> tuple[list[TurnFinished], bool]:
        """Drop the turns held that are <= `turn` (or, given `turns`, those of them held) and
        ignore their later chunks. Only audio we hold is cut: no high-water mark is kept.
        `cut_ns` is when the device buffer gets dropped (None: a sink with no buffer,
        everything handed over was heard). Returns the cut turns and whether audio of theirs
        may still sound (so the device buffer must be reset)."""
        cut: list[TurnFinished] = []
        events: list[tuple[str, dict]] = []
        hit = (lambda k: k in turns) if turns is not None else (lambda k: k <= turn)
        with self._lock:
            held = [k for k in (*self._turns, *self._finishing) if hit(k)]
            for k in held + ([] if turns is not None else [turn]):
                self._cut[k] = None
                self._cut.move_to_end(k)
            while len(self._cut) > 256:   # bounded: the oldest cuts are long finished
                self._cut.popitem(last=False)
            self.segment += 1
            self._sched_ns = None   # what plays next starts its own schedule
            audible = False
            survivor_in_device = False
            for k in list(self._finishing):   # wholly handed over, but maybe still sounding
                t = self._finishing[k]
                sounding = cut_ns is not None and t.end_ns is not None and t.end_ns > cut_ns
                if not hit(k):
                    survivor_in_device |= sounding
                elif sounding:
                    del self._finishing[k]
                    audible = True
                    heard = t.heard_at(cut_ns, self.rate)
                    self.stats["played_frames"] -= t.pulled - heard
                    self.stats["interrupted_turns"] += 1
                    cut.append(TurnFinished(k, heard, True, t.end_ns))
                else:
                    del self._finishing[k]
                    self._finished_event(t, events)
            for k in list(self._turns):
                t = self._turns[k]
                sounding = t.end_ns is not None and (cut_ns is None or t.end_ns > cut_ns)
                if not hit(k):
                    survivor_in_device |= sounding and t.pulled > 0
                    continue
                del self._turns[k]
                audible |= sounding
                heard = t.pulled if cut_ns is None else t.heard_at(cut_ns, self.rate)
                self.stats["played_frames"] -= t.pulled - heard
                self.stats["dropped_on_interrupt_frames"] += t.queued
                self.stats["interrupted_turns"] += 1
                self.queued_frames -= t.queued
                cut.append(TurnFinished(k, heard, t.started, t.end_ns))
        self._emit(events)
        # Never cut a newer turn's audio already in the device: let the old tail play out.
        return cut, audible and not survivor_in_device

    # ----------------------------------------------------------- consumer side
    def pull(self, n: int, first_ns: int) -> np.ndarray:
        """The next `n` frames for the sink; `first_ns` = wall time the first of them sounds."""
        out = np.zeros(n, dtype=np.int16)
        if not self._turns and not self._finishing:   # idle: no lock, no events (dict reads are atomic)
            self._sched_ns = None
            return out
        events: list[tuple[str, dict]] = []
        pos = 0
        ns_per_frame = 1e9 / self.rate
        with self._lock:
            now = self.clock()
            self._flush_finishing(events)
            if (self._sched_ns is not None and self.max_lag_ns is not None
                    and first_ns - self._sched_ns > self.max_lag_ns):
                self._skip_stale(first_ns, now, events)
            while pos < n and self._turns:
                t = next(iter(self._turns.values()))
                later_waiting = len(self._turns) > 1
                if t.state != PLAYING:
                    if t.queued == 0:   # STARVED
                        if t.ended or later_waiting or now - t.dry_since >= self.turn_gap_s:
                            self._finish(t, events)
                            continue
                        t.gap_heard = True
                        break
                    if not (t.ended or later_waiting or t.queued >= self.prebuffer_frames
                            or now - t.wait_since >= self.prebuffer_s):
                        break          # still prebuffering: silence for now
                    t.state = PLAYING
                take = min(n - pos, t.queued)
                t.take(out, pos, take)
                ts = first_ns + int(pos * ns_per_frame)
                if not t.started:
                    t.started = True
                    self.stats["turns_started"] += 1
                    self.started_handed_ns = self.wall_ns()   # latency budget: reached the sink
                    events.append(("turn_started", {"turn": t.turn, "first_sample_ts": ts}))
                t.blocks.append((ts, take))
                t.pulled += take
                self.queued_frames -= take
                self.stats["played_frames"] += take
                pos += take
                t.end_ns = self.last_audio_end_ns = first_ns + int(pos * ns_per_frame)
                if t.queued == 0:
                    if t.ended or later_waiting:
                        self._finish(t, events)
                        continue
                    t.state, t.dry_since, t.gap_heard = STARVED, now, pos < n
                    break
            # Audio to the end of the block: the schedule goes on; any silence restarts it.
            if pos == n:
                self._sched_ns = (first_ns if self._sched_ns is None else self._sched_ns) + int(n * ns_per_frame)
            else:
                self._sched_ns = None
        self._emit(events)
        return out

    def _skip_stale(self, first_ns: int, now: float, events: list[tuple[str, dict]]) -> None:
        """Playback fell behind its schedule by more than max_lag (the process or the device
        was stalled): drop what should have sounded by `first_ns`, so the listener hears the
        audio due now. A turn queued behind is due from max(end of the one before, its
        arrival), and is skipped only if it too is more than max_lag behind."""
        cursor = self._sched_ns
        assert cursor is not None and self.max_lag_ns is not None
        lag_ns = first_ns - cursor
        frames = chunks = 0
        turns: list[int] = []
        for t in list(self._turns.values()):
            start = cursor if not turns and t.state == PLAYING else max(cursor, t.arrived_ns)
            behind = first_ns - start
            if behind <= self.max_lag_ns or not t.queued:
                break
            cursor = start + int(t.queued * 1e9 / self.rate)
            k = min(t.queued, int(behind * self.rate // 1_000_000_000))
            chunks += t.drop(k)
            self.queued_frames -= k
            frames += k
            turns.append(t.turn)
            if t.queued:
                break                   # this turn goes on from the audio due now
            if t.ended or len(self._turns) > 1:
                self._finish(t, events)  # skipped to its end: the next one may be due too
                continue
            t.state, t.dry_since = STARVED, now   # still streaming: what comes next is current
            break
        self._sched_ns = first_ns
        if frames:
            self.stats["stale_chunks"] += chunks
            self.stats["stale_frames"] += frames
            self.stats["stale_skips"] += 1
            events.append(("stale", {"turns": turns, "skipped_ms": round(frames * 1000 / self.rate, 1),
                                     "lag_ms": round(lag_ns / 1e6, 1)}))

    def _finish(self, t: _Turn, events: list[tuple[str, dict]]) -> None:
        """`t` was wholly handed to the sink: report it once its last sample has sounded."""
        del self._turns[t.turn]
        self.queued_frames -= t.queued
        self._finished[t.turn] = (t.pulled, t.end_ns)
        while len(self._finished) > 64:
            self._finished.popitem(last=False)
        if t.started:
            self._finishing[t.turn] = t
            self._flush_finishing(events)

    def _flush_finishing(self, events: list[tuple[str, dict]]) -> None:
        now_ns = self.wall_ns()
        for k in list(self._finishing):
            t = self._finishing[k]
            if t.end_ns is None or t.end_ns <= now_ns:
                del self._finishing[k]
                self._finished_event(t, events)

    def _finished_event(self, t: _Turn, events: list[tuple[str, dict]]) -> None:
        self.stats["turns_finished"] += 1
        fields: dict[str, Any] = {"turn": t.turn, "played_ms": round(t.pulled * 1000 / self.rate, 1),
                                  "interrupted": False}
        if t.end_ns is not None:
            fields["silent_ts"] = t.end_ns
        events.append(("turn_finished", fields))

    def _emit(self, events: list[tuple[str, dict]]) -> None:
        for kind, fields in events:
            try:
                self.on_event(kind, fields)
            except Exception as exc:  # a broken listener must never stop the audio
                log.warning("playback event %s not delivered: %s", kind, exc)

    @property
    def buffered_ms(self) -> float:
        return self.queued_frames * 1000 / self.rate

    @property
    def active(self) -> bool:
        return bool(self._turns or self._finishing)


# ------------------------------------------------------------------ sinks
class DeviceSink:
    """The speaker, pulling from the jitter buffer in its audio thread. A sound server's sink is
    played with libpulse directly (services/lib/pulseout.py: the server's write requests pull a
    period at a time in libpulse's thread); any other device, or `portaudio=True`, through a
    callback-mode sounddevice OutputStream."""

    kind = "device"
    has_device_buffer = True

    def __init__(self, device: str | None, period_ms: float, device_rate: int | None,
                 latency_ms: float | None = None, portaudio: bool = False) -> None:
        self.jb: JitterBuffer | None = None   # set before start()
        device, server_dev = select_server_device(device, "output")   # a server sink name -> pulse
        self.underflows = 0
        self.callback_errors = 0
        self._last_callback = 0.0
        self.callback_gap_max_ms = 0.0   # longest wait between callbacks: a starved audio thread
        self.realtime: bool | None = None   # decided in the callback thread itself
        # Echo reference (audio.ref): called from the audio thread with every block and the wall
        # time its first sample sounds (it publishes the blocks with sound). Set by the Player.
        self.on_block: Callable[[np.ndarray, int], None] | None = None
        self.pulse: PulseOutput | None = None
        self._latency_ms = latency_ms or 0.0
        if not portaudio and device in (None, "pulse", "default"):
            self.pulse = self._open_pulse(server_dev, period_ms, device_rate)
        self.api = "pulse" if self.pulse is not None else "portaudio"
        if self.pulse is not None:
            self.sd = None
            self.device_index = -1
            self.device_name = device_in_use("pulse", "output", server_dev)
            self.rate, self.channels = self.pulse.rate, self.pulse.channels
            self.period_frames = self.pulse.period_frames
            self.latency_s = self.pulse.latency_s
            return
        self.sd = import_sounddevice("output")
        info = resolve_device(self.sd, parse_device(device), "output")
        self.device_index = int(info["index"])
        self.device_name = device_in_use(str(info["name"]), "output", server_dev)
        self.rate = pick_rate(self.sd, self.device_index, "output", OUT_RATE, device_rate)
        self.channels = pick_channels(self.sd, self.device_index, "output", self.rate)
        self.period_frames = max(16, int(round(self.rate * period_ms / 1000)))
        # A deep device buffer costs nothing on interrupt (abort drops it) and rides out a busy
        # CPU; it only delays the start of a turn by as much.
        self.requested_latency: float | str = latency_ms / 1000 if latency_ms else "low"
        self.stream = self._open()
        self.latency_s = float(self.stream.latency)

    def _open_pulse(self, server_dev: Any, period_ms: float, device_rate: int | None) -> PulseOutput | None:
        """The sound server's sink (the chosen one, else its default) played directly, or None
        (no libpulse, no server: PortAudio is tried, and says what is missing)."""
        rate = device_rate or OUT_RATE
        period = max(16, int(round(rate * period_ms / 1000)))
        # "low" (0) on PortAudio was two periods; so is the smallest buffer here.
        latency_ms = self._latency_ms or 2 * period * 1000 / rate
        try:
            pulse = PulseOutput(server_dev.name if server_dev else None, rate, 1, period, latency_ms,
                                "livepipe playback", self._fill)
        except PulseUnavailable as exc:
            log.debug("no direct sound server output (%s): using PortAudio", exc)
            return None
        pulse.on_first_write = self._on_first_write
        return pulse

    def _on_first_write(self) -> None:
        self.realtime = make_audio_thread_realtime()

    def _block(self, frames: int, out_ns: int) -> np.ndarray:
        """The next block for the device (audio thread): `out_ns` = when its first sample sounds."""
        now = time.monotonic()
        if self._last_callback:
            self.callback_gap_max_ms = max(self.callback_gap_max_ms, (now - self._last_callback) * 1000)
        self._last_callback = now
        block = self.jb.pull(frames, out_ns)
        if self.on_block is not None:
            self.on_block(block, out_ns)
        return block

    def _fill(self, frames: int, out_ns: int) -> bytes:
        """libpulse's thread (PulseOutput counts an exception and plays silence for it)."""
        if self.jb is None:   # the server asks at once, before the Player is set up
            return bytes(frames * 2)
        return self._block(frames, out_ns).tobytes()

    def _open(self) -> Any:
        try:
            return self.sd.RawOutputStream(device=self.device_index, samplerate=self.rate, channels=self.channels,
                                           dtype="int16", blocksize=self.period_frames,
                                           latency=self.requested_latency,
                                           callback=self._callback)
        except Exception as exc:   # PortAudioError: busy device, unsupported format...
            raise DeviceError(f"cannot open output device {self.device_name!r} at {self.rate} Hz: {exc}") from None

    def _callback(self, outdata: Any, frames: int, time_info: Any, status: Any) -> None:
        try:
            if self.realtime is None:
                self.realtime = make_audio_thread_realtime()
            if status.output_underflow:
                self.underflows += 1
            delay = stream_delay_s(time_info.outputBufferDacTime - time_info.currentTime, self.latency_s)
            block = self._block(frames, time.time_ns() + int(delay * 1e9))
            if self.channels > 1:
                block = np.repeat(block, self.channels)
            outdata[:] = block.tobytes()
        except Exception:   # never let an exception kill the PortAudio thread: play silence
            self.callback_errors += 1
            outdata[:] = bytes(len(outdata))

    def start(self) -> None:
        if self.pulse is not None:
            return   # the server has been asking for audio since the stream opened
        try:
            self.stream.start()
        except Exception as exc:
            raise DeviceError(f"cannot start output device {self.device_name!r}: {exc}") from None

    def reset(self) -> None:
        """Drop what the device holds: flush the server's stream, or abort (discards its
        buffer) and start again."""
        self._last_callback = 0.0   # the restart pause is not a starved callback
        if self.pulse is not None:
            try:
                self.pulse.flush()
            except PulseUnavailable as exc:   # the server went away: `alive` says so to the loop
                log.warning("output stream flush failed: %s", exc)
            return
        try:
            self.stream.abort()
            self.stream.start()
        except Exception as exc:   # the device went away: reopen once
            log.warning("output device reset failed (%s): reopening it", exc)
            try:
                self.stream.close()
            except Exception:
                pass
            self.stream = self._open()
            self.start()

    @property
    def alive(self) -> bool:
        if self.pulse is not None:
            return self.pulse.alive
        return bool(self.stream.active)

    def close(self) -> None:
        if self.pulse is not None:
            self.pulse.close()
            return
        try:
            if not self.stream.closed:
                self.stream.abort()
                self.stream.close()
        except Exception:
            pass

    def metrics(self) -> dict[str, Any]:
        underflows, errors, extra = self.underflows, self.callback_errors, {}
        if self.pulse is not None:
            underflows, errors, extra = (self.pulse.underflows, self.pulse.callback_errors,
                                         {"device_clock_held": self.pulse.clock.held,
                                          "device_flush_underflows": self.pulse.flush_underflows})
        return {**extra, "device": self.device_name, "device_rate": self.rate, "device_underflows": underflows,
                "device_latency_ms": round(self.latency_s * 1000, 1), "callback_errors": errors,
                "callback_gap_max_ms": round(self.callback_gap_max_ms, 1), "audio_thread_realtime": int(bool(self.realtime)),
                "device_api": self.api}


class ClockedSink:
    """A sink with no sound card: a thread pulls one period at a time on an absolute clock and
    writes it to a WAV file (or nowhere), so the file is what a listener would have heard."""

    has_device_buffer = False

    def __init__(self, jb: JitterBuffer, period_ms: float, path: str | None = None) -> None:
        self.jb = jb
        self.kind = "file" if path else "null"
        self.rate = jb.rate
        self.period_frames = max(16, int(round(self.rate * period_ms / 1000)))
        self.latency_s = 0.0
        # A restarted playback continues the file (the record of what was heard before), never truncates it.
        self.writer = WavWriter(path, self.rate, append=True) if path else None
        if self.writer and self.writer.appended_frames:
            log.info("%s exists: appending (it holds %.1f s already)", path, self.writer.appended_frames / self.rate)
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{self.kind}-sink", daemon=True)
        self.late_periods = 0
        self.stalls = 0
        self.error: Exception | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        period_s = self.period_frames / self.rate
        t0_mono, t0_wall = time.monotonic(), time.time_ns()
        k = 0
        last_flush = t0_mono
        try:
            while not self._stop.is_set():
                due = t0_mono + k * period_s
                wait = due - time.monotonic()
                if wait > 0:
                    if self._stop.wait(wait):
                        break
                elif wait < -SINK_STALL_S:
                    # Stalled (SIGSTOP, suspended VM): a device would have played silence meanwhile.
                    missed = int(-wait / period_s)
                    self.stalls += 1
                    if self.writer:
                        self.writer.write(np.zeros(missed * self.period_frames, np.int16))
                    k += missed
                    due = t0_mono + k * period_s
                elif wait < -period_s:
                    self.late_periods += 1   # we were descheduled: catch up, the file keeps real time
                block = self.jb.pull(self.period_frames, t0_wall + int(k * period_s * 1e9))
                if self.writer:
                    self.writer.write(block)
                    if due - last_flush >= 1.0:   # keep the header valid if we get killed
                        self.writer.flush()
                        last_flush = due
                k += 1
        except Exception as exc:   # disk full, file removed...
            self.error = exc

    def reset(self) -> None:
        pass   # nothing is buffered beyond the period being written

    @property
    def alive(self) -> bool:
        return self.error is None

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        if self.writer:
            try:
                self.writer.close()
            except OSError:
                pass

    def metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {"late_periods": self.late_periods, "sink_stalls": self.stalls}
        if self.writer:
            m["file_s"] = round(self.writer.frames / self.rate, 2)
        return m


# ------------------------------------------------------------------ service
class Player:
    """Glue between the bus and the buffer/sink: handlers, interrupt, metrics."""

    def __init__(self, svc: Service, jb: JitterBuffer, sink: AudioSink, device_reset: bool) -> None:
        self.svc, self.jb, self.sink, self.device_reset = svc, jb, sink, device_reset
        self._resamplers: dict[int, StreamResampler] = {}
        self.interrupts = 0
        self.rejected_chunks = 0
        self.converted_chunks = 0
        self.reset_ms: deque[float] = deque(maxlen=200)
        self._audio_ts = 0              # newest publish time (ns) of audio.out handled
        self._audio_mono = 0.0          # when the last audio.out was handled
        self._completed: OrderedDict[int, None] = OrderedDict()   # turns whose end was applied
        self._pending_ends: set[asyncio.Task] = set()
        self.stamps: dict[int, dict[str, int]] = {}   # local turn key -> latency-budget stamps of its first chunk
        # A turn is (publisher instance, turn number): a restarted bridge counts from 1 again
        # and must be a new sequence. The buffer gets local keys, allocated in arrival order.
        self._keys: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._names: dict[int, tuple[str, int]] = {}
        self._next_key = 0
        # Per publisher: its last interrupt (turn, publish time). Chunks of turns <= turn published
        # before it are dropped; audio published after an interrupt is never cut by it.
        self._cuts: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self.cut_chunks = 0

    def _key(self, inst: str, turn: int) -> int:
        key = self._keys.get((inst, turn))
        if key is None:
            self._next_key += 1
            key = self._keys[(inst, turn)] = self._next_key
            self._names[key] = (inst, turn)
            while len(self._keys) > 1024:   # bounded: the oldest turns are long finished
                _, old = self._keys.popitem(last=False)
                self._names.pop(old, None)
        return key

    def _turn_of(self, key: int) -> int:
        name = self._names.get(key)
        return name[1] if name is not None else key

    def _push(self, key: int, pcm: np.ndarray) -> None:
        """Queue audio; a chunk the buffer drops is counted (heartbeat) and logged once."""
        late, over = self.jb.stats["late_chunks"], self.jb.stats["overflow_chunks"]
        if self.jb.push(key, pcm):
            return
        inst, turn = self._names.get(key, ("?", key))
        if self.jb.stats["overflow_chunks"] != over:
            self.svc.ratelog.warning("drop-overflow", f"dropped audio.out of turn {turn}: the buffer holds "
                                                      f"{self.jb.max_frames / self.jb.rate:.0f} s already (--max-buffer-s)")
        elif self.jb.stats["late_chunks"] != late:
            self.svc.ratelog.warning("drop-late", f"dropped audio.out of turn {turn} (from {inst}): "
                                                  "that turn was interrupted or has finished")

    def publish_event(self, kind: str, fields: dict) -> None:
        if kind == "stale":   # counted in the heartbeat (stale_*, audio_dropped); one line each time
            log.warning("skipped %.1f s of stale audio (turns %s): playback was %.1f s behind its schedule "
                        "(stalled?); playing the audio due now (--max-lag-ms %d)", fields["skipped_ms"] / 1000,
                        ", ".join(str(self._turn_of(k)) for k in fields["turns"]), fields["lag_ms"] / 1000,
                        self.jb.max_lag_ns // 1_000_000)
            return
        if kind == "turn_started":   # latency budget (README): the turn's stamps, plus when it reached the sink
            fields = {**fields, "stamps": {**self.stamps.pop(fields["turn"], {}),
                                           "handed_ts": self.jb.started_handed_ns}}
        if not self.svc.stopping:
            self.svc.publish_threadsafe("playback", kind, **{**fields, "turn": self._turn_of(fields["turn"])})

    # --------------------------------------------------------- handlers
    def on_audio(self, msg: Message) -> None:
        inst, turn = msg["inst"], msg["turn"]
        self._audio_ts = max(self._audio_ts, msg["ts"])
        self._audio_mono = time.monotonic()
        if msg["sample_width"] != 2:
            self.rejected_chunks += 1
            self.svc.ratelog.warning("width", f"ignored audio.out chunk of turn {turn}: "
                                              f"{msg['sample_width'] * 8}-bit samples (expected 16-bit)")
            return
        pcm = np.frombuffer(msg.payload, dtype="<i2")
        if msg["channels"] > 1:
            pcm = pcm.reshape(-1, msg["channels"]).mean(axis=1).astype(np.int16)
        rate = msg["rate"]
        if rate != OUT_RATE:
            self.converted_chunks += 1
            self.svc.ratelog.warning("rate", f"audio.out at {rate} Hz (the contract says {OUT_RATE}): resampling")
        cut = self._cuts.get(inst)
        if cut is not None and turn <= cut[0] and msg["ts"] <= cut[1]:
            self.cut_chunks += 1       # published before the interrupt that cut its turn
            self.svc.ratelog.warning("drop-cut", f"dropped audio.out of interrupted turn {turn} (from {inst})")
            return
        key = self._key(inst, turn)
        if "stamps" in msg.header and key not in self.stamps:
            self.stamps[key] = {**msg["stamps"], "out_pub_ts": msg["ts"], "play_recv_ts": time.time_ns()}
            while len(self.stamps) > 16:   # turns that never started (interrupted first)
                self.stamps.pop(next(iter(self.stamps)))
        if self.jb.is_cut(key):
            self._push(key, pcm)   # counted there as late; no resampler state to keep
            return
        if key in self._completed:
            # Audio after its turn's end was applied: resample it on its own, keep nothing back.
            self._push(key, StreamResampler(rate, self.sink.rate).process(pcm, last=True))
            return
        rs = self._resamplers.get(key)
        if rs is None or rs.in_rate != rate:
            if rs is not None:
                self._push(key, rs.process(np.empty(0, np.int16), last=True))
            rs = self._resamplers[key] = StreamResampler(rate, self.sink.rate)
            for old in [k for k in self._resamplers if k < key]:   # a newer turn began: flush older
                self._flush_resampler(old)
        self._push(key, rs.process(pcm))

    def _flush_resampler(self, key: int) -> None:
        rs = self._resamplers.pop(key, None)
        if rs is not None and not rs.passthrough:
            self._push(key, rs.process(np.empty(0, np.int16), last=True))

    def on_control(self, msg: Message) -> None:
        kind = msg.kind
        if kind == "interrupt":
            # A publish time in the future (a forged header) may cut at most 1 s of what follows.
            # `of` names the publisher whose turn is cut when another process (the console) asks.
            self.interrupt(msg.get("of") or msg["inst"], msg["turn"],
                           min(msg["ts"], (msg.recv_ns or time.time_ns()) + 1_000_000_000))
        elif kind in ("turn_complete", "generation_complete"):
            task = asyncio.get_running_loop().create_task(self._end_turn(msg["inst"], msg["turn"], msg["ts"]))
            self._pending_ends.add(task)
            task.add_done_callback(self._pending_ends.discard)

    async def _end_turn(self, inst: str, turn: int, published_ns: int) -> None:
        """Apply a turn's end once its audio is in. The control lane overtakes the audio lane,
        so chunks published before turn_complete may still be queued behind it: wait until
        the audio lane has handled something published later, or has gone quiet."""
        deadline = time.monotonic() + 5.0
        while (self._audio_ts < published_ns and time.monotonic() - self._audio_mono < 0.03
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
        key = self._keys.get((inst, turn))
        if key is None or self.jb.is_cut(key):
            return   # no audio of that turn came (or it was cut): nothing to end
        self._flush_resampler(key)
        self._completed[key] = None
        while len(self._completed) > 64:
            self._completed.popitem(last=False)
        self.jb.end_turn(key)

    def interrupt(self, inst: str, turn: int, published_ns: int) -> None:
        """Cut the turns <= `turn` of publisher `inst` that we hold, and their chunks still in
        flight (published before `published_ns`)."""
        t0 = time.perf_counter()
        self._cuts[inst] = (turn, published_ns)
        self._cuts.move_to_end(inst)
        while len(self._cuts) > 64:
            self._cuts.popitem(last=False)
        keys = {k for (i, t), k in self._keys.items() if i == inst and t <= turn}
        cut_ns = time.time_ns() if self.sink.has_device_buffer and self.device_reset else None
        cut, audible = self.jb.interrupt(0, cut_ns, turns=keys)
        for k in [k for k in self._resamplers if k in keys]:
            del self._resamplers[k]
        if audible and self.sink.has_device_buffer and self.device_reset:
            self.sink.reset()
        silent_ns = time.time_ns()
        self.interrupts += 1
        self.reset_ms.append((time.perf_counter() - t0) * 1000)
        for f in cut:
            fields: dict[str, Any] = {"turn": self._turn_of(f.turn),
                                      "played_ms": round(f.played_frames * 1000 / self.jb.rate, 1),
                                      "interrupted": True}
            if f.started and f.end_ns is not None:
                fields["silent_ts"] = min(f.end_ns, silent_ns) if cut_ns is not None else f.end_ns
            self.svc.publish("playback", "turn_finished", **fields)
        if cut:
            log.info("interrupted turn %d: silent after %.1f ms", turn, self.reset_ms[-1])

    # --------------------------------------------------------- main
    async def run(self, svc: Service) -> None:
        log.info("playing audio.out to %s", self._describe())
        try:
            while True:
                if not self.sink.alive:
                    err = getattr(self.sink, "error", None)
                    raise DeviceError(f"the {self.sink.kind} sink stopped" + (f": {err}" if err else
                                                                              " (audio device lost)"))
                self._update_metrics()
                ref = getattr(self.sink, "on_block", None)
                if isinstance(ref, EchoReference):   # a device sink: is audio.ref wanted?
                    ref.refresh()
                await asyncio.sleep(0.25)
        finally:
            self.sink.close()   # while the loop still runs: no event from the audio thread is left dangling

    def _describe(self) -> str:
        if isinstance(self.sink, DeviceSink):
            return (f"device {self.sink.device_name!r} at {self.sink.rate} Hz, period "
                    f"{self.sink.period_frames * 1000 / self.sink.rate:.0f} ms, latency {self.sink.latency_s * 1000:.0f} ms"
                    + (" through libpulse" if self.sink.api == "pulse" else " through PortAudio"))
        return f"file {self.sink.path}" if self.sink.kind == "file" else "nowhere (--null)"

    def _update_metrics(self) -> None:
        m = self.svc.metrics
        m.update(self.jb.stats)
        m.update(self.sink.metrics())
        # Audio dropped for any reason, in one figure (`livepipe top` adds it to DROPS).
        m["audio_dropped"] = (self.jb.stats["late_chunks"] + self.jb.stats["overflow_chunks"] + self.cut_chunks
                              + self.rejected_chunks + self.jb.stats["stale_chunks"])
        m.update(sink=self.sink.kind, buffered_ms=round(self.jb.buffered_ms, 1), interrupts=self.interrupts,
                 prebuffer_ms=self.jb.prebuffer_ms,
                 stale_ms=round(self.jb.stats["stale_frames"] * 1000 / self.jb.rate, 1),
                 cut_chunks=self.cut_chunks,
                 rejected_chunks=self.rejected_chunks, converted_chunks=self.converted_chunks,
                 period_ms=round(self.sink.period_frames * 1000 / self.sink.rate, 2),
                 played_s=round(self.jb.stats["played_frames"] / self.jb.rate, 2))
        if self.reset_ms:
            m["interrupt_reset_ms_max"] = round(max(self.reset_ms), 2)
            m["interrupt_reset_ms_last"] = round(self.reset_ms[-1], 2)


class EchoReference:
    """audio.ref: exactly what went to the device, for a local capture-audio's echo canceller.

    Called from the audio thread with every block. Blocks with sound are published; when the
    device goes silent, one `silence` marker says so (from its `out_ts` on), and nothing more until
    it plays sound again: a silent reference costs no message, and capture-audio knows it is not
    late (it never waits for it). Published only while some process
    subscribes to audio.ref (`wanted`, refreshed by the event loop every 0.25 s): otherwise each
    block would wake the loop for nothing (echo off, or no capture-audio on this bus). A
    capture-audio that subscribes later takes references only after it has seen playback's
    heartbeat (about a second), so the refresh period loses it nothing."""

    def __init__(self, svc: Service, rate: int) -> None:
        self.svc, self.rate = svc, rate
        self.wanted = True
        self.sounding = True   # the last block published had sound (so the first silence is said)

    def refresh(self) -> None:
        self.wanted = self.svc.has_subscriber("audio.ref")

    def __call__(self, block: np.ndarray, out_ns: int) -> None:
        if not self.wanted or self.svc.stopping:
            return
        sound = bool(block.any())
        if not (sound or self.sounding):
            return   # silence goes on: said once
        self.sounding = sound
        try:
            if sound:
                self.svc.publish_threadsafe("audio.ref", "audio", block.tobytes(), rate=self.rate, channels=1,
                                            sample_width=2, frames=len(block), out_ts=out_ns)
            else:
                self.svc.publish_threadsafe("audio.ref", "silence", out_ts=out_ns)
        except (AssertionError, RuntimeError):   # the loop is not running yet / any more
            pass


def build_parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="livepipe playback", description=__doc__.split("\n\n")[0])
    out = p.add_mutually_exclusive_group()
    out.add_argument("--device", metavar="NAME|INDEX", help="output device: a sound server sink name "
                     "(e.g. speaker) or a PortAudio index/name (default: the system default)")
    out.add_argument("--file", metavar="PATH.wav", help="write what a listener would hear to a WAV file, "
                     "in real time (silences included), instead of a device; an existing one (a restart) "
                     "is appended to")
    out.add_argument("--null", action="store_true", help="play to nowhere (events and metrics only)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--prebuffer-ms", type=float, default=DEFAULT_PREBUFFER_MS,
                   help=f"audio queued before a turn starts playing (default {DEFAULT_PREBUFFER_MS:g}: at once; "
                        "each underrun adds the gap heard, at least 20 ms, up to --prebuffer-max-ms)")
    p.add_argument("--prebuffer-max-ms", type=float, default=DEFAULT_PREBUFFER_MAX_MS,
                   help=f"most the prebuffer grows to after underruns (default {DEFAULT_PREBUFFER_MAX_MS:g})")
    p.add_argument("--period-ms", type=float, default=20.0,
                   help="device period: the block each device callback (or file write) handles (default 20)")
    p.add_argument("--latency-ms", type=float, default=DEFAULT_LATENCY_MS,
                   help=f"device buffer (default {DEFAULT_LATENCY_MS:g} ms); an interrupt drops it, so it only "
                        "delays a turn's start; 0 = PortAudio's 'low'")
    p.add_argument("--device-rate", type=int, metavar="HZ",
                   help="open the device at this rate and resample (default: 24000 if the device takes it)")
    p.add_argument("--turn-gap-ms", type=float, default=1000.0,
                   help="a turn dry this long with no turn_complete is reported finished (default 1000)")
    p.add_argument("--max-lag-ms", type=float, default=DEFAULT_MAX_LAG_MS,
                   help=f"playing further behind schedule than this (a stalled process) skips the stale audio "
                        f"to what is due now (default {DEFAULT_MAX_LAG_MS:g}; 0 = never skip)")
    p.add_argument("--max-buffer-s", type=float, default=600.0,
                   help="most audio held (default 600 s); beyond it chunks are dropped and counted")
    p.add_argument("--portaudio", action="store_true",
                   help="play through PortAudio even to a sound server's sink (default: play to "
                        "PulseAudio/PipeWire directly with libpulse, about half the CPU)")
    p.add_argument("--no-device-reset", action="store_true",
                   help="on interrupt only clear the queue and let the device buffer play out (a baseline)")
    add_bus_arguments(p)
    return p


@verb("playback")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("playback")
    if args.list_devices:
        return print_device_list(log)
    for name in ("prebuffer_ms", "prebuffer_max_ms", "turn_gap_ms", "max_lag_ms"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if not 2.0 <= args.period_ms <= 200.0 or args.max_buffer_s <= 0:
        raise UsageError("--period-ms must be within 2..200 and --max-buffer-s positive")
    cfg = BusConfig.from_args(args)
    svc = Service("playback", cfg)
    holder: dict[str, Player] = {}

    def make_buffer(rate: int) -> JitterBuffer:
        # With a device that needs another rate the buffer holds device-rate audio (resampled on arrival).
        return JitterBuffer(rate, args.prebuffer_ms, args.turn_gap_ms, args.max_buffer_s,
                            on_event=lambda kind, fields: holder["player"].publish_event(kind, fields),
                            prebuffer_max_ms=args.prebuffer_max_ms, max_lag_ms=args.max_lag_ms)
    try:
        if args.file or args.null:
            jb = make_buffer(OUT_RATE)
            sink: AudioSink = ClockedSink(jb, args.period_ms, args.file)
        else:
            sink = DeviceSink(args.device, args.period_ms, args.device_rate, args.latency_ms, portaudio=args.portaudio)
            jb = sink.jb = make_buffer(sink.rate)
        sink.start()
    except (DeviceError, AudioFileError) as exc:
        return fail("playback", exc)
    player = holder["player"] = Player(svc, jb, sink, device_reset=not args.no_device_reset)
    if isinstance(sink, DeviceSink):
        sink.on_block = EchoReference(svc, sink.rate)
    svc.on("audio.out", player.on_audio)
    svc.on("control", player.on_control)
    try:
        return svc.main(player.run)
    finally:
        sink.close()
