"""Helpers for the gemini-bridge end-to-end tests: real speech, the emulator and bridge processes,
and bus publishers/subscribers."""
from __future__ import annotations

import functools
import json
import subprocess
import tempfile
import time
import wave
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pytest
import soxr

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message
from livepipe.bus.topics import TOPICS
from tests.conftest import spawn, stop

CHUNK = 320   # 20 ms at 16 kHz


@functools.lru_cache(maxsize=None)
def speech(text: str, rate: int = 16000) -> np.ndarray:
    """Real synthesized speech (espeak-ng) as int16 mono at `rate`."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-s", "190", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            src_rate = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    y = soxr.resample(x.astype(np.float32) / 32768, src_rate, rate)
    return np.clip(y * 32767, -32768, 32767).astype(np.int16)


def silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.int16)


def best_correlation(reference: np.ndarray, signal: np.ndarray) -> tuple[float, int]:
    """Peak normalized cross-correlation of `reference` inside `signal` (1.0 = identical), and its lag
    (where reference[0] falls in signal; negative when it starts before)."""
    a = reference.astype(np.float64)
    # Silence around the signal: the reference may start before it (a pre-roll) or run past its end.
    b = np.concatenate([np.zeros(len(a)), signal.astype(np.float64), np.zeros(len(a))])
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: len(b) - len(a) + 1]
    lag = int(np.argmax(corr))
    window = b[lag: lag + len(a)]
    denom = np.linalg.norm(a) * np.linalg.norm(window)
    return (float(corr[lag] / denom) if denom else 0.0), lag - len(a)


def publish_audio(client: BusClient, pcm: np.ndarray, rate: int = 16000, channels: int = 1,
                  chunk_ms: int = 20, pace: float = 0.0) -> list[tuple[int, int]]:
    """Publish PCM on audio.in in chunk_ms chunks; pace 1.0 = real time, 0 = as fast as possible.
    Returns (frame offset after the chunk, time.time_ns() when published) per chunk."""
    frames = rate * chunk_ms // 1000
    data = pcm.reshape(-1, channels) if channels > 1 else pcm
    t0 = time.monotonic()
    sent: list[tuple[int, int]] = []
    for i, start in enumerate(range(0, len(data), frames)):
        chunk = np.ascontiguousarray(data[start:start + frames])
        client.publish("audio.in", "audio", chunk.tobytes(), rate=rate, channels=channels, sample_width=2,
                       frames=len(chunk))
        sent.append((start + len(chunk), time.time_ns()))
        if pace:
            ahead = t0 + (i + 1) * chunk_ms / 1000 / pace - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    return sent


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Recorder:
    """A BusClient subscribed to topics, keeping every message (and raw frames) it receives."""

    def __init__(self, cfg: BusConfig, topics: Iterable[str] = (), all_topics: bool = False) -> None:
        self.client = BusClient("test-recorder", cfg, topics, all_topics=all_topics)
        self.client.wait_ready()
        self.messages: list[Message] = []
        self.raw: list[list[bytes]] = []

    def pump(self, timeout: float = 0.05) -> None:
        from livepipe.bus.message import decode
        frames = self.client.recv_raw(timeout)
        while frames is not None:
            self.raw.append(frames)
            try:
                self.messages.append(decode(frames, self.client.cfg.session))
            except Exception:
                pass
            frames = self.client.recv_raw(0)

    def until(self, predicate: Callable[[list[Message]], object], timeout: float, what: str) -> object:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            value = predicate(self.messages)
            if value:
                return value
            if time.monotonic() > deadline:
                kinds = [(m.topic, m.kind, m.get("state", m.get("turn"))) for m in self.messages[-30:]
                         if m.topic != "status"]
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {kinds}")

    def select(self, topic: str, kind: str | None = None, **fields: object) -> list[Message]:
        return [m for m in self.messages if m.topic == topic and (kind is None or m.kind == kind)
                and all(m.get(k) == v for k, v in fields.items())]

    def close(self) -> None:
        self.client.close()


def sessions_states(rec: Recorder) -> list[str]:
    return [m["state"] for m in rec.select("control", "session")]


def reply_audio(rec: Recorder, turn: int) -> np.ndarray:
    chunks = [m.payload for m in rec.select("audio.out", "audio", turn=turn)]
    return np.frombuffer(b"".join(chunks), "<i2") if chunks else np.zeros(0, np.int16)


def turn_completed(turn: int) -> Callable[[list[Message]], bool]:
    return lambda msgs: any(m.topic == "control" and m.kind == "turn_complete" and m["turn"] == turn for m in msgs)


def audio_before(done: Message, rec: Recorder, emu: "Emulator | None" = None) -> bool:
    """Whether every audio.out chunk its publisher sent before `done` (its control message, e.g.
    turn_complete) is in `rec`. The control lane overtakes the others (a burst of reply chunks
    sent at once can still be on its way behind the turn_complete that followed it), but a
    process publishes all its other messages on one socket, in order: one of them sent after
    `done` (its heartbeat comes every second) proves the chunks before it are in. Sooner, when
    the emulator's timeline says how much it sent for that turn, and that much is in."""
    inst = done["inst"]
    if any(m["inst"] == inst and m["ts"] > done["ts"] and getattr(TOPICS.get(m.topic), "lane", "control") != "control"
           for m in rec.messages):
        return True
    if emu is None or done.kind != "turn_complete":
        return False
    sent = [e["sent_seconds"] for e in emu.events("turn_complete") if e.get("turn") == done["turn"]]
    got = sum(m["frames"] for m in rec.select("audio.out", "audio", turn=done["turn"]) if m["inst"] == inst)
    return bool(sent) and abs(got - sent[-1] * 24000) <= 12   # a chunk is >= 10 ms: 240 samples


class Emulator:
    """`livepipe emulator` on a free port. With wait=False the constructor returns at once, so a
    bridge can start beside it (it waits for emulator.json by itself); call wait_ready() after."""

    def __init__(self, env: dict[str, str], *args: str, wait: bool = True) -> None:
        self.env = env
        self.state = Path(env["LIVEPIPE_STATE_DIR"])
        self.timeline_path = self.state / "timeline.jsonl"
        self.proc = spawn(["emulator", "--port", "0", "--timeline", str(self.timeline_path), *args], env)
        self.out = ("", "")
        self.info: dict = {}
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "Emulator":
        info_path = self.state / "emulator" / "emulator.json"

        def ready() -> dict | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"emulator exited {self.proc.returncode}: {self.proc.communicate()}")
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                return None
            return info if info.get("pid") == self.proc.pid else None
        self.info = wait_for(ready, 15, "emulator.json")
        return self

    def timeline(self) -> list[dict]:
        try:
            lines = self.timeline_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def events(self, name: str) -> list[dict]:
        return [e for e in self.timeline() if e.get("event") == name]

    def stop(self) -> tuple[str, str]:
        self.out = stop(self.proc)
        return self.out


def start_bridge(env: dict[str, str], *args: str, extra_env: dict[str, str] | None = None,
                 python: str | None = None) -> subprocess.Popen:
    """`python`: another interpreter (e.g. a venv with another google-genai) running this checkout's bridge."""
    if python is None:
        return spawn(["gemini-bridge", *args], {**env, **(extra_env or {})})
    return subprocess.Popen([python, "-m", "livepipe.services", "gemini-bridge", *args], env={**env, **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stopped_output(proc: subprocess.Popen) -> tuple[str, str]:
    return stop(proc)


def upsample(x: np.ndarray, rate_in: int = 16000, rate_out: int = 24000) -> np.ndarray:
    return np.clip(soxr.resample(x.astype(np.float32) / 32768, rate_in, rate_out) * 32767,
                   -32768, 32767).astype(np.int16)


def assert_reply_is(reply: np.ndarray, said: np.ndarray, min_corr: float = 0.95) -> float:
    """The parrot's reply is the utterance (trimmed to its voiced part) at 24 kHz: find it in what was said."""
    assert len(reply) > 0.5 * 24000 * 0.5, f"reply of only {len(reply)} samples"
    corr, _ = best_correlation(reply, upsample(said))
    assert corr >= min_corr, f"reply correlates {corr:.3f} with the utterance"
    assert len(reply) <= len(said) * 1.5 + 2400
    return corr


class Live:
    """One conversation rig: emulator, bridge, a recorder of every topic and a publisher."""

    def __init__(self, bus_env: dict, bus_cfg: BusConfig, emulator_args: Iterable[str] = (),
                 bridge_args: Iterable[str] = (), bridge_env: dict[str, str] | None = None,
                 bridge_first: bool = False, bridge_python: str | None = None) -> None:
        self.env = bus_env
        self.bridge: subprocess.Popen | None = None
        self.emu: Emulator | None = None
        self.out: tuple[str, str] | None = None
        self.rec = Recorder(bus_cfg, all_topics=True)
        self.pub = BusClient("test-pub", bus_cfg)
        try:
            self.pub.wait_ready()
            if bridge_first:   # as honcho starts everything at once: the bridge must wait for the emulator
                self.bridge = start_bridge(bus_env, *bridge_args, extra_env=bridge_env, python=bridge_python)
                self.rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and
                                              m.get("detail") == "waiting for the emulator" for m in ms),
                               20, "the bridge to wait for the emulator")
            # Emulator and bridge start side by side (each pays its own interpreter start): the bridge
            # waits for emulator.json by itself, as under honcho.
            self.emu = Emulator(bus_env, "--latency", "0.05", *emulator_args, wait=False)
            if not bridge_first:
                self.bridge = start_bridge(bus_env, *bridge_args, extra_env=bridge_env, python=bridge_python)
            self.emu.wait_ready()
            self.rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and
                                          m["state"] == "connected" for m in ms), 20, "the bridge to connect")
            self.pub.wait_subscriber("audio.in")
        except BaseException:
            self.close()
            raise

    def say(self, pcm: np.ndarray, pace: float = 0.0, **kw) -> list[tuple[int, int]]:
        return publish_audio(self.pub, pcm, pace=pace, **kw)

    def reply(self, turn: int, timeout: float = 15) -> np.ndarray:
        """The audio of `turn`, once it is complete: its turn_complete and every chunk sent before it."""
        done = self.rec.until(lambda ms: [m for m in ms if m.topic == "control" and m.kind == "turn_complete"
                                          and m["turn"] == turn], timeout, f"turn_complete {turn}")[0]
        self.rec.until(lambda ms: audio_before(done, self.rec, self.emu), 5, f"the audio of turn {turn}")
        return reply_audio(self.rec, turn)

    def metrics(self) -> dict:
        self.rec.pump()
        beats = [m for m in self.rec.select("status", "heartbeat") if m["src"] == "gemini-bridge"]
        return beats[-1]["metrics"] if beats else {}

    def close(self) -> tuple[str, str]:
        if self.out is None:
            self.out = stop(self.bridge) if self.bridge is not None else ("", "")
            if self.emu is not None:
                self.emu.stop()
            self.rec.close()
            self.pub.close()
        return self.out


@pytest.fixture
def live_factory(bus_env: dict, bus_cfg: BusConfig) -> Iterator[Callable[..., "Live"]]:
    rigs: list[Live] = []

    def make(**kw) -> Live:
        rigs.append(Live(bus_env, bus_cfg, **kw))
        return rigs[-1]
    yield make
    for r in rigs:
        r.close()
