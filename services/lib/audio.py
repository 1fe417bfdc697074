"""Audio helpers shared by capture-audio, playback, the bridge, the tools and the audio benchmarks.

Pure helpers: WAV reading/writing, sample-format conversion (`decode_pcm`, the one PCM decoder),
streaming resampling, fixed-size chunking, level/frequency measures, and opening a sounddevice
stream with one clear error. sounddevice (PortAudio) is imported only by `import_sounddevice()`,
so file and null runs never load PortAudio.
"""
from __future__ import annotations

import logging

import os
import struct
import time
from typing import Any, BinaryIO

import numpy as np

from livepipe.services.lib.devices import server_devices_text
from livepipe.services.lib.verb import VerbError, fail

# The bus contract (bus/topics.py): audio.in is 16 kHz, audio.out 24 kHz, both mono s16le.
IN_RATE = 16_000
OUT_RATE = 24_000
SAMPLE_WIDTH = 2

_WAVE_FORMAT_PCM = 0x0001
_WAVE_FORMAT_FLOAT = 0x0003
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


class AudioFileError(VerbError, ValueError):
    """A WAV file we cannot read or write; the message is one line for the user."""


class DeviceError(VerbError, RuntimeError):
    """No usable audio device; the message is one line for the user."""


# ----------------------------------------------------------------- conversion
def float_to_int16(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> int16 with clipping (no wrap-around on overs)."""
    return np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) by averaging the channels (keeps float dtype)."""
    if x.ndim == 1:
        return x
    if x.shape[1] == 1:
        return x[:, 0]
    return x.mean(axis=1, dtype=np.float32)


def decode_pcm(data: bytes | memoryview, sample_width: int, channels: int = 1, is_float: bool = False,
               dtype: Any = np.float32) -> np.ndarray:
    """Little-endian PCM -> floats in [-1, 1] shaped (frames, channels): unsigned 8-bit (the WAV
    convention), signed 16/24/32-bit, or IEEE float 32/64 with `is_float` (clipped, NaN -> 0).
    A trailing partial frame is ignored. The one decoder for WAV files, levels and the bridge."""
    w = sample_width
    n = len(data) // (w * channels) * channels        # whole frames only
    if is_float:
        if w not in (4, 8):
            raise ValueError(f"float sample width {w}")
        x = np.nan_to_num(np.clip(np.frombuffer(data, dtype="<f4" if w == 4 else "<f8", count=n), -1.0, 1.0))
    elif w == 1:
        x = (np.frombuffer(data, dtype=np.uint8, count=n).astype(np.float64) - 128.0) / 128.0
    elif w == 2:
        x = np.frombuffer(data, dtype="<i2", count=n) / 32768.0
    elif w == 3:
        b = np.frombuffer(data, dtype=np.uint8, count=n * 3).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)
    elif w == 4:
        x = np.frombuffer(data, dtype="<i4", count=n) / float(1 << 31)
    else:
        raise ValueError(f"sample width {w}")
    return x.astype(dtype, copy=False).reshape(-1, channels)


# ----------------------------------------------------------------- measures
def mean_square(x: np.ndarray) -> float:
    """Mean of x² for integer samples (int16), exactly: squares and their sums stay below 2^53,
    so one float64 dot product gives what np.mean(np.square(x, dtype=np.float64)) gives, at a
    third of the cost (it runs several times per 20 ms chunk). 0.0 for no samples."""
    f = x.astype(np.float64)
    return float(f.dot(f)) / len(f) if len(f) else 0.0


def rms_dbfs(x: np.ndarray) -> float:
    """RMS level in dBFS (full-scale sine = -3 dBFS); -inf dB is reported as -120."""
    if x.size == 0:
        return -120.0
    f = x.astype(np.float64)
    if x.dtype == np.int16:
        f /= 32768.0
    rms = float(np.sqrt(np.mean(f * f)))
    return max(-120.0, 20.0 * np.log10(rms)) if rms > 0 else -120.0


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the strongest spectral peak, refined by parabolic interpolation."""
    f = x.astype(np.float64)
    f = f - f.mean()
    n = len(f)
    if n < 16:
        return 0.0
    spec = np.abs(np.fft.rfft(f * np.hanning(n)))
    k = int(np.argmax(spec[1:]) + 1)
    if 1 <= k < len(spec) - 1:
        a, b, c = np.log(spec[k - 1] + 1e-12), np.log(spec[k] + 1e-12), np.log(spec[k + 1] + 1e-12)
        denom = a - 2 * b + c
        k = k + (0.5 * (a - c) / denom if denom else 0.0)
    return float(k * rate / n)


def tone(freq: float, seconds: float, rate: int, dbfs: float = -12.0, phase_frames: int = 0) -> np.ndarray:
    """An int16 sine of `freq` Hz whose RMS level is `dbfs` (continuous across calls via phase_frames)."""
    n = int(round(seconds * rate))
    amp = 10 ** (dbfs / 20) * np.sqrt(2)
    t = (np.arange(n) + phase_frames) / rate
    return float_to_int16(amp * np.sin(2 * np.pi * freq * t))


# ----------------------------------------------------------------- resampling
class StreamResampler:
    """Streaming int16 resampler (soxr) for one continuous signal: no clicks at block edges.

    Passes samples through untouched when the rates are equal.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self._rs = None
        if self.in_rate != self.out_rate:
            import soxr   # a small wheel; imported here so a passthrough costs nothing
            self._rs = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="int16", quality=quality)

    @property
    def passthrough(self) -> bool:
        return self._rs is None

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        """Feed int16 mono samples; returns the output available so far (all of it if `last`)."""
        if self._rs is None:
            return x
        return self._rs.resample_chunk(np.ascontiguousarray(x, dtype=np.int16), last=last)

    def delay_s(self) -> float:
        """Output held back by the filter, in seconds: soxr aligns its output with the input
        (no group-delay shift), so the newest output lags the newest input by this much."""
        return 0.0 if self._rs is None else float(self._rs.delay()) / self.out_rate


# ----------------------------------------------------------------- chunking
class Chunker:
    """Cut a stream of int16 samples into chunks of exactly `size` samples, with timestamps.

    `push(samples, ts_ns)` says when the first of `samples` was captured; each chunk gets the
    capture time of its first sample. Timestamps follow the sample clock and re-anchor when the
    source clock disagrees by more than `resync_ns` (after an overflow, for instance).
    """

    def __init__(self, size: int, rate: int, resync_ns: int = 50_000_000, early_ns: int | None = None) -> None:
        # early_ns: re-anchor as soon as the source dates samples this much EARLIER than the chunks
        # say (a SampleClock finding a more punctual block), not only beyond resync_ns.
        self.size, self.rate, self.resync_ns = size, rate, resync_ns
        self.early_ns = resync_ns if early_ns is None else early_ns
        self._buf = np.empty(0, dtype=np.int16)
        self._head_ts: int | None = None

    def push(self, samples: np.ndarray, ts_ns: int) -> list[tuple[np.ndarray, int]]:
        if samples.size:
            expected = None if self._head_ts is None else self._head_ts + self._ns(len(self._buf))
            if expected is None or abs(ts_ns - expected) > self.resync_ns or expected - ts_ns > self.early_ns:
                self._head_ts = ts_ns - self._ns(len(self._buf))
            self._buf = np.concatenate([self._buf, samples.astype(np.int16, copy=False)])
        out = []
        while len(self._buf) >= self.size:
            out.append((self._buf[:self.size].copy(), int(self._head_ts)))
            self._buf = self._buf[self.size:]
            self._head_ts += self._ns(self.size)
        return out

    @property
    def pending(self) -> int:
        """Samples held toward the next chunk."""
        return len(self._buf)

    def flush(self) -> tuple[np.ndarray, int] | None:
        """The partial last chunk, if any."""
        if not len(self._buf):
            return None
        chunk, ts = self._buf.copy(), int(self._head_ts or time.time_ns())
        self._buf = np.empty(0, dtype=np.int16)
        return chunk, ts

    def _ns(self, frames: int) -> int:
        return frames * 1_000_000_000 // self.rate


class SampleClock:
    """Dates the samples of a device stream on the wall clock.

    PortAudio's ADC timestamps are not usable with every host API (through ALSA's pulse
    plugin they wander by hundreds of ms), but callback arrival times are only ever late,
    never early. So sample i is dated `t0 + i / rate`, with t0 the lower envelope of
    `arrival - frames_so_far / rate`, allowed to creep up slowly (`leak`, for a device clock
    running slower than ours) and reset when the device reports lost input.
    """

    def __init__(self, rate: int, latency_s: float = 0.0, leak: float = 0.002) -> None:
        self.rate, self.latency_ns, self.leak = rate, int(latency_s * 1e9), leak
        self.frames = 0
        self.t0: int | None = None

    def update(self, arrival_ns: int, frames: int, reset: bool = False) -> int:
        """Account a block of `frames` that arrived at `arrival_ns`; returns its first sample's time."""
        first = self.frames
        self.frames += frames
        candidate = arrival_ns - self.frames * 1_000_000_000 // self.rate
        if self.t0 is None or reset:
            self.t0 = candidate
        else:
            self.t0 = min(candidate, self.t0 + int(self.leak * frames * 1_000_000_000 / self.rate))
        return self.time_of(first)

    def time_of(self, index: int) -> int:
        """Wall-clock ns when sample `index` (counted from the first block) was captured."""
        assert self.t0 is not None
        return self.t0 + index * 1_000_000_000 // self.rate - self.latency_ns


# ----------------------------------------------------------------- WAV files
class WavReader:
    """Streaming WAV reader: PCM 8/16/24/32-bit, IEEE float 32/64, WAVE_FORMAT_EXTENSIBLE.

    `read(n)` returns float32 (frames, channels) in [-1, 1]; `rewind()` restarts (for --loop).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            self._f: BinaryIO = open(self.path, "rb")
        except OSError as exc:
            raise AudioFileError(f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            self._parse_header()
        except AudioFileError:
            self._f.close()
            raise
        except (struct.error, ValueError) as exc:
            self._f.close()
            raise AudioFileError(f"{self.path} is not a valid WAV file ({exc})") from None

    def _parse_header(self) -> None:
        f = self._f
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] not in (b"RIFF", b"RF64") or riff[8:12] != b"WAVE":
            raise AudioFileError(f"{self.path} is not a WAV file (no RIFF/WAVE header)")
        fmt = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise AudioFileError(f"{self.path}: WAV file has no data chunk")
            cid, size = head[:4], struct.unpack("<I", head[4:])[0]
            if cid == b"fmt ":
                fmt = f.read(size)
                if size % 2:
                    f.read(1)
            elif cid == b"data":
                if fmt is None:
                    raise AudioFileError(f"{self.path}: WAV data chunk before fmt chunk")
                self._data_start = f.tell()
                file_size = os.fstat(f.fileno()).st_size
                # Streaming writers leave 0 or 0xFFFFFFFF as the size: use what is on disk.
                avail = file_size - self._data_start
                self._data_bytes = avail if size in (0, 0xFFFFFFFF) or size > avail else size
                break
            else:
                f.seek(size + (size % 2), 1)
        tag, ch, rate, _, align, bits = struct.unpack("<HHIIHH", fmt[:16])
        if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
            tag = struct.unpack("<H", fmt[24:26])[0]
        if tag not in (_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT):
            raise AudioFileError(f"{self.path}: unsupported WAV encoding (format tag {tag:#x}); "
                                 "use PCM or float WAV (e.g. `sox in.x -b 16 out.wav`)")
        if ch < 1 or rate < 1000 or rate > 768_000:
            raise AudioFileError(f"{self.path}: WAV has {ch} channels at {rate} Hz")
        width = bits // 8
        if (tag == _WAVE_FORMAT_PCM and width not in (1, 2, 3, 4)) or \
                (tag == _WAVE_FORMAT_FLOAT and width not in (4, 8)) or align != width * ch:
            raise AudioFileError(f"{self.path}: unsupported WAV sample format ({bits}-bit, align {align})")
        self.channels, self.rate, self.sample_width, self.is_float = ch, rate, width, tag == _WAVE_FORMAT_FLOAT
        self.frames = self._data_bytes // align
        self._pos = 0

    @property
    def duration_s(self) -> float:
        return self.frames / self.rate

    def read(self, n: int) -> np.ndarray:
        n = min(n, self.frames - self._pos)
        if n <= 0:
            return np.zeros((0, self.channels), dtype=np.float32)
        raw = self._f.read(n * self.channels * self.sample_width)
        x = decode_pcm(raw, self.sample_width, self.channels, self.is_float)
        self._pos += len(x)
        return x

    def rewind(self) -> None:
        self._f.seek(self._data_start)
        self._pos = 0

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "WavReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_wav_int16(path: str | os.PathLike, rate: int | None = None) -> tuple[np.ndarray, int]:
    """A whole WAV as mono int16 (resampled to `rate` if given): (samples, rate)."""
    with WavReader(path) as r:
        x = float_to_int16(to_mono(r.read(r.frames)))
        src = r.rate
    if rate and rate != src:
        rs = StreamResampler(src, rate)
        return rs.process(x, last=True), rate
    return x, src


class WavWriter:
    """PCM WAV writer (s16le by default; 8/24/32-bit with `sample_width` and `write_bytes`) that
    keeps the header valid as it goes.

    The RIFF and data sizes are patched on `flush()` (and on close), so a process that is
    killed leaves a playable file holding everything flushed so far.
    """

    def __init__(self, path: str | os.PathLike, rate: int, channels: int = 1, sample_width: int = SAMPLE_WIDTH,
                 append: bool = False) -> None:
        """`append`: continue a WAV this class wrote (same format) instead of truncating it, e.g.
        after a crash; its data size is taken from the file's length (the header may lag)."""
        self.path, self.rate, self.channels, self.sample_width = str(path), rate, channels, sample_width
        self._align = align = channels * sample_width
        fmt = b"fmt " + struct.pack("<IHHIIHH", 16, _WAVE_FORMAT_PCM, channels, rate, rate * align, align,
                                    8 * sample_width)
        self.appended_frames = 0
        try:
            if append and os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
                self._f: BinaryIO = open(self.path, "r+b")
                head = self._f.read(44)
                if len(head) < 44 or head[:4] != b"RIFF" or head[8:12] != b"WAVE" or head[12:36] != fmt \
                        or head[36:40] != b"data":
                    self._f.close()
                    raise AudioFileError(f"{self.path} exists and is not a {rate} Hz {channels}-channel "
                                         f"{8 * sample_width}-bit WAV "
                                         "to continue: choose another path")
                size = self._f.seek(0, os.SEEK_END)
                self.appended_frames = self.frames = (size - 44) // align
                self._f.truncate(44 + self.frames * align)   # a half frame left by a kill
                self._f.seek(44 + self.frames * align)
                self._dirty = True
                self.flush()
                return
            self._f = open(self.path, "wb")
        except OSError as exc:
            raise AudioFileError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.frames = 0
        self._f.write(b"RIFF" + struct.pack("<I", 36) + b"WAVE")
        self._f.write(fmt)
        self._f.write(b"data" + struct.pack("<I", 0))
        self._dirty = True
        self.flush()

    def write(self, x: np.ndarray) -> None:
        """int16 samples, (frames,) or (frames, channels), for an s16le file."""
        if self.sample_width != SAMPLE_WIDTH:
            raise ValueError("write() takes int16 samples: use write_bytes() for another sample width")
        self.write_bytes(np.ascontiguousarray(x, dtype="<i2").tobytes())

    def write_bytes(self, data: bytes | memoryview) -> None:
        """Frames already in the file's format (little-endian, interleaved; 8-bit unsigned)."""
        self._f.write(data)
        self.frames += len(data) // self._align
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        nbytes = self.frames * self._align
        end = self._f.tell()
        self._f.seek(4)
        self._f.write(struct.pack("<I", 36 + nbytes))
        self._f.seek(40)
        self._f.write(struct.pack("<I", nbytes))
        self._f.seek(end)
        self._f.flush()
        self._dirty = False

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_wav_int16(path: str | os.PathLike, samples: np.ndarray, rate: int) -> None:
    with WavWriter(path, rate) as w:
        w.write(samples)


# ----------------------------------------------------------------- devices
NO_DEVICE_HINT = {
    "input": "use --file PATH.wav to read audio from a file instead (or --tone HZ / --silence for tests)",
    "output": "use --file PATH.wav to write what would be heard to a file instead (or --null)",
}


def import_sounddevice(kind: str | None = None) -> Any:
    """Import sounddevice (loads PortAudio), turning a missing library into a DeviceError
    (naming the file alternative for `kind` 'input'/'output')."""
    try:
        import sounddevice
    except OSError as exc:   # "PortAudio library not found"
        hint = f"; {NO_DEVICE_HINT[kind]}" if kind else ""
        raise DeviceError(f"PortAudio is not available ({exc}; Debian: apt install libportaudio2){hint}") from None
    release_alsa_probes()
    return sounddevice


def release_alsa_probes() -> None:
    """Unload the ALSA plugins PortAudio loaded only to list devices.

    PortAudio's device scan opens every PCM in the ALSA configuration (a52, jack, oss, upmix...),
    and ALSA keeps each plugin and its libraries loaded (a52 alone pulls in libavcodec and ~90
    more): about 11 MB of RSS in capture-audio and playback that no stream uses. Freeing ALSA's
    global configuration closes the plugins no open PCM holds (PortAudio does the same on
    Pa_Terminate; the next open reads the configuration again). Not Linux/ALSA: nothing to do."""
    try:
        import ctypes
        lib = ctypes.CDLL("libasound.so.2", mode=os.RTLD_NOLOAD)   # only if PortAudio loaded it
        lib.snd_config_update_free_global()
    except (OSError, AttributeError):
        pass


def parse_device(spec: str | None) -> int | str | None:
    """`--device` value: an index if it is a number, else a (sub)string of the device name."""
    if spec is None or spec == "":
        return None
    return int(spec) if spec.strip().lstrip("-").isdigit() else spec


def resolve_device(sd: Any, spec: int | str | None, kind: str) -> dict:
    """The sounddevice info dict for `spec` (None = the default) of `kind` 'input'/'output'.

    Raises DeviceError with one line naming the alternative when there is no such device.
    """
    hint = NO_DEVICE_HINT[kind]
    try:
        devices = sd.query_devices()
    except Exception as exc:   # PortAudio could not even enumerate
        raise DeviceError(f"no audio {kind} device ({exc}); {hint}") from None
    channels_key = f"max_{kind}_channels"
    usable = [d for d in devices if d[channels_key] > 0]
    if not usable:
        raise DeviceError(f"no audio {kind} device found (no sound card, and no PulseAudio/PipeWire "
                          f"server reachable); {hint}")
    try:
        info = sd.query_devices(spec, kind)
    except ValueError as exc:       # "No input device matching 'x'"
        raise DeviceError(f"{exc} (see --list-devices); {hint}") from None
    except Exception as exc:        # PortAudioError: "Error querying device -1" = no default device
        raise DeviceError(f"no default audio {kind} device ({exc}); pick one with --device "
                          f"(see --list-devices) or {hint}") from None
    if info[channels_key] < 1:
        raise DeviceError(f"device {info['name']!r} has no {kind} channels (see --list-devices); {hint}")
    return dict(info)


def pick_rate(sd: Any, device: int, kind: str, wanted: int, forced: int | None = None) -> int:
    """`wanted` if the device opens at it, else the device's default rate (we resample)."""
    if forced:
        return forced
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        check(device=device, samplerate=wanted, channels=1, dtype="int16")
        return wanted
    except Exception:
        info = sd.query_devices(device, kind)
        return int(info["default_samplerate"])


def pick_channels(sd: Any, device: int, kind: str, rate: int) -> int:
    """1 if the device opens mono, else its smallest working channel count up to 2 (we mix)."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    for ch in (1, 2):
        try:
            check(device=device, samplerate=rate, channels=ch, dtype="int16")
            return ch
        except Exception:
            continue
    return 1


def list_devices_text() -> str:
    """The device table for --list-devices (PortAudio loaded here only)."""
    sd = import_sounddevice()
    devices = sd.query_devices()
    if len(devices) == 0:
        raise DeviceError("no audio devices found (no sound card, and no PulseAudio/PipeWire server reachable)")
    try:
        default_in, default_out = sd.default.device
    except Exception:
        default_in = default_out = -1
    lines = [f"{'idx':>3}  {'in':>3} {'out':>3}  {'rate':>6}  name"]
    for d in devices:
        mark = ("<" if d["index"] == default_in else " ") + (">" if d["index"] == default_out else " ")
        lines.append(f"{d['index']:>3}{mark}{d['max_input_channels']:>3} {d['max_output_channels']:>3}  "
                     f"{int(d['default_samplerate']):>6}  {d['name']}")
    lines.append("(< default input, > default output; pass an index or a name part to --device)")
    server = server_devices_text()
    return "\n".join(["PortAudio devices:", *lines] + (["", server] if server else []))



def print_device_list(log: logging.Logger) -> int:
    """`--list-devices`: print the table, or one error line (`livepipe VERB: ...`, VERB = the log's
    name); the exit code."""
    try:
        print(list_devices_text())
        return 0
    except DeviceError as exc:
        return fail(log.name, exc)

def make_audio_thread_realtime(priority: int = 10) -> bool:
    """Give the calling thread (a PortAudio callback thread) real-time scheduling if allowed.

    Audio threads starve first on a loaded machine; PulseAudio and JACK do the same (via
    rtkit or RLIMIT_RTPRIO). Without the privilege it stays as it was: returns False.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))   # 0 = this thread on Linux
        return True
    except (AttributeError, OSError):   # not Linux, or no CAP_SYS_NICE / RLIMIT_RTPRIO
        return False


def stream_delay_s(reported: float, fallback: float) -> float:
    """A PortAudio time_info delay if it is sane, else the stream's nominal latency."""
    return reported if 0.0 <= reported < 2.0 and reported == reported else fallback
