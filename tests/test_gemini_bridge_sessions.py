"""End-to-end: long sessions. goAway switchovers and dropped connections lose no user audio."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from tests.bridge_support import (best_correlation, live_factory, reply_audio, silence, speech,  # noqa: F401
                                  upsample, wait_for)

UTTERANCES = ["Hello there, how are you", "What time is it", "Tell me a story about a cat"]


def conversation(gap_s: float = 1.2) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """The utterances with silence between them: (pcm, [(start, voiced end, words)]). The gap leaves
    room for the reply (0.5 s end-of-speech silence + latency + reply at --pace 4), so nobody barges in."""
    parts, spans, pos = [], [], 0
    for text in UTTERANCES:
        words = speech(text)
        parts += [words, silence(gap_s)]
        spans.append((pos, pos + len(words), words))
        pos += len(words) + int(gap_s * 16000)
    return np.concatenate(parts), spans


def full_replies(rig, spans, cut: bool = False) -> dict[int, tuple[int, ...]]:
    """For each utterance, the turn whose reply is all of it (correlation >= 0.95, full length). With
    `cut`, also a turn a lost connection cut and the next one, together: the resumed session answers
    the utterance again from its start, and the bridge publishes only what follows the cut
    (test_bridge_cut_reply.py), so the two turns' audio is the whole reply, nothing missing or twice."""
    turns = sorted({m["turn"] for m in rig.rec.select("audio.out")})
    audio = {t: reply_audio(rig.rec, t) for t in turns}
    candidates = [(t,) for t in turns] + ([(t, u) for t, u in zip(turns, turns[1:]) if u == t + 1] if cut else [])
    found: dict[int, tuple[int, ...]] = {}
    for i, (_, _, words) in enumerate(spans):
        ref = upsample(words)
        for c in candidates:
            reply = np.concatenate([audio[t] for t in c])
            if len(reply) < 0.7 * len(ref):   # the parrot trims the words' trailing silence
                continue
            corr, _ = best_correlation(reply, ref)
            if corr >= 0.95:
                found[i] = c
                break
    return found


def test_goaway_switchover_loses_no_audio(live_factory):
    # Every connection gets a goAway 1 s after setup (3 s left): several switchovers while the user
    # speaks in real time, some of them mid-utterance and some while the model replies.
    rig = live_factory(emulator_args=("--goaway-after", "1.0", "--goaway-grace", "3", "--pace", "4"))
    pcm, spans = conversation()
    rig.say(pcm, pace=1.0)
    rig.rec.until(lambda ms: len(full_replies(rig, spans)) == len(spans), 15, "a full reply to every utterance")

    found = full_replies(rig, spans)
    assert sorted(found) == [0, 1, 2] and len(set(found.values())) == 3
    timeline = rig.emu.timeline()
    starts = [e for e in timeline if e["event"] == "session_start"]
    assert len(starts) >= 3 and all(e["resumed"] for e in starts[1:])
    assert len({e["session"] for e in starts}) == 1                    # one conversation throughout
    assert len(rig.rec.select("control", "go_away")) >= 2
    # A lost chunk inside an utterance would shift the rest of its reply: the whole-reply correlation
    # above (>= 0.95) proves each reached the model complete, whichever connection carried it.
    metrics = wait_for(lambda: (m := rig.metrics()) and m.get("switch_audio_gap_ms") is not None and m, 5,
                       "switchover metrics")
    assert metrics["audio_in_dropped_ms"] == 0
    out, err = rig.close()
    gaps = [float(g) for g in re.findall(r"resumed on connection \d+: ([\d.]+) ms after", err)]
    assert len(gaps) >= 2
    report = {"switchovers": len(starts) - 1, "audio_gap_ms": sorted(gaps),
              "audio_gap_ms_median": float(np.median(gaps)), "audio_gap_ms_max": max(gaps),
              "replayed_ms": metrics.get("audio_in_replayed_ms", 0)}
    print("GOAWAY", json.dumps(report))
    if os.environ.get("LIVEPIPE_BRIDGE_REPORT"):
        with open(os.environ["LIVEPIPE_BRIDGE_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")
    assert rig.bridge.returncode == 0 and "Traceback" not in err


def test_dropped_connection_reconnects_and_resumes(live_factory):
    # The bridge starts first and waits for the emulator; then every connection drops (1011) after
    # 1.2 s: it reconnects with the resumption handle and the conversation goes on, nothing lost.
    # Where the drops fall in a reply depends on how long each reconnection took: a reply may be cut
    # and continued in the next turn (full_replies `cut`).
    rig = live_factory(emulator_args=("--drop-after", "1.2", "--pace", "4"), bridge_first=True)
    pcm, spans = conversation()
    rig.say(pcm, pace=1.0)
    rig.rec.until(lambda ms: len(full_replies(rig, spans, cut=True)) == len(spans), 15,
                  "a full reply to every utterance")
    found = full_replies(rig, spans, cut=True)
    assert len({c[0] for c in found.values()}) == 3 and sorted(found.values()) == list(found.values())
    states = [m["state"] for m in rig.rec.select("control", "session")]
    assert states[0] == "connecting" and "reconnecting" in states
    after = states[states.index("reconnecting"):]
    assert "resuming" in after and "connected" in after
    timeline = rig.emu.timeline()
    assert len([e for e in timeline if e["event"] == "drop"]) >= 2
    starts = [e for e in timeline if e["event"] == "session_start"]
    assert all(e["resumed"] for e in starts[1:]) and len({e["session"] for e in starts}) == 1
    metrics = wait_for(lambda: (m := rig.metrics()) and m.get("reconnects", 0) >= 2 and m, 5, "reconnect metrics")
    assert metrics["audio_in_dropped_ms"] == 0
    out, err = rig.close()
    assert rig.bridge.returncode == 0 and "Traceback" not in err
    assert "waiting for the emulator" in err and "connection 1 lost (connection closed 1011" in err
    for c in found.values():   # a reply in two turns: the first was cut, and its repeat was not published
        assert len(c) == 1 or re.search(rf"repeated \d+ ms of turn {c[0]}, cut by the lost connection", err), err


SLOW_TOOL = r"""
import time
from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
with BusClient("tool-slow", BusConfig.from_env(), ["tool.call"]) as c:
    c.wait_ready()
    print("ready", flush=True)
    m = c.recv(30)
    time.sleep(1.5)   # a slow tool: its answer comes after the connection's goAway
    c.publish("tool.result", "result", id=m["id"], name=m["name"], response={"ok": True})
    print("answered", m["id"], flush=True)
"""


def test_goaway_while_a_tool_call_is_pending(live_factory, tmp_path, bus_env):
    # goAway as the tool call goes out, while the model waits for a slow tool: the answer still reaches
    # the model that asked, it finishes its turn there, and only then the bridge switches over.
    import subprocess
    import sys

    from tests.conftest import ROOT
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"function_declarations": [{"name": "lookup", "description": "slow lookup"}]}))
    rig = live_factory(emulator_args=("--goaway-at-tool-call", "--goaway-grace", "3", "--tool-trigger", "1.0",
                                      "--pace", "0"),
                       bridge_args=("--tools", str(tools)))
    tool = subprocess.Popen([sys.executable, "-c", SLOW_TOOL], env=bus_env, cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert tool.stdout.readline().strip() == "ready"
        said = speech("Hello there, how are you")
        rig.say(np.concatenate([said, silence(0.7)]))
        rig.rec.until(lambda ms: any(m.topic == "control" and m.kind == "turn_complete" for m in ms), 10,
                      "the turn to complete")
        assert "answered" in tool.communicate(timeout=10)[0]
    finally:
        if tool.poll() is None:
            tool.kill()
    # ...and then switches: connected again after the goAway.
    rig.rec.until(lambda ms: [m.get("state") for m in ms if m.topic == "control" and m.kind in ("go_away", "session")]
                  [-2:] == ["resuming", "connected"], 10, "the switchover")
    reply = rig.reply(1)
    corr, _ = best_correlation(reply, upsample(said))
    assert corr >= 0.95 and len(reply) > 0.7 * len(upsample(said))
    events = [(e["event"], e["conn"]) for e in rig.emu.timeline()]
    assert ("goaway", 1) in events and ("tool_response", 1) in events and ("turn_complete", 1) in events
    assert events.index(("goaway", 1)) < events.index(("tool_response", 1))
    assert wait_for(lambda: ("session_start", 2) in [(e["event"], e["conn"]) for e in rig.emu.timeline()], 5,
                    "the second connection in the emulator timeline")


def test_a_stalled_server_is_noticed_and_nothing_said_is_lost(live_factory):
    # The emulator freezes (SIGSTOP) from the user's first words until the user has said everything
    # (about 6 s: the second and third utterances go into the frozen connection), without closing
    # anything, as a hung server or a dead network path would. The bridge notices within its
    # --silent-server-s bound, reconnects with the handle once the server answers again, and every utterance,
    # including those spoken into the frozen connection, gets its whole reply.
    import signal
    import threading
    import time

    rig = live_factory(emulator_args=("--pace", "4"), bridge_args=("--silent-server-s", "2",
                                                                   "--connect-timeout", "30"))
    pcm, spans = conversation()
    speaker = threading.Thread(target=rig.say, args=(pcm,), kwargs={"pace": 1.0}, daemon=True)
    speaker.start()
    wait_for(lambda: rig.rec.pump() or rig.rec.select("transcript"), 10, "the first words to reach the model")
    os.kill(rig.emu.proc.pid, signal.SIGSTOP)
    stalled_at = time.monotonic()
    try:
        def reconnecting() -> bool:
            rig.rec.pump()
            return any(m["state"] == "reconnecting" for m in rig.rec.select("control", "session"))
        wait_for(reconnecting, 7, "the bridge to notice the silent server")
        noticed_s = time.monotonic() - stalled_at
        speaker.join(20)   # the stall lasts until the last word was spoken into it
        assert not speaker.is_alive()
    finally:
        os.kill(rig.emu.proc.pid, signal.SIGCONT)
    speaker.join(20)
    # Every utterance reached the model whole: the emulator heard a speech segment as long as each one
    # (its VAD trims up to ~0.3 s of the words' own leading and trailing silence). Replies may overlap
    # the re-sent speech, as they would with a real model, so they are not what is checked here.
    def heard_every_utterance() -> bool:
        heard = [e["seconds"] for e in rig.emu.events("speech_end")]
        return all(any(len(words) / 16000 - 0.35 <= d <= len(words) / 16000 for d in heard)
                   for _, _, words in spans)
    wait_for(heard_every_utterance, 30, "the model to hear every utterance whole")
    metrics = wait_for(lambda: (m := rig.metrics()) and m.get("silent_server_detected", 0) >= 1 and m, 5,
                       "the silent-server counter")
    print(f"STALL noticed after {noticed_s:.2f} s (bound 2 s + one ping period)")
    assert noticed_s < 2.0 + 0.7 + 1.5   # the bound, one ping period, and slack for a loaded machine
    assert metrics["audio_in_dropped_ms"] == 0
    out, err = rig.close()
    assert "answered no ping for 2 s" in err and "Traceback" not in err
