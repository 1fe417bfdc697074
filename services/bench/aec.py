"""`livepipe bench aec [--json]`: echo cancellers on a synthetic echo, to choose one.

The far end is the demo's recorded voice; the echo is it through a 100 ms random room response
at -10 dB, 120 ms late; another voice (the same recording reversed) talks over it from 7 to 9 s
(double talk) and alone from 10 to 12 s. Each canceller gets the reference 30 ms ahead of its
echo, in 10 ms frames. Measured: ERLE over 3-7 s (echo only), the near voice's level change and
envelope correlation in double talk and alone, and CPU (% of one core). Cancellers: the `aec`
extra's WebRTC APM (livekit), and `pyaec` / `speexdsp_aec` when installed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from livepipe.services.lib.audio import StreamResampler, read_wav_int16
from livepipe.services.lib.echo import FRAME, ApmCanceller

RATE = 16000


class _Pyaec:
    def __init__(self) -> None:
        import pyaec
        self.a = pyaec.Aec(FRAME, 3200, RATE, True)

    def process(self, mic: np.ndarray, ref: np.ndarray, hint: int) -> np.ndarray:
        return np.array(self.a.cancel_echo(mic.tolist(), ref.tolist()), np.int16)


class _Speex:
    def __init__(self) -> None:
        from speexdsp_aec import SpeexAec
        self.a = SpeexAec(sample_rate=RATE, frame_ms=10, filter_tail_ms=200)

    def process(self, mic: np.ndarray, ref: np.ndarray, hint: int) -> np.ndarray:
        b = self.a.process(mic, ref)
        o = np.frombuffer(b, "<i2") if b else np.zeros(0, np.int16)
        return o if len(o) == FRAME else np.zeros(FRAME, np.int16)


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    spec = importlib.util.find_spec("livepipe.launch")   # a namespace package: no __file__
    assert spec is not None and spec.submodule_search_locations
    x, r = read_wav_int16(Path(next(iter(spec.submodule_search_locations))) / "assets" / "user.wav")
    x = StreamResampler(r, RATE).process(x, last=True)
    rng = np.random.default_rng(1)
    n = RATE * 12
    far = np.tile(x, 3)[:n].copy()
    far[RATE * 10:] = 0
    near = np.tile(x[::-1], 3)[:n] * 0.7
    d = int(0.12 * RATE)
    h = rng.standard_normal(1600) * np.exp(-np.arange(1600) / 300)
    h *= 0.3 / np.sqrt(np.sum(h * h))
    echo = np.concatenate([np.zeros(d), np.convolve(far.astype(float), h)[:n]])[:n]
    talk = np.zeros(n)
    talk[RATE * 7:RATE * 9] = near[RATE * 7:RATE * 9]
    talk[RATE * 10:RATE * 12] = near[RATE * 5:RATE * 7]
    mic = np.clip(echo + talk + rng.standard_normal(n) * 10, -32768, 32767).astype(np.int16)
    return far, mic, talk, d


def measure(make: Any) -> dict[str, Any]:
    far, mic, talk, d = scene()
    c = make()
    out = np.zeros_like(mic)
    shift = d - 480
    t = time.process_time()
    for i in range(0, len(mic) - FRAME + 1, FRAME):
        j = i - shift
        ref = far[j:j + FRAME] if j >= 0 else np.zeros(FRAME, np.int16)
        out[i:i + FRAME] = c.process(mic[i:i + FRAME], ref, 30)
    cpu = (time.process_time() - t) / (len(mic) / RATE) * 100

    def energy(s: np.ndarray, a: float, b: float) -> float:
        return float(np.mean(s[int(a * RATE):int(b * RATE)].astype(float) ** 2))

    def kept(a: float, b: float) -> tuple[float, float]:
        s = slice(int(a * RATE), int(b * RATE))
        o, n = out[s].astype(float), talk[s]

        def env(v: np.ndarray) -> np.ndarray:
            return np.log10(np.mean(v[:len(v) // 320 * 320].reshape(-1, 320) ** 2, axis=1) + 1e2)
        corr = max(np.corrcoef(env(o[k:]), env(n[:len(n) - k]))[0, 1] for k in range(0, 400, 40))
        return round(float(corr), 2), round(float(10 * np.log10(np.mean(o * o) / np.mean(n * n))), 1)
    dt, alone = kept(7.25, 9), kept(10.25, 12)
    return {"erle_db": round(10 * np.log10(energy(mic, 3, 7) / max(energy(out, 3, 7), 1.0)), 1),
            "double_talk_env_corr": dt[0], "double_talk_gain_db": dt[1],
            "near_alone_env_corr": alone[0], "near_alone_gain_db": alone[1], "cpu_pct_core": round(cpu, 2)}


def coughs_against_vad_prefix() -> dict[str, Any]:
    """What stops a cough from interrupting the model: the emulator's turn detector (webrtcvad, as
    the service's start-of-speech), fed 20 synthetic coughs of 100-300 ms, against how late real
    speech (the demo voice) then registers, per prefix_padding_ms."""
    from livepipe.services.processes.emulator.turns import SpeechStart, TurnDetector, VadSettings
    rng = np.random.default_rng(3)

    def cough(ms: int) -> np.ndarray:
        n = 16 * ms
        x = rng.standard_normal(n + 200)
        x = np.convolve(x, np.ones(3) / 3, "same") - np.convolve(x, np.ones(25) / 25, "same")   # band-pass
        env = np.minimum(1, np.arange(n) / (16 * 15)) * np.exp(-np.arange(n) / (16 * ms / 3))
        return (x[:n] * env * 6000 / np.std(x)).astype(np.int16)
    _, _, talk, _ = scene()
    voice = talk[RATE * 10:RATE * 12].astype(np.int16)
    first = int(np.flatnonzero(np.abs(voice) > 300)[0])
    pad = np.zeros(8000, np.int16)
    out: dict[str, Any] = {}
    for prefix in (60, 120, 200, 300):
        settings = VadSettings.from_setup({"automatic_activity_detection": {"prefix_padding_ms": prefix}})
        starts = sum(any(isinstance(e, SpeechStart) for e in TurnDetector(settings).feed(
            np.concatenate([pad, cough(100 + 10 * k), pad]))) for k in range(20))
        ev = [e for e in TurnDetector(settings).feed(np.concatenate([pad, voice, pad])) if isinstance(e, SpeechStart)]
        out[f"prefix_{prefix}ms"] = {"coughs_starting_speech_of_20": starts,
                                     "speech_start_after_first_voice_ms": round((ev[0].at_sample - 8000 - first) / 16, 1)
                                     if ev else None}
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livepipe bench aec", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object (the default output too)")
    p.parse_args(argv)
    result: dict[str, Any] = {}
    for name, make in (("webrtc-apm (livekit)", ApmCanceller), ("pyaec", _Pyaec), ("speexdsp", _Speex)):
        try:
            result[name] = measure(make)
        except ImportError as exc:
            result[name] = {"error": f"not installed: {exc}"}
        except Exception as exc:   # a library that loads but fails (missing system lib...)
            result[name] = {"error": str(exc)}
    try:
        result["coughs_vs_vad_prefix"] = coughs_against_vad_prefix()
    except ImportError as exc:   # the emulator's extra (webrtcvad) is not installed
        result["coughs_vs_vad_prefix"] = {"error": f"not installed: {exc}"}
    print(json.dumps(result, indent=2))
    return 0
