"""Reading a PulseAudio/PipeWire source directly with libpulse (ctypes, no PortAudio, no thread).

capture-audio's microphone goes to the sound server anyway: through PortAudio it took PortAudio's
ALSA thread, ALSA's pulse plugin and a cffi callback into Python for every 10 ms block. Session 4
read it with libpulse's simple API in a thread (1.3 % of a core against 8.2 % through
sounddevice); pa_simple still ran libpulse's threaded mainloop, so each 10 ms fragment woke two
threads besides the event loop's. Here the record stream runs on the process's asyncio loop
(services/lib/pulseloop.py): each fragment is taken (pa_stream_peek/pa_stream_drop) in the loop
iteration its arrival wakes, and handed to `on_data` there.

Standard library only; `PulseUnavailable` when libpulse is missing or no server answers, and
the caller uses PortAudio instead.
"""
from __future__ import annotations

import ctypes
import logging
import time
from typing import Callable

from livepipe.services.lib.pulseloop import (NO_VALUE, OPERATION_RUNNING, SAMPLE_S16LE, STREAM_ADJUST_LATENCY,
                                             STREAM_CREATING, STREAM_FAILED, STREAM_INTERPOLATE_TIMING, STREAM_READY,
                                             STREAM_TERMINATED, BufferAttr, PulseContext, PulseLoop, PulseUnavailable,
                                             SampleSpec, notify_cb, request_cb, success_cb)

__all__ = ["PulseRecord", "PulseUnavailable"]

log = logging.getLogger("pulsein")


class PulseRecord:
    """One record stream of s16le samples from `source` (None: the server's default, which
    libpulse takes from PULSE_SOURCE when set), opened on `ml` before it returns (run_until:
    before the PulseLoop is attached to the event loop). The server sends a fragment every
    `block_frames`, and keeps what arrives until it is read (up to its default maxlength, 4 MB:
    two minutes at 16 kHz), so nothing is lost while the event loop is not running yet.

    `start(on_data, on_stopped)`: from then on each fragment is handed to `on_data(bytes, lost)`
    (lost: the server skipped audio before it) in the loop iteration that received it, and a
    stream that the server ends calls `on_stopped(reason)` once."""

    def __init__(self, ml: PulseLoop, source: str | None, rate: int, channels: int, block_frames: int,
                 app: str, timeout: float = 5.0) -> None:
        self.ml = ml
        self.rate, self.channels, self.block_frames = rate, channels, block_frames
        self.holes = 0                 # gaps the server reported in the stream (counted as overflows)
        self.stopped: str | None = None   # why the stream ended, once it has
        self._on_data: Callable[[bytes, bool], None] | None = None
        self._on_stopped: Callable[[str], None] | None = None
        self._lost = False
        self._ptr, self._len = ctypes.c_void_p(), ctypes.c_size_t()
        self._peek_args = (ctypes.byref(self._ptr), ctypes.byref(self._len))
        self._state_cb = notify_cb(self._on_state)
        self._read_cb = request_cb(self._on_read)
        self._timing_cb = success_cb(lambda *_: None)
        self.stream: int | None = None
        self.ctx = PulseContext(ml, app, timeout)
        lib = self.lib = self.ctx.lib
        try:
            spec = SampleSpec(SAMPLE_S16LE, rate, channels)
            self.stream = lib.pa_stream_new(self.ctx.ctx, b"microphone", ctypes.byref(spec), None)
            if not self.stream:
                raise PulseUnavailable(self.ctx.error())
            lib.pa_stream_set_state_callback(self.stream, self._state_cb, None)
            # fragsize: the server sends a block as soon as one is captured (as ALSA's pulse plugin
            # asks for its period); the flags are pa_simple's, without its timing updates (a timer
            # that polls the server's latency, up to every 10 ms): the latency is read once, below.
            attr = BufferAttr(NO_VALUE, NO_VALUE, NO_VALUE, NO_VALUE, block_frames * channels * 2)
            if lib.pa_stream_connect_record(self.stream, source.encode() if source else None, ctypes.byref(attr),
                                            STREAM_INTERPOLATE_TIMING | STREAM_ADJUST_LATENCY) < 0:
                raise PulseUnavailable(self.ctx.error())
            if not ml.run_until(lambda: self._state() != STREAM_CREATING, timeout):
                raise PulseUnavailable(f"the sound server did not open the stream within {timeout:.0f} s")
            if self._state() != STREAM_READY:
                raise PulseUnavailable(self.ctx.error())
            # The server records into the stream from about now: what is read later is dated from here.
            self.ready_ns = time.time_ns()
            self.latency_s = self._latency(timeout)
        except PulseUnavailable:
            self.close()
            raise

    def _state(self) -> int:
        return self.lib.pa_stream_get_state(self.stream) if self.stream else STREAM_TERMINATED

    def _latency(self, timeout: float) -> float:
        """What libpulse reports for the stream: the source's latency plus audio not yet read."""
        lib = self.lib
        op = lib.pa_stream_update_timing_info(self.stream, self._timing_cb, None)
        if op:
            self.ml.run_until(lambda: lib.pa_operation_get_state(op) != OPERATION_RUNNING, timeout)
            lib.pa_operation_unref(op)
        usec, negative = ctypes.c_uint64(), ctypes.c_int()
        if lib.pa_stream_get_latency(self.stream, ctypes.byref(usec), ctypes.byref(negative)) < 0 or negative.value:
            return 0.0
        return usec.value / 1e6

    def start(self, on_data: Callable[[bytes, bool], None], on_stopped: Callable[[str], None]) -> None:
        """Hand fragments over from now on (what the server already sent first)."""
        self._on_data, self._on_stopped = on_data, on_stopped
        self.lib.pa_stream_set_read_callback(self.stream, self._read_cb, None)
        self._on_read(None, 0, None)
        if self._state() != STREAM_READY:
            self._on_state(None, None)

    def _on_read(self, stream: int | None, nbytes: int, userdata: int | None) -> None:
        lib, s = self.lib, self.stream
        ptr, length = self._ptr, self._len
        try:
            while s:
                if lib.pa_stream_peek(s, *self._peek_args) < 0:
                    self._stop(self.ctx.error())
                    return
                if not length.value:
                    return
                data = ctypes.string_at(ptr.value, length.value) if ptr.value else None
                lib.pa_stream_drop(s)
                if data is None:    # a hole: audio the server did not deliver
                    self.holes += 1
                    self._lost = True
                    continue
                lost, self._lost = self._lost, False
                if self._on_data is not None:
                    self._on_data(data, lost)
                s = self.stream   # on_data may have closed the stream
        except Exception:
            log.exception("reading the microphone stream failed")

    def _on_state(self, stream: int | None, userdata: int | None) -> None:
        if self._state() in (STREAM_FAILED, STREAM_TERMINATED) and self.stream:
            self._stop(self.ctx.error())

    def _stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason
            if self._on_stopped is not None:
                try:
                    self._on_stopped(reason)
                except Exception:
                    log.exception("the microphone stream's stop handler failed")

    @property
    def active(self) -> bool:
        return self.stopped is None and self._state() == STREAM_READY

    def close(self) -> None:
        """Stop the stream and the connection (again: no-op)."""
        lib = self.lib if self.stream else None
        if lib is not None and self.stream:
            s, self.stream = self.stream, None
            lib.pa_stream_set_read_callback(s, request_cb(), None)
            lib.pa_stream_set_state_callback(s, notify_cb(), None)
            lib.pa_stream_disconnect(s)
            lib.pa_stream_unref(s)
        self.ctx.close()
