"""Faults a tester would try (issue 15): restarted processes, forged or hostile input, one
process down. Real processes on a real broker; no sound card needed (playback --null).
"""
from __future__ import annotations

import os
import signal
import struct
import time
from typing import Iterator

import numpy as np
import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import encode, make_header
from livepipe.services.lib.audio import OUT_RATE, tone
from livepipe.services.lib.jpeg import ImageRejected, check_image
from tests.bridge_support import live_factory, start_bridge  # noqa: F401
from tests.conftest import stop
from tests.playback_burst import publish_turn, start_playback, wait_event


@pytest.fixture
def listener(bus_cfg: BusConfig) -> Iterator[BusClient]:
    with BusClient("test", bus_cfg, ["playback", "status"]) as c:
        c.wait_ready()
        yield c


def playback_metrics(client: BusClient, timeout: float = 5.0) -> dict:
    beat = client.wait_for("status", "heartbeat", timeout, src="playback")
    return beat["metrics"]


# ---------------------------------------------------------------- 1. turn identity
def test_a_forged_interrupt_with_a_huge_turn_mutes_nothing_that_follows(bus_env, bus_cfg, listener):
    proc = start_playback(["--null"], bus_env, listener)
    forger = BusClient("forger", bus_cfg)
    try:
        forger.wait_ready()
        publish_turn(listener, 1, tone(440.0, 0.3, OUT_RATE, -12.0))
        listener.publish("control", "turn_complete", turn=1)
        wait_event(listener, "turn_finished", 1)
        # One forged interrupt under its own name, one claiming to come from the audio's publisher.
        forger.publish("control", "interrupt", turn=10**9, reason="forged")
        spoofed = make_header("interrupt", "gemini-bridge", listener.inst, 999, {"turn": 10**9})
        forger.send_raw(encode("control", spoofed))
        forger.publish("control", "interrupt", turn=10**9, reason="sync")   # both handled once this one is
        listener.wait_for("status", "heartbeat", 5, src="playback")
        # The next replies are heard.
        for turn in (2, 3):
            publish_turn(listener, turn, tone(660.0, 0.2, OUT_RATE, -12.0))
            listener.publish("control", "turn_complete", turn=turn)
            wait_event(listener, "turn_started", turn)
            finished = wait_event(listener, "turn_finished", turn)
            assert finished["played_ms"] == pytest.approx(200.0, abs=1) and not finished["interrupted"]
        # Audio of a finished turn is dropped, counted in the heartbeat and said once.
        publish_turn(listener, 1, tone(440.0, 0.2, OUT_RATE, -12.0))
        deadline = time.monotonic() + 5
        while playback_metrics(listener).get("audio_dropped", 0) < 5:
            assert time.monotonic() < deadline, "dropped audio not counted"
    finally:
        forger.close()
        out, err = stop(proc)
    assert err.count("dropped audio.out of turn 1") == 1, err


def test_a_bridge_killed_and_restarted_is_heard_from_its_first_reply(live_factory, bus_env, listener):  # noqa: F811
    rig = live_factory(bridge_args=("--backend", "emulator"))
    player = start_playback(["--null"], bus_env, listener)
    try:
        playback_metrics(listener, 15)   # its first heartbeat: its bus path is live (the rig's recorder
        rig.pub.wait_subscriber("text.in")   # subscribes to everything, so has_subscriber says nothing)
        for turn in (1, 2):
            rig.pub.publish("text.in", "text", text=f"hello {turn}")
            wait_event(listener, "turn_started", turn, timeout=15)
        rig.rec.until(lambda ms: any(m.topic == "control" and m.kind == "turn_complete" and m["turn"] == 2
                                     for m in ms), 15, "turn 2 complete")
        rig.bridge.send_signal(signal.SIGKILL)
        rig.bridge.wait(5)
        n_before = len(rig.rec.messages)
        rig.bridge = start_bridge(bus_env, "--backend", "emulator")
        rig.rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and m["state"] == "connected"
                                     for m in ms[n_before:]), 20, "the new bridge to connect")
        rig.pub.wait_subscriber("text.in")
        rig.pub.publish("text.in", "text", text="after the restart")
        # The new bridge counts from 1 again: its turn 1 is a new turn, played in full.
        started = wait_event(listener, "turn_started", 1, timeout=15)
        finished = wait_event(listener, "turn_finished", 1, timeout=15)
        assert finished["played_ms"] > 100 and not finished["interrupted"]
        assert started["first_sample_ts"] < finished["silent_ts"]
        assert playback_metrics(listener).get("audio_dropped") == 0
    finally:
        stop(player)


# ---------------------------------------------------------------- 2. decompression bomb
def bomb_jpeg(width: int = 20000, height: int = 20000) -> bytes:
    """A real 16x16 JPEG (631 bytes) whose frame header claims `width` x `height`."""
    import cv2
    ok, buf = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident memory (VmHWM): catches a spike between two samples."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_image_header_check_refuses_what_no_camera_produces():
    import cv2
    ok, buf = cv2.imencode(".jpg", np.zeros((720, 1280, 3), np.uint8))
    assert check_image(buf.tobytes()) == (1280, 720)
    ok, png = cv2.imencode(".png", np.zeros((10, 20, 3), np.uint8))
    assert check_image(png.tobytes(), "image/png") == (20, 10)
    for bad in (bomb_jpeg(), bomb_jpeg(8000, 8000), b"\xff\xd8\xff\xd9", b"GIF89a", b""):
        with pytest.raises(ImageRejected):
            check_image(bad)


def test_a_decompression_bomb_on_video_in_is_refused_unread(live_factory):  # noqa: F811
    rig = live_factory(bridge_args=("--backend", "emulator"))
    rig.pub.wait_subscriber("video.in")
    bomb = bomb_jpeg()
    assert len(bomb) < 1000
    rig.pub.publish("video.in", "image", bomb, image_width=16, image_height=16, mime="image/jpeg")
    rig.rec.until(lambda ms: any(m.topic == "status" and m["src"] == "gemini-bridge"
                                 and m["metrics"].get("video_frames_too_large") == 1 for m in ms),
                  15, "the bridge to count the refused frame")
    assert peak_rss_bytes(rig.bridge.pid) < 400e6
    # It keeps serving: a real frame goes to the model.
    import cv2
    ok, frame = cv2.imencode(".jpg", np.full((480, 640, 3), 90, np.uint8))
    rig.pub.publish("video.in", "image", frame.tobytes(), image_width=640, image_height=480, mime="image/jpeg")
    rig.rec.until(lambda ms: any(m.topic == "status" and m["src"] == "gemini-bridge"
                                 and m["metrics"].get("video_frames_sent") == 1 for m in ms),
                  15, "a real frame to be sent")
    assert rig.metrics()["video_frames_rejected"] == 1
    out, err = rig.close()
    assert err.count("20000x20000") == 1, err
