"""`livepipe demo`: a scripted conversation that runs on any machine, then a summary.

It starts launch/Procfile.demo under honcho (real processes on a private bus): the user is a
recorded WAV (launch/assets/user.wav, made with espeak-ng), the camera is the test pattern, the
model is the local emulator (or the real Live API when GEMINI_API_KEY / GOOGLE_API_KEY is set)
and playback writes what a listener would hear to a WAV file. The user talks, pauses, gets an
answer, and talks over that answer (a barge-in); the model stops and answers the second line.

The demo watches the bus itself (heartbeats, audio, transcripts, playback events) and ends the run
by itself once the user's audio is over and the model has gone quiet, or at --timeout. Every run
has its own ports, state directory and session name, so runs never collide; honcho and every
process it started are gone when the demo returns.

How the figures are defined (the same for the emulator and the real service):
  voice-to-voice   end of the user's speech -> first sample of the reply at the output.
                   End of speech: the capture time (audio.in capture_ts) of the end of the last
                   voiced 20 ms frame (webrtcvad, above -50 dBFS) before the reply starts.
                   First sample: playback's turn_started first_sample_ts (when it reaches the
                   device, or its place in the WAV file's real-time clock).
  interrupt-to-silence   the control `interrupt` message's publish time -> playback's silent_ts
                   for that turn (when its last sample left the output).
  frames sent      video frames the bridge sent to the model (its video_frames_sent metric).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError
from livepipe.bus.message import Message
from livepipe.services.lib.conversation import Conversation


from livepipe.services.lib.net import free_port
from livepipe.services.lib.settings import state_dir
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb
def _launch_dir() -> Path:
    """launch/ of a checkout, or its copy installed with the package, both importable as livepipe.launch."""
    spec = importlib.util.find_spec("livepipe.launch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("livepipe.launch is not installed: reinstall livepipe (pip install livepipe)")
    return Path(next(iter(spec.submodule_search_locations)))


LAUNCH = _launch_dir()
PROCFILE = LAUNCH / "Procfile.demo"
USER_WAV = LAUNCH / "assets" / "user.wav"
USER_SCRIPT = LAUNCH / "assets" / "user.json"
KEEP_RUNS = 10                 # older demo run directories are removed
CONNECT_WAIT_S = 30.0          # the pipeline (model session included) must be up within this

IN_RATE = 16000
VAD_FRAME = 320                # 20 ms at 16 kHz
VAD_FLOOR_DBFS = -50.0         # quieter frames never count as speech (noise, dither)


def log(text: str) -> None:
    print(f"livepipe demo: {text}", file=sys.stderr, flush=True)


class DemoError(Exception):
    """What went wrong, in one line for the user."""


# ----------------------------------------------------------------------------- setup
def prune_old_runs(base: Path, keep: int) -> None:
    """Remove all but the newest `keep` demo runs (only directories a demo made: they hold demo.env)."""
    runs = sorted((d for d in base.glob("demo-*") if (d / "demo.env").is_file()), key=lambda d: d.stat().st_mtime)
    for d in runs[:-keep] if keep > 0 else runs:
        shutil.rmtree(d, ignore_errors=True)


def scripts_dir() -> str:
    """Where `livepipe` is installed, so the Procfile's `exec livepipe` finds it even via `python -m`."""
    return sysconfig.get_path("scripts")


@dataclass
class Run:
    session: str
    run_dir: Path
    env_file: Path
    reply_wav: Path | None
    pub_endpoint: str
    sub_endpoint: str
    env: dict[str, str]


def prepare_run(args: argparse.Namespace) -> Run:
    session = f"demo-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    base = Path(args.out_dir).expanduser() if args.out_dir else state_dir() / "demo"
    base.mkdir(parents=True, exist_ok=True)
    prune_old_runs(base, KEEP_RUNS - 1)
    run_dir = base / session
    run_dir.mkdir()
    # capture-audio's Procfile line blocks reading this FIFO until we say go: an event, not a poll.
    os.mkfifo(run_dir / "go")
    pub, sub = free_port(), free_port()
    while sub == pub:
        sub = free_port()
    reply_wav = None if args.devices else run_dir / "reply.wav"
    values = {
        "LIVEPIPE_SESSION": session,
        "LIVEPIPE_STATE_DIR": str(run_dir),        # the emulator's address, certificates and timeline
        "LIVEPIPE_PUB_BIND": f"tcp://127.0.0.1:{pub}",
        "LIVEPIPE_SUB_BIND": f"tcp://127.0.0.1:{sub}",
        "LIVEPIPE_PUB_ENDPOINT": f"tcp://127.0.0.1:{pub}",
        "LIVEPIPE_SUB_ENDPOINT": f"tcp://127.0.0.1:{sub}",
        "LIVEPIPE_DEMO_DIR": str(run_dir),
        "LIVEPIPE_DEMO_USER_WAV": str(Path(args.user_wav).resolve()),
        "LIVEPIPE_DEMO_REPLY_WAV": str(reply_wav or ""),
        "LIVEPIPE_DEMO_DEVICES": "1" if args.devices else "",
    }
    # honcho's env-file parser drops `KEY=` lines: an unset LIVEPIPE_DEMO_DEVICES reads as empty anyway.
    lines = ["# generated by `livepipe demo` for this run only"]
    lines += [f"{k}={shlex.quote(v)}" for k, v in values.items() if v]
    env_file = run_dir / "demo.env"
    env_file.write_text("\n".join(lines) + "\n")
    env = dict(os.environ)
    # The user's own bus settings must not leak into this private run (a remote broker, CURVE keys).
    for k in ("LIVEPIPE_BROKER", "LIVEPIPE_CURVE_SERVER_KEY", "LIVEPIPE_CURVE_CLIENT_KEY",
              "LIVEPIPE_CURVE_SERVER_SECRET", "LIVEPIPE_CURVE_ALLOW", "LIVEPIPE_DEMO_DEVICES"):
        env.pop(k, None)
    env.update(values)
    env["PATH"] = os.pathsep.join([scripts_dir(), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return Run(session, run_dir, env_file, reply_wav, values["LIVEPIPE_PUB_ENDPOINT"],
               values["LIVEPIPE_SUB_ENDPOINT"], env)


# ----------------------------------------------------------------------------- honcho
_LINE = re.compile(r"^\S+ (?P<name>[\w.-]+)\s*\| ?(?P<text>.*)$")
_STOPPED = re.compile(r"^(?P<name>[\w-]+)\.\d+ stopped \(rc=(?P<rc>-?\d+)\)")


def _die_with_parent() -> None:
    """Linux: honcho gets SIGTERM if the demo itself is killed, so nothing outlives it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


class Honcho:
    """honcho as a subprocess: its output goes to a log file, and we keep what explains a failure."""

    def __init__(self, run: Run, verbose: bool) -> None:
        self.log_path = run.run_dir / "honcho.log"
        self.verbose = verbose
        self.last_line: dict[str, str] = {}
        self.stopped: dict[str, int] = {}           # process -> exit code, as honcho reported it
        self.known_pids: set[int] = set()
        self._lock = threading.Lock()
        cmd = [sys.executable, "-m", "honcho", "start", "--no-colour", "-f", str(PROCFILE), "-e", str(run.env_file),
               "-d", str(LAUNCH)]
        self.proc = subprocess.Popen(cmd, env=run.env, cwd=str(LAUNCH), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                     errors="replace", start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self._reader = threading.Thread(target=self._read, name="honcho-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "w", encoding="utf-8") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if self.verbose:
                    sys.stderr.write(line)
                m = _LINE.match(line.rstrip("\n"))
                if not m:
                    continue
                name, text = m.group("name"), m.group("text")
                with self._lock:
                    if name == "system":
                        s = _STOPPED.match(text)
                        if s:
                            self.stopped.setdefault(s.group("name"), int(s.group("rc")))
                    elif text.strip():
                        self.last_line[name.split(".")[0]] = text.strip()

    def first_failure(self) -> str | None:
        """A process that stopped on its own (while we had not asked anything to stop)."""
        with self._lock:
            for name, rc in self.stopped.items():
                last = self.last_line.get(name, "")
                return f"{name} exited with code {rc}" + (f": {last}" if last else "")
        return None

    def remember_children(self) -> None:
        try:
            import psutil
            self.known_pids.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
        except Exception:   # psutil missing, or honcho already gone
            pass

    def stop(self, timeout: float = 10.0) -> list[int]:
        """SIGTERM honcho (it stops its processes, SIGKILL after 5 s); returns pids we had to kill."""
        self.remember_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        return reap(self.known_pids)


def reap(pids: set[int], grace: float = 3.0) -> list[int]:
    """Wait for processes we started to exit; kill (and return) any still alive after `grace`."""
    try:
        import psutil
    except ImportError:
        return []
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in still]


# ----------------------------------------------------------------------------- watching the bus
@dataclass
class Turn:
    number: int
    first_sample_ts: int | None = None
    finished: bool = False
    played_ms: float | None = None
    interrupted: bool = False
    silent_ts: int | None = None
    user_text: list[str] = field(default_factory=list)
    model_text: list[str] = field(default_factory=list)
    completed: bool = False


class Watcher:
    """Everything the summary needs, from the bus only (no knowledge of which backend answers)."""

    def __init__(self, user_frames: int | None) -> None:
        from livepipe.services.lib.vad import VoiceFramer, rms_of_dbfs
        self.vad = VoiceFramer(IN_RATE, VAD_FRAME * 1000 // IN_RATE, 2, rms_of_dbfs(VAD_FLOOR_DBFS))
        self.user_frames = user_frames       # file mode: audio.in frames that make up the script
        self.turns: dict[int, Turn] = {}
        self.interrupts: list[tuple[int, int]] = []          # (turn, publish ts)
        self.heartbeats: dict[str, dict[str, Any]] = {}      # src -> last heartbeat header
        self.pids: dict[str, int] = {}
        self.session_states: list[tuple[str, str]] = []      # (state, detail) from the bridge
        self.backend = ""
        self.audio_in_frames = 0
        self.audio_in_started = False
        self.user_done_at: float | None = None               # monotonic time the script's audio was all sent
        self.voiced_ends: deque[int] = deque(maxlen=20000)   # capture ts (ns) where a voiced frame ends
        self.speech_segments: list[list[int]] = []           # [start_ns, end_ns] of user speech
        self.video_frames_seen = 0
        self.last_activity = time.monotonic()                # last model audio / playback event
        self.error: str | None = None

    # -------------------------------------------------------------- input
    def feed(self, msg: Message) -> None:
        topic, kind = msg.topic, msg.kind
        if topic == "status":
            self.heartbeats[msg["src"]] = msg.header
            if isinstance(msg.get("pid"), int):
                self.pids[msg["src"]] = msg["pid"]
            metrics = msg.get("metrics") or {}
            if msg["src"] == "gemini-bridge" and isinstance(metrics.get("backend"), str):
                self.backend = metrics["backend"]
        elif topic == "audio.in":
            self._user_audio(msg)
        elif topic == "audio.out":
            self.turn(msg["turn"])
            self.last_activity = time.monotonic()
        elif topic == "video.in":
            self.video_frames_seen += 1
        elif topic == "transcript" and kind == "transcript":   # not interim or thought text
            t = self.turn(msg["turn"])
            (t.user_text if msg["role"] == "user" else t.model_text).append(msg["text"])
        elif topic == "control":
            if kind == "interrupt":
                self.interrupts.append((msg["turn"], msg["ts"]))
            elif kind == "turn_complete":
                self.turn(msg["turn"]).completed = True
                self.last_activity = time.monotonic()
            elif kind == "session" and msg["src"] == "gemini-bridge":
                self.session_states.append((msg["state"], msg.get("detail") or ""))
                self.backend = msg.get("backend") or self.backend
                if msg["state"] == "error":
                    self.error = f"the model session failed: {msg.get('detail') or 'no detail'}"
        elif topic == "playback":
            t = self.turn(msg["turn"])
            self.last_activity = time.monotonic()
            if kind == "turn_started":
                t.first_sample_ts = msg["first_sample_ts"]
            elif kind == "turn_finished":
                t.finished, t.played_ms, t.interrupted = True, float(msg["played_ms"]), bool(msg["interrupted"])
                t.silent_ts = msg.get("silent_ts")

    def turn(self, n: int) -> Turn:
        if n not in self.turns:
            self.turns[n] = Turn(n)
        return self.turns[n]

    def _user_audio(self, msg: Message) -> None:
        if msg["rate"] != IN_RATE or msg["channels"] != 1 or msg["sample_width"] != 2:
            return   # off-contract audio: the bridge converts it; we only time speech on the contract format
        pcm = np.frombuffer(msg.payload or b"", "<i2")
        ts = msg.get("capture_ts") or msg["ts"]
        self.audio_in_started = True
        self.audio_in_frames += len(pcm)
        if self.user_frames is not None and self.user_done_at is None and self.audio_in_frames >= self.user_frames:
            self.user_done_at = time.monotonic()
        # 20 ms frames aligned across chunks, each with the capture time of its first sample.
        for _frame, start_ns, voiced in self.vad.feed(pcm, ts):
            if voiced:
                end_ns = start_ns + VAD_FRAME * 1_000_000_000 // IN_RATE
                self.voiced_ends.append(end_ns)
                seg = self.speech_segments[-1] if self.speech_segments else None
                if seg is not None and start_ns - seg[1] < 500_000_000:   # pauses inside a sentence
                    seg[1] = end_ns
                else:
                    self.speech_segments.append([start_ns, end_ns])

    # -------------------------------------------------------------- state
    def bridge_connected(self) -> bool:
        hb = self.heartbeats.get("gemini-bridge")
        state = (hb or {}).get("metrics", {}).get("state")
        return state == "connected" or bool(self.session_states and self.session_states[-1][0] == "connected")

    def has(self, *srcs: str) -> bool:
        return all(s in self.heartbeats for s in srcs)

    def heard(self) -> list[Turn]:
        return [t for k, t in sorted(self.turns.items()) if t.first_sample_ts is not None]

    def idle_for(self) -> float:
        """Seconds the model has been quiet: no turn is still playing or streaming."""
        if any(t.first_sample_ts is not None and not t.finished for t in self.turns.values()):
            return 0.0
        return time.monotonic() - self.last_activity

    def speech_end_before(self, ts: int) -> int | None:
        ends = [e for e in self.voiced_ends if e <= ts]
        return max(ends) if ends else None

    # -------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        turns = []
        v2v: list[float] = []
        for t in self.heard():
            end = self.speech_end_before(t.first_sample_ts)
            ms = round((t.first_sample_ts - end) / 1e6, 1) if end is not None else None
            if ms is not None:
                v2v.append(ms)
            turns.append({"turn": t.number, "user": " ".join(t.user_text).strip(),
                          "model": " ".join(t.model_text).strip(), "voice_to_voice_ms": ms,
                          "played_ms": t.played_ms, "interrupted": t.interrupted})
        i2s: list[float] = []
        for turn, ts in self.interrupts:
            t = self.turns.get(turn)
            if t is not None and t.interrupted and t.silent_ts is not None:
                # An output already silent when the interrupt came counts as 0, not as a negative time.
                i2s.append(round(max(0, t.silent_ts - ts) / 1e6, 2))
        bridge = (self.heartbeats.get("gemini-bridge") or {}).get("metrics", {})
        return {
            "turns": len(turns),
            "voice_to_voice_ms": v2v,
            "interrupts": len(self.interrupts),
            "interrupt_to_silence_ms": i2s,
            "frames_sent": int(bridge.get("video_frames_sent", 0)),
            "frames_captured": self.video_frames_seen,
            "turn_details": turns,
            "user_speech_segments": len(self.speech_segments),
            "user_audio_s": round(self.audio_in_frames / IN_RATE, 2),
            "backend": self.backend,
        }


# ----------------------------------------------------------------------------- the run
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe demo", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--devices", action="store_true",
                   help="use the default microphone and speaker instead of the WAV files: speak the script "
                        "yourself (or play launch/assets/user.wav into the microphone) once it says ready")
    p.add_argument("--turns", type=int, default=None, metavar="N",
                   help="with --devices: end after N replies have been heard (default: the script's "
                        "utterances, 2)")
    p.add_argument("--user-wav", default=str(USER_WAV), metavar="PATH.wav",
                   help="the user's side of the conversation (default launch/assets/user.wav)")
    p.add_argument("--timeout", type=float, default=90.0, metavar="S",
                   help="give up after S seconds (default %(default)s)")
    p.add_argument("--quiet-s", type=float, default=1.5, metavar="S",
                   help="the run ends once the user's audio is over and the model has been quiet this long "
                        "(default %(default)s)")
    p.add_argument("--out-dir", metavar="DIR",
                   help="where run directories go (default <LIVEPIPE_STATE_DIR or ~/.local/state/livepipe>/demo; "
                        f"the newest {KEEP_RUNS} are kept)")
    p.add_argument("--verbose", action="store_true", help="show every process's log lines (stderr)")
    p.add_argument("--console", action="store_true",
                   help="also run `livepipe console` on this run's bus and print its URL; it keeps serving "
                        "after the summary until Ctrl-C")
    p.add_argument("--console-port", type=int, default=0, metavar="PORT",
                   help="the console's port on 127.0.0.1 (default: a free one)")
    return p.parse_args(argv)


def expected_utterances() -> int:
    try:
        return len(json.loads(USER_SCRIPT.read_text())["utterances"])
    except (OSError, ValueError, KeyError, TypeError):
        return 2


def wav_frames_16k(path: str) -> int:
    """How many 16 kHz frames capture-audio will publish for this file."""
    from livepipe.services.lib.audio import AudioFileError, WavReader
    try:
        with WavReader(path) as r:
            return int(r.frames * IN_RATE // r.rate)
    except AudioFileError as exc:
        raise DemoError(str(exc)) from None


def converse(args: argparse.Namespace, run: Run, honcho: Honcho, watcher: Watcher) -> None:
    """Drive the run: wait for the pipeline, say go, watch the conversation until it is over."""
    cfg = BusConfig.from_env(run.env)
    t0 = time.monotonic()
    deadline = t0 + args.timeout

    drain: Callable[[], None] = lambda: None   # reads what the bus still holds, once it is up

    def check_alive() -> None:
        failure = honcho.first_failure()
        if failure is None and honcho.proc.poll() is not None:
            failure = f"honcho exited with code {honcho.proc.returncode}"
        if failure is not None:
            # The bridge says why on the bus before it exits; honcho's exit line can come first.
            drain()
            raise DemoError(watcher.error or failure)
        if watcher.error:
            raise DemoError(watcher.error)
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {args.timeout:g} s ({what_we_wait_for()})")

    stage = "the bus"

    def what_we_wait_for() -> str:
        return f"waiting for {stage}"

    with BusClient("demo", cfg, all_topics=True) as bus:
        while True:   # the broker is one of honcho's processes: it may take a moment
            check_alive()
            try:
                bus.wait_ready(1.0)
                break
            except BusTimeout:
                continue
        stage = "the model session (gemini-bridge connected) and playback"
        log(f"bus up after {time.monotonic() - t0:.1f} s; waiting for the model session")
        last_children = 0.0
        # The same per-turn lines as `livepipe transcript`, for the user at the microphone.
        conversation = Conversation(turns_only=True) if args.devices else None

        def pump(seconds: float) -> None:
            nonlocal last_children
            end = time.monotonic() + seconds
            while True:
                msg = bus.recv(max(0.0, end - time.monotonic()))
                if msg is not None:
                    watcher.feed(msg)
                    if conversation is not None:   # --devices: the conversation as it happens
                        for line in conversation.feed(msg):
                            print(line, file=sys.stderr, flush=True)
                if time.monotonic() - last_children > 0.5:
                    honcho.remember_children()
                    last_children = time.monotonic()
                if msg is None or time.monotonic() >= end:
                    return

        drain = lambda: pump(0.3)   # noqa: E731
        connect_by = time.monotonic() + min(args.timeout, CONNECT_WAIT_S)
        said = ""
        needed = ("playback", "capture-video") + (("console",) if args.console else ())
        while not (watcher.bridge_connected() and watcher.has(*needed)):
            check_alive()
            pump(0.1)
            state, detail = watcher.session_states[-1] if watcher.session_states else ("", "")
            if state == "reconnecting" and detail != said:
                log(f"the model session is not up yet: {detail} (retrying)")
                said = detail
            if time.monotonic() > connect_by:
                waiting = "the model session" if not watcher.bridge_connected() else "playback and capture-video"
                why = f": {detail}" if detail and not watcher.bridge_connected() else ""
                raise DemoError(f"{waiting} did not come up within {min(args.timeout, CONNECT_WAIT_S):g} s{why}")
        # O_RDWR never blocks on a FIFO; the line waits in the pipe until capture-audio's shell reads
        # it, so this fd stays open (it is closed when the demo process exits).
        go_fd = os.open(run.run_dir / "go", os.O_RDWR)
        os.write(go_fd, b"go\n")
        stage = "capture-audio's first audio"
        while not watcher.audio_in_started:
            check_alive()
            pump(0.1)
        if args.devices:
            log("ready: speak now (the default microphone is live; the replies play on the default speaker)")
        else:
            log(f"ready after {time.monotonic() - t0:.1f} s ({watcher.backend or 'model'} connected): "
                "the conversation is playing")
        want = args.turns if args.turns is not None else expected_utterances()
        stage = "the conversation to end"
        while True:
            check_alive()
            pump(0.1)
            if args.devices:
                user_over = sum(1 for t in watcher.heard() if t.finished) >= want
            else:
                user_over = (watcher.user_done_at is not None
                             and time.monotonic() - watcher.user_done_at >= args.quiet_s)
            if user_over and watcher.idle_for() >= args.quiet_s:
                break
        for line in conversation.flush() if conversation is not None else []:
            print(line, file=sys.stderr, flush=True)
        # The bridge's next heartbeat carries its final counters (frames sent).
        stage = "the bridge's last heartbeat"
        asked = time.time_ns()
        until = time.monotonic() + 1.5
        while time.monotonic() < until and (watcher.heartbeats.get("gemini-bridge") or {}).get("ts", 0) < asked:
            pump(0.05)


def render(summary: dict[str, Any]) -> str:
    lines = [f"livepipe demo: {summary['turns']} turns, {summary['interrupts']} interrupt(s), "
             f"backend {summary['backend'] or '?'} (session {summary['session']})"]
    for t in summary["turn_details"]:
        lines.append(f"  turn {t['turn']}:")
        if t["user"]:
            lines.append(f"    user   {t['user']}")
        if t["model"]:
            lines.append(f"    model  {t['model']}")
        heard = f"heard {t['played_ms'] / 1000:.2f} s" if t["played_ms"] is not None else "still playing"
        v2v = f"{t['voice_to_voice_ms']:.0f} ms" if t["voice_to_voice_ms"] is not None else "n/a"
        lines.append(f"    voice-to-voice {v2v}, {heard}" + (", interrupted by the user" if t["interrupted"] else ""))
    fmt = lambda xs, d: ", ".join(f"{x:.{d}f}" for x in xs) or "none"   # noqa: E731
    lines += [
        f"voice-to-voice (end of the user's speech -> first reply sample at the output): "
        f"{fmt(summary['voice_to_voice_ms'], 0)} ms",
        f"interrupt-to-silence (interrupt published -> output silent): {fmt(summary['interrupt_to_silence_ms'], 1)} ms",
        f"video frames sent to the model: {summary['frames_sent']} (captured {summary['frames_captured']})",
    ]
    if summary["reply_wav"]:
        lines.append(f"what the user heard: {summary['reply_wav']} ({summary['reply_wav_s']:.1f} s, 24 kHz mono)")
    lines.append(f"run directory (logs, emulator timeline): {summary['run_dir']}")
    return "\n".join(lines)


def wav_seconds(path: Path) -> float:
    from livepipe.services.lib.audio import AudioFileError, WavReader
    try:
        with WavReader(path) as r:
            return r.duration_s
    except AudioFileError:
        return 0.0


@verb("demo")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.devices and not Path(args.user_wav).is_file():
        raise UsageError(f"the user's WAV {args.user_wav} does not exist")
    if not PROCFILE.is_file():
        return fail("demo", f"{PROCFILE} is missing (run the demo from a livepipe checkout: pip install -e .)", 2)
    if shutil.which("sh") is None:
        return fail("demo", "no /bin/sh: honcho needs a POSIX shell", 2)
    try:
        user_frames = None if args.devices else wav_frames_16k(args.user_wav)
        run = prepare_run(args)
    except (OSError, DemoError, ConfigError) as exc:
        return fail("demo", exc, 2)
    backend = "the Live API" if (os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")) \
        else "the local emulator"
    log(f"run {run.session}: starting broker, model bridge, {backend}, camera (test pattern), "
        f"{'microphone and speaker' if args.devices else 'user WAV and reply WAV'} under honcho")
    t0 = time.monotonic()

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt   # stop like Ctrl-C: honcho and its processes go down with us
    signal.signal(signal.SIGTERM, on_sigterm)
    watcher = Watcher(user_frames)
    honcho = Honcho(run, args.verbose)
    console = start_console(args, run) if args.console else None
    error: str | None = None
    code = 0
    try:
        converse(args, run, honcho, watcher)
    except DemoError as exc:
        error, code = str(exc), 1
    except KeyboardInterrupt:
        error, code = "interrupted (Ctrl-C or SIGTERM)", 130
    finally:
        killed = honcho.stop()
    ended_by_signal: list[int] = []
    summary = watcher.summary()
    try:   # every process's last heartbeat (counters, metrics): what to look at when something sounded wrong
        (run.run_dir / "heartbeats.json").write_text(json.dumps(watcher.heartbeats, indent=1, default=str))
    except OSError:
        pass
    if error is None and summary["turns"] == 0:
        error, code = "the model never answered (no reply reached playback)", 1
    if killed:
        log(f"warning: had to kill {len(killed)} process(es) that outlived honcho: {killed}")
    summary.update(session=run.session, run_dir=str(run.run_dir), duration_s=round(time.monotonic() - t0, 2),
                   reply_wav=str(run.reply_wav) if run.reply_wav else None,
                   reply_wav_s=round(wav_seconds(run.reply_wav), 2) if run.reply_wav else None,
                   user_wav=None if args.devices else str(Path(args.user_wav).resolve()),
                   processes=watcher.pids, exit_codes=dict(honcho.stopped), orphans_killed=killed,
                   ok=error is None, error=error)
    if console is not None:   # from here a Ctrl-C ends the console, never a half-printed summary
        _end_console_on_signal(console[0], ended_by_signal)
    if args.json:
        print(json.dumps(summary), flush=True)
    elif summary["turns"]:
        print(render(summary), flush=True)
    if error:
        log(f"{error} (logs: {honcho.log_path})")
    if console is not None:
        serve_console_until_interrupted(console, keep=code != 130 and not ended_by_signal)
    return code


def _end_console_on_signal(proc: subprocess.Popen, ended_by_signal: list[int]) -> None:
    """SIGINT/SIGTERM after the conversation terminate the console instead of raising: the signal may land
    anywhere between the summary and the wait, and the demo must still end cleanly with code 0."""
    def on_signal(signum: int, frame: Any) -> None:
        ended_by_signal.append(signum)
        if proc.poll() is None:
            proc.terminate()
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


def start_console(args: argparse.Namespace, run: Run) -> tuple[subprocess.Popen, str]:
    """`livepipe console` on this run's bus (it waits for the broker by itself); prints its URL."""
    port = args.console_port or free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(run.run_dir / "console.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "livepipe.services", "console", "--port", str(port)],
                                env=run.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    log(f"console: {url} (open it in a browser)")
    return proc, url


def serve_console_until_interrupted(console: tuple[subprocess.Popen, str], keep: bool = True) -> None:
    """The conversation is over; the console keeps showing it until Ctrl-C (or SIGTERM)."""
    proc, url = console
    try:
        if keep and proc.poll() is None:
            log(f"console still serving {url}: Ctrl-C to end")
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
