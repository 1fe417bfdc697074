"""End-to-end: broker + emulator + gemini-bridge as real processes, the real google-genai SDK over TLS,
and test publishers/subscribers on the bus."""
from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import time

import cv2
import numpy as np

from tests.bridge_support import (Emulator, assert_reply_is, live_factory, reply_audio, silence,  # noqa: F401
                                  speech, start_bridge, upsample, wait_for)
from tests.conftest import ROOT


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = rng.integers(0, 255, 3)
    cv2.circle(img, (width // 2, height // 2), min(width, height) // 4, (255, 255, 255), -1)
    return cv2.imencode(".jpg", img)[1].tobytes()


def test_conversation_audio_transcripts_text_video_and_no_key_leak(live_factory):
    secret = "AIzaSy" + secrets.token_urlsafe(24)
    rig = live_factory(emulator_args=("--api-key", secret, "--pace", "0"),
                       bridge_args=("--backend", "emulator"),
                       # DEBUG: the SDK's and websockets' own logs (request headers included) must be scrubbed too
                       bridge_env={"GEMINI_API_KEY": secret, "LIVEPIPE_LOG": "DEBUG"})

    # 1. An utterance in, the same voice back at 24 kHz, with both transcripts and the turn's controls.
    said = speech("Hello there, how are you")
    rig.say(np.concatenate([said, silence(0.7)]))
    reply = rig.reply(1)
    assert_reply_is(reply, said)
    user = rig.rec.select("transcript", role="user")
    model = rig.rec.select("transcript", role="model")
    assert user and user[0]["turn"] == 1 and re.match(r"utterance 1: 1\.\d\d s", user[0]["text"]), user
    assert model and model[0]["turn"] == 1 and model[0]["text"].startswith("reply 1:")
    gen = rig.rec.select("control", "generation_complete", turn=1)
    done = rig.rec.select("control", "turn_complete", turn=1)
    assert gen and done and gen[0]["ts"] <= done[0]["ts"]
    assert done[0]["usage"]["prompt_tokens"] > 0 and done[0]["usage"]["total_tokens"] > 0
    assert all(m["rate"] == 24000 for m in rig.rec.select("audio.out"))

    # 2. The same words at 48 kHz stereo: converted to 16 kHz mono, never sent wrong.
    stereo = np.repeat(upsample(said, 16000, 48000)[:, None], 2, axis=1).reshape(-1)
    rig.say(np.concatenate([stereo, np.zeros(2 * 48000 * 7 // 10, np.int16)]), rate=48000, channels=2)
    assert_reply_is(rig.reply(2), said)

    # 3. Text in: the emulator answers text with a 330 Hz tone and names it in the transcript.
    rig.pub.publish("text.in", "text", text="hello bridge")
    tone = rig.reply(3)
    spectrum = np.abs(np.fft.rfft(tone.astype(np.float64)))
    assert abs(np.argmax(spectrum) * 24000 / len(tone) - 330) < 5
    assert any(m["text"] == 'reply 3: text "hello bridge"' for m in rig.rec.select("transcript", role="model", turn=3))

    # 4. Video: 1280x720 frames at 5 FPS for 2.2 s reach the model fitted to 768x432 at <= 1 FPS.
    t0 = time.monotonic()
    for i in range(11):
        rig.pub.publish("video.in", "image", jpeg(1280, 720, i), image_width=1280, image_height=720, mime="image/jpeg")
        time.sleep(max(0.0, t0 + (i + 1) * 0.2 - time.monotonic()))
    rig.say(np.concatenate([speech("What time is it"), silence(0.7)]))
    rig.reply(4)
    text = [m["text"] for m in rig.rec.select("transcript", role="user", turn=4)][0]
    frames = re.search(r"frames (\d+), last (\d+)x(\d+)(?:, ([\d.]+) fps)?", text)
    assert frames, text
    n, w, h, fps = int(frames[1]), int(frames[2]), int(frames[3]), float(frames[4] or 0)
    assert (w, h) == (768, 432)
    # 11 frames over 2.2 s: at 1 FPS at most 3 get through. The emulator's fps uses its own arrival
    # stamps, taken after decoding (and, for the first frame, importing OpenCV): allow that jitter.
    assert 2 <= n <= 3 and fps <= 1.05, text

    # 5. The key is nowhere: not on the bus (every frame of every topic), not in stdout/stderr.
    out, err = rig.close()
    assert rig.bridge.returncode == 0, err[-2000:]
    raw = b"".join(b"".join(bytes(f) for f in frames_) for frames_ in rig.rec.raw)
    assert len(rig.rec.raw) > 100
    assert secret.encode() not in raw
    assert secret not in out and secret not in err
    assert "x-goog-api-key: ***" in err   # websockets' debug log did print the header: scrubbed
    assert "Traceback" not in err


def test_interrupt_publishes_control_first_and_no_audio_of_that_turn_after(live_factory):
    rig = live_factory(emulator_args=("--pace", "1"))   # a real-time reply, so there is time to barge in
    first = speech("Tell me a story about a cat")
    rig.say(np.concatenate([first, silence(0.6)]))
    rig.rec.until(lambda ms: len([m for m in ms if m.topic == "audio.out"]) >= 5, 10, "the reply to start")
    second = speech("What time is it")
    rig.say(np.concatenate([second, silence(0.6)]))
    rig.reply(2)
    interrupts = rig.rec.select("control", "interrupt")
    assert [m["turn"] for m in interrupts] == [1]
    cut_at = interrupts[0]["ts"]
    turn1 = rig.rec.select("audio.out", turn=1)
    assert turn1 and max(m["ts"] for m in turn1) < cut_at          # nothing of turn 1 after the interrupt
    played = sum(m["frames"] for m in turn1) / 24000
    assert played < len(first) / 16000 - 0.3                       # it really was cut short
    complete1 = rig.rec.select("control", "turn_complete", turn=1)
    assert complete1 and complete1[0]["ts"] >= cut_at
    assert_reply_is(reply_audio(rig.rec, 2), second)
    # The bus interrupt follows the service's `interrupted` closely (emulator timeline, same clock).
    emu_cut = [e for e in rig.emu.timeline() if e["event"] == "interrupted"]
    assert emu_cut and 0 <= (cut_at - emu_cut[0]["t_ns"]) / 1e6 < 500


TOOL_RESPONDER = r"""
import sys
from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
with BusClient("tool-clock", BusConfig.from_env(), ["tool.call"]) as c:
    c.wait_ready()
    print("ready", flush=True)
    while True:
        m = c.recv(30)
        if m is None:
            break
        if m.kind == "call" and m["name"] == "get_time":
            c.publish("tool.result", "result", id=m["id"], name=m["name"], response={"time": "12:34"})
            print("answered", m["id"], flush=True)
            break
"""


def test_tool_round_trip_through_another_process_and_timeout(live_factory, tmp_path, bus_env):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_time", "description": "the time now",
                                  "parameters": {"type": "object", "properties": {}}}]))
    rig = live_factory(emulator_args=("--tool-trigger", "1.2"),
                       bridge_args=("--tools", str(tools), "--tool-timeout", "1.5"))
    responder = subprocess.Popen([sys.executable, "-c", TOOL_RESPONDER], env=bus_env, cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert responder.stdout.readline().strip() == "ready"
        said = speech("Hello there, how are you")          # 1.46 s: over the trigger
        rig.say(np.concatenate([said, silence(0.7)]))
        assert_reply_is(rig.reply(1), said)
        calls = rig.rec.select("tool.call", "call")
        assert [(c["name"], c["args"]["utterance"]) for c in calls] == [("get_time", 1)]
        answered = responder.communicate(timeout=10)[0]
        assert f"answered {calls[0]['id']}" in answered
        emu = {e["event"]: e for e in rig.emu.timeline() if e.get("turn") == 1}
        assert emu["tool_response"]["id"] == calls[0]["id"]
    finally:
        if responder.poll() is None:
            responder.kill()
    # Nobody answers the second call (the recorder subscribes, so it is published): an error response
    # after --tool-timeout lets the model go on instead of hanging.
    t0 = time.monotonic()
    rig.say(np.concatenate([said, silence(0.7)]))
    assert_reply_is(rig.reply(2, timeout=20), said)
    assert time.monotonic() - t0 >= 1.5
    assert len(rig.rec.select("tool.call", "call")) == 2
    wait_for(lambda: rig.metrics().get("tool_timeouts") == 1, 5, "tool_timeouts metric")
    # The user speaks while a call is pending: the model cancels it; the cancel is published, the
    # turn is interrupted, and the short new utterance (no tool) is answered.
    rig.say(np.concatenate([said, silence(0.7)]))
    rig.rec.until(lambda ms: len([m for m in ms if m.topic == "tool.call" and m.kind == "call"]) == 3, 10,
                  "the third tool call")
    short = speech("What time is it")
    rig.say(np.concatenate([short, silence(0.7)]))
    assert_reply_is(rig.reply(4), short)
    third = rig.rec.select("tool.call", "call")[2]["id"]
    assert [m["ids"] for m in rig.rec.select("tool.call", "cancel")] == [[third]]
    assert [m["turn"] for m in rig.rec.select("control", "interrupt")] == [3]
    assert rig.rec.select("control", "turn_complete", turn=3)
    assert not rig.rec.select("audio.out", turn=3)


def test_bad_key_is_one_clear_line_and_a_nonzero_exit(bus_env):
    secret = "AIzaSy" + secrets.token_urlsafe(24)
    emu = Emulator(bus_env, "--api-key", secret)
    wrong = "AIzaSy-wrong-" + secrets.token_urlsafe(16)
    try:
        bridge = start_bridge(bus_env, "--backend", "emulator", extra_env={"GEMINI_API_KEY": wrong})
        out, err = bridge.communicate(timeout=30)
    finally:
        emu.stop()
    assert bridge.returncode == 1
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "1007" in errors[0] and "API key not valid" in errors[0], err
    assert "Traceback" not in err and wrong not in err and wrong not in out
    assert err.count("connected (") == 0 and "retrying" not in err


def test_bad_settings_are_refused_before_connecting(tmp_path, bus_env):
    # No emulator runs: each is refused at once with one line naming the option and exit 2.
    cases = [
        (["--media-resolution", "ultra"], {}, "--media-resolution 'ultra'"),
        ([], {"LIVEPIPE_MODEL_VIDEO_FPS": "5"}, "--video-fps '5'"),
        (["--tools", str(tmp_path / "missing.json")], {}, "no such file"),
        (["--backend", "gemini"], {}, "GEMINI_API_KEY"),
        (["--system-instruction", "@" + str(tmp_path / "nope.txt")], {}, "--system-instruction"),
        (["--vad", "maybe"], {}, "--vad 'maybe': use on or off"),
    ]
    procs = [start_bridge(bus_env, *args, extra_env=env) for args, env, _ in cases]
    for proc, (_, _, expected) in zip(procs, cases):
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("livepipe gemini-bridge: "), err


def test_vad_off_marks_activity_itself(live_factory):
    # With the service's activity detection off, the bridge brackets speech with activityStart/End.
    rig = live_factory(bridge_args=("--vad", "off", "--vad-silence-ms", "300"), emulator_args=("--pace", "0"))
    said = speech("What time is it")
    rig.say(np.concatenate([said, silence(0.6)]))
    assert_reply_is(rig.reply(1), said, 0.9)
    ends = [e for e in rig.emu.timeline() if e["event"] == "speech_end"]
    assert len(ends) == 1 and ends[0]["manual"] is True
