"""`livepipe demo --devices` through a real audio stack: PulseAudio null sinks as the sound card.

The test is the user: once the demo says it is ready, it plays the user's speech into the virtual
microphone, and it records the speaker's monitor, which must hold the replies: the first cut short
by the barge-in, the second whole, both the user's words played back (the emulator parrots).
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from tests.demo_audio import OUT_RATE, ROOT, USER_WAV, check_replies
from tests.pulse_support import play_into_mic, pulse, pulse_devices, record_speaker  # noqa: F401
from tests.test_demo import clean_env

pytestmark = [pytest.mark.timeout(120), pytest.mark.solo]   # solo (tests/conftest.py): a whole conversation heard


def test_demo_on_real_devices_is_heard_on_the_speaker(tmp_path: Path, pulse_devices) -> None:
    env = clean_env(tmp_path)
    env.update(pulse_devices.playback_env())
    env.update(pulse_devices.capture_env())          # PULSE_SINK = our speaker, PULSE_SOURCE = our microphone
    # No acoustic path from speaker to microphone here, and the replies are compared sample by sample
    # with what was said: the echo canceller would reshape the barge-in spoken over the model
    # (tests/test_echo.py covers it, with a room).
    env["LIVEPIPE_ECHO"] = "off"
    with record_speaker(pulse_devices, OUT_RATE) as rec:
        demo = subprocess.Popen([sys.executable, "-m", "livepipe.services", "demo", "--devices", "--json", "--timeout", "80"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue[str] = queue.Queue()
        stderr: list[str] = []

        def read_stderr() -> None:
            for line in demo.stderr:
                stderr.append(line)
                lines.put(line)
            lines.put("")   # EOF

        threading.Thread(target=read_stderr, daemon=True).start()
        try:
            while True:   # the demo says when its microphone is live
                line = lines.get(timeout=60)
                assert line, f"the demo ended before it was ready: {''.join(stderr)}"
                if "ready: speak now" in line:
                    break
            play_into_mic(pulse_devices, USER_WAV)     # the user speaks
            out, _ = demo.communicate(timeout=60)
        finally:
            if demo.poll() is None:
                demo.terminate()
                demo.wait(15)
        heard = rec.stop()
    assert demo.returncode == 0, "".join(stderr)
    summary = json.loads(out)
    assert summary["ok"], summary["error"]
    assert summary["turns"] >= 2 and summary["interrupts"] >= 1 and summary["frames_sent"] >= 1, summary
    assert summary["reply_wav"] is None
    assert all(500 < ms < 3000 for ms in summary["voice_to_voice_ms"]), summary["voice_to_voice_ms"]
    assert all(0 <= ms < 250 for ms in summary["interrupt_to_silence_ms"]), summary["interrupt_to_silence_ms"]
    assert summary["orphans_killed"] == [] and all(rc == 0 for rc in summary["exit_codes"].values())
    for pid in summary["processes"].values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    check_replies(heard, OUT_RATE, exact=False)
    # As it happens, the user reads each turn, with the same lines as `livepipe transcript`.
    said = "".join(stderr)
    for line in ("turn 1  user:  utterance 1", "turn 1  model: reply 1", "turn 1  interrupted (the user spoke over",
                 "turn 2  user:  utterance 2", "turn 2  model: reply 2"):
        assert "\n" + line in said, said
