"""The 60 s playback burst, started at the beginning of the session and checked at the end.

A minute of audio has to take a minute to play; starting it first (both audio test modules
use this fixture) lets that minute overlap the other audio tests instead of adding to them.
The check is tests/test_playback.py::test_a_minute_of_audio_delivered_in_a_second_plays_without_drops.
Also holds the small bus helpers the playback tests share.
"""
from __future__ import annotations

import os
import subprocess
import time
from typing import Iterator

import numpy as np
import pytest

from livepipe.services.lib.audio import OUT_RATE, tone
from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message
from livepipe.services.dev.pulse import PulseDaemon
from tests.conftest import Broker, free_port, spawn, stop
from tests.pulse_support import pulse, record_speaker  # noqa: F401

BURST_S = 60
CHUNK = 960               # 40 ms audio.out chunks, as the bridge sends them


def publish_turn(client: BusClient, turn: int, pcm: np.ndarray, chunk: int = CHUNK) -> None:
    for i in range(0, len(pcm), chunk):
        part = pcm[i:i + chunk]
        client.publish("audio.out", "audio", part.tobytes(), rate=OUT_RATE, channels=1, sample_width=2,
                       frames=len(part), turn=turn)


def wait_event(client: BusClient, kind: str, turn: int, timeout: float = 10.0) -> Message:
    return client.wait_for("playback", kind, timeout, turn=turn)


def start_playback(args: list[str], env: dict[str, str], client: BusClient) -> subprocess.Popen:
    """Spawn `livepipe playback ARGS` and return once it subscribes to audio.out."""
    proc = spawn(["playback", *args], env)
    deadline = time.monotonic() + 15
    while not client.has_subscriber("audio.out"):
        assert proc.poll() is None, stop(proc)
        assert time.monotonic() < deadline, "playback did not subscribe to audio.out"
        client.pub.poll(50)
    return proc


_RUNNING: dict | None = None   # one burst per session, whichever module asks first


@pytest.fixture(scope="session")
def playback_burst(pulse: PulseDaemon) -> Iterator[dict]:  # noqa: F811
    """60 s of audio delivered in 1 s to a playback on its own speaker, its own broker."""
    global _RUNNING
    # A fixture imported into two modules is two fixture definitions to pytest: share one run.
    if _RUNNING is not None:
        yield _RUNNING
        return
    pulse.ensure_running()
    devices = pulse.private_devices()
    pub, sub = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPIPE_")}
    env.update(LIVEPIPE_PUB_ENDPOINT=f"tcp://127.0.0.1:{pub}", LIVEPIPE_SUB_ENDPOINT=f"tcp://127.0.0.1:{sub}",
               PYTHONUNBUFFERED="1")
    broker = Broker(env, pub, sub).start()
    client = BusClient("burst", BusConfig.from_env(env), ["playback", "status"])
    client.wait_ready()
    rec = record_speaker(devices)   # first: it also keeps the null sink on a short clock
    # A deeper device buffer than the default 40 ms: the minute plays while other tests run on the
    # same 2 cores, and an 80 ms stall of the audio callback then is a gap at the sink that says
    # nothing about what this checks (a burst queued whole, played in order without a drop).
    proc = start_playback(["--latency-ms", "120"], {**env, **devices.playback_env()}, client)
    # One continuous tone: a dropped, repeated or late block shows as a gap or a sample mismatch.
    signal = tone(330.0, BURST_S, OUT_RATE, -14.0)
    t0 = time.monotonic()
    n_chunks = len(signal) // CHUNK
    for k in range(n_chunks):     # spread over one second: 60x real time
        publish_turn(client, 1, signal[k * CHUNK:(k + 1) * CHUNK])
        ahead = t0 + (k + 1) / n_chunks - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
    delivered_s = time.monotonic() - t0
    client.publish("control", "turn_complete", turn=1)
    _RUNNING = dict(client=client, rec=rec, proc=proc, signal=signal, delivered_s=delivered_s)
    yield _RUNNING
    _RUNNING = None
    client.close()
    stop(proc)
    rec.stop()
    broker.stop()
    devices.close()
