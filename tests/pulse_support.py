"""Real audio devices for tests: a PulseAudio daemon with null sinks (see bus/pulse.py).

Use from a test module:

    from tests.pulse_support import pulse, pulse_devices, record_speaker, play_into_mic, speech_wav  # noqa: F401

    def test_x(pulse_devices, bus_env, tmp_path):
        env = {**bus_env, **pulse_devices.playback_env()}     # PULSE_SINK = a private speaker
        with record_speaker(pulse_devices) as rec:            # parec on that speaker's monitor
            proc = spawn(["playback"], env) ...
        play_into_mic(pulse_devices, wav)                     # paplay into the private mic feed

- `pulse` (session): reuses a server that answers `pactl info`, else starts a system-mode
  daemon (as root) with `speaker` (24 kHz mono, default sink), `mic_feed` (16 kHz mono) and
  `virtual_mic` (a remap of mic_feed.monitor, default source); readiness is `pactl info`.
  At the end it unloads what it loaded and stops the daemon only if it started it and no
  other client still uses it.
- `pulse_devices` (function): a private speaker / mic_feed / virtual_mic trio with unique
  names on that daemon, so tests (and other sessions sharing the daemon) never hear each other.
- A null sink with no low-latency client renders in 2 s blocks: start `record_speaker` before
  playing, or the first audio can arrive up to 2 s late.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from livepipe.services.lib.audio import StreamResampler, read_wav_int16, write_wav_int16
from livepipe.services.dev.pulse import DeviceSet, MonitorRecorder, PulseDaemon, PulseError, loud_spans, play_wav  # noqa: F401


@pytest.fixture(scope="session")
def pulse() -> Iterator[PulseDaemon]:
    try:
        daemon = PulseDaemon.ensure()
    except PulseError as exc:
        pytest.fail(f"PulseAudio is needed for the device tests: {exc}")
    yield daemon
    daemon.close()


@pytest.fixture
def pulse_devices(pulse: PulseDaemon) -> Iterator[DeviceSet]:
    pulse.ensure_running()   # another session that owned the daemon may have stopped it
    devices = pulse.private_devices()
    yield devices
    devices.close()


def record_speaker(devices: DeviceSet, rate: int = 24000, latency_ms: int = 5) -> MonitorRecorder:
    """Record what the speaker plays (its monitor); waits for the first block before returning."""
    rec = MonitorRecorder(f"{devices.speaker}.monitor", rate, devices.daemon.env, latency_ms)
    rec.wait_started()
    return rec


def record_source(devices: DeviceSet, source: str, rate: int, latency_ms: int = 5) -> MonitorRecorder:
    rec = MonitorRecorder(source, rate, devices.daemon.env, latency_ms)
    rec.wait_started()
    return rec


def play_into_mic(devices: DeviceSet, wav: str | Path, wait: bool = True) -> subprocess.Popen | None:
    """Play a WAV into the virtual microphone (via its feed sink); blocks until drained unless wait=False."""
    if wait:
        play_wav(wav, devices.mic_feed, devices.daemon.env)
        return None
    return subprocess.Popen(["paplay", f"--device={devices.mic_feed}", "--latency-msec=200", str(wav)],
                            env={**os.environ, **devices.daemon.env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def speech_wav(path: str | Path, text: str = "The quick brown fox jumps over the lazy dog.",
               rate: int | None = None) -> tuple[Path, np.ndarray, int]:
    """Speak `text` with espeak-ng into a WAV (resampled to `rate` if given).

    Returns (path, mono int16 samples, rate)."""
    path = Path(path)
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is needed to make test speech (Debian: apt install espeak-ng)")
    raw = path.with_suffix(".espeak.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True, timeout=30)
    samples, src_rate = read_wav_int16(raw)
    raw.unlink()
    if rate and rate != src_rate:
        samples = StreamResampler(src_rate, rate).process(samples, last=True)
        src_rate = rate
    write_wav_int16(path, samples, src_rate)
    return path, samples, src_rate


def without_portaudio(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` in which importing sounddevice fails, as on a machine without PortAudio."""
    fake = tmp_path / "no_portaudio"
    fake.mkdir(exist_ok=True)
    (fake / "sounddevice.py").write_text("raise OSError('PortAudio library not found (test)')\n")
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), env.get("PYTHONPATH", "")]))}


def align(reference: np.ndarray, recording: np.ndarray) -> int:
    """Offset of `reference` inside `recording` (by FFT cross-correlation)."""
    a = reference.astype(np.float64)
    b = recording.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)
    return int(np.argmax(corr[:len(b)]))


def similarity(reference: np.ndarray, recording: np.ndarray) -> float:
    """Normalised correlation (1.0 = identical shape) of two equally long signals."""
    a = reference.astype(np.float64)
    b = recording.astype(np.float64)
    den = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / den) if den else 0.0
