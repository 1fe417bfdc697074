"""The gemini-bridge itself under the oldest google-genai the project allows (pyproject's floor; the
newest, installed here, drives every other bridge test): one line answered and one tool call through
the real bridge process, its emulator and broker, the bridge run by the old SDK's venv on this
checkout's code."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np

from tests.bridge_support import Live, assert_reply_is, silence, speech
from tests.conftest import ROOT
from tests.test_emulator_sdk_compat import OLD_SDK, old_sdk_python  # noqa: F401  (fixture: the floor's venv)


def test_bridge_under_the_oldest_supported_sdk_answers_and_calls_a_tool(old_sdk_python, bus_env, bus_cfg, tmp_path):
    # The venv sees the system's livepipe install, which may be another checkout: put this one first.
    shim = tmp_path / "shim"
    (shim / "livepipe").mkdir(parents=True)
    for folder in ("bus", "services", "launch"):
        (shim / "livepipe" / folder).symlink_to(ROOT / folder)
    # What a newer SDK field needs is one line before connecting, not a crash mid-session.
    r = subprocess.run([str(old_sdk_python), "-m", "livepipe.services", "gemini-bridge", "--backend", "emulator",
                        "--transcription-vocabulary", "Ilsenmoor"], env={**bus_env, "PYTHONPATH": str(shim)},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        ("livepipe gemini-bridge: --transcription-vocabulary needs google-genai >= 2.13 (AudioTranscriptionConfig."
         "custom_vocabulary): pip install -U google-genai")], r.stderr
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "look_up", "description": "search the archive"}]))
    rig = Live(bus_env, bus_cfg, emulator_args=("--pace", "0", "--tool-trigger", "2.5"),
               bridge_args=("--tools", str(tools)), bridge_env={"PYTHONPATH": str(shim)},
               bridge_python=str(old_sdk_python))
    try:
        hello = speech("Hello there, how are you")
        rig.say(np.concatenate([hello, silence(0.8)]))
        assert_reply_is(rig.reply(1), hello)
        rig.say(np.concatenate([speech("Please look this up for me, and tell me what you find out about it."),
                                silence(0.8)]))
        call = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.call" and m.kind == "call"], 15,
                             "tool.call")[0]
        assert call["name"] == "look_up" and call["args"]["utterance"] == 2
        rig.pub.publish("tool.result", "result", id=call["id"], name="look_up", response={"found": "it"})
        rig.reply(2)
        said = {(m["role"], m["turn"]): m["text"] for m in rig.rec.select("transcript", "transcript")}
        assert re.match(r"^utterance 1: \d\.\d\d s$", said[("user", 1)]) and said[("model", 1)].startswith("reply 1: ")
        assert said[("model", 2)].endswith(", after tool look_up")
        start = rig.emu.events("session_start")[0]
        assert start["sdk"].startswith(OLD_SDK + ".") and start["generation"] == 3   # the default model
    finally:
        _, err = rig.close()
    assert rig.bridge.returncode == 0 and "Traceback" not in err, err[-2000:]
