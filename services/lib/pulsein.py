"""Reading a PulseAudio/PipeWire source directly with libpulse's simple API (ctypes, no PortAudio).

capture-audio's microphone goes to the sound server anyway: through PortAudio it took PortAudio's
ALSA thread, ALSA's pulse plugin and a cffi callback into Python for every 10 ms block. Measured
on the bench machine, reading 10 ms blocks of the default source for 20 s: 8.2 % of a core and
49 MB RSS through sounddevice, 1.3 % and 30 MB with pa_simple_read in a thread (the server
delivers the same 10 ms fragments; ctypes releases the GIL while the read waits).

Standard library only; `PulseUnavailable` when libpulse-simple is missing or no server answers,
and the caller uses PortAudio instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util

PA_STREAM_RECORD = 2
PA_SAMPLE_S16LE = 3
_NO_VALUE = 0xFFFFFFFF   # (uint32_t) -1: "the server's default" in pa_buffer_attr


class PulseUnavailable(OSError):
    """No libpulse-simple, or the server refused the stream (the message says which)."""


class _SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class _BufferAttr(ctypes.Structure):
    _fields_ = [("maxlength", ctypes.c_uint32), ("tlength", ctypes.c_uint32), ("prebuf", ctypes.c_uint32),
                ("minreq", ctypes.c_uint32), ("fragsize", ctypes.c_uint32)]


_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("pulse-simple") or "libpulse-simple.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise PulseUnavailable(f"libpulse-simple not found ({exc})") from None
    lib.pa_simple_new.restype = ctypes.c_void_p
    lib.pa_simple_new.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                                  ctypes.POINTER(_SampleSpec), ctypes.c_void_p, ctypes.POINTER(_BufferAttr),
                                  ctypes.POINTER(ctypes.c_int)]
    lib.pa_simple_read.restype = ctypes.c_int
    lib.pa_simple_read.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
    lib.pa_simple_get_latency.restype = ctypes.c_uint64
    lib.pa_simple_get_latency.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
    lib.pa_simple_free.restype = None
    lib.pa_simple_free.argtypes = [ctypes.c_void_p]
    lib.pa_strerror.restype = ctypes.c_char_p
    lib.pa_strerror.argtypes = [ctypes.c_int]
    _lib = lib
    return lib


class PulseInput:
    """One record stream of s16le samples from `source` (None: the server's default, which
    libpulse takes from PULSE_SOURCE when set). The server sends a fragment every `block_frames`;
    read() returns `read_frames` (default: one fragment) as soon as the fragment that completes
    them has arrived, so reading a whole chunk at once costs no latency, only fewer wakeups."""

    def __init__(self, source: str | None, rate: int, channels: int, block_frames: int, app: str,
                 read_frames: int | None = None) -> None:
        lib = _load()
        self._lib = lib
        self.rate, self.channels, self.block_frames = rate, channels, block_frames
        self.read_frames = read_frames or block_frames
        self.read_bytes = self.read_frames * channels * 2
        spec = _SampleSpec(PA_SAMPLE_S16LE, rate, channels)
        # fragsize: the server sends a block as soon as one is captured (as ALSA's pulse plugin asks
        # for its period); maxlength: the server's default, seconds of audio before any is lost.
        attr = _BufferAttr(_NO_VALUE, _NO_VALUE, _NO_VALUE, _NO_VALUE, block_frames * channels * 2)
        err = ctypes.c_int(0)
        self._s = lib.pa_simple_new(None, app.encode(), PA_STREAM_RECORD, source.encode() if source else None,
                                    b"microphone", ctypes.byref(spec), None, ctypes.byref(attr), ctypes.byref(err))
        if not self._s:
            raise PulseUnavailable(self._error(err.value))
        self._err = ctypes.c_int(0)
        self.buffer = ctypes.create_string_buffer(self.read_bytes)

    def _error(self, code: int) -> str:
        text = self._lib.pa_strerror(code)
        return text.decode(errors="replace") if text else f"error {code}"

    def read(self) -> bytes:
        """The next `read_frames` (waits for them, without the GIL); PulseUnavailable if the stream broke."""
        if self._lib.pa_simple_read(self._s, self.buffer, self.read_bytes, ctypes.byref(self._err)) < 0:
            raise PulseUnavailable(self._error(self._err.value))
        return self.buffer.raw

    @property
    def latency_s(self) -> float:
        """What libpulse reports for the stream: the source's latency plus audio not yet read."""
        usec = self._lib.pa_simple_get_latency(self._s, ctypes.byref(self._err))
        return 0.0 if usec == 2**64 - 1 else usec / 1e6

    def close(self) -> None:
        """Free the stream; only once no read() is running."""
        if self._s:
            self._lib.pa_simple_free(self._s)
            self._s = None
