"""Every verb ends the same way when the user can fix the cause: one line `livepipe VERB: ...` on
stderr, exit 2 for a bad flag or setting, exit 1 when it could not do its job, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys

from livepipe.services.cli import VERBS
from tests.conftest import ROOT, free_port

BENCHES = ("bus", "interrupt", "video", "goaway", "capture")


def _run_all(cases: dict[str, list[str]], env: dict[str, str]) -> dict[str, subprocess.CompletedProcess]:
    """Run the verbs side by side (each is a fresh interpreter: a second or so to import)."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "livepipe.services", *argv], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=60)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API"))}
    # nowhere to connect: a verb that got past its checks fails fast instead of waiting for a broker
    port = free_port()
    env.update(LIVEPIPE_PUB_ENDPOINT=f"tcp://127.0.0.1:{port}", LIVEPIPE_SUB_ENDPOINT=f"tcp://127.0.0.1:{port}")
    return env


def _one_line(res: subprocess.CompletedProcess, prefix: str) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_an_unknown_flag_is_one_line_and_exit_2_for_every_verb() -> None:
    cases = {verb: [verb, "--no-such-flag"] for verb in VERBS if verb != "bench"}
    cases.update({f"bench {b}": ["bench", b, "--no-such-flag"] for b in BENCHES})
    results = _run_all(cases, _clean_env())
    for name, res in results.items():
        assert res.returncode == 2, (name, res.stderr)
        line = _one_line(res, f"livepipe {name}: ")
        # (a verb with required arguments names those first)
        assert ("--no-such-flag" in line or "required" in line) and line.endswith("(see --help)"), line


def test_a_bad_setting_from_the_environment_is_one_line_and_exit_2() -> None:
    env = dict(_clean_env(), LIVEPIPE_SESSION="not a session!")
    verbs = {"tap": ["tap"], "top": ["top"], "record": ["record", os.devnull], "say": ["say", "hi"],
             "capture-audio": ["capture-audio", "--silence"], "playback": ["playback", "--null"],
             "capture-video": ["capture-video", "test"], "gemini-bridge": ["gemini-bridge"]}
    for name, res in _run_all(verbs, env).items():
        assert res.returncode == 2, (name, res.stderr)
        assert "LIVEPIPE_SESSION" in _one_line(res, f"livepipe {name}: "), (name, res.stderr)


def test_no_broker_is_one_line_and_exit_1() -> None:
    cases = {"tap": ["tap", "--connect-timeout", "0.5"], "top": ["top", "--connect-timeout", "0.5"],
             "say": ["say", "--wait", "0.5", "hi"]}
    for name, res in _run_all(cases, _clean_env()).items():
        assert res.returncode == 1, (name, res.stderr)
        _one_line(res, f"livepipe {name}: ")
