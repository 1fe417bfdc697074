"""Acoustic echo cancellation for capture-audio: the model's voice, played on a loudspeaker, is
removed from the microphone signal before it becomes audio.in.

- `ReferenceTrack` holds what playback handed to its device (topic audio.ref), placed on the
  wall clock by the device output time PortAudio gave, at 16 kHz.
- `DelayEstimator` finds the delay between that reference and its echo in the microphone by
  cross-correlation (timestamps of two devices plus the room: never a constant).
- `Canceller` is the declared interface of the DSP: `process(mic, ref)` on 10 ms frames.
  `ApmCanceller` is WebRTC's audio processing module (AEC3, plus optional noise suppression,
  high-pass filter and gain control) from the `livekit` package (extra `aec`).
- `EchoStage` ties them together for one microphone: `cancel`, `gate` (half duplex: the
  microphone is silenced while the model is heard, plus a tail) or `off`, with metrics
  (ERLE, estimated delay) for the heartbeat. A microphone chunk that may hold echo waits for its
  reference when that is late (`reference_ready`, bounded by MAX_REF_WAIT_MS).
- `BargeInGuard` keeps a cough, a click or a burst of residual echo from cutting the model off:
  while the model is heard, a new sound burst is held until it has been speech long enough to be
  a barge-in, then released whole (nothing said is lost); a burst that ends before that is sent
  as silence, and counted.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable, Protocol

import numpy as np

from livepipe.services.lib.audio import IN_RATE, StreamResampler, mean_square

FRAME = IN_RATE // 100           # 10 ms: the unit every WebRTC APM call takes
NS = 1_000_000_000
MODES = ("cancel", "gate", "off")


class Canceller(Protocol):
    """Removes the echo of `ref` from `mic`: both int16 mono 16 kHz, FRAME samples, `ref`
    already aligned so that its echo reaches `mic` no earlier than `delay_hint_ms` later."""

    name: str
    latency: int     # samples the output lags the input by

    def process(self, mic: np.ndarray, ref: np.ndarray, delay_hint_ms: int) -> np.ndarray: ...


def aec_available() -> bool:
    try:
        import livekit.rtc  # noqa: F401
    except Exception:
        return False
    return True


class _ApmCalls:
    """process_reverse_stream / process_stream / set_stream_delay_ms of one livekit APM on two fixed
    10 ms buffers. livekit builds, serializes and parses a protobuf message and creates and drops a
    handle in Python for every request; here, as the buffers never move, each request is serialized
    once and sent as the same bytes (the module is the same, so its output is bit-identical). Falls
    back to livekit's public methods if its internals are not as expected."""

    def __init__(self, apm: Any, far: Any, near: Any) -> None:
        self.apm, self.far, self.near = apm, far, near
        self.delay_ms: int | None = None   # the hint last passed
        self._fast = False
        try:
            import ctypes
            from livekit.rtc._ffi_client import FfiClient
            from livekit.rtc._proto import ffi_pb2
            from livekit.rtc._utils import get_address
            lib = FfiClient.instance._ffi_lib
            self._ctypes, self._request, self._drop = ctypes, lib.livekit_ffi_request, lib.livekit_ffi_drop_handle
            self._resp_ptr = ctypes.POINTER(ctypes.c_ubyte)()
            self._resp_len = ctypes.c_size_t()
            self._resp_args = (ctypes.byref(self._resp_ptr), ctypes.byref(self._resp_len))
            self._proto = ffi_pb2
            calls = []
            for field, frame in (("apm_process_reverse_stream", far), ("apm_process_stream", near)):
                req = ffi_pb2.FfiRequest()
                m = getattr(req, field)
                m.apm_handle = apm._ffi_handle.handle
                m.data_ptr = get_address(frame._data)
                m.size = len(frame._data)
                m.sample_rate = frame.sample_rate
                m.num_channels = frame.num_channels
                data = req.SerializeToString()
                ok = ffi_pb2.FfiResponse()
                getattr(ok, field).SetInParent()   # the answer without an error
                calls.append(((ctypes.c_ubyte * len(data)).from_buffer_copy(data), len(data),
                              ok.SerializeToString(), field))
            self._reverse, self._forward = calls
            self._fast = True
        except Exception:   # another livekit version: its public methods, as they are
            self._fast = False

    def _send(self, call: tuple) -> None:
        data, size, ok, field = call
        handle = self._request(data, size, *self._resp_args)
        resp = self._ctypes.string_at(self._resp_ptr, self._resp_len.value)
        self._drop(handle)
        if resp != ok:
            parsed = self._proto.FfiResponse()
            parsed.ParseFromString(resp)
            error = getattr(parsed, field).error
            if error:
                raise RuntimeError(error)

    def reverse(self) -> None:
        if self._fast:
            self._send(self._reverse)
        else:
            self.apm.process_reverse_stream(self.far)

    def forward(self, delay_hint_ms: int) -> None:
        # The hint is kept by the module (AEC3 stores it as its external delay), so it is passed
        # when it changes.
        if self.delay_ms != delay_hint_ms:
            self.apm.set_stream_delay_ms(int(delay_hint_ms))
            self.delay_ms = delay_hint_ms
        if self._fast:
            self._send(self._forward)
        else:
            self.apm.process_stream(self.near)


class ApmCanceller:
    """WebRTC AudioProcessingModule through livekit.rtc (a Rust FFI; 10 ms frames)."""

    name = "webrtc-apm"
    _latency: dict[tuple, int] = {}   # measured once per option set

    def __init__(self, noise_suppression: bool = False, auto_gain: bool = False, high_pass: bool = True) -> None:
        from livekit import rtc   # the `aec` extra: imported only when cancelling
        self._rtc = rtc
        opts = dict(echo_cancellation=True, noise_suppression=noise_suppression, high_pass_filter=high_pass,
                    auto_gain_control=auto_gain)
        self.apm = rtc.AudioProcessingModule(**opts)
        # One far and one near frame, reused: the module works in place on their buffers.
        self._far = rtc.AudioFrame(bytearray(FRAME * 2), IN_RATE, 1, FRAME)
        self._near = rtc.AudioFrame(bytearray(FRAME * 2), IN_RATE, 1, FRAME)
        self._far_pcm = np.frombuffer(self._far._data, dtype="<i2")
        self._near_pcm = np.frombuffer(self._near._data, dtype="<i2")
        self._calls = _ApmCalls(self.apm, self._far, self._near)
        key = tuple(opts.values())
        if key not in ApmCanceller._latency:
            ApmCanceller._latency[key] = self._measure_latency(rtc.AudioProcessingModule(**opts))
        self.latency = ApmCanceller._latency[key]
        release_file_pages("liblivekit_ffi")

    def _measure_latency(self, apm: Any) -> int:
        """Samples the module delays its output by (its internal resampling), measured once on a
        throwaway instance with noise and no echo, so the bypass path can be delayed to match."""
        noise = _probe_noise(FRAME * 40)
        out = np.zeros_like(noise)
        silent = np.zeros(FRAME, np.int16)
        calls = _ApmCalls(apm, self._far, self._near)
        for i in range(0, len(noise), FRAME):
            out[i:i + FRAME] = self._run(noise[i:i + FRAME], silent, 0, calls)
        a, b = noise.astype(np.float64), out.astype(np.float64)
        corr = [float(np.dot(a[:len(a) - k], b[k:])) for k in range(0, 4 * FRAME)]
        return int(np.argmax(corr))

    @property
    def fast(self) -> bool:
        """True when requests go to the module as pre-serialized bytes (see _ApmCalls)."""
        return self._calls._fast

    def process(self, mic: np.ndarray, ref: np.ndarray, delay_hint_ms: int) -> np.ndarray:
        return self._run(mic, ref, delay_hint_ms, self._calls)

    def _run(self, mic: np.ndarray, ref: np.ndarray, delay_hint_ms: int, calls: _ApmCalls) -> np.ndarray:
        self._far_pcm[:] = ref
        calls.reverse()
        self._near_pcm[:] = mic
        calls.forward(delay_hint_ms)
        return self._near_pcm.copy()


def release_file_pages(name: str) -> int:
    """Unmap the pages of library `name` that its loading and setup touched and that only hold its
    file's contents (read-only mappings with no anonymous page: code and constants, never written),
    so they stop counting in the process's memory (RSS); any of them used again is mapped back from
    the page cache, a minor fault. livekit's 28 MB library leaves ~8 MB resident after it starts its
    runtime and makes an APM, of which the echo canceller uses ~3 MB. Returns the kB released (0
    where /proc or madvise is missing)."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        spans: list[tuple[int, int, int]] = []
        cur: list[Any] | None = None
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(None, 6)
                if "-" in head[0] and len(head) >= 5 and ":" in head[3]:   # a mapping's first line
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    cur = [lo, hi, 0] if len(head) == 6 and name in head[5] and head[1] in ("r--p", "r-xp") else None
                elif cur is not None and head[0] == "Rss:":
                    cur[2] = int(head[1])
                elif cur is not None and head[0] == "Anonymous:":
                    if int(head[1]) == 0 and cur[2]:   # never written: the file's own bytes
                        spans.append((cur[0], cur[1], cur[2]))
                    cur = None
        released = 0
        for lo, hi, kb in spans:
            if libc.madvise(lo, hi - lo, 4) == 0:   # MADV_DONTNEED
                released += kb
        return released
    except (OSError, ValueError, AttributeError):
        return 0


def _probe_noise(n: int) -> np.ndarray:
    """Deterministic white noise (a hashed counter), int16. Not numpy.random: importing it costs
    2.4 MB of RSS in capture-audio for this one use (the measured latency is the same)."""
    x = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    return (((x >> np.uint64(40)).astype(np.float64) / 2**24 - 0.5) * 10000).astype(np.int16)


class ReferenceTrack:
    """audio.ref blocks placed on a 16 kHz wall-clock grid (sample k sounds at k / 16000 s)."""

    def __init__(self, seconds: float = 8.0) -> None:
        self.size = int(seconds * IN_RATE)
        self.buf = np.zeros(self.size, np.int16)
        # Per slot, the lap of the absolute index it holds (index // size; -1 = never written):
        # a run of slots within one lap is then checked against one number, with slices,
        # instead of building an index array per read (100 reads a second). int32: wall-clock
        # indexes at 16 kHz are ~2.7e13, their laps ~2e8.
        self.lap = np.full(self.size, -1, np.int32)
        self._rs: StreamResampler | None = None
        self._next: int | None = None                    # grid index where the current run continues
        self._next_ns = 0
        self.blocks = 0
        self.last_loud_index = -(1 << 62)                # newest grid index with audible reference
        self.last_start = 0                              # grid index where the newest block begins
        self.tail_loud = False                           # the newest 10 ms received was audible
        self.silent = False                              # playback said it plays silence after the newest block

    def add(self, pcm: np.ndarray, rate: int, first_ns: int) -> None:
        """`pcm` (int16 mono at `rate`) whose first sample sounds at `first_ns`."""
        self.blocks += 1
        idx = first_ns * IN_RATE // NS
        gap = 0
        if self.silent and self._rs is not None and self._rs.in_rate == rate and len(pcm):
            # After playback's silence marker: the device played whole silent blocks meanwhile. The
            # silence is put back (as zeros) when the gap is that, give or take 5 ms of timestamp
            # jitter, so the reference does not shift against its echo (AEC3 does not recover well
            # from a reference that jumps). A gap of more than a second (between turns) restarts.
            frames = (first_ns - self._next_ns) * rate / NS
            k = round(frames / len(pcm))
            if 0 <= k * len(pcm) <= rate and abs(frames - k * len(pcm)) * NS <= 5_000_000 * rate:
                gap = k * len(pcm)
            else:
                self._flush()
        self.silent = False
        if gap:
            pcm_in = np.concatenate([np.zeros(gap, np.int16), pcm])
        else:
            pcm_in = pcm
            # A block that continues the previous one (within 5 ms) keeps the resampler and the
            # running index, so timestamp jitter does not tear the signal.
            if (self._rs is None or self._rs.in_rate != rate or self._next is None
                    or abs(first_ns - self._next_ns) > 5_000_000):
                self._flush()
                self._rs = StreamResampler(rate, IN_RATE)
                self._next = idx
        self._next_ns = first_ns + len(pcm) * NS // rate
        assert self._rs is not None
        self._write(self._rs.process(pcm_in))

    def _flush(self) -> None:
        """The resampler's tail written out; the next block starts a new run."""
        if self._rs is not None and self._next is not None:
            self._write(self._rs.process(np.empty(0, np.int16), last=True))
        self._rs = None

    def mark_silent(self) -> None:
        """Playback plays silence after the newest block until it sends another: nothing is
        awaited meanwhile (and the next block may continue the run, see add)."""
        self.silent = True
        self.tail_loud = False

    def _write(self, out: np.ndarray) -> None:
        if not len(out) or self._next is None:
            return
        start = self._next
        self.last_start = start
        self._next += len(out)
        self.tail_loud = bool(np.max(np.abs(out[-FRAME:].astype(np.int32))) > 100)
        for pos, slot, m in self._segments(start, len(out)):
            self.buf[slot:slot + m] = out[pos:pos + m]
            self.lap[slot:slot + m] = (start + pos) // self.size
        if np.max(np.abs(out.astype(np.int32))) > 100:
            self.last_loud_index = max(self.last_loud_index, start + len(out))

    def _segments(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """[start, start+n) as (offset, slot, length) runs that do not wrap around the ring."""
        runs, pos = [], 0
        while pos < n:
            slot = (start + pos) % self.size
            m = min(n - pos, self.size - slot)
            runs.append((pos, slot, m))
            pos += m
        return runs

    @property
    def end_index(self) -> int | None:
        """Grid index just past the newest reference sample received (None before any)."""
        return self._next

    def read(self, start: int, n: int) -> np.ndarray:
        """Grid samples [start, start+n); silence where nothing was played."""
        out = np.zeros(n, np.int16)
        for pos, slot, m in self._segments(start, n):
            valid = self.lap[slot:slot + m] == (start + pos) // self.size
            np.copyto(out[pos:pos + m], self.buf[slot:slot + m], where=valid)
        return out

    def may_be_loud(self, start: int) -> bool:
        """False when no sample above 100 can be at grid index `start` or later: a window from
        there is silent for the tests below and need not be read (the model is mostly silent)."""
        return start < self.last_loud_index


def _fft_size(n: int) -> int:
    """The smallest 2^a * 3^b >= n: an FFT length with no wrap-around for the lags searched, and
    up to 25 % shorter than the next power of two (2.2 ms instead of 3.5 ms per estimate at 2.5 s)."""
    best = 1 << max(0, (n - 1).bit_length())
    p3 = 1
    while p3 < best:
        m = p3 << max(0, (-(-n // p3) - 1).bit_length())   # p3 * the smallest power of two >= n / p3
        best = min(best, m)
        p3 *= 3
    return best


class DelayEstimator:
    """Delay of the echo behind the reference, by cross-correlation over the last ~2 s.

    Accepts a peak only when the correlation coefficient is clear (echo, not the user talking
    over it); reports the median of the last accepted peaks."""

    def __init__(self, max_ms: int = 500, min_ms: int = -60, window_s: float = 2.0, min_corr: float = 0.25) -> None:
        self.max_lag, self.min_lag = max_ms * IN_RATE // 1000, min_ms * IN_RATE // 1000
        self.n = int(window_s * IN_RATE)
        self.min_corr = min_corr
        self.mic: deque[np.ndarray] = deque()
        self.ref: deque[np.ndarray] = deque()
        self.frames = 0
        self.accepted: deque[int] = deque(maxlen=5)
        self._delay: int | None = None   # median of `accepted`, kept as it changes (read every 10 ms frame)
        self.last_corr = 0.0
        self.runs = 0

    def push(self, mic: np.ndarray, ref_wall: np.ndarray) -> None:
        """`ref_wall`: the reference at the same wall time as `mic` (no delay applied)."""
        self.mic.append(mic)
        self.ref.append(ref_wall)
        self.frames += len(mic)
        while self.frames > self.n + self.max_lag:
            self.frames -= len(self.mic.popleft())
            self.ref.popleft()

    def update(self) -> int | None:
        """Run one estimate (call a few times a second); returns the delay in samples or None."""
        if self.frames < self.n // 2:
            return self.delay
        mic = np.concatenate(self.mic).astype(np.float64)
        ref = np.concatenate(self.ref).astype(np.float64)
        if float(np.mean(ref * ref)) < 1e4 or float(np.mean(mic * mic)) < 100:   # nothing played / heard
            return self.delay
        # Nothing heard where an echo of it can be (from the first audible reference sample less the
        # earliest lag, to the last one plus the longest): the model spoke while the microphone heard
        # nothing (headphones), the user spoke only before or after it: no FFT
        loud = np.flatnonzero(np.abs(ref) > 100)
        after = mic[max(0, int(loud[0]) + self.min_lag):int(loud[-1]) + self.max_lag] if len(loud) else mic[:0]
        if float(np.sum(after * after)) / len(mic) < 100:   # not .dot: OpenBLAS threads spin for long vectors
            return self.delay
        self.runs += 1
        n = _fft_size(len(mic) + self.max_lag - self.min_lag)
        corr = np.fft.irfft(np.fft.rfft(mic, n) * np.conj(np.fft.rfft(ref, n)), n)
        lags = np.concatenate([np.arange(0, self.max_lag + 1), np.arange(self.min_lag, 0)])
        vals = np.concatenate([corr[:self.max_lag + 1], corr[n + self.min_lag:]])
        best = int(np.argmax(np.abs(vals)))
        lag = int(lags[best])
        # correlation coefficient at that lag, over the overlapping part
        a = mic[max(0, lag):len(mic) + min(0, lag)]
        b = ref[max(0, -lag):len(ref) - max(0, lag)]
        m = min(len(a), len(b))
        den = np.sqrt(np.sum(a[:m] ** 2) * np.sum(b[:m] ** 2))
        self.last_corr = float(abs(np.sum(a[:m] * b[:m])) / den) if den else 0.0
        if self.last_corr >= self.min_corr:
            self.accepted.append(lag)
            self._delay = int(np.median(self.accepted))
        return self.delay

    @property
    def delay(self) -> int | None:
        return self._delay


class EchoStage:
    """Echo handling for one microphone stream (16 kHz int16 chunks with capture times).

    `cancel` runs every frame through the canceller (so it stays converged) but publishes its
    output only while the model is audible at the microphone (the delayed reference was loud
    within the last ACTIVE_TAIL_MS); otherwise the microphone passes unchanged, delayed by the
    canceller's own latency so both paths line up, with a 10 ms crossfade at each switch. The
    user's voice is then untouched whenever the model is silent."""

    MARGIN_MS = 30          # the APM gets the reference this much ahead of its echo
    ACTIVE_TAIL_MS = 300    # the room (and the canceller) still ring this long after the model stops
    GATE_TAIL_MS = 250      # gate: stay muted this long after the model's voice stopped

    REALIGN_MS = 20         # a delay estimate this far from the one applied re-aligns the reference
    WARM_FRAMES = 300       # a fresh canceller runs 3 s before it may idle (AEC3's initial state: 2.5 s)
    QUIET_MS = 500          # ... once the model has been silent this long

    # A chunk whose reference has not arrived (playback or the bus slowed by CPU load) waits for
    # it this long at most, and only if it is loud enough to hold an echo: the room is otherwise
    # quiet, so nothing waits while nobody speaks.
    MAX_REF_WAIT_MS = 40
    LOUD_RMS = 100.0        # about -50 dBFS
    IDLE_MS = 300           # a reference that ended this long before a chunk's time: no turn is playing

    # How far above the model's echo is the microphone (`near_end_db`, for the barge-in guard)? The
    # echo expected at the microphone is the aligned reference's power (the loudest 10 ms from
    # ECHO_BACK_MS before the delay estimate to 10 ms after it: the estimate can run ~20 ms short of
    # the room's delay) times the room's power gain (the median over the last loud frames), held with
    # a room tail that falls ECHO_DECAY_DB per 10 ms. What the canceller leaves of the echo (3-10 dB
    # under it in double talk) adds nothing at the microphone; the user, or a cough, does.
    ECHO_BACK_MS = 40
    ECHO_DECAY_DB = 1.5

    def __init__(self, mode: str, make_canceller: Callable[[], Canceller] | None = None,
                 max_ref_wait_ms: int | None = None) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if max_ref_wait_ms is not None:
            self.MAX_REF_WAIT_MS = max_ref_wait_ms
        self.make_canceller = make_canceller
        self.canceller = make_canceller() if make_canceller is not None and mode == "cancel" else None
        self.latency = self.canceller.latency if self.canceller is not None else 0
        # The delay the canceller's reference is aligned by. It changes only between model turns,
        # with a fresh canceller: WebRTC's AEC3 never recovers from a reference that jumps
        # (measured: a 60 ms step took ERLE from 40 dB to 0 dB for good).
        self.applied_delay = 0
        self.realigns = 0
        self.ref = ReferenceTrack()
        self.estimator = DelayEstimator()
        self._since_estimate = 0
        self._erle: deque[float] = deque(maxlen=500)   # per-frame ERLE (dB) of the last 5 s of echo frames
        self._raw = np.zeros(self.latency, np.int16)                  # bypass delay line
        self._active = False
        self._fade = np.linspace(0.0, 1.0, FRAME, endpoint=False)
        self.frames = 0
        self.echo_frames = 0        # frames in which the model was audible
        self.gated_frames = 0
        self.cancelled_frames = 0   # frames published from the canceller's output
        self.idle_frames = 0        # frames passed through untouched: the model silent for long (see _idle)
        self._canceller_frames = 0  # frames the current canceller has processed
        self._idle_lookback = (self.latency + self.estimator.max_lag + self.ACTIVE_TAIL_MS * IN_RATE // 1000
                               + self.MARGIN_MS * IN_RATE // 1000 + FRAME)
        self.heard = False          # the model was audible in the last chunk processed
        self.near_end_db = math.inf  # the last chunk's power over the echo expected in it (dB; inf: none expected)
        self._gain: deque[float] = deque(maxlen=300)   # room power gain, reference -> microphone, last 3 s of loud frames
        self._gain_median: float | None = None
        self._gain_new = 0          # gains learnt since the median was taken (every 0.5 s of loud frames)
        self._ref_powers: deque[float] = deque(maxlen=self.ECHO_BACK_MS * IN_RATE // 1000 // FRAME + 2)
        self._echo_env = 0.0        # echo power expected at the microphone (room tail included)
        self._ref_power_at: tuple[int | None, float] = (None, 0.0)   # the last 10 ms reference power read
        self._chunk_mic = self._chunk_echo = 0.0
        self._decay = 10 ** (-self.ECHO_DECAY_DB / 10)
        self.ref_waits = 0          # chunks held for a late reference
        self.ref_wait_ms_max = 0.0
        self.ref_timeouts = 0       # chunks that waited the full bound, then went on without it
        self.ref_late = 0           # ... whose reference did arrive afterwards (echo passed uncancelled)
        self._gave_up_at: int | None = None      # reference end when a wait last timed out
        self._timed_out: deque[int] = deque(maxlen=64)   # reference index those chunks needed
        # Grid index up to which processed chunks were judged against the reference (their
        # samples less the estimated delay): a block that starts before it came too late for them.
        self._judged_to: int | None = None
        self.ref_missed = 0          # reference blocks that came after chunks needing them were published
        self.ref_missed_ms_max = 0.0

    def add_silence(self) -> None:
        """Playback plays silence after its newest block: no reference is late meanwhile."""
        self.ref.mark_silent()
        self._timed_out.clear()   # what they needed was silence, not late

    def add_reference(self, pcm: np.ndarray, rate: int, first_ns: int) -> None:
        start = first_ns * IN_RATE // NS
        if self._judged_to is not None and start < self._judged_to:
            self.ref_missed += 1
            self.ref_missed_ms_max = max(self.ref_missed_ms_max, (self._judged_to - start) * 1000 / IN_RATE)
        self.ref.add(pcm, rate, first_ns)
        self._ref_power_at = (None, 0.0)
        end = self.ref.end_index
        while self._timed_out and end is not None and self._timed_out[0] <= end:
            # a block that starts past what a chunk needed: that stretch was silence, not late
            if self._timed_out.popleft() > self.ref.last_start:
                self.ref_late += 1

    def _ref_needed(self, chunk_len: int, capture_ns: int) -> int:
        """Grid index just past the last reference sample the canceller reads for this chunk."""
        return capture_ns * IN_RATE // NS + chunk_len - self.applied_delay + self.MARGIN_MS * IN_RATE // 1000

    def reference_ready(self, chunk: np.ndarray, capture_ns: int, waited_ns: int) -> bool:
        """May this chunk be processed now? No only while it is loud, its reference has not
        arrived yet, and it has waited less than MAX_REF_WAIT_MS. After a wait that timed out (the
        model is silent: the user speaks), nothing waits again until a new reference block arrives."""
        if self.mode != "cancel" or not len(chunk) or not self.MAX_REF_WAIT_MS:
            return True
        need = self._ref_needed(len(chunk), capture_ns)
        end = self.ref.end_index
        if (end is not None and end >= need) or self.ref.silent:
            return True
        if self._gave_up_at == end:
            return True
        # The reference stream runs (its end is within IDLE_MS of what is needed) but the model fell
        # silent at its end: the turn is over, what follows is silence, nothing to wait for.
        if end is not None and need - end < self.IDLE_MS * IN_RATE // 1000 and not self.ref.tail_loud:
            return True
        if math.sqrt(mean_square(chunk)) < self.LOUD_RMS:
            return True
        if waited_ns >= self.MAX_REF_WAIT_MS * 1_000_000:
            self.ref_timeouts += 1
            self._gave_up_at = end
            self._timed_out.append(need)
            return True
        return False

    def note_wait(self, waited_ns: int) -> None:
        """A chunk that was held for its reference is processed now."""
        self.ref_waits += 1
        self.ref_wait_ms_max = max(self.ref_wait_ms_max, waited_ns / 1e6)

    @property
    def delay_samples(self) -> int:
        d = self.estimator.delay
        return 0 if d is None else d

    @property
    def latency_ns(self) -> int:
        return self.latency * NS // IN_RATE

    def process(self, chunk: np.ndarray, capture_ns: int) -> np.ndarray:
        """One microphone chunk (a multiple of 10 ms) -> the chunk to publish, same length. With
        `cancel` it lags the input by `latency` samples (the caller shifts its capture time)."""
        if self.mode == "off" or not len(chunk):
            return chunk
        start = capture_ns * IN_RATE // NS
        out = chunk.copy()
        heard = False
        self._chunk_mic = self._chunk_echo = 0.0
        for i in range(0, len(chunk) - FRAME + 1, FRAME):
            out[i:i + FRAME] = self._frame(chunk[i:i + FRAME], start + i)
            heard = heard or self._active
        self.heard = heard
        self.near_end_db = (10 * math.log10(max(self._chunk_mic, 1.0) / self._chunk_echo)
                            if self._chunk_echo > 0 else math.inf)
        if self.estimator.delay is not None:
            self._judged_to = start + len(chunk) - self.delay_samples
        return out

    def _audible(self, index: int, delay: int, tail_ms: int) -> bool:
        """Was the model's voice heard by the microphone at `index` (or within tail_ms before)?"""
        tail = tail_ms * IN_RATE // 1000
        if not self.ref.may_be_loud(index - delay - tail):
            return False
        window = self.ref.read(index - delay - tail, tail + FRAME)
        return bool(len(window)) and int(np.max(np.abs(window.astype(np.int32)))) > 100

    def _idle(self, index: int) -> bool:
        """The model has been silent longer than anything this frame's processing reads: the
        canceller's reference, the activity test's tail, the delay estimator's longest lag. The
        microphone then passes as it is, and the canceller and the estimator are not run: they
        would only be fed silence (half of a conversation; AEC3 is ~40 % of the echo stage's CPU).
        They resume with the state they had, on the first frame whose window holds sound."""
        if self._active or self.ref.may_be_loud(index - self._idle_lookback):
            return False
        if self.mode == "cancel":
            self._realign(index)   # quiet: a new delay estimate is applied now, with a fresh canceller
            # A fresh canceller is run through AEC3's initial state (2.5 s of frames, whatever it hears)
            # before it may idle: one made just before a reply started it still in that state (test_echo:
            # ERLE 22-24 dB instead of ~50 after the re-alignment between turns).
            return self._canceller_frames >= self.WARM_FRAMES
        return True

    def _frame(self, mic: np.ndarray, index: int) -> np.ndarray:
        self.frames += 1
        if self._idle(index):
            self.idle_frames += 1
            self._echo_env = 0.0            # nothing of the model is left in the room (see _expect_echo)
            self._ref_powers.clear()
            if self.mode == "gate":
                return mic
            line = np.concatenate([self._raw, mic])   # the bypass keeps the canceller's latency
            self._raw = line[FRAME:]
            return line[:FRAME]
        ref_wall = self.ref.read(index, FRAME)
        self.estimator.push(mic, ref_wall)
        self._estimate()
        delay = self.delay_samples
        if self.mode == "gate":
            if self._audible(index, delay, self.GATE_TAIL_MS):
                self.gated_frames += 1
                self._active = True
                return np.zeros(FRAME, np.int16)
            self._active = False
            return mic
        margin = self.MARGIN_MS * IN_RATE // 1000
        assert self.canceller is not None
        self._realign(index)
        out = self.canceller.process(mic, self.ref.read(index - self.applied_delay + margin, FRAME), self.MARGIN_MS)
        self._canceller_frames += 1
        line = np.concatenate([self._raw, mic])
        raw, self._raw = line[:FRAME], line[FRAME:]
        em = mean_square(mic)
        if self._ref_power(index - delay) > 1e4:   # the model is audible
            self.echo_frames += 1
            if em > 1e3:   # the echo is above the noise floor: there is something to cancel
                self._erle.append(10 * np.log10(em / max(mean_square(out), 1.0)))
        self._expect_echo(index, em)
        # the output lags by `latency`: judge activity at the time of the samples it holds
        active = self._audible(index - self.latency, delay, self.ACTIVE_TAIL_MS)
        was, self._active = self._active, active
        if active:
            self.cancelled_frames += 1
        if active == was:
            return out if active else raw
        w = self._fade if active else self._fade[::-1]   # weight of the canceller's output
        return (out * w + raw * (1.0 - w)).astype(np.int16)

    def _expect_echo(self, index: int, mic_power: float) -> None:
        """The echo power expected in the microphone frame at grid index `index`, added to the
        chunk's sums with the frame's power (see ECHO_BACK_MS)."""
        # One 10 ms read per frame (the frame after this one's, kept for the next ECHO_BACK_MS), at
        # the delay estimate and, when it differs, at the delay the canceller is aligned by: the
        # estimate can be off for a while (seen: 132 ms for a room of 73-83 ms, in bench barge).
        ahead = index + FRAME
        p = self._ref_power(ahead - self.applied_delay) if abs(self.applied_delay - self.delay_samples) >= FRAME else 0.0
        p = max(p, self._ref_power(ahead - self.delay_samples))   # read last: the next frame's own (_frame)
        self._ref_powers.append(p)
        ref_power = max(self._ref_powers)
        if ref_power > 1e4 and mic_power > 1e3:   # the model loud, the room above its noise: learn the gain
            self._gain.append(mic_power / ref_power)
            self._gain_new += 1
            if len(self._gain) >= 20 and (self._gain_median is None or self._gain_new >= 50):
                self._gain_new = 0
                self._gain_median = float(np.median(self._gain))
        gain = self._gain_median or 0.0
        self._echo_env = max(gain * ref_power, self._echo_env * self._decay)
        self._chunk_mic += mic_power
        self._chunk_echo += self._echo_env

    def _ref_power(self, start: int) -> float:
        """Mean square of the reference's 10 ms at grid index `start`. The last one read is kept (until
        a reference block is added): _expect_echo reads the next frame's, which _frame then asks for."""
        if self._ref_power_at[0] != start:
            p = mean_square(self.ref.read(start, FRAME)) if self.ref.may_be_loud(start) else 0.0
            self._ref_power_at = (start, p)
        return self._ref_power_at[1]

    def _estimate(self) -> None:
        self._since_estimate += 1
        if self._since_estimate >= 50:   # every 0.5 s of audio
            self._since_estimate = 0
            self.estimator.update()

    def _realign(self, index: int) -> None:
        """A new delay estimate is applied, with a fresh canceller, once the model has been quiet."""
        delay = self.delay_samples
        if (abs(delay - self.applied_delay) > self.REALIGN_MS * IN_RATE // 1000
                and not self._audible(index, self.applied_delay, self.QUIET_MS)):
            assert self.make_canceller is not None
            self.applied_delay = delay
            self.canceller = self.make_canceller()
            self._canceller_frames = 0
            self.realigns += 1

    @property
    def erle_db(self) -> float | None:
        """Echo return loss enhancement: the median over the last 5 s of frames in which the
        model was audible (the median, so the user talking over the model does not hide it)."""
        if len(self._erle) < 20:
            return None
        return round(float(np.median(self._erle)), 1)

    def metrics(self) -> dict[str, Any]:
        d = self.estimator.delay
        return {"echo_mode": self.mode, "echo_canceller": getattr(self.canceller, "name", None) if self.mode == "cancel" else None,
                "echo_erle_db": self.erle_db, "echo_delay_ms": None if d is None else round(d * 1000 / IN_RATE, 1),
                "echo_delay_corr": round(self.estimator.last_corr, 2), "echo_frames": self.echo_frames,
                "echo_cancelled_frames": self.cancelled_frames, "echo_idle_frames": self.idle_frames, "echo_gated_frames": self.gated_frames,
                "echo_ref_blocks": self.ref.blocks, "echo_realigns": self.realigns, "echo_latency_ms": round(self.latency * 1000 / IN_RATE, 1),
                "echo_ref_waits": self.ref_waits, "echo_ref_wait_ms_max": round(self.ref_wait_ms_max, 1),
                "echo_ref_timeouts": self.ref_timeouts, "echo_ref_late": self.ref_late,
                "echo_ref_missed": self.ref_missed, "echo_ref_missed_ms_max": round(self.ref_missed_ms_max, 1)}


class BargeInGuard:
    """While the model is heard, a new sound burst reaches audio.in only once it has been speech
    for `min_ms` (webrtcvad 20 ms frames, as the service's start of speech) with a vowel in it: then
    all of it is released at once, onset included, and the stream runs live again. A burst that falls
    silent for END_MS before that (a cough, a click, a burst of residual echo) goes out as silence of
    the same length, counted: the service never takes it for the user barging in.

    What separates a cough from words over the model (measured through the room of tests/test_echo.py,
    `livepipe bench barge`): not its length (a 250 ms cough is 260 ms of speech to webrtcvad, "Stop."
    220 ms) but its spectrum: a cough is noise (spectral flatness -6 to -20 dB in every 20 ms frame),
    a vowel is harmonics under formants (-23 to -40 dB). The canceller passes the model's echo through
    during a cough (double talk), and that echo has vowels: so a vowel counts only in a frame where the
    microphone is VOWEL_NEAR_DB above the echo expected there (EchoStage.near_end_db), and voice counts
    at all only within NEAR_HANG_MS of a frame NEAR_END_DB above it (what is left of the echo after a
    cough is not the user going on).

    Bursts that start while the model is silent are never held. Timestamps are kept, so audio.in
    stays continuous; only the moment a held burst is sent moves (by up to MAX_HOLD_MS)."""

    END_MS = 400            # a burst ends after this much unvoiced audio: a pause between words is shorter,
                            # so a short first word ("Stop.") is released with the words after it
    OPEN_END_MS = 600       # released speech: stop passing straight through after this much silence
    # Never hold longer than this, whatever the detector says (knocks 300 ms apart are neither 260 ms of
    # speech nor 400 ms quiet): under gemini-bridge's 1 s pause that ends the audio stream, which a
    # longer hold would trigger with audio still to come.
    MAX_HOLD_MS = 800
    NEAR_END_DB = 3.0       # the microphone this far over the model's echo: a sound of the room's own
    NEAR_HANG_MS = 100      # ... and voice still counts this long after the last such chunk
    VOWEL_NEAR_DB = 6.0     # a vowel counts only this far over the echo (the echo has vowels)
    VOWEL_FLATNESS_DB = -22.0   # spectral flatness (150 Hz - 8 kHz) under this: harmonics, a vowel
    VOWEL_MS = 40           # vowel needed in a burst before it is released

    def __init__(self, min_ms: int) -> None:
        from livepipe.services.lib.vad import VoiceFramer   # webrtcvad: the `aec` extra
        self.min_ms = min_ms
        self._vad = VoiceFramer(IN_RATE, 20, 2, 60.0)       # the emulator's detector settings
        self.state = "idle"                                  # idle | hold | open
        self._held: list[tuple[np.ndarray, int]] = []
        self._held_ms = 0.0
        self._voiced_ms = 0
        self._vowel_ms = 0
        self._quiet_ms = 0.0
        self._far_ms = 0.0               # how long the microphone has been no more than the model's echo
        self._window = np.hanning(self._vad.frame)
        self.held_bursts = 0
        self.released_bursts = 0
        self.silenced_bursts = 0
        self.silenced_ms = 0.0
        self.release_delay_ms_max = 0.0
        self.release_delay_ms_last = 0.0
        self.echo_voiced_ms = 0          # voice not counted: the microphone held no more than the echo
        self.vowelless_bursts = 0        # bursts of 'speech' long enough, without a vowel (coughs), silenced

    def flatness_db(self, frame: np.ndarray) -> float:
        """Spectral flatness of a 20 ms frame over 150 Hz - 8 kHz, in dB (0: white noise)."""
        p = np.abs(np.fft.rfft(frame * self._window)[3:]) ** 2 + 1e-3
        return float(10 * (np.mean(np.log10(p)) - np.log10(np.mean(p))))

    def push(self, chunk: np.ndarray, ts: int, model_heard: bool, near_end_db: float = math.inf) -> list[tuple[np.ndarray, int]]:
        """`near_end_db`: how far the microphone was above the model's echo expected in this chunk
        (EchoStage.near_end_db; inf: no echo expected, or not known)."""
        if (self.state == "idle" and not model_heard and not len(self._vad.pending)
                and not len(chunk) % self._vad.frame):
            # Nothing can be held: the detector is not asked (its frames stay aligned; the quiet
            # count restarts at the first voiced frame anyway)
            return [(chunk, ts)]
        chunk_ms = len(chunk) * 1000 / IN_RATE
        if not model_heard:
            near_end_db = math.inf
        self._far_ms = 0.0 if near_end_db >= self.NEAR_END_DB else self._far_ms + chunk_ms
        counts = self._far_ms <= self.NEAR_HANG_MS
        vowel_ms = voiced_ms = heard_ms = 0
        for f in self._vad.cut(chunk):
            if self._vad.is_voiced(f):
                heard_ms += 20
                if not counts:
                    self.echo_voiced_ms += 20
                    continue
                voiced_ms += 20
                if (self.state != "open" and near_end_db >= self.VOWEL_NEAR_DB
                        and self.flatness_db(f) < self.VOWEL_FLATNESS_DB):
                    vowel_ms += 20
        self._quiet_ms = 0.0 if voiced_ms else self._quiet_ms + chunk_ms
        if self.state == "idle":
            # any voice starts a burst, the echo's too: it is held (and goes out as silence) rather
            # than passed to the service
            if not (model_heard and heard_ms):
                return [(chunk, ts)]
            self.state, self._held, self._held_ms, self._voiced_ms, self._vowel_ms = "hold", [], 0.0, 0, 0
            self.held_bursts += 1
        if self.state == "open":
            if self._quiet_ms >= self.OPEN_END_MS:
                self.state = "idle"
            return [(chunk, ts)]
        self._held.append((chunk, ts))
        self._held_ms += chunk_ms
        self._voiced_ms += voiced_ms
        self._vowel_ms += vowel_ms
        if (self._voiced_ms >= self.min_ms and self._vowel_ms >= self.VOWEL_MS) or self._held_ms >= self.MAX_HOLD_MS:
            out, self._held = self._held, []
            self.state = "open"
            self.released_bursts += 1
            delay = self._held_ms - chunk_ms
            self.release_delay_ms_last = delay
            self.release_delay_ms_max = max(self.release_delay_ms_max, delay)
            return out
        if self._quiet_ms >= self.END_MS:
            out = [(np.zeros_like(c), t) for c, t in self._held]
            self._held = []
            self.state = "idle"
            self.silenced_bursts += 1
            self.silenced_ms += self._held_ms
            self.vowelless_bursts += self._voiced_ms >= self.min_ms
            return out
        return []

    def metrics(self) -> dict[str, Any]:
        return {"barge_in_min_ms": self.min_ms, "barge_in_held": self.held_bursts,
                "barge_in_released": self.released_bursts, "barge_in_silenced": self.silenced_bursts,
                "barge_in_silenced_ms": round(self.silenced_ms), "barge_in_delay_ms_last": round(self.release_delay_ms_last),
                "barge_in_delay_ms_max": round(self.release_delay_ms_max), "barge_in_echo_voiced_ms": self.echo_voiced_ms,
                "barge_in_vowelless": self.vowelless_bursts}


class EchoLink:
    """capture-audio's side of echo handling: finds the local playback (its heartbeat's host is
    ours), takes its audio.ref, and runs an EchoStage on the microphone chunks.

    `requested` is cancel | gate | off | auto. auto = cancel when a playback runs on this
    machine and the APM is installed, gate when it runs here but the APM is missing, off when
    no playback runs here (nothing of ours can echo)."""

    LOCAL_TIMEOUT_S = 5.0     # a local playback silent this long (no heartbeat) is gone

    def __init__(self, requested: str, host: str, log: Any, clock: Any = None, barge_in_ms: int = 0,
                 ref_wait_ms: int | None = None) -> None:
        self.requested, self.host, self.log = requested, host, log
        self.ref_wait_ms = ref_wait_ms
        self.clock = clock or time.monotonic
        self.barge_in_ms = barge_in_ms
        self.guard: BargeInGuard | None = None
        # chunks waiting for their reference: (chunk, capture ns, arrival monotonic ns)
        self._pending: deque[tuple[np.ndarray, int, int]] = deque()
        self.local_playback: dict[str, float] = {}    # playback instance -> last heartbeat (monotonic)
        self.stage: EchoStage | None = None
        self.ignored_refs = 0                         # audio.ref from a playback on another machine
        self.bad_refs = 0
        self.ref_lead_ms_min = math.inf
        self._said_none = False
        self._started = self.clock()

    # ---------------------------------------------------------------- bus
    def on_status(self, msg: Any) -> None:
        if msg["src"] == "playback" and msg.get("host") == self.host:
            if msg["inst"] not in self.local_playback:
                self.log.info("playback runs on this machine (%s): echo handling %s", self.host, self._resolve())
            self.local_playback[msg["inst"]] = self.clock()

    def on_ref(self, msg: Any) -> None:
        if msg["inst"] not in self.local_playback:
            self.ignored_refs += 1
            return
        if msg.kind == "silence":
            if self.stage is not None:
                self.stage.add_silence()
            return
        if msg["sample_width"] != 2 or msg["channels"] != 1:
            self.bad_refs += 1
            return
        stage = self._stage()
        if stage is not None:
            # how long before its first sample sounds the block is here (< 0: after)
            lead_ms = (msg["out_ts"] - time.time_ns()) / 1e6
            self.ref_lead_ms_min = min(self.ref_lead_ms_min, lead_ms)
            stage.add_reference(np.frombuffer(msg.payload, dtype="<i2"), msg["rate"], msg["out_ts"])

    # ---------------------------------------------------------------- audio
    @property
    def local(self) -> bool:
        now = self.clock()
        return any(now - t < self.LOCAL_TIMEOUT_S for t in self.local_playback.values())

    def _resolve(self) -> str:
        if self.requested != "auto":
            if self.requested == "cancel" and not aec_available():
                return "gate"    # said once at startup by the caller
            return self.requested
        if not self.local_playback:
            return "off"
        return "cancel" if aec_available() else "gate"

    def _stage(self) -> EchoStage | None:
        mode = self._resolve()
        if mode == "off":
            return None
        if self.stage is None or self.stage.mode != mode:
            self.stage = EchoStage(mode, ApmCanceller if mode == "cancel" else None, self.ref_wait_ms)
        return self.stage

    def process(self, chunk: np.ndarray, capture_ns: int) -> list[tuple[np.ndarray, int]]:
        """A microphone chunk -> the chunks to publish now, in order, each with the capture time of
        its first sample: none while it waits for its reference or the guard holds a burst."""
        if len(chunk) % FRAME:
            return [(chunk, capture_ns)]   # not whole 10 ms frames (--chunk-ms not a multiple of 10): said at startup
        if not self.local_playback:
            if (self.requested in ("cancel", "gate") and not self._said_none
                    and self.clock() - self._started > self.LOCAL_TIMEOUT_S):
                self._said_none = True
                self.log.warning("--echo %s: no playback runs on this machine (no heartbeat from host %s); "
                                 "nothing to cancel until one does", self.requested, self.host)
            return self._flush() + [(chunk, capture_ns)]
        stage = self._stage()
        if stage is None:
            return self._flush() + [(chunk, capture_ns)]
        now = time.monotonic_ns()
        self._pending.append((chunk, capture_ns, now))
        out: list[tuple[np.ndarray, int]] = []
        while self._pending:
            c, ts, arrived = self._pending[0]
            if not stage.reference_ready(c, ts, now - arrived):
                break
            self._pending.popleft()
            if c is not chunk:   # an earlier chunk that waited for its reference
                stage.note_wait(now - arrived)
            processed = stage.process(c, ts)
            ts -= stage.latency_ns
            if self.barge_in_ms and stage.mode == "cancel":
                if self.guard is None:
                    self.guard = BargeInGuard(self.barge_in_ms)
                out.extend(self.guard.push(processed, ts, stage.heard, stage.near_end_db))
            else:
                out.append((processed, ts))
        return out

    def _flush(self) -> list[tuple[np.ndarray, int]]:
        """Chunks still waiting when echo handling stops: sent as they are."""
        out = [(c, ts) for c, ts, _ in self._pending]
        self._pending.clear()
        return out

    def metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {"echo": self.requested, "echo_reference": "local" if self.local else "none",
                             "echo_ignored_refs": self.ignored_refs, "echo_bad_refs": self.bad_refs,
                             "echo_ref_lead_ms_min": None if math.isinf(self.ref_lead_ms_min) else round(self.ref_lead_ms_min, 1)}
        m["barge_in_min_ms"] = self.barge_in_ms
        if self.guard is not None:
            m.update(self.guard.metrics())
        if self.stage is not None:
            m.update(self.stage.metrics())
        else:
            m["echo_mode"] = self._resolve() if self.local_playback else "off"
        return m
