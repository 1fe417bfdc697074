"""Helpers for the emulator tests: real speech (espeak-ng), emulator processes, SDK sessions.

Also runnable as a script (`python tests/emulator_support.py URL CA WAV`) so a separate venv with
another google-genai version can run one scenario against a running emulator and print JSON.
"""
from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import ssl
import subprocess
import sys
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parent.parent
RATE_IN, RATE_OUT = 16000, 24000


# --- audio -----------------------------------------------------------------------------------

def speech(text: str, out_dir: Path) -> np.ndarray:
    """`text` spoken by espeak-ng, as 16 kHz int16 mono (leading/trailing silence trimmed)."""
    wav = out_dir / f"espeak-{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", "en", "-s", "165", "-w", str(wav), text], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with wave.open(str(wav)) as w:
        rate, data = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = soxr.resample(data, rate, RATE_IN).astype(np.int16)
    loud = np.flatnonzero(np.abs(x) > 300)
    return x[max(0, loud[0] - 160):loud[-1] + 160].copy()


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE_IN), np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int = RATE_IN) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16)


def match(reference16k: np.ndarray, reply24k: np.ndarray) -> tuple[float, float]:
    """Where the reply sits inside the reference (resampled to 24 kHz) and how alike it is there.

    Returns (lag seconds, normalised correlation at the cross-correlation peak, 1.0 = identical).
    """
    pad = np.zeros(RATE_IN // 2, np.int16)      # the reply may start before / end after the reference
    ref = soxr.resample(np.concatenate([pad, reference16k, pad]), RATE_IN, RATE_OUT).astype(np.float64)
    rep = reply24k.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(ref) + len(rep))))
    xc = np.fft.irfft(np.fft.rfft(ref, n) * np.conj(np.fft.rfft(rep, n)), n)[:len(ref)]
    lag = int(np.argmax(xc))
    seg = ref[lag:lag + len(rep)]
    rep = rep[:len(seg)]
    corr = float(np.dot(seg, rep) / (np.linalg.norm(seg) * np.linalg.norm(rep) + 1e-9))
    return lag / RATE_OUT - 0.5, corr


def found_in(words16k: np.ndarray, reply24k: np.ndarray) -> float:
    """How intact `words` are at their best place inside `reply` (normalised correlation, 1.0 = all
    of them, unchanged). Unlike match(), extra audio around them in the reply does not count."""
    a = soxr.resample(words16k, RATE_IN, RATE_OUT).astype(np.float64)
    b = np.concatenate([np.zeros(len(a)), reply24k.astype(np.float64), np.zeros(len(a))])
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    xc = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[:len(b) - len(a) + 1]
    # normalised at every lag (a short piece would otherwise "match" best wherever the reply is loud)
    energy = np.concatenate([[0.0], np.cumsum(b * b)])
    window = np.sqrt(np.maximum(energy[len(a):] - energy[:-len(a)], 0.0))
    a_norm = float(np.linalg.norm(a))
    if a_norm == 0:
        return 0.0
    ncc = np.where(window > 1e-3 * a_norm, xc / (a_norm * np.maximum(window, 1e-9)), 0.0)
    return float(ncc.max())


# --- emulator processes ----------------------------------------------------------------------

class Emulator:
    """`livepipe emulator --port 0 ...` as a subprocess with its own state directory."""

    def __init__(self, state: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.state, self.args = state, list(args)
        self.env = dict(env or os.environ)
        for k in [k for k in self.env if k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API"))]:
            del self.env[k]
        self.env["PYTHONUNBUFFERED"] = "1"
        self.proc: subprocess.Popen | None = None
        self.ready_line = ""
        self.info: dict[str, Any] = {}

    @property
    def info_path(self) -> Path:
        return self.state / "emulator" / "emulator.json"

    @property
    def timeline_path(self) -> Path:
        return self.state / "emulator" / "timeline.jsonl"

    def start(self) -> "Emulator":
        self.proc = subprocess.Popen([sys.executable, "-m", "livepipe.services", "emulator", "--port", "0",
                                      "--state-dir", str(self.state), *self.args],
                                     cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def wait_ready(self, timeout: float = 15.0) -> "Emulator":
        """Block until the 'listening on' line; then emulator.json must already be in place."""
        assert self.proc is not None and self.proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while "listening on" not in self.ready_line:
            if self.proc.poll() is not None:
                raise AssertionError(f"emulator exited {self.proc.returncode}: {self.proc.communicate()}")
            if not sel.select(max(0.0, deadline - time.monotonic())):
                raise AssertionError("emulator did not report listening in time")
            self.ready_line = self.proc.stderr.readline()
        sel.close()
        self.info = json.loads(self.info_path.read_text())
        return self

    @property
    def url(self) -> str:
        return self.info["url"]

    def stop(self, timeout: float = 5.0) -> tuple[int, str]:
        """SIGTERM; returns (exit code, the rest of stderr)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err

    def timeline(self) -> list[dict[str, Any]]:
        if not self.timeline_path.exists():
            return []
        return [json.loads(line) for line in self.timeline_path.read_text().splitlines() if line.strip()]


def start_all(emulators: list[Emulator]) -> list[Emulator]:
    """Start several emulators in parallel (each pays its own import time once)."""
    for e in emulators:
        e.start()
    for e in emulators:
        e.wait_ready()
    return emulators


# --- SDK sessions ----------------------------------------------------------------------------

def make_client(url: str, ca_file: str, api_key: str = "test-key", api_version: str = "v1beta") -> Any:
    from google import genai
    from google.genai import types
    ctx = ssl.create_default_context(cafile=ca_file)
    return genai.Client(api_key=api_key, http_options=types.HttpOptions(
        base_url=url, api_version=api_version, async_client_args={"ssl": ctx}))


async def send_audio(session: Any, samples: np.ndarray, chunk_ms: int = 20, speed: float = 8.0,
                     mime: str = "audio/pcm;rate=16000") -> None:
    """Stream samples as the SDK's user would, `speed` times faster than real time (0 = no pacing)."""
    from google.genai import types
    step = RATE_IN * chunk_ms // 1000
    t0 = time.monotonic()
    for k, off in enumerate(range(0, len(samples), step)):
        await session.send_realtime_input(audio=types.Blob(data=samples[off:off + step].tobytes(), mime_type=mime))
        if speed > 0:
            delay = t0 + (k + 1) * chunk_ms / 1000 / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


@dataclass
class TurnResult:
    audio: bytearray = field(default_factory=bytearray)
    input_text: list[str] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    interrupted: bool = False
    generation_complete: bool = False
    turn_complete: bool = False
    turns_completed: int = 0
    usage: Any = None
    tool_calls: list[Any] = field(default_factory=list)
    cancelled_ids: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    handle_indexes: list[int | None] = field(default_factory=list)   # lastConsumedClientMessageIndex of each
    handle_times: list[float] = field(default_factory=list)          # time.monotonic() each arrived
    go_away: Any = None
    first_audio_at: float | None = None

    @property
    def samples(self) -> np.ndarray:
        return np.frombuffer(bytes(self.audio), "<i2")

    @property
    def seconds(self) -> float:
        return len(self.audio) / 2 / RATE_OUT


def absorb(result: TurnResult, msg: Any) -> None:
    sc = msg.server_content
    if sc is not None:
        if sc.model_turn:
            for part in sc.model_turn.parts or []:
                if part.inline_data and part.inline_data.data:
                    if result.first_audio_at is None:
                        result.first_audio_at = time.monotonic()
                    result.audio += part.inline_data.data
                if part.text:
                    result.text_parts.append(part.text)
        if sc.input_transcription and sc.input_transcription.text:
            result.input_text.append(sc.input_transcription.text)
        if sc.output_transcription and sc.output_transcription.text:
            result.output_text.append(sc.output_transcription.text)
        result.interrupted |= bool(sc.interrupted)
        result.generation_complete |= bool(sc.generation_complete)
        result.turn_complete |= bool(sc.turn_complete)
        result.turns_completed += bool(sc.turn_complete)
    if msg.usage_metadata is not None:
        result.usage = msg.usage_metadata
    if msg.tool_call is not None:
        result.tool_calls += list(msg.tool_call.function_calls or [])
    if msg.tool_call_cancellation is not None:
        result.cancelled_ids += list(msg.tool_call_cancellation.ids or [])
    if msg.session_resumption_update is not None and msg.session_resumption_update.new_handle:
        result.handles.append(msg.session_resumption_update.new_handle)
        result.handle_indexes.append(msg.session_resumption_update.last_consumed_client_message_index)
        result.handle_times.append(time.monotonic())
    if msg.go_away is not None:
        result.go_away = msg.go_away


async def collect_turn(session: Any, result: TurnResult | None = None, timeout: float = 15.0,
                       until_tool_call: bool = False) -> TurnResult:
    """Receive until turnComplete (or a toolCall when asked) and gather what the user would see."""
    result = result or TurnResult()

    async def run() -> None:
        while True:
            async for msg in session.receive():
                absorb(result, msg)
                if until_tool_call and msg.tool_call is not None:
                    return
            if result.turn_complete:
                return
    await asyncio.wait_for(run(), timeout)
    return result


async def receive_until(session: Any, predicate: Any, result: TurnResult, timeout: float = 10.0) -> TurnResult:
    """Receive (across turns) until predicate(result) holds; a close raises the SDK's APIError."""
    async def run() -> None:
        while not predicate(result):
            async for msg in session.receive():
                absorb(result, msg)
                if predicate(result):
                    return
    await asyncio.wait_for(run(), timeout)
    return result


# --- script mode: one scenario with whatever google-genai this interpreter has ----------------

async def _scenario(url: str, ca_file: str, wav: str) -> dict[str, Any]:
    from google import genai
    from google.genai import types
    samples = read_wav(Path(wav))
    client = make_client(url, ca_file)
    config = types.LiveConnectConfig(response_modalities=["AUDIO"], input_audio_transcription={},
                                     output_audio_transcription={})
    async with client.aio.live.connect(model="models/gemini-2.5-flash-native-audio-latest", config=config) as s:
        await send_audio(s, np.concatenate([samples, silence(0.8)]), speed=0)
        turn = await collect_turn(s)
        await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="hi")]),
                                    turn_complete=True)
        text_turn = await collect_turn(s)
    lag, corr = match(samples, turn.samples)
    return {"sdk": genai.__version__, "input": turn.input_text, "output": turn.output_text,
            "reply_seconds": turn.seconds, "corr": corr, "turn_complete": turn.turn_complete,
            "text_output": text_turn.output_text, "text_reply_seconds": text_turn.seconds}


async def _non_blocking_scenario(url: str, ca_file: str, wav: str) -> dict[str, Any]:
    """A NON_BLOCKING function on a 2.5 model; its response sent with scheduling WHEN_IDLE and
    will_continue, as this SDK version serializes them."""
    from google import genai
    from google.genai import types
    samples = read_wav(Path(wav))
    config = types.LiveConnectConfig(
        response_modalities=["AUDIO"], input_audio_transcription={}, output_audio_transcription={},
        tools=[types.Tool(function_declarations=[types.FunctionDeclaration(name="look_up", behavior="NON_BLOCKING")])])
    async with make_client(url, ca_file).aio.live.connect(
            model="models/gemini-2.5-flash-native-audio-preview-12-2025", config=config) as s:
        await send_audio(s, np.concatenate([samples, silence(0.8)]), speed=0)
        first = await collect_turn(s)
        call = first.tool_calls[0]
        await s.send_tool_response(function_responses=[types.FunctionResponse(
            id=call.id, name=call.name, response={"ok": True}, scheduling="WHEN_IDLE", will_continue=False)])
        result = await collect_turn(s)
    return {"sdk": genai.__version__, "reply": first.output_text, "tool": call.name, "result": result.output_text}


if __name__ == "__main__":
    scenario = _non_blocking_scenario if sys.argv[4:5] == ["non-blocking"] else _scenario
    print(json.dumps(asyncio.run(scenario(*sys.argv[1:4]))))
