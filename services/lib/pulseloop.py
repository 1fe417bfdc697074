"""libpulse's asynchronous API driven by the process's own asyncio event loop (ctypes, no thread).

libpulse runs its contexts and streams on whatever implements `pa_mainloop_api`: a table of
functions to watch file descriptors (io events), run timers (time events) and run work once per
loop iteration (defer events). Its own mainloops (pa_mainloop, pa_threaded_mainloop) need a
thread of their own beside asyncio's loop; here the table is implemented over asyncio
(`loop.add_reader`/`add_writer`, `call_at`, `call_soon`), so what the server sends is read in
the event loop thread, in the same loop iteration that its socket or ring buffer wakes. On the
2-core VM waking a thread costs ~100 µs of CPU: the simple API's reader thread and libpulse's
threaded mainloop were woken for every 10 ms fragment (README, Performance).

A `PulseLoop` can be used before any asyncio loop runs: it records what libpulse asks for, and
`run_until()` polls those descriptors itself (a stream opened before the bus is up, at startup).
`attach(loop)` then hands everything to the asyncio loop; from there on nothing blocks. Anything
libpulse asks for after that loop closed is dropped quietly (a stream freed at exit).

prior art: pulsectl-asyncio's mainloop (mhthies/pulsectl-asyncio), which also does this in
ctypes; here timers honour libpulse's monotonic-clock flag and the loop can be attached later.

Standard library only: `PulseUnavailable` when libpulse is missing.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import select
import time
from typing import Any, Callable

log = logging.getLogger("pulseloop")

# pa_io_event_flags_t (pulse/mainloop-api.h)
IO_INPUT, IO_OUTPUT, IO_HANGUP, IO_ERROR = 1, 2, 4, 8
# A timeval whose tv_usec has this bit is on the monotonic clock (pulsecore/core-rtclock.h), else
# it is wall-clock time. asyncio's loop.time() is time.monotonic(), the same CLOCK_MONOTONIC.
_TIMEVAL_RTCLOCK = 1 << 30


class PulseUnavailable(OSError):
    """No libpulse, or the server refused us (the message says which)."""


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _MainloopApi(ctypes.Structure):
    pass


_P = ctypes.c_void_p
_api_p = ctypes.POINTER(_MainloopApi)
_io_cb = ctypes.CFUNCTYPE(None, _api_p, _P, ctypes.c_int, ctypes.c_int, _P)    # (api, e, fd, flags, ud)
_time_cb = ctypes.CFUNCTYPE(None, _api_p, _P, ctypes.POINTER(_Timeval), _P)    # (api, e, tv, ud)
_defer_cb = ctypes.CFUNCTYPE(None, _api_p, _P, _P)                             # (api, e, ud)
_destroy_cb = ctypes.CFUNCTYPE(None, _api_p, _P, _P)                           # (api, e, ud)

_FIELDS = [
    ("io_new", ctypes.CFUNCTYPE(_P, _api_p, ctypes.c_int, ctypes.c_int, _io_cb, _P)),
    ("io_enable", ctypes.CFUNCTYPE(None, _P, ctypes.c_int)),
    ("io_free", ctypes.CFUNCTYPE(None, _P)),
    ("io_set_destroy", ctypes.CFUNCTYPE(None, _P, _destroy_cb)),
    ("time_new", ctypes.CFUNCTYPE(_P, _api_p, ctypes.POINTER(_Timeval), _time_cb, _P)),
    ("time_restart", ctypes.CFUNCTYPE(None, _P, ctypes.POINTER(_Timeval))),
    ("time_free", ctypes.CFUNCTYPE(None, _P)),
    ("time_set_destroy", ctypes.CFUNCTYPE(None, _P, _destroy_cb)),
    ("defer_new", ctypes.CFUNCTYPE(_P, _api_p, _defer_cb, _P)),
    ("defer_enable", ctypes.CFUNCTYPE(None, _P, ctypes.c_int)),
    ("defer_free", ctypes.CFUNCTYPE(None, _P)),
    ("defer_set_destroy", ctypes.CFUNCTYPE(None, _P, _destroy_cb)),
    ("quit", ctypes.CFUNCTYPE(None, _api_p, ctypes.c_int)),
]
_MainloopApi._fields_ = [("userdata", _P), *_FIELDS]


class _Event:
    """One io, time or defer event. libpulse holds it as an opaque pointer: its id."""

    __slots__ = ("id", "cb", "userdata", "destroy", "fd", "flags", "deadline", "tv", "handle", "enabled")

    def __init__(self, eid: int, cb: Any, userdata: int | None) -> None:
        self.id, self.cb, self.userdata = eid, cb, userdata
        self.destroy: Any = None
        self.fd = -1
        self.flags = 0               # io: the IO_* flags wanted
        self.deadline: float | None = None   # time: monotonic seconds, None = disabled
        self.tv = _Timeval()         # time: what libpulse gave, passed back to its callback
        self.handle: asyncio.Handle | None = None   # time/defer: scheduled on the asyncio loop
        self.enabled = False         # defer


class PulseLoop:
    """A `pa_mainloop_api` over an asyncio loop (attached now or later). Pass `api` to
    pa_context_new. Everything runs in the thread of that loop (or of run_until)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._next_id = 1
        self._io: dict[int, _Event] = {}
        self._time: dict[int, _Event] = {}
        self._defer: dict[int, _Event] = {}
        self._readers: dict[int, list[_Event]] = {}   # fd -> io events wanting input
        self._writers: dict[int, list[_Event]] = {}   # fd -> io events wanting output
        self._reading: set[int] = set()   # fds the asyncio loop watches for us (add_reader)
        self._writing: set[int] = set()
        self._busy = -1                   # the fd whose callback runs now: its watch is synced after it
        self._polls: dict[int, Any] = {}  # fd -> a poll object asking "more to read already?"
        self.dispatch_errors = 0
        # The C side of the table: bound methods kept alive as long as this object.
        self._vtable = _MainloopApi(None, *(ftype(getattr(self, f"_{name}")) for name, ftype in _FIELDS))
        self.api = ctypes.pointer(self._vtable)

    # ---------------------------------------------------------------- attaching
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every event to `loop` (the loop running in this thread, or about to)."""
        if self.loop is loop:
            return
        assert self.loop is None, "a PulseLoop is attached once"
        self.loop = loop
        for fd in {ev.fd for ev in self._io.values()}:
            self._sync(fd)
        for ev in self._time.values():
            self._schedule_timer(ev)
        for ev in self._defer.values():
            if ev.enabled:
                self._schedule_defer(ev)

    @property
    def _live(self) -> bool:
        return self.loop is not None and not self.loop.is_closed()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Before attach(): run libpulse's events in this thread until done() (True) or the
        timeout (False). The events are polled here; nothing is left scheduled anywhere."""
        assert self.loop is None, "run_until() is for before attach()"
        deadline = time.monotonic() + timeout
        poller = select.poll()
        while not done():
            for ev in [e for e in self._defer.values() if e.enabled]:
                if ev.enabled and ev.id in self._defer:
                    self._fire_defer(ev)
            if done():
                return True
            now = time.monotonic()
            if now >= deadline:
                return False
            wait = deadline - now
            if any(e.enabled for e in self._defer.values()):
                wait = 0.0
            for ev in self._time.values():
                if ev.deadline is not None:
                    wait = min(wait, max(0.0, ev.deadline - now))
            fds: dict[int, int] = {}
            for ev in self._io.values():
                mask = (select.POLLIN if ev.flags & IO_INPUT else 0) | (select.POLLOUT if ev.flags & IO_OUTPUT else 0)
                if mask:
                    fds[ev.fd] = fds.get(ev.fd, 0) | mask
            for fd, mask in fds.items():
                poller.register(fd, mask)
            try:
                ready = poller.poll(wait * 1000)
            finally:
                for fd in fds:
                    poller.unregister(fd)
            for fd, revents in ready:
                flags = ((IO_INPUT if revents & select.POLLIN else 0) | (IO_OUTPUT if revents & select.POLLOUT else 0)
                         | (IO_HANGUP if revents & select.POLLHUP else 0) | (IO_ERROR if revents & select.POLLERR else 0))
                for ev in [e for e in self._io.values() if e.fd == fd]:
                    if ev.id in self._io and (ev.flags | IO_HANGUP | IO_ERROR) & flags:
                        self._fire_io(ev, flags & (ev.flags | IO_HANGUP | IO_ERROR))
            now = time.monotonic()
            for ev in [e for e in self._time.values() if e.deadline is not None and e.deadline <= now]:
                if ev.id in self._time and ev.deadline is not None and ev.deadline <= now:
                    self._fire_timer(ev)
        return True

    # ---------------------------------------------------------------- dispatching
    def _fire_io(self, ev: _Event, flags: int) -> None:
        ev.cb(self.api, ev.id, ev.fd, flags, ev.userdata)

    def _on_readable(self, fd: int) -> None:
        # libpulse reads one thing per callback (a packet's descriptor, then its payload), and
        # drops and re-creates its io event around each read: what is already there is read
        # here, in this loop iteration, and the loop's watch is updated once, after.
        self._busy = fd
        try:
            for _ in range(16):
                events = self._readers.get(fd)
                if not events:
                    break
                if len(events) == 1:
                    ev = events[0]
                    ev.cb(self.api, ev.id, fd, IO_INPUT, ev.userdata)
                else:
                    for ev in list(events):
                        if ev.id in self._io:
                            ev.cb(self.api, ev.id, fd, IO_INPUT, ev.userdata)
                if fd not in self._readers or not self._more(fd):
                    break
        finally:
            self._busy = -1
            self._sync(fd)

    def _more(self, fd: int) -> bool:
        poller = self._polls.get(fd)
        if poller is None:
            poller = self._polls[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        ready = poller.poll(0)
        return bool(ready) and bool(ready[0][1] & select.POLLIN)

    def _on_writable(self, fd: int) -> None:
        self._busy = fd
        try:
            for ev in list(self._writers.get(fd, ())):
                if ev.id in self._io:
                    ev.cb(self.api, ev.id, fd, IO_OUTPUT, ev.userdata)
        finally:
            self._busy = -1
            self._sync(fd)

    def _fire_timer(self, ev: _Event) -> None:
        ev.handle = None
        ev.deadline = None   # a time event fires once, until restarted
        ev.cb(self.api, ev.id, ctypes.byref(ev.tv), ev.userdata)

    def _fire_defer(self, ev: _Event) -> None:
        ev.handle = None
        ev.cb(self.api, ev.id, ev.userdata)
        if ev.enabled and ev.handle is None and ev.id in self._defer and self.loop is not None:
            self._schedule_defer(ev)   # enabled: once per loop iteration until disabled

    def _schedule_timer(self, ev: _Event) -> None:
        if ev.handle is not None:
            ev.handle.cancel()
            ev.handle = None
        if ev.deadline is not None and self._live:
            assert self.loop is not None
            ev.handle = self.loop.call_at(ev.deadline, self._fire_timer, ev)

    def _schedule_defer(self, ev: _Event) -> None:
        if ev.handle is None and self._live:
            assert self.loop is not None
            ev.handle = self.loop.call_soon(self._fire_defer, ev)

    def _watch(self, ev: _Event, flags: int) -> None:
        """Note which events want input/output on ev.fd, and tell the loop (but not while that
        fd's callback runs: libpulse frees and re-creates its event around every read)."""
        for table, bit in ((self._readers, IO_INPUT), (self._writers, IO_OUTPUT)):
            events = table.get(ev.fd)
            if flags & bit:
                if events is None:
                    table[ev.fd] = [ev]
                elif ev not in events:
                    events.append(ev)
            elif events is not None and ev in events:
                events.remove(ev)
                if not events:
                    del table[ev.fd]
        if ev.fd != self._busy:
            self._sync(ev.fd)

    def _sync(self, fd: int) -> None:
        """The asyncio loop's readers/writers for fd, as the events want them (once attached)."""
        if not self._live:
            return
        loop = self.loop
        assert loop is not None
        if fd in self._readers:
            if fd not in self._reading:
                self._reading.add(fd)
                loop.add_reader(fd, self._on_readable, fd)
        elif fd in self._reading:
            self._reading.discard(fd)
            self._polls.pop(fd, None)
            loop.remove_reader(fd)
        if fd in self._writers:
            if fd not in self._writing:
                self._writing.add(fd)
                loop.add_writer(fd, self._on_writable, fd)
        elif fd in self._writing:
            self._writing.discard(fd)
            loop.remove_writer(fd)

    # ---------------------------------------------------------------- the C table
    # Each runs when libpulse calls it (from a ctypes call of ours): an exception cannot
    # propagate into C, so it is logged and counted.
    def _new(self, table: dict[int, _Event], cb: Any, userdata: int | None) -> _Event:
        ev = _Event(self._next_id, cb, userdata)
        self._next_id += 1
        table[ev.id] = ev
        return ev

    def _io_new(self, api: Any, fd: int, flags: int, cb: Any, userdata: int | None) -> int:
        ev = self._new(self._io, cb, userdata)
        ev.fd, ev.flags = fd, flags
        try:
            self._watch(ev, flags)
        except Exception:
            self._failed("io_new")
        return ev.id

    def _io_enable(self, e: int, flags: int) -> None:
        ev = self._io.get(e)
        if ev is not None and ev.flags != flags:
            ev.flags = flags
            try:
                self._watch(ev, flags)
            except Exception:
                self._failed("io_enable")

    def _io_free(self, e: int) -> None:
        ev = self._io.pop(e, None)
        if ev is not None:
            try:
                self._watch(ev, 0)
            except Exception:
                self._failed("io_free")
            self._destroyed(ev)

    def _set_destroy(self, e: int, cb: Any) -> None:   # io, time and defer alike
        ev = self._io.get(e) or self._time.get(e) or self._defer.get(e)
        if ev is not None:
            ev.destroy = cb if cb else None

    def _destroyed(self, ev: _Event) -> None:
        if ev.destroy is not None:
            ev.destroy(self.api, ev.id, ev.userdata)

    def _set_time(self, ev: _Event, tv: Any) -> None:
        if not tv:
            ev.deadline = None
        else:
            t = tv.contents
            ev.tv.tv_sec, ev.tv.tv_usec = t.tv_sec, t.tv_usec
            if t.tv_usec & _TIMEVAL_RTCLOCK:
                ev.deadline = t.tv_sec + (t.tv_usec & ~_TIMEVAL_RTCLOCK) / 1e6
            else:   # wall clock
                ev.deadline = t.tv_sec + t.tv_usec / 1e6 - time.time() + time.monotonic()
        self._schedule_timer(ev)

    def _time_new(self, api: Any, tv: Any, cb: Any, userdata: int | None) -> int:
        ev = self._new(self._time, cb, userdata)
        try:
            self._set_time(ev, tv)
        except Exception:
            self._failed("time_new")
        return ev.id

    def _time_restart(self, e: int, tv: Any) -> None:
        ev = self._time.get(e)
        if ev is not None:
            try:
                self._set_time(ev, tv)
            except Exception:
                self._failed("time_restart")

    def _time_free(self, e: int) -> None:
        ev = self._time.pop(e, None)
        if ev is not None:
            if ev.handle is not None:
                ev.handle.cancel()
            self._destroyed(ev)

    def _defer_new(self, api: Any, cb: Any, userdata: int | None) -> int:
        ev = self._new(self._defer, cb, userdata)
        self._defer_enable(ev.id, 1)   # a new defer event is enabled (as in pa_mainloop)
        return ev.id

    def _defer_enable(self, e: int, b: int) -> None:
        ev = self._defer.get(e)
        if ev is None:
            return
        if not b:   # the common call: libpulse disables its defer event on every read
            ev.enabled = False
            if ev.handle is not None:
                ev.handle.cancel()
                ev.handle = None
            return
        ev.enabled = True
        try:
            self._schedule_defer(ev)
        except Exception:
            self._failed("defer_enable")

    def _defer_free(self, e: int) -> None:
        ev = self._defer.pop(e, None)
        if ev is not None:
            ev.enabled = False
            if ev.handle is not None:
                ev.handle.cancel()
            self._destroyed(ev)

    _io_set_destroy = _time_set_destroy = _defer_set_destroy = _set_destroy

    def _quit(self, api: Any, retval: int) -> None:
        pass   # nothing of ours asks libpulse to quit a loop that the process owns

    def _failed(self, what: str) -> None:
        self.dispatch_errors += 1
        log.exception("libpulse mainloop %s failed", what)


# ------------------------------------------------------------------ libpulse itself
# The one loader and signature table for libpulse: services/lib/pulsein.py (record, on a
# PulseLoop) and services/lib/pulseout.py (playback, on libpulse's threaded mainloop).
# Enum values from pulse/def.h and pulse/sample.h (stable ABI).
CONTEXT_READY, CONTEXT_FAILED, CONTEXT_TERMINATED = 4, 5, 6
STREAM_CREATING, STREAM_READY, STREAM_FAILED, STREAM_TERMINATED = 1, 2, 3, 4
STREAM_INTERPOLATE_TIMING, STREAM_AUTO_TIMING_UPDATE = 0x2, 0x8
STREAM_ADJUST_LATENCY, STREAM_EARLY_REQUESTS = 0x2000, 0x4000
OPERATION_RUNNING = 0
SEEK_RELATIVE = 0
SAMPLE_S16LE = 3
NO_VALUE = 0xFFFFFFFF   # (uint32_t) -1: "the server's default" in pa_buffer_attr


class SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class BufferAttr(ctypes.Structure):
    _fields_ = [("maxlength", ctypes.c_uint32), ("tlength", ctypes.c_uint32), ("prebuf", ctypes.c_uint32),
                ("minreq", ctypes.c_uint32), ("fragsize", ctypes.c_uint32)]


notify_cb = ctypes.CFUNCTYPE(None, _P, _P)                       # (object, userdata)
request_cb = ctypes.CFUNCTYPE(None, _P, ctypes.c_size_t, _P)     # (stream, nbytes, userdata)
success_cb = ctypes.CFUNCTYPE(None, _P, ctypes.c_int, _P)        # (object, success, userdata)

_lib: ctypes.CDLL | None = None


def libpulse() -> ctypes.CDLL:
    """libpulse.so.0 with the signatures used here (PulseUnavailable if it is missing)."""
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("pulse") or "libpulse.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise PulseUnavailable(f"libpulse not found ({exc})") from None
    I, S, U64 = ctypes.c_int, ctypes.c_size_t, ctypes.c_uint64
    sigs: dict[str, tuple[Any, list]] = {
        "pa_threaded_mainloop_new": (_P, []),
        "pa_threaded_mainloop_get_api": (_api_p, [_P]),
        "pa_threaded_mainloop_start": (I, [_P]),
        "pa_threaded_mainloop_stop": (None, [_P]),
        "pa_threaded_mainloop_free": (None, [_P]),
        "pa_threaded_mainloop_lock": (None, [_P]),
        "pa_threaded_mainloop_unlock": (None, [_P]),
        "pa_threaded_mainloop_wait": (None, [_P]),
        "pa_threaded_mainloop_signal": (None, [_P, I]),
        "pa_context_new": (_P, [_api_p, ctypes.c_char_p]),
        "pa_context_set_state_callback": (None, [_P, notify_cb, _P]),
        "pa_context_connect": (I, [_P, ctypes.c_char_p, I, _P]),
        "pa_context_get_state": (I, [_P]),
        "pa_context_errno": (I, [_P]),
        "pa_context_disconnect": (None, [_P]),
        "pa_context_unref": (None, [_P]),
        "pa_stream_new": (_P, [_P, ctypes.c_char_p, _P, _P]),
        "pa_stream_set_state_callback": (None, [_P, notify_cb, _P]),
        "pa_stream_set_read_callback": (None, [_P, request_cb, _P]),
        "pa_stream_set_write_callback": (None, [_P, request_cb, _P]),
        "pa_stream_set_underflow_callback": (None, [_P, notify_cb, _P]),
        "pa_stream_connect_record": (I, [_P, ctypes.c_char_p, _P, I]),
        "pa_stream_connect_playback": (I, [_P, ctypes.c_char_p, _P, I, _P, _P]),
        "pa_stream_get_state": (I, [_P]),
        "pa_stream_peek": (I, [_P, ctypes.POINTER(_P), ctypes.POINTER(S)]),
        "pa_stream_drop": (I, [_P]),
        "pa_stream_write": (I, [_P, _P, S, _P, ctypes.c_int64, I]),
        "pa_stream_writable_size": (S, [_P]),
        "pa_stream_flush": (_P, [_P, success_cb, _P]),
        "pa_stream_get_buffer_attr": (ctypes.POINTER(BufferAttr), [_P]),
        "pa_stream_update_timing_info": (_P, [_P, success_cb, _P]),
        "pa_stream_get_latency": (I, [_P, ctypes.POINTER(U64), ctypes.POINTER(I)]),
        "pa_stream_disconnect": (I, [_P]),
        "pa_stream_unref": (None, [_P]),
        "pa_operation_get_state": (I, [_P]),
        "pa_operation_unref": (None, [_P]),
        "pa_strerror": (ctypes.c_char_p, [I]),
    }
    for fn, (res, args) in sigs.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    _lib = lib
    return lib


def strerror(code: int) -> str:
    text = libpulse().pa_strerror(code)
    return text.decode(errors="replace") if text else f"error {code}"


class PulseContext:
    """A connection to the sound server on a PulseLoop, connected before it returns (run_until:
    call it before the loop is attached). PulseUnavailable if no server answers."""

    def __init__(self, ml: PulseLoop, app: str, timeout: float = 5.0) -> None:
        lib = self.lib = libpulse()
        self.ml = ml
        self.on_failed: Callable[[str], None] | None = None   # the server went away, once READY
        self._state_cb = notify_cb(self._on_state)
        self.ctx = lib.pa_context_new(ml.api, app.encode())
        if not self.ctx:
            raise PulseUnavailable("pa_context_new failed")
        lib.pa_context_set_state_callback(self.ctx, self._state_cb, None)
        try:
            if lib.pa_context_connect(self.ctx, None, 0, None) < 0:
                raise PulseUnavailable(self.error())
            if not ml.run_until(lambda: self.state() >= CONTEXT_READY, timeout):
                raise PulseUnavailable(f"the sound server did not answer within {timeout:.0f} s")
            if self.state() != CONTEXT_READY:
                raise PulseUnavailable(self.error())
        except PulseUnavailable:
            self.close()
            raise

    def state(self) -> int:
        return self.lib.pa_context_get_state(self.ctx) if self.ctx else CONTEXT_TERMINATED

    def error(self) -> str:
        return strerror(self.lib.pa_context_errno(self.ctx)) if self.ctx else "closed"

    def _on_state(self, ctx: int, userdata: int | None) -> None:
        try:
            if self.ctx and self.state() in (CONTEXT_FAILED, CONTEXT_TERMINATED) and self.on_failed is not None:
                self.on_failed(self.error())
        except Exception:
            log.exception("libpulse context state callback failed")

    def close(self) -> None:
        if self.ctx:
            ctx, self.ctx = self.ctx, None
            self.lib.pa_context_set_state_callback(ctx, notify_cb(), None)
            self.lib.pa_context_disconnect(ctx)
            self.lib.pa_context_unref(ctx)
