"""What a new user meets in their first hour (issue 11), each as the user would meet it:
the README's service snippet run as printed, `livepipe transcript`, `livepipe top` in a real
terminal, replay into a running pipeline, and the smaller conveniences (say, ports, --version)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from tests.conftest import ROOT, livepipe_cmd, spawn, stop, stop_all

README = (ROOT / "README.md").read_text()


def readme_block(section: str) -> str:
    """The first ```python block after the heading `section`."""
    rest = README[README.index(section):]
    m = re.search(r"```python\n(.*?)```", rest, re.S)
    assert m, f"no python block under {section}"
    return m.group(1)


# ------------------------------------------------------------ point 2: "Writing a service"
def test_readme_service_snippet_runs_serves_its_handler_and_exits_0_on_sigterm(bus_env, bus_cfg, tmp_path):
    script = tmp_path / "my_service.py"
    script.write_text(readme_block("### Writing a service"))
    proc = subprocess.Popen([sys.executable, str(script)], env=bus_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with BusClient("user", bus_cfg, ["text.in"]) as user:
            user.wait_ready()
            hello = user.wait_for("text.in", "text", timeout=15)   # its main ran
            assert hello["text"] == "hello" and hello["src"] == "my-service"
            user.wait_subscriber("transcript", 10)   # still serving after its main returned
            user.publish("transcript", "transcript", role="user", text="what do you see", turn=1, final=True)
            assert proc.stdout.readline() == "user what do you see\n"
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()



def test_readme_tool_server_answers_only_calls_routed_to_it_and_not_cancelled_ones(bus_env, bus_cfg, tmp_path):
    """README's "Serving functions" example: a call without `to` is for a --tools function (which
    wins), and a call the model cancelled gets no late result."""
    script = tmp_path / "weather.py"
    script.write_text(readme_block("### Serving functions to the model").replace(
        'lambda args: {"weather": "sunny"}', 'lambda args: time.sleep(args.get("sleep", 0)) or {"weather": "sunny"}')
        .replace("import sys", "import sys\nimport time"))
    proc = subprocess.Popen([sys.executable, str(script)], env=bus_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with BusClient("gemini-bridge", bus_cfg, ["tool.announce", "tool.result", "status"]) as bridge:
            bridge.wait_ready()
            inst = bridge.wait_for("tool.announce", "announce", timeout=15)["inst"]
            bridge.wait_subscriber("tool.call", 10)
            bridge.publish("tool.call", "call", id="for-tools-file", name="get_weather", args={})
            bridge.publish("tool.call", "call", id="routed", name="get_weather", args={}, to=inst)
            assert bridge.wait_for("tool.result", timeout=10)["id"] == "routed"   # not the unrouted one
            slow = time.time_ns()
            bridge.publish("tool.call", "call", id="slow", name="get_weather", args={"sleep": 1.0}, to=inst)
            bridge.publish("tool.call", "cancel", ids=["slow"])
            # Until a heartbeat from after the slow handler's end: its result would have come before it.
            seen, deadline = [], time.monotonic() + 10
            while not [m for m in seen if m.topic == "status" and m["src"] == "weather"
                       and m["ts"] > slow + 1_300_000_000] and time.monotonic() < deadline:
                seen += [m] if (m := bridge.recv(1)) is not None else []
            beats = [m for m in seen if m.topic == "status" and m["src"] == "weather"]
            assert beats[-1]["metrics"]["tool_calls_cancelled"] == 1
            assert not [m for m in seen if m.topic == "tool.result"]
    finally:
        stop(proc)


def test_a_main_that_returns_an_int_ends_the_service_with_that_code(bus_env, tmp_path):
    """The README's way for a main to end the process: `return 1` instead of returning None."""
    script = tmp_path / "one_shot.py"
    script.write_text(readme_block("### Writing a service").replace(
        "        # returning None keeps serving", "        return 3\n        # returning None keeps serving"))
    proc = subprocess.run([sys.executable, str(script)], env=bus_env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 3, proc.stderr

# ------------------------------------------------------------ point 3: `livepipe transcript`
def read_until(stream, text: str, seen: list[str]) -> None:
    """Read lines from `stream` into `seen` until one contains `text` (the tool said it)."""
    for line in stream:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no {text!r} in {seen}")


def test_transcript_prints_ready_each_turn_and_interrupts(bus_env, bus_cfg):
    proc = spawn(["transcript"], bus_env)
    seen: list[str] = []
    try:
        read_until(proc.stdout, "waiting for", seen)      # its subscriptions are live
        with BusClient("gemini-bridge", bus_cfg) as bridge, BusClient("capture-audio", bus_cfg) as mic:
            bridge.wait_ready()
            mic.wait_ready()
            bridge.publish("control", "session", state="connected", backend="emulator")
            mic.publish("status", "heartbeat", counters={"sent": 51},
                        metrics={"chunks_published": 50, "level_dbfs": -31.0, "muted": 0})   # audio flows
            read_until(proc.stdout, "ready", seen)
            # Transcripts come in pieces, as the Live API sends them.
            bridge.publish("transcript", "transcript", role="user", text="what do", turn=1)
            bridge.publish("transcript", "transcript", role="user", text=" you see?", turn=1)
            bridge.publish("transcript", "transcript", role="model", text="A desk", turn=1)
            bridge.publish("transcript", "transcript", role="model", text=" and a lamp.", turn=1)
            bridge.publish("control", "turn_complete", turn=1)
            bridge.publish("transcript", "transcript", role="model", text="Once upon", turn=2)
            bridge.publish("control", "interrupt", turn=2, reason="barge-in")   # the user barged in: the model stops
            bridge.publish("transcript", "transcript", role="user", text="Sorry, stop.", turn=3, final=True)
            bridge.publish("control", "session", state="reconnecting", detail="connection lost", backend="emulator")
            read_until(proc.stdout, "model session reconnecting", seen)
            mic.publish("text.in", "text", text="and  the window?")     # typed (livepipe say, the console)
            read_until(proc.stdout, "typed", seen)
    finally:
        out, err = stop(proc)
    assert proc.returncode == 0, err
    assert "".join(seen + [out]).splitlines() == [
        "waiting for the model session (gemini-bridge) and the microphone (capture-audio)",
        "ready, speak now (emulator)",
        "turn 1  user:  what do you see?",
        "turn 1  model: A desk and a lamp.",
        "turn 2  model: Once upon",
        "turn 2  interrupted (the user spoke over the model)",
        "turn 3  user:  Sorry, stop.",
        "model session reconnecting: connection lost",
        "typed  and the window?",
    ]


# ------------------------------------------------------------ point 6: `livepipe top` in a terminal
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`livepipe ARGS` on a pseudo-terminal of `columns` x 24: what a user's terminal would show."""

    def __init__(self, args: list[str], env: dict[str, str], columns: int) -> None:
        import fcntl
        import pty
        import struct
        import termios
        self.columns = columns
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.proc = subprocess.Popen(livepipe_cmd(*args), env={**env, "COLUMNS": str(columns), "LINES": "24",
                                                               "TERM": "xterm"},
                                     stdin=slave, stdout=slave, stderr=slave, close_fds=True, start_new_session=True)
        os.close(slave)
        self.raw = b""

    def read_until(self, predicate, timeout: float = 30.0) -> str:
        """Read the terminal until predicate(last screen) holds; returns that screen."""
        import select
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen is not None and predicate(screen):
                return screen
            if select.select([self.master], [], [], 0.2)[0]:
                try:
                    self.raw += os.read(self.master, 65536)
                except OSError:
                    break
        raise AssertionError(f"the terminal never showed it: {self.screen()!r}")

    def pump(self, seconds: float) -> None:
        """Read what the program wrote within `seconds`."""
        import select
        if select.select([self.master], [], [], seconds)[0]:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:
                pass

    def screen(self) -> str | None:
        """The last complete redraw (top homes the cursor, `ESC[H`, before each)."""
        text = self.raw.decode("utf-8", "replace")
        frames = text.split("\x1b[H")
        done = [f for f in frames[:-1]] + ([frames[-1]] if frames[-1].endswith("\x1b[J") else [])
        return ESCAPES.sub("", done[-1]).replace("\r", "") if len(frames) > 1 and done else None

    def lines(self) -> list[str]:
        return [ESCAPES.sub("", ln).replace("\r", "") for ln in self.raw.decode("utf-8", "replace").split("\n")]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def test_top_fits_80_and_120_columns_shows_what_matters_and_q_quits(bus_env):
    pipeline = [spawn(args, bus_env) for args in (["emulator", "--port", "0"], ["gemini-bridge"],
                                                   ["capture-audio", "--tone", "440"], ["playback", "--null"])]
    terminals = []
    try:
        terminals = [Terminal(["top"], bus_env, columns) for columns in (80, 120)]
        for term in terminals:
            screen = term.read_until(lambda s: "connected" in s and re.search(r"mic -1\d dBFS", s)
                                    and "underruns 0" in s)   # the -12 dBFS tone
            rows = {ln.split()[0]: ln for ln in screen.splitlines() if ln.strip()}
            assert {"gemini-bridge", "capture-audio", "playback"} <= set(rows), screen
            assert "connected" in rows["gemini-bridge"] and "live" in rows["capture-audio"]
            header = rows["PROCESS"].split()
            assert header[:8] == ["PROCESS", "STATE", "CPU%", "RSS", "IN/s", "OUT/s", "DROP", "REJ"] or \
                header[:9] == ["PROCESS", "STATE", "PID", "CPU%", "RSS", "IN/s", "OUT/s", "DROP", "REJ"], header
            assert ("PID" in header) == (term.columns >= 120)
            os.write(term.master, b"q")
            assert term.proc.wait(10) == 0
            wide = [ln for ln in term.lines() if len(ln) > term.columns]
            assert not wide, wide
    finally:
        for term in terminals:
            term.close()
        stop_all(pipeline)


# ------------------------------------------------------------ point 8: replay into a running pipeline
def test_replay_into_a_live_pipeline_warns_and_replace_mutes_the_microphone(bus_env, bus_cfg, tmp_path):
    from livepipe.bus.message import encode, make_header
    from livepipe.services.lib.recording import RecordingWriter

    rec = tmp_path / "question.lprec"      # 1 s of recorded speech-level audio from a microphone
    t0 = time.time_ns() - 10**9
    with RecordingWriter(rec, "") as writer:
        for i in range(50):
            header = make_header("audio", "capture-audio", "0ld0ld00", i, {
                "rate": 16000, "channels": 1, "sample_width": 2, "frames": 320, "capture_ts": t0 + i * 20_000_000})
            writer.write(t0 + i * 20_000_000, encode("audio.in", header, b"\x10\x20" * 320))
    pipeline = [spawn(args, bus_env) for args in (["emulator", "--port", "0"], ["gemini-bridge"],
                                                   ["capture-audio", "--tone", "440"])]
    try:
        with BusClient("watcher", bus_cfg, ["audio.in", "status", "control"]) as watcher:
            watcher.wait_ready()
            watcher.wait_for("status", "heartbeat", timeout=30, src="gemini-bridge")   # the bridge listens
            live = watcher.wait_for("audio.in", timeout=30)["inst"]    # the microphone is live
            # 1. A plain replay: one line says the bridge will hear both; the bridge counts and warns.
            plain = spawn(["replay", str(rec)], bus_env)
            _, err = plain.communicate(timeout=30)
            assert plain.returncode == 0, err
            assert f"warning: capture-audio/{live} is publishing audio.in live" in err and "--replace" in err
            deadline = time.monotonic() + 10
            while True:
                hb = watcher.wait_for("status", "heartbeat", timeout=max(0.1, deadline - time.monotonic()),
                                      src="gemini-bridge")
                if hb["metrics"]["audio_in_interleaved"] > 0:
                    break
            # 2. --replace: mute, the replay alone on audio.in, unmute.
            replace = spawn(["replay", str(rec), "--replace"], bus_env)
            watcher.wait_for("control", "mute", timeout=15)
            seen = []
            while not (seen and seen[-1].topic == "control" and seen[-1].kind == "unmute"):
                msg = watcher.recv(15)
                assert msg is not None, "no unmute"
                if msg.topic in ("audio.in", "control"):
                    seen.append(msg)
            replayed = [i for i, m in enumerate(seen) if m.topic == "audio.in" and m["inst"] != live]
            assert len(replayed) == 50
            during = seen[replayed[0]:replayed[-1] + 1]
            assert all(m["inst"] != live for m in during if m.topic == "audio.in"), "the microphone was not muted"
            assert watcher.wait_for("audio.in", timeout=10, inst=live)     # unmuted: live again
            _, err = replace.communicate(timeout=15)
            assert replace.returncode == 0 and "sent control: mute" in err and "sent control: unmute" in err, err
    finally:
        outs = stop_all(pipeline)
    bridge_err = outs[1][1]
    assert bridge_err.count("two sources publish audio.in") == 1, bridge_err    # said once, rate-limited


# ------------------------------------------------------------ point 10: the smaller things
def test_say_prints_what_it_sent(bus_env, bus_cfg):
    with BusClient("bridge", bus_cfg, ["text.in"]) as bridge:
        bridge.wait_ready()
        proc = spawn(["say", "what", "do", "you", "see?"], bus_env)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out == "livepipe say: sent 'what do you see?' on text.in\n"
        assert bridge.wait_for("text.in", "text")["text"] == "what do you see?"


def free_port_pair() -> int:
    """A port P with P and P+1 both free on loopback."""
    import socket
    while True:
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            base = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
            return base


def env_without_bus(bus_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in bus_env.items() if not k.startswith("LIVEPIPE_") or k == "LIVEPIPE_STATE_DIR"}


def test_one_variable_moves_every_port_and_tools_say_when_no_broker_answers(bus_env):
    base = free_port_pair()
    env = {**env_without_bus(bus_env), "LIVEPIPE_PORT_BASE": str(base)}
    # No broker yet: the tool says so in one line and keeps waiting.
    tap = spawn(["tap", "text.in", "--count", "1"], env)
    line = tap.stderr.readline()
    assert line == (f"livepipe tap: no broker answers at tcp://127.0.0.1:{base} / tcp://127.0.0.1:{base + 1}; "
                    "waiting: is `livepipe broker` running?\n")
    assert tap.poll() is None
    broker = spawn(["broker"], env)       # binds PORT_BASE and PORT_BASE+1: the same one variable
    try:
        assert tap.stderr.readline() == "livepipe tap: the broker answers\n"
        say = spawn(["say", "--wait", "20", "hello"], env)
        _, err = say.communicate(timeout=30)
        assert say.returncode == 0, err
        out, err = tap.communicate(timeout=20)
        assert tap.returncode == 0 and "text.in" in out and "'hello'" in out, err
        # LIVEPIPE_BROKER=HOST:PORT says the same for a client of a remote broker.
        with BusClient("remote", BusConfig.from_env({"LIVEPIPE_BROKER": f"127.0.0.1:{base}"})) as remote:
            remote.wait_ready(10)
            assert remote.cfg.sub_endpoint == f"tcp://127.0.0.1:{base + 1}"
    finally:
        stop(broker)


def test_version():
    import tomllib
    proc = subprocess.run(livepipe_cmd("--version"), capture_output=True, text=True, timeout=30)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout == f"livepipe {version}\n"


def test_honcho_starts_the_procfile_from_the_repository_root(bus_env, tmp_path):
    """README: `honcho -d launch start` from the repository root (its .env: launch/.env; here -e
    names a test one). The conversation process comes up and waits for the model."""
    base = free_port_pair()
    (tmp_path / "test.env").write_text(f"LIVEPIPE_PORT_BASE={base}\nLIVEPIPE_STATE_DIR={tmp_path / 'state'}\n")
    env = env_without_bus(bus_env)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    assert "honcho -d launch start" in README
    honcho = subprocess.Popen([sys.executable, "-m", "honcho", "-d", "launch", "-e", str(tmp_path / "test.env"),
                               "start", "--no-colour", "broker", "transcript"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen: list[str] = []
    try:
        read_until(honcho.stdout, "waiting for the model session", seen)
    finally:
        honcho.send_signal(signal.SIGTERM)
        out, _ = honcho.communicate(timeout=20)
    assert not any("no broker answers" in ln for ln in seen), seen   # both on PORT_BASE from the env file


def test_transcript_on_a_terminal_keeps_a_microphone_meter_line(bus_env):
    mic = spawn(["capture-audio", "--tone", "440"], bus_env)
    term = Terminal(["transcript"], bus_env, 80)
    listener = BusClient("listener", BusConfig.from_env(bus_env), ["audio.in"])   # the tone starts for a listener
    try:
        meter = re.compile(r"mic +-1\d dBFS \[#{10,}\.*\]   model no bridge yet")   # the -12 dBFS tone
        deadline = time.monotonic() + 20
        while not meter.search(ESCAPES.sub("", term.raw.decode("utf-8", "replace"))):
            assert time.monotonic() < deadline, term.raw[-400:]
            term.pump(0.5)
        os.kill(term.proc.pid, signal.SIGTERM)
        assert term.proc.wait(10) == 0
        # the meter line is redrawn in place (\r): it must never wrap
        redraws = [ESCAPES.sub("", seg) for seg in term.raw.decode("utf-8", "replace").replace("\n", "\r").split("\r")]
        assert all(len(seg) < 80 for seg in redraws if seg.startswith("mic ")), redraws
    finally:
        listener.close()
        term.close()
        stop(mic)
