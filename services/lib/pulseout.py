"""Playing to a PulseAudio/PipeWire sink directly with libpulse's asynchronous API (ctypes, no PortAudio).

playback's speaker goes to the sound server anyway: through PortAudio it took PortAudio's ALSA
thread, ALSA's pulse plugin (itself a libpulse client with its own thread) and a cffi callback
into Python for every period. Here the server's write requests call `fill(frames)` directly in
libpulse's own thread, one call per period.

Why not the simple API (pa_simple_write from a thread, as services/lib/pulsein.py reads): a
blocking write holds a block taken from the queue while it waits for room, up to a period; an
interrupt that flushes the stream meanwhile would then still hear that block. Here the block is
taken only when the server asks for it, under the mainloop lock, and `flush()` takes the same
lock: nothing taken before an interrupt survives it.

libpulse itself is loaded, with its signatures, by services/lib/pulseloop.py (one table for the
microphone's and this stream's calls). Why libpulse's threaded mainloop here and not the event
loop (PulseLoop, as the microphone): tried in session 7 (branch playloop-async), a turn's first
12-90 samples went missing at the speaker's monitor in 6 of 10 runs (1 of 5 with the loop thread
not real-time), against 0 of 4 with this thread in the same hour; not understood (README, Performance).

Standard library only; `PulseUnavailable` when libpulse is missing or no server answers, and
the caller uses PortAudio instead.
"""
from __future__ import annotations

import ctypes
import logging
import time
from typing import Callable

from livepipe.services.lib.pulseloop import (CONTEXT_FAILED, CONTEXT_READY, CONTEXT_TERMINATED, NO_VALUE,
                                             OPERATION_RUNNING, SAMPLE_S16LE, SEEK_RELATIVE, STREAM_AUTO_TIMING_UPDATE,
                                             STREAM_EARLY_REQUESTS, STREAM_FAILED, STREAM_INTERPOLATE_TIMING,
                                             STREAM_READY, STREAM_TERMINATED, BufferAttr, PulseUnavailable, SampleSpec,
                                             libpulse, notify_cb, request_cb, success_cb)

log = logging.getLogger("pulseout")


class OutputClock:
    """When each period written to a playback stream will sound, on the wall clock.

    libpulse's latency (`pa_stream_get_latency`, interpolated) is right while the stream plays,
    but after the stream ran dry (libpulse's thread was descheduled longer than the buffer) it
    is too small for about 100 ms: measured, the periods written at once after a 150 ms stall got
    times 0.1-15 ms apart instead of 20, up to 40 ms early, and audio.ref then placed them over
    each other; PortAudio's ALSA plugin reopens the stream after an underrun and never did.
    Periods written one after another play back to back unless the stream ran dry between them,
    so each is dated from the end of the one before, following libpulse's estimate (when within
    GAP_NS of it) by at most SLEW_NS a period (a sound card's clock drifts from the system clock by well under that). It
    starts again from libpulse's estimate at the first write, after a flush, and when that
    estimate is more than GAP_NS later than the end of the last period (the stream ran dry and
    played silence). Pure arithmetic: no libpulse call, any thread, any mainloop."""

    SLEW_NS = 50_000        # 2.5 ms a second: follows any real clock drift, never jumps
    GAP_NS = 5_000_000      # audio.ref's own continuity tolerance (services/lib/echo.py)

    def __init__(self, period_ns: int) -> None:
        self.period_ns = period_ns
        self.end_ns: int | None = None   # when the last period dated ends sounding (None: restart)
        self.held = 0                    # periods dated from the one before, libpulse's estimate being earlier

    def next(self, estimate_ns: int) -> int:
        """The wall time the period written now starts sounding, given libpulse's `estimate_ns`."""
        end = self.end_ns
        if end is None or estimate_ns > end + self.GAP_NS:
            out = estimate_ns
        elif estimate_ns < end - self.GAP_NS:   # libpulse's estimate is wrong (see above): it follows
            self.held += 1
            out = end
        else:
            out = end + max(-self.SLEW_NS, min(self.SLEW_NS, estimate_ns - end))
        self.end_ns = out + self.period_ns
        return out

    def restart(self) -> None:
        """What was written is gone (a flush): the next period is dated afresh."""
        self.end_ns = None


class PulseOutput:
    """One playback stream of s16le samples to `sink` (None: the server's default, which libpulse
    takes from PULSE_SINK when set).

    The server asks for audio as its buffer drains; each time, `fill(frames, out_ns)` is called
    in libpulse's thread for every whole period that fits, with the wall time the block's first
    sample will sound, and must return that many frames of bytes. `latency_ms` is the whole
    buffer the stream keeps (client and server, as PortAudio's latency on this server was);
    `flush()` drops all of it (an interrupt)."""

    FLUSH_UNDERFLOW_S = 0.2   # an underflow this soon after a flush comes from the flush

    def __init__(self, sink: str | None, rate: int, channels: int, period_frames: int, latency_ms: float,
                 app: str, fill: Callable[[int, int], bytes]) -> None:
        lib = libpulse()
        self._lib = lib
        self.rate, self.channels, self.period_frames = rate, channels, period_frames
        self.frame_bytes = 2 * channels
        self.period_bytes = period_frames * self.frame_bytes
        self.fill = fill
        self.underflows = 0
        self.callback_errors = 0
        self.on_first_write: Callable[[], None] | None = None   # called once, in libpulse's thread
        self._first = True
        self.flush_underflows = 0
        self._flushed_at = -1e9   # time.monotonic() of the last flush
        self._ml = self._ctx = self._s = None
        # The callbacks must outlive the stream: kept on the object.
        self._state_cb = notify_cb(self._on_state)
        self._write_cb = request_cb(self._on_write)
        self._underflow_cb = notify_cb(self._on_underflow)
        self._flushed_cb = success_cb(self._on_flushed)
        self.clock = OutputClock(period_frames * 1_000_000_000 // rate)
        self._usec = ctypes.c_uint64(0)
        self._neg = ctypes.c_int(0)
        ml = self._ml = lib.pa_threaded_mainloop_new()
        if not ml:
            raise PulseUnavailable("pa_threaded_mainloop_new failed")
        try:
            self._connect(sink, app, latency_ms)
        except BaseException:
            self.close()
            raise

    def _connect(self, sink: str | None, app: str, latency_ms: float) -> None:
        lib, ml = self._lib, self._ml
        self._ctx = lib.pa_context_new(lib.pa_threaded_mainloop_get_api(ml), app.encode())
        if not self._ctx:
            raise PulseUnavailable("pa_context_new failed")
        lib.pa_context_set_state_callback(self._ctx, self._state_cb, None)
        if lib.pa_context_connect(self._ctx, None, 0, None) < 0:
            raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
        lib.pa_threaded_mainloop_lock(ml)
        try:
            if lib.pa_threaded_mainloop_start(ml) < 0:
                raise PulseUnavailable("pa_threaded_mainloop_start failed")
            while (state := lib.pa_context_get_state(self._ctx)) != CONTEXT_READY:
                if state in (CONTEXT_FAILED, CONTEXT_TERMINATED):
                    raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
                lib.pa_threaded_mainloop_wait(ml)
            spec = SampleSpec(SAMPLE_S16LE, self.rate, self.channels)
            self._s = lib.pa_stream_new(self._ctx, b"playback", ctypes.byref(spec), None)
            if not self._s:
                raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
            lib.pa_stream_set_state_callback(self._s, self._state_cb, None)
            lib.pa_stream_set_write_callback(self._s, self._write_cb, None)
            lib.pa_stream_set_underflow_callback(self._s, self._underflow_cb, None)
            # EARLY_REQUESTS: the server asks for a period when the sink needs one, and asks the
            # sink for a latency of one period (minreq). Without it a tlength of two periods asked
            # the sink for none: a null sink then woke the server every 0.5 ms (pactl: "configured
            # 500 usec"); ADJUST_LATENCY did the same. The server then keeps tlength at 3 periods
            # (a 40 ms request: 60 ms; PortAudio's DAC time was ~40 ms, libpulse's ~44 ms here).
            # minreq: one period; prebuf: one period, so playing starts (and, after
            # a flush or an underrun, restarts) with the first block written. Only whole periods
            # are written, and the server may round tlength: with its default prebuf (= tlength)
            # the stream could wait for a few bytes that never come.
            tlength = max(2 * self.period_bytes, int(self.rate * latency_ms / 1000) * self.frame_bytes)
            attr = BufferAttr(NO_VALUE, tlength, self.period_bytes, self.period_bytes, NO_VALUE)
            flags = STREAM_INTERPOLATE_TIMING | STREAM_AUTO_TIMING_UPDATE | STREAM_EARLY_REQUESTS
            if lib.pa_stream_connect_playback(self._s, sink.encode() if sink else None, ctypes.byref(attr),
                                              flags, None, None) < 0:
                raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
            while (state := lib.pa_stream_get_state(self._s)) != STREAM_READY:
                if state in (STREAM_FAILED, STREAM_TERMINATED):
                    raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
                lib.pa_threaded_mainloop_wait(ml)
            got = lib.pa_stream_get_buffer_attr(self._s).contents
            self.tlength_frames = got.tlength // self.frame_bytes
            self.minreq_frames = got.minreq // self.frame_bytes
        finally:
            lib.pa_threaded_mainloop_unlock(ml)

    def _error(self, code: int) -> str:
        text = self._lib.pa_strerror(code)
        return text.decode(errors="replace") if text else f"error {code}"

    # ------------------------------------------------------ libpulse's thread
    def _on_state(self, obj: int, userdata: int) -> None:
        self._lib.pa_threaded_mainloop_signal(self._ml, 0)

    def _on_flushed(self, stream: int, success: int, userdata: int) -> None:
        self._lib.pa_threaded_mainloop_signal(self._ml, 0)

    def _on_underflow(self, stream: int, userdata: int) -> None:
        # The stream never runs dry on purpose (libpulse's thread was late), but a flush (an
        # interrupt) empties it: an underflow right after one is that, not counted (measured: 9 in
        # the 70 interrupts of `bench interrupt`).
        if time.monotonic() - self._flushed_at < self.FLUSH_UNDERFLOW_S:
            self.flush_underflows += 1
        else:
            self.underflows += 1

    def _on_write(self, stream: int, nbytes: int, userdata: int) -> None:
        try:
            if self._first:
                self._first = False
                if self.on_first_write is not None:
                    self.on_first_write()
            self._write(nbytes)
        except Exception:   # never let an exception out into libpulse's thread
            self.callback_errors += 1

    def _write(self, nbytes: int) -> None:
        """Write whole periods while `nbytes` allow (mainloop lock held), silence included: the
        stream never runs dry on purpose. (Session 5 let it run dry while nothing played and
        restarted it with audio: measured, each restart was dated 5-37 ms later than the speaker
        played it, more at each turn, as the server rewinds the silence it rendered meanwhile;
        the echo canceller's reference then came after its echo.)"""
        lib, s = self._lib, self._s
        while nbytes >= self.period_bytes:
            try:
                data = self.fill(self.period_frames, self._next_out_ns())
            except Exception:   # play silence: the server asks again only for what it gets
                self.callback_errors += 1
                data = bytes(self.period_bytes)
            if lib.pa_stream_write(s, data, len(data), None, 0, SEEK_RELATIVE) < 0:
                break
            nbytes -= len(data)

    def _next_out_ns(self) -> int:
        """Wall time the next sample written will sound: libpulse's latency for the stream
        (interpolated locally: the sink's latency plus what is queued), from now, kept
        continuous with the period before (OutputClock)."""
        if self._lib.pa_stream_get_latency(self._s, ctypes.byref(self._usec), ctypes.byref(self._neg)) < 0:
            usec = 0   # no timing information yet (just connected or flushed): what is queued is nothing
        else:
            usec = 0 if self._neg.value else self._usec.value
        return self.clock.next(time.time_ns() + usec * 1000)

    # ---------------------------------------------------------- any thread
    @property
    def latency_s(self) -> float:
        return self.tlength_frames / self.rate

    def flush(self) -> None:
        """Drop everything the stream holds, client and server side, and return once the server
        has done it. Takes the mainloop lock, so no fill() runs meanwhile; the server then asks
        for audio again."""
        lib, ml = self._lib, self._ml
        lib.pa_threaded_mainloop_lock(ml)
        try:
            if lib.pa_stream_get_state(self._s) != STREAM_READY:
                raise PulseUnavailable("the playback stream is not running")
            op = lib.pa_stream_flush(self._s, self._flushed_cb, None)
            if not op:
                raise PulseUnavailable(self._error(lib.pa_context_errno(self._ctx)))
            self.clock.restart()   # before the wait: the server may ask for audio meanwhile
            self._flushed_at = time.monotonic()
            while (lib.pa_operation_get_state(op) == OPERATION_RUNNING
                   and lib.pa_stream_get_state(self._s) == STREAM_READY):
                lib.pa_threaded_mainloop_wait(ml)
            lib.pa_operation_unref(op)
        finally:
            lib.pa_threaded_mainloop_unlock(ml)

    @property
    def alive(self) -> bool:
        return bool(self._s) and self._lib.pa_stream_get_state(self._s) == STREAM_READY

    def close(self) -> None:
        """Stop the stream and libpulse's thread (no fill() runs after this returns)."""
        lib, ml = self._lib, self._ml
        if not ml:
            return
        lib.pa_threaded_mainloop_lock(ml)
        if self._s:
            lib.pa_stream_set_write_callback(self._s, request_cb(), None)
            lib.pa_stream_disconnect(self._s)
        if self._ctx:
            lib.pa_context_disconnect(self._ctx)
        lib.pa_threaded_mainloop_unlock(ml)
        lib.pa_threaded_mainloop_stop(ml)
        if self._s:
            lib.pa_stream_unref(self._s)
        if self._ctx:
            lib.pa_context_unref(self._ctx)
        lib.pa_threaded_mainloop_free(ml)
        self._ml = self._ctx = self._s = None
