"""The emulator against the oldest google-genai the project allows (pyproject's floor, >=1.30).

The newest (the installed 3.x) drives every test in test_emulator.py. google-genai 1.30 differs
where it matters: camelCase nested keys (mimeType), v1beta by default, websockets 15. It runs in a
venv under /tmp (made once, then reused across runs) that sees this interpreter's other packages.
The venv is built offline from wheels `launch/install.sh --test` downloads into
~/.cache/livepipe/google-genai-<floor>/: a test never reaches for the network, and skips with one
line when the wheels are not there.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.emulator_support import ROOT, Emulator, speech, write_wav


def _floor() -> str:
    m = re.search(r'"google-genai>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert m, "pyproject.toml names no google-genai floor"
    return m.group(1)


OLD_SDK = _floor()      # the oldest supported; the newest is what this interpreter has installed
VENV = Path(f"/tmp/livepipe-genai-{OLD_SDK}-venv")
WHEELS = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "livepipe" / f"google-genai-{OLD_SDK}"


def _version(python: Path) -> str:
    """The google-genai version installed in the venv itself (its metadata: no slow import)."""
    if not python.exists():
        return ""
    found = sorted(VENV.glob("lib/python*/site-packages/google_genai-*.dist-info"))
    return found[-1].name.removeprefix("google_genai-").removesuffix(".dist-info") if found else ""


@pytest.fixture(scope="session")
def old_sdk_python() -> Path:
    python = VENV / "bin" / "python"
    with open(f"{VENV}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # parallel runs build it once
        if not _version(python).startswith(OLD_SDK + "."):
            if not list(WHEELS.glob(f"google_genai-{OLD_SDK}*.whl")):
                pytest.skip(f"google-genai {OLD_SDK} (the oldest supported) is not in {WHEELS}: "
                            "run launch/install.sh --test to download it")
            shutil.rmtree(VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True, timeout=120)
            r = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                                "--find-links", str(WHEELS), f"google-genai=={OLD_SDK}.*"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                pytest.skip(f"google-genai {OLD_SDK} does not install from {WHEELS} "
                            f"(rerun launch/install.sh --test): {last}")
    assert _version(python).startswith(OLD_SDK + ".")
    return python


def test_oldest_supported_sdk_full_turn_and_text(old_sdk_python, tmp_path):
    samples = speech("Hello there, this is a test of the emulator.", tmp_path)
    write_wav(tmp_path / "utterance.wav", samples)
    emu = Emulator(tmp_path / "state", "--latency", "0.05", "--pace", "0").start().wait_ready()
    try:
        r = subprocess.run([str(old_sdk_python), str(ROOT / "tests" / "emulator_support.py"), emu.url,
                            emu.info["ca_file"], str(tmp_path / "utterance.wav")],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    finally:
        code, err = emu.stop()
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["sdk"].startswith(OLD_SDK + ".")
    m = re.match(r"^utterance 1: (\d+\.\d\d) s$", out["input"][0])
    assert m and out["output"] == [f"reply 1: {m.group(1)} s"]
    assert out["turn_complete"] and out["corr"] > 0.98
    assert abs(out["reply_seconds"] - len(samples) / 16000) < 0.1
    assert out["text_output"] == ['reply 2: text "hi"'] and abs(out["text_reply_seconds"] - (0.4 + 0.03 * 2)) < 0.01
    assert code == 0 and "Traceback" not in err
