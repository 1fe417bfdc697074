"""Real audio devices on a machine without a sound card: a PulseAudio daemon with null sinks.

Used by the device tests (tests/pulse_support.py), `livepipe bench interrupt` and demos:

    daemon = PulseDaemon.ensure()            # reuse a reachable server, or start a system daemon
    env = {**os.environ, **daemon.env, "PULSE_SINK": "speaker"}   # for a playback process
    with MonitorRecorder("speaker.monitor", 24000, daemon.env) as rec: ...
    daemon.close()                           # stops the daemon only if we started it

Facts this relies on (each checked on a headless Debian machine): system mode needs
`auth-anonymous=1`; the daemon runs as user `pulse`, so its config file and every folder
above it must be readable by that user; `pactl info` succeeding is the readiness check.
A null sink with no low-latency client renders in 2 s blocks, so the first stream into it
can start up to 2 s late: keep a low-latency recorder on its monitor when timing matters.
"""
from __future__ import annotations

import bisect
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from livepipe.services.lib.verb import VerbError

SYSTEM_SOCKET = "/var/run/pulse/native"
SYSTEM_PIDFILE = "/var/run/pulse/pid"

# The standard headless layout: a 24 kHz speaker, a 16 kHz sink you play "speech" into,
# and a virtual microphone that hears that sink (the default source).
STANDARD_CONFIG = """\
load-module module-native-protocol-unix auth-anonymous=1
load-module module-null-sink sink_name=speaker rate=24000 channels=1
load-module module-null-sink sink_name=mic_feed rate=16000 channels=1
load-module module-remap-source master=mic_feed.monitor source_name=virtual_mic
set-default-sink speaker
set-default-source virtual_mic
"""


class PulseError(VerbError, RuntimeError):
    """PulseAudio could not be reached or started; one line for the user."""


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 5.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def pactl(*args: str, env: dict[str, str] | None = None, timeout: float = 5.0) -> str:
    """Run pactl; returns stdout, raises PulseError with pactl's own message on failure."""
    full_env = {**os.environ, **(env or {})}
    try:
        res = _run(["pactl", *args], full_env, timeout)
    except FileNotFoundError:
        raise PulseError("pactl not found (Debian: apt install pulseaudio-utils)") from None
    except subprocess.TimeoutExpired:
        raise PulseError(f"pactl {' '.join(args)} timed out") from None
    if res.returncode != 0:
        raise PulseError(f"pactl {' '.join(args)}: {(res.stderr or res.stdout).strip()}")
    return res.stdout


def server_info(env: dict[str, str] | None = None) -> dict[str, str] | None:
    """`pactl info` as a dict, or None if no server answers."""
    try:
        out = pactl("info", env=env, timeout=3.0)
    except PulseError:
        return None
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _short_list(kind: str, env: dict[str, str] | None) -> list[list[str]]:
    return [line.split("\t") for line in pactl("list", "short", kind, env=env).splitlines() if line.strip()]


class PulseDaemon:
    """A reachable PulseAudio server with the standard devices; owns what it started or loaded."""

    def __init__(self, env: dict[str, str], started_pid: int | None) -> None:
        self.env = env                     # variables a client needs to reach this server
        self.started_pid = started_pid     # set only if we started the daemon
        self._modules: list[str] = []      # modules we loaded, unloaded on close()

    @property
    def started(self) -> bool:
        return self.started_pid is not None

    # -------------------------------------------------------------- startup
    @classmethod
    def ensure(cls, timeout: float = 10.0) -> "PulseDaemon":
        """Reuse a server that answers `pactl info`, else start a system-mode daemon."""
        if shutil.which("pulseaudio") is None or shutil.which("pactl") is None:
            raise PulseError("PulseAudio is not installed (Debian: apt install pulseaudio pulseaudio-utils)")
        if server_info() is not None:
            daemon = cls({k: os.environ[k] for k in ("PULSE_SERVER",) if k in os.environ}, None)
        else:
            env = {"PULSE_SERVER": f"unix:{SYSTEM_SOCKET}"}
            if server_info(env) is not None:   # a system daemon we can reach directly
                daemon = cls(env, None)
            else:
                daemon = cls(env, cls._start_system_daemon(env, timeout))
        daemon.ensure_standard_devices()
        return daemon

    @staticmethod
    def _start_system_daemon(env: dict[str, str], timeout: float) -> int | None:
        # The daemon drops to user `pulse`: a mkdtemp folder is mode 700 and would make it fail
        # with "Daemon startup failed"; open up the folder (755) and the file (644).
        folder = tempfile.mkdtemp(prefix="livepipe-pulse-")
        cfg = Path(folder) / "livepipe.pa"
        cfg.write_text(STANDARD_CONFIG)
        os.chmod(folder, 0o755)
        os.chmod(cfg, 0o644)
        try:
            res = _run(["pulseaudio", "--system", "-D", "-n", "-F", str(cfg), "--disallow-exit",
                        "--exit-idle-time=-1"], timeout=timeout)
            # Readiness is pactl answering. A failed start may mean another process won a race
            # and started it: give that one a moment before reporting our own failure.
            deadline = time.monotonic() + (timeout if res.returncode == 0 else 2.0)
            while server_info(env) is None:
                if time.monotonic() > deadline:
                    detail = (res.stderr or res.stdout).strip().splitlines()
                    raise PulseError("could not start a PulseAudio system daemon"
                                     + (f": {detail[-1]}" if detail else "")
                                     + " (system mode needs root)")
                time.sleep(0.02)   # poll interval between pactl round trips
        finally:
            shutil.rmtree(folder, ignore_errors=True)   # the daemon read it at startup
        if res.returncode != 0:
            return None   # another process won the race and started it: we reuse theirs
        try:
            return int(Path(SYSTEM_PIDFILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def ensure_running(self, timeout: float = 10.0) -> None:
        """Start a daemon again if ours (or the one we reused) has gone away, e.g. stopped by
        another session that owned it; we then own the new one."""
        if server_info(self.env) is not None:
            return
        env = {"PULSE_SERVER": f"unix:{SYSTEM_SOCKET}"}
        if server_info(env) is None:
            self.started_pid = self._start_system_daemon(env, timeout)
        self.env = env
        self._modules = []   # they died with the old daemon
        self.ensure_standard_devices()

    def ensure_standard_devices(self) -> None:
        """Load speaker / mic_feed / virtual_mic on a reused server that lacks them."""
        sinks = {row[1] for row in _short_list("sinks", self.env) if len(row) > 1}
        sources = {row[1] for row in _short_list("sources", self.env) if len(row) > 1}
        if "speaker" not in sinks:
            self.load_null_sink("speaker", 24000)
        if "mic_feed" not in sinks:
            self.load_null_sink("mic_feed", 16000)
        if "virtual_mic" not in sources:
            self.load_virtual_mic("virtual_mic", "mic_feed")

    # -------------------------------------------------------------- devices
    def load_null_sink(self, name: str, rate: int, channels: int = 1) -> str:
        mod = pactl("load-module", "module-null-sink", f"sink_name={name}", f"rate={rate}",
                    f"channels={channels}", f"sink_properties=device.description={name}", env=self.env).strip()
        self._modules.append(mod)
        return mod

    def load_virtual_mic(self, name: str, feed_sink: str) -> str:
        mod = pactl("load-module", "module-remap-source", f"master={feed_sink}.monitor",
                    f"source_name={name}", f"source_properties=device.description={name}", env=self.env).strip()
        self._modules.append(mod)
        return mod

    def private_devices(self, tag: str | None = None) -> "DeviceSet":
        """A fresh speaker/mic_feed/virtual_mic trio with unique names, so concurrent users of
        one daemon never hear each other. Unloaded by `DeviceSet.close()` (or daemon.close())."""
        tag = tag or uuid.uuid4().hex[:6]
        speaker, feed, mic = f"lp{tag}_speaker", f"lp{tag}_mic_feed", f"lp{tag}_virtual_mic"
        mods = [self.load_null_sink(speaker, 24000), self.load_null_sink(feed, 16000),
                self.load_virtual_mic(mic, feed)]
        return DeviceSet(self, speaker, feed, mic, mods)

    def unload(self, module: str) -> None:
        try:
            pactl("unload-module", module, env=self.env)
        except PulseError:
            pass   # already gone (daemon restarted, or unloaded by its owner)
        if module in self._modules:
            self._modules.remove(module)

    def clients(self) -> list[str]:
        """Names of connected clients (other than pactl itself)."""
        rows = _short_list("clients", self.env)
        return [row[2] for row in rows if len(row) > 2 and "pactl" not in row[2]]

    # -------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Unload our modules; stop the daemon if we started it and nobody else uses it."""
        for mod in list(reversed(self._modules)):
            self.unload(mod)
        if self.started_pid is None:
            return
        try:
            others = self.clients()
        except PulseError:
            others = []
        if others:
            return   # someone else (another test session, a demo) reuses it: leave it running
        try:
            os.kill(self.started_pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(self.started_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        self.started_pid = None


class DeviceSet:
    """A private speaker (24 kHz), mic feed sink (16 kHz) and virtual microphone."""

    def __init__(self, daemon: PulseDaemon, speaker: str, mic_feed: str, virtual_mic: str,
                 modules: list[str]) -> None:
        self.daemon, self.speaker, self.mic_feed, self.virtual_mic = daemon, speaker, mic_feed, virtual_mic
        self._modules = modules

    def playback_env(self) -> dict[str, str]:
        """Environment for a process whose default output is this speaker."""
        return {**self.daemon.env, "PULSE_SINK": self.speaker}

    def capture_env(self) -> dict[str, str]:
        """Environment for a process whose default input is this virtual microphone."""
        return {**self.daemon.env, "PULSE_SOURCE": self.virtual_mic}

    def add_room(self, latency_ms: int, volume: str) -> str:
        """A room: the speaker's monitor fed back into the mic feed (module-loopback) after
        `latency_ms`, at `volume` (PulseAudio's cubic scale, e.g. "60%"), so the microphone hears
        the speaker. Unloaded with the devices; returns the module."""
        env = self.daemon.env
        mod = pactl("load-module", "module-loopback", f"source={self.speaker}.monitor", f"sink={self.mic_feed}",
                    f"latency_msec={latency_ms}", "source_dont_move=true", "sink_dont_move=true", env=env).strip()
        self._modules.append(mod)
        for block in pactl("list", "sink-inputs", env=env).split("Sink Input #")[1:]:
            if f"Owner Module: {mod}\n" in block:
                pactl("set-sink-input-volume", block.split()[0], volume, env=env)
                return mod
        raise PulseError("the loopback's sink input did not appear")

    def close(self) -> None:
        for mod in reversed(self._modules):
            self.daemon.unload(mod)
        self._modules = []


def play_wav(path: str | os.PathLike, sink: str, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> None:
    """Play a WAV file into `sink` (e.g. the mic feed) and return when it has drained."""
    full_env = {**os.environ, **(env or {})}
    res = _run(["paplay", f"--device={sink}", "--latency-msec=200", str(path)], full_env, timeout)
    if res.returncode != 0:
        raise PulseError(f"paplay {path} into {sink}: {(res.stderr or res.stdout).strip()}")


class MonitorRecorder:
    """Record a source (e.g. `speaker.monitor`) with parec as s16le mono, keeping arrival times.

    The null sink renders on the system clock, so sample i of the recording sounds at
    `t0 + i / rate`; `t0` is estimated as the earliest any block could have started
    (min over blocks of arrival - start_index / rate), i.e. a sample is never dated before
    it could be observed at the monitor.
    """

    def __init__(self, source: str, rate: int, env: dict[str, str] | None = None,
                 latency_ms: int = 5) -> None:
        self.source, self.rate = source, rate
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            ["parec", f"--device={source}", "--format=s16le", f"--rate={rate}", "--channels=1",
             "--raw", f"--latency-msec={latency_ms}"],
            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self._lock = threading.Lock()
        self._blocks: list[bytes] = []
        self._arrivals: list[tuple[int, int]] = []    # (arrival ns, start sample index)
        self._frames = 0
        self._pending = b""
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._reader, name=f"parec-{source}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            now = time.time_ns()
            if not data:
                break
            data = self._pending + data
            usable = len(data) - len(data) % 2
            self._pending = data[usable:]
            with self._lock:
                self._arrivals.append((now, self._frames))
                self._blocks.append(data[:usable])
                self._frames += usable // 2
            self._first.set()

    def wait_started(self, timeout: float = 10.0) -> None:
        if not self._first.wait(timeout):
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.poll() is not None else ""
            raise PulseError(f"no audio from {self.source} within {timeout} s {err}".strip())

    @property
    def frames(self) -> int:
        with self._lock:
            return self._frames

    def samples(self, start: int = 0) -> np.ndarray:
        """The recording so far, from sample `start`, as int16."""
        with self._lock:
            data = b"".join(self._blocks)
        return np.frombuffer(data, dtype="<i2")[start:].copy()

    def t0_ns(self) -> int:
        """Estimated wall-clock time (ns) of sample 0."""
        with self._lock:
            arr = list(self._arrivals)
        if not arr:
            raise PulseError(f"no audio recorded from {self.source}")
        return min(a - s * 1_000_000_000 // self.rate for a, s in arr)

    def arrival_of(self, index: int) -> int | None:
        """Wall-clock ns when the block holding sample `index` reached us (None: not yet)."""
        with self._lock:
            starts = [s for _, s in self._arrivals]
            k = bisect.bisect_right(starts, index) - 1
            if k < 0 or index >= self._frames:
                return None
            return self._arrivals[k][0]

    def clock_offsets_ns(self) -> np.ndarray:
        """Per block: arrival - start_index / rate, minus t0 (0 = on time; spread = delivery jitter)."""
        with self._lock:
            arr = np.array([a - s * 1_000_000_000 // self.rate for a, s in self._arrivals], dtype=np.int64)
        return arr - arr.min() if len(arr) else arr

    def time_of(self, index: int, t0: int | None = None) -> int:
        return (self.t0_ns() if t0 is None else t0) + index * 1_000_000_000 // self.rate

    def index_at(self, t_ns: int, t0: int | None = None) -> int:
        return int((t_ns - (self.t0_ns() if t0 is None else t0)) * self.rate // 1_000_000_000)

    def wait_frames(self, frames: int, timeout: float) -> bool:
        """Wait (polling the reader's progress) until `frames` samples have been recorded."""
        deadline = time.monotonic() + timeout
        while self.frames < frames:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True

    def stop(self) -> np.ndarray:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(2)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return self.samples()

    def __enter__(self) -> "MonitorRecorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def loud_spans(x: np.ndarray, rate: int, threshold: int = 300, min_gap_ms: float = 30.0) -> list[tuple[int, int]]:
    """[start, end) sample spans of a recording where |x| exceeds `threshold`, merging gaps shorter
    than min_gap_ms: where sound was heard, for benchmarks and tests that listen at a null sink."""
    idx = np.nonzero(np.abs(x.astype(np.int32)) > threshold)[0]
    if not len(idx):
        return []
    gap = int(rate * min_gap_ms / 1000)
    breaks = np.nonzero(np.diff(idx) > gap)[0]
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    ends = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return list(zip(starts.tolist(), ends.tolist()))
