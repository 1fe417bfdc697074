"""Faults a tester would try (issue 15): restarted processes, forged or hostile input, one
process down. Real processes on a real broker; no sound card needed (playback --null).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import msgpack
import numpy as np
import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import encode, make_header
from livepipe.bus.topics import TOPICS
from livepipe.services.lib.audio import OUT_RATE, tone
from livepipe.services.lib.conversation import join_pieces
from livepipe.services.lib.jpeg import ImageRejected, check_image
from tests.bridge_support import Emulator, Recorder, live_factory, start_bridge  # noqa: F401
from tests.conftest import ROOT, free_port, spawn, stop
from tests.playback_burst import publish_turn, start_playback, wait_event


@pytest.fixture
def listener(bus_cfg: BusConfig) -> Iterator[BusClient]:
    with BusClient("test", bus_cfg, ["playback", "status"]) as c:
        c.wait_ready()
        yield c


def metrics_of(client: BusClient, src: str, timeout: float = 5.0) -> dict:
    return client.wait_for("status", "heartbeat", timeout, src=src)["metrics"]


def playback_metrics(client: BusClient, timeout: float = 5.0) -> dict:
    return metrics_of(client, "playback", timeout)


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
    # `transcript` keeps the conversation: the restarted bridge's session starts with it (issue 16).
    keeper = spawn(["transcript", "--no-meter"], bus_env)
    try:
        assert keeper.stdout.readline().startswith("waiting for")     # on the bus
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
        said = []   # what was typed, and each turn's reply: the conversation the new session starts with
        for turn in (1, 2):
            said += [f"hello {turn}", join_pieces([m["text"] for m in rig.rec.messages[:n_before] if m.topic ==
                                                   "transcript" and m["role"] == "model" and m["turn"] == turn])]
        seeded = rig.emu.events("history")
        assert len(seeded) == 1 and seeded[0]["texts"] == said, (seeded, said)
    finally:
        stop(player)
        stop(keeper)


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
    # A frame cut short decodes to nothing: refused (counted), not sent.
    rig.pub.publish("video.in", "image", frame.tobytes()[:len(frame) // 2], image_width=640, image_height=480,
                    mime="image/jpeg")
    rig.rec.until(lambda ms: any(m.topic == "status" and m["src"] == "gemini-bridge"
                                 and m["metrics"].get("video_frames_rejected") == 2 for m in ms),
                  15, "the bridge to refuse the cut frame")
    assert rig.metrics()["video_frames_sent"] == 1
    out, err = rig.close()
    assert err.count("20000x20000") == 1, err


# ---------------------------------------------------------------- 3. supervision
def launch_lines() -> dict[str, str]:
    """launch/Procfile as a user runs it, minus what needs a sound card: the microphone is replaced
    by text.in from the test, the speaker by `playback --null`. The camera is missing."""
    from honcho.environ import parse_procfile
    lines = dict(parse_procfile((ROOT / "launch" / "Procfile").read_text()).processes)
    del lines["capture-audio"]
    assert lines["playback"].endswith("livepipe playback"), lines["playback"]
    lines["playback"] += " --null"
    return lines


def beat(rec: Recorder, src: str, timeout: float, not_pid: int | None = None, **metrics: object) -> dict:
    """The first heartbeat of `src` (from a process other than `not_pid`) whose metrics match."""
    def found(msgs: list) -> dict | None:
        for m in msgs:
            if (m.topic == "status" and m["src"] == src and m.get("pid") != not_pid
                    and all(m["metrics"].get(k) == v for k, v in metrics.items())):
                return m.header
        return None
    return rec.until(found, timeout, f"a heartbeat of {src} {metrics} (pid != {not_pid})")


def playback_event(rec: Recorder, kind: str, turn: int, after: int, timeout: float = 15) -> dict:
    return rec.until(lambda ms: next((m.header for m in ms[after:] if m.topic == "playback" and m.kind == kind
                                      and m["turn"] == turn), None), timeout, f"playback {kind} {turn}")


def connected(rec: Recorder, after: int, timeout: float = 30) -> None:
    rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and m["state"] == "connected"
                             for m in ms[after:]), timeout, "the bridge to connect")


def test_under_honcho_a_killed_process_comes_back_and_a_missing_camera_ends_nothing(tmp_path):
    pub, sub = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API"))}
    env.update(LIVEPIPE_PUB_BIND=f"tcp://127.0.0.1:{pub}", LIVEPIPE_SUB_BIND=f"tcp://127.0.0.1:{sub}",
               LIVEPIPE_PUB_ENDPOINT=f"tcp://127.0.0.1:{pub}", LIVEPIPE_SUB_ENDPOINT=f"tcp://127.0.0.1:{sub}",
               LIVEPIPE_STATE_DIR=str(tmp_path / "state"), LIVEPIPE_EMULATOR_PORT="0",
               LIVEPIPE_VIDEO_SOURCE="7", PYTHONUNBUFFERED="1")
    procfile = tmp_path / "Procfile"
    procfile.write_text("".join(f"{name}: {cmd}\n" for name, cmd in launch_lines().items()))
    log_path = tmp_path / "honcho.log"
    with open(log_path, "w") as log_file:
        honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start", "--no-colour", "-f", str(procfile)],
                                  cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        rec = Recorder(BusConfig.from_env(env), all_topics=True)
        try:
            # No camera: one line, a heartbeat that says so, and the others keep running.
            video = beat(rec, "capture-video", 20, source_state="no_camera")
            beat(rec, "playback", 20)
            connected(rec, 0)
            rec.client.wait_subscriber("text.in")
            mark = len(rec.messages)
            rec.client.publish("text.in", "text", text="first")
            playback_event(rec, "turn_finished", 1, mark)

            # capture-video killed: it comes back (still without a camera), nothing else stops.
            os.kill(video["pid"], signal.SIGKILL)
            beat(rec, "capture-video", 20, not_pid=video["pid"], source_state="no_camera")

            # The bridge killed: it comes back and the conversation goes on, heard from its first reply.
            bridge = beat(rec, "gemini-bridge", 10)
            os.kill(bridge["pid"], signal.SIGKILL)
            mark = len(rec.messages)
            connected(rec, mark)
            rec.client.publish("text.in", "text", text="second")
            playback_event(rec, "turn_started", 1, mark)
            finished = playback_event(rec, "turn_finished", 1, mark)
            assert finished["played_ms"] > 100 and not finished["interrupted"]
            assert honcho.poll() is None
        finally:
            rec.close()
    finally:
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(20)
    out = log_path.read_text()
    assert out.count("continuing without video (set LIVEPIPE_VIDEO_SOURCE=test or screen)") == 2, out  # once per start
    assert out.count("capture-video killed by SIGKILL") == 1 and out.count("gemini-bridge killed by SIGKILL") == 1, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("source, line", [("7", "camera 7: cannot open"),
                                          ("/dev/video77", "camera /dev/video77: no such device")])
def test_a_missing_camera_is_a_conversation_without_video_said_once(bus_env, listener, source, line):
    proc = spawn(["capture-video", source], bus_env)
    try:
        deadline = time.monotonic() + 20
        while True:
            metrics = metrics_of(listener, "capture-video")
            if metrics.get("source_state") == "no_camera":
                break
            assert time.monotonic() < deadline and proc.poll() is None, metrics
        for _ in range(3):   # it stays up, saying nothing more
            assert metrics_of(listener, "capture-video").get("source_state") == "no_camera"
        assert proc.poll() is None
    finally:
        out, err = stop(proc)
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if "capture-video" in ln and ("WARNING" in ln or "ERROR" in ln)]
    assert lines == [f"capture-video: WARNING {line} (no such camera, or in use by another program): continuing "
                     "without video (set LIVEPIPE_VIDEO_SOURCE=test or screen)"] if source == "7" else \
        len(lines) == 1 and line in lines[0] and "continuing without video" in lines[0], err


def test_supervise_policy_restarts_gives_up_and_passes_signals_on(tmp_path):
    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "livepipe.services", "supervise", *args], capture_output=True,
                              text=True, timeout=timeout)
    # A crash is restarted, with a counted line each time, until the limit; then its code is passed on.
    res = run("--max-restarts", "2", "--backoff", "0", "--", "sh", "-c", "echo run >&2; exit 3")
    assert res.returncode == 3 and res.stderr.count("run") == 3, res.stderr
    assert res.stderr.count("restarting in") == 2 and "2 restarts within 30 s each; giving up" in res.stderr
    # A usage or configuration error (exit 2) is not restarted, nor a clean exit 0 (on-failure).
    res = run("--", "sh", "-c", "echo run >&2; exit 2")
    assert res.returncode == 2 and res.stderr.count("run") == 1 and "not restarted" in res.stderr, res.stderr
    res = run("--", "sh", "-c", "exit 0")
    assert res.returncode == 0 and res.stderr == ""
    # A process that ends by itself after a while, then succeeds: restarted once.
    marker = tmp_path / "ran"
    res = run("--backoff", "0", "--", "sh", "-c", f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; kill -9 $$")
    assert res.returncode == 0 and "sh killed by SIGKILL" in res.stderr, res.stderr
    # SIGTERM to supervise reaches the process; supervise exits with its code, no restart.
    proc = subprocess.Popen([sys.executable, "-m", "livepipe.services", "supervise", "--", "sh", "-c",
                             f"trap 'exit 0' TERM; touch {tmp_path / 'up'}; while :; do sleep 0.05; done"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while not (tmp_path / "up").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)   # the child creates the file within milliseconds
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "restarting" not in err, err


# ---------------------------------------------------------------- 6. bad input side effects
def test_random_topics_and_single_frames_are_counted_and_said_in_few_lines(bus_env, bus_cfg, listener):
    proc = start_playback(["--null"], bus_env, listener)
    sender = BusClient("garbage", bus_cfg)
    header = msgpack.packb({"v": 1, "kind": "interrupt", "src": "x", "inst": "x", "seq": 0, "ts": 0, "turn": 1})
    try:
        metrics_of(listener, "playback", 15)
        sender.wait_ready()
        for _ in range(1000):   # topics with random suffixes (playback subscribes to the prefix "control")
            sender.send_raw([f"control.{os.urandom(6).hex()}".encode(), header])
        for _ in range(100):    # single-frame messages
            sender.send_raw([b"control"])
        deadline = time.monotonic() + 15
        while True:
            beat = listener.wait_for("status", "heartbeat", 5, src="playback")
            if beat["counters"]["rejected"] >= 1100:
                break
            assert time.monotonic() < deadline, beat["counters"]
        assert beat["counters"]["rejected"] == 1100
    finally:
        sender.close()
        out, err = stop(proc)
    rejected_lines = [ln for ln in err.splitlines() if "rejected a message" in ln]
    assert 1 <= len(rejected_lines) <= 2, err[:3000]     # one per declared topic, one for all others


def test_tap_stats_keeps_one_row_for_undeclared_topics(bus_env, bus_cfg):
    # --seconds 20 only bounds a hung tap: it is stopped once a refresh has counted all 500.
    tap = spawn(["tap", "--stats", "--json", "--interval", "0.2", "--seconds", "20"], bus_env)
    sender = BusClient("garbage", bus_cfg)
    rows: list[dict] = []
    try:
        assert "listening to" in tap.stderr.readline()
        sender.wait_ready()
        for _ in range(500):
            sender.send_raw([f"x.{os.urandom(6).hex()}".encode(), b"\x80"])
        while not rows or rows[-1]["topics"].get("(undeclared topics)", {}).get("rejected", 0) < 500:
            line = tap.stdout.readline()
            assert line, f"tap ended before counting 500 rejected messages: {rows[-1:]}"
            rows.append(json.loads(line))
    finally:
        sender.close()
        out, err = stop(tap)
    rows += [json.loads(line) for line in out.strip().splitlines()]   # its last refresh, on SIGTERM
    last = rows[-1]
    assert set(last["topics"]) <= set(TOPICS) | {"(undeclared topics)"}, list(last["topics"])[:10]
    assert last["topics"]["(undeclared topics)"]["rejected"] == 500


def test_a_50_mb_control_message_never_reaches_a_service(bus_env, bus_cfg, listener):
    proc = start_playback(["--null"], bus_env, listener)
    sender = BusClient("garbage", bus_cfg)
    try:
        metrics_of(listener, "playback", 15)
        sender.wait_ready()
        before = peak_rss_bytes(proc.pid)
        header = msgpack.packb({"v": 1, "kind": "mute", "src": "x", "inst": "x", "seq": 0, "ts": 0})
        sender.send_raw([b"control", header, bytes(50 * 1024 * 1024)])
        sender.send_raw([b"control", b"\xc1"])    # a small bad message after it
        deadline = time.monotonic() + 15
        while True:
            beat = listener.wait_for("status", "heartbeat", 5, src="playback")
            if beat["counters"]["rejected"] >= 1:
                break
            assert time.monotonic() < deadline, beat["counters"]
        # Only the small one was received: the big one never reached the service.
        assert beat["counters"]["rejected"] == 1
        assert peak_rss_bytes(proc.pid) - before < 20e6
        # And the sender still publishes: the next message from it arrives.
        sender.send_raw([b"control", b"\xc1"])
        while beat["counters"]["rejected"] < 2:
            assert time.monotonic() < deadline, beat["counters"]
            beat = listener.wait_for("status", "heartbeat", 5, src="playback")
    finally:
        sender.close()
        stop(proc)


# ---------------------------------------------------------------- 5. restarts lose records
def test_a_stale_emulator_json_is_not_dialled(bus_env, bus_cfg, tmp_path):
    first = Emulator(bus_env, "--latency", "0.05")
    info = dict(first.info)
    first.proc.send_signal(signal.SIGKILL)     # killed: its emulator.json stays behind
    first.proc.wait(5)
    info_path = Path(bus_env["LIVEPIPE_STATE_DIR"]) / "emulator" / "emulator.json"
    assert json.loads(info_path.read_text())["pid"] == info["pid"]
    rec = Recorder(bus_cfg, ["control", "status"])
    bridge = start_bridge(bus_env, "--backend", "emulator")
    emu = None
    try:
        rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and m.get("detail") ==
                                 "waiting for the emulator" for m in ms), 20, "the bridge to wait for an emulator")
        emu = Emulator(bus_env, "--latency", "0.05")
        rec.until(lambda ms: any(m.topic == "control" and m.kind == "session" and m["state"] == "connected"
                                 for m in ms), 20, "the bridge to connect to the new emulator")
    finally:
        out, err = stop(bridge)
        if emu is not None:
            emu.stop()
        rec.close()
    assert err.count("is stale (process %d is gone)" % info["pid"]) == 1, err
    assert "cannot connect" not in err, err


def _restart_emulator(rig, bus_env, *args: str) -> int:
    """SIGKILL the rig's emulator (its sessions are lost) and start a new one; returns where the new
    one's lines begin in the shared timeline."""
    rig.emu.proc.send_signal(signal.SIGKILL)
    rig.emu.proc.wait(5)
    start = len(rig.emu.timeline())
    rig.emu = Emulator(bus_env, "--latency", "0.05", *args)
    return start


def test_a_fresh_session_after_an_emulator_restart_hears_what_was_not_answered_and_only_that(
        live_factory, bus_env):  # noqa: F811
    """Each emulator restart loses its sessions, so the bridge's resumption is refused and a fresh
    session starts: it must not be sent a line the model already answered (it would answer it
    twice), and it must get whole a line said but not answered yet, even one a handle had covered;
    it starts with the conversation so far as its history."""
    from tests.bridge_support import assert_reply_is, silence, speech, turn_completed
    a, c = speech("Good morning"), speech("What is the weather like today")
    b = speech("Please tell me a long story about a cat and a dog")
    rig = live_factory(emulator_args=("--pace", "0"), bridge_args=("--barge-in", "off", "--stream-end-after", "0"))
    # A, published faster than real time (a replayed file, a flushed buffer) and answered at once.
    rig.say(np.concatenate([a, silence(0.8)]))
    rig.reply(1)
    mark = _restart_emulator(rig, bus_env, "--pace", "0", "--latency", "1.0")
    rig.rec.until(lambda ms: sum(m.topic == "control" and m.kind == "session" and m["state"] == "connected"
                                 for m in ms) >= 2, 20, "a fresh session on the new emulator")
    # C answered (after 1 s) while B is being said: the handle after C's reply covers B's start.
    rig.say(np.concatenate([c, silence(0.8)]))
    rig.say(b, pace=1.0)
    rig.rec.until(turn_completed(2), 10, "the reply to C")
    heard2 = [e["seconds"] for e in rig.emu.timeline()[mark:] if e["event"] == "speech_end"]
    seeded2 = [e["texts"] for e in rig.emu.timeline()[mark:] if e["event"] == "history"]
    mark = _restart_emulator(rig, bus_env, "--pace", "0")
    rig.say(silence(0.8))      # B ends: the next session closes it
    rig.rec.until(turn_completed(3), 20, "a reply on the third emulator")
    heard3 = [e["seconds"] for e in rig.emu.timeline()[mark:] if e["event"] == "speech_end"]
    seeded3 = [e["texts"] for e in rig.emu.timeline()[mark:] if e["event"] == "history"]
    print("FRESH-SESSION", {"session2_utterances_s": heard2, "session3_utterances_s": heard3})
    assert len(heard2) == 1, f"the second session heard {heard2} (A again, then C?)"
    assert len(heard3) == 1, f"the third session heard {heard3}"
    assert_reply_is(rig.reply(3), b)
    voiced = np.flatnonzero(np.abs(b) > 300)
    assert heard3[0] >= 0.9 * (voiced[-1] - voiced[0]) / 16000, f"B reached it cut: {heard3[0]} s"
    # Not amnesia either (issue 16): each fresh session starts with the conversation so far as its
    # history, the words the bus showed for the answered turns (B, not answered, is heard instead).
    said = [m["text"] for t in (1, 2) for role in ("user", "model")
            for m in rig.rec.select("transcript", "transcript", turn=t, role=role)]
    assert seeded2 == [said[:2]] and seeded3 == [said], (seeded2, seeded3, said)
    out, err = rig.close()
    assert "sending again" in err and "fresh session" in err, err


def test_a_restarted_file_playback_continues_the_record(bus_env, listener, tmp_path):
    from livepipe.services.lib.audio import WavReader, dominant_frequency
    from tests.pulse_support import loud_spans
    path = tmp_path / "heard.wav"
    for freq in (440.0, 880.0):
        proc = start_playback(["--file", str(path)], bus_env, listener)
        try:
            metrics_of(listener, "playback", 15)
            publish_turn(listener, 1, tone(freq, 0.3, OUT_RATE, -12.0))
            listener.publish("control", "turn_complete", turn=1)
            wait_event(listener, "turn_finished", 1)
            for _ in range(2):     # two heartbeats: the writer has flushed since the turn ended
                metrics_of(listener, "playback")
        finally:
            if freq == 440.0:
                proc.send_signal(signal.SIGKILL)   # a crash: the file must survive the restart
                proc.wait(5)
            else:
                _, err = stop(proc)
                assert "exists: appending" in err, err
    with WavReader(path) as r:
        heard = (r.read(r.frames)[:, 0] * 32768).astype(np.int16)
    spans = loud_spans(heard, OUT_RATE, min_gap_ms=100)
    assert len(spans) == 2, spans
    assert [round(dominant_frequency(heard[a:b], OUT_RATE)) for a, b in spans] == [440, 880]


def test_a_stalled_playback_resumes_with_the_audio_due_now_not_the_backlog(bus_env, listener, tmp_path):
    """Playback SIGSTOPped for 3 s in the middle of a 6.5 s reply (streamed in well ahead, as the
    model does): after SIGCONT the listener hears the part of the reply due at that wall time,
    the stale part is skipped, counted and said in one line. (The reply is 1 s heard + the 3 s
    stall + 2.5 s due after it: enough to find where playing resumed, no longer to play out.)"""
    from livepipe.services.lib.audio import WavReader
    path = tmp_path / "heard.wav"
    rng = np.random.default_rng(15)
    sent = np.clip(rng.normal(0, 3000, OUT_RATE * 13 // 2), -32000, 32000).astype(np.int16)   # every window unique
    proc = start_playback(["--file", str(path)], bus_env, listener)
    try:
        publish_turn(listener, 1, sent)
        listener.publish("control", "turn_complete", turn=1)
        started = wait_event(listener, "turn_started", 1)
        while time.time_ns() < started["first_sample_ts"] + 1_000_000_000:   # 1 s of it heard
            listener.recv(0.02)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)     # the stall itself
        proc.send_signal(signal.SIGCONT)
        wait_event(listener, "turn_finished", 1)
        deadline = time.monotonic() + 5
        m = metrics_of(listener, "playback")
        while m.get("stale_ms", 0) == 0 and time.monotonic() < deadline:   # the next heartbeat counts it
            m = metrics_of(listener, "playback")
    finally:
        _, err = stop(proc)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert m["stale_ms"] > 1000 and m["stale_skips"] == 1 and m["audio_dropped"] >= 1, m
    assert err.count("stale audio") == 1, err
    with WavReader(path) as r:
        heard = (r.read(r.frames)[:, 0] * 32768).astype(np.int16)
    o1 = int(np.flatnonzero(heard)[0])
    assert np.array_equal(heard[o1:o1 + 4800], sent[:4800])
    # The stall is silence in the file (what a listener heard), then the reply resumes...
    zero = np.flatnonzero(heard[o1:] == 0)
    runs = np.split(zero, np.flatnonzero(np.diff(zero) != 1) + 1)
    stall = max(runs, key=len)
    assert len(stall) > 2.5 * OUT_RATE, len(stall)
    resume = o1 + int(stall[-1]) + 1
    window = heard[resume:resume + 480]
    at = [int(i) for i in np.flatnonzero(sent == window[0]) if np.array_equal(sent[i:i + 480], window)]
    assert len(at) == 1, at
    # ...with the samples due at that wall time (the file runs on the wall clock), not where it stopped.
    due = resume - o1
    assert abs(at[0] - due) <= 3 * 480, (at[0], due)
    stopped_at = o1 + int(stall[0])
    assert at[0] - (stopped_at - o1) > 2 * OUT_RATE
