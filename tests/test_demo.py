"""`livepipe demo` end to end: real honcho, real processes, the emulator as the model, and the
reply WAV checked the way a listener would (replies there and intact, the interrupted one cut)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.demo_audio import ROOT, check_replies, read_wav

pytestmark = pytest.mark.timeout(120)


def clean_env(tmp_path: Path) -> dict[str, str]:
    """No API key (the emulator answers), no bus settings of the caller, a private state dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API", "PULSE_"))}
    env["LIVEPIPE_STATE_DIR"] = str(tmp_path / "state")
    return env


def assert_sane(summary: dict) -> None:
    assert summary["ok"], summary["error"]
    assert summary["backend"] == "emulator"
    assert summary["turns"] >= 2, summary
    assert summary["interrupts"] >= 1, summary
    assert summary["frames_sent"] >= 1, summary
    assert len(summary["voice_to_voice_ms"]) == summary["turns"]
    for ms in summary["voice_to_voice_ms"]:
        # the emulator waits 500 ms of silence + 300 ms think time: a reply cannot come sooner
        assert 500 < ms < 3000, summary["voice_to_voice_ms"]
    assert len(summary["interrupt_to_silence_ms"]) == summary["interrupts"]
    for ms in summary["interrupt_to_silence_ms"]:
        assert 0 <= ms < 250, summary["interrupt_to_silence_ms"]
    first, second = summary["turn_details"][:2]
    assert first["interrupted"] and not second["interrupted"]
    assert first["user"] and first["model"], "transcripts missing"
    # nothing outlives the demo; every process stopped cleanly when asked
    for name, pid in summary["processes"].items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, name
    assert summary["orphans_killed"] == []
    assert set(summary["exit_codes"]) >= {"broker", "emulator", "gemini-bridge", "capture-audio",
                                          "capture-video", "playback"}
    assert all(rc == 0 for rc in summary["exit_codes"].values()), summary["exit_codes"]


def check_demo_run(summary: dict, state_dir: Path) -> None:
    """What a listener checks after `livepipe demo --json`: the summary (assert_sane), and the reply
    WAV under the state dir holding the replies intact, the interrupted one cut, each as long as the
    summary says it was heard. The demo itself runs in tests/test_packaging.py
    (test_wheel_installed_elsewhere_runs_the_demo): from a wheel installed elsewhere, the way a user
    without a checkout runs it; one ~18 s run serves both checks."""
    assert_sane(summary)
    reply = Path(summary["reply_wav"])
    assert reply.is_relative_to(state_dir)
    heard, rate = read_wav(reply)
    segs = check_replies(heard, rate)
    # the summary says what the file holds: how long each reply was heard
    for seg, turn in zip(segs, summary["turn_details"]):
        assert abs(seg["seconds"] * 1000 - turn["played_ms"]) < 120, (segs, summary["turn_details"])


def test_demo_reports_a_refused_model_session_in_one_line(tmp_path: Path) -> None:
    """The model refuses the key (an emulator that demands another one): one clear line, exit 1,
    and honcho and every process are gone."""
    env = clean_env(tmp_path)
    env["LIVEPIPE_EMULATOR_API_KEY"] = "the-only-key-accepted"
    res = subprocess.run([sys.executable, "-m", "livepipe.services", "demo", "--json", "--timeout", "40"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stderr
    summary = json.loads(res.stdout)
    assert not summary["ok"] and "API key not valid" in summary["error"], summary["error"]
    failed = [line for line in res.stderr.splitlines() if "API key not valid" in line]
    assert len(failed) == 1 and failed[0].startswith("livepipe demo: the model session failed: "), res.stderr
    assert "Traceback" not in res.stderr
    assert summary["orphans_killed"] == []
    for pid in summary["processes"].values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_demo_rejects_a_user_file_that_is_not_audio(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not a wav file")
    res = subprocess.run([sys.executable, "-m", "livepipe.services", "demo", "--user-wav", str(bad)], cwd=ROOT,
                         env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"livepipe demo: {bad} is not a WAV file (no RIFF/WAVE header)"]
