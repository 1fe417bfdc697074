"""`livepipe bench pipeline [--json] [--plot FILE.png]`: voice-to-voice latency of the whole
pipeline on real (PulseAudio null sink) devices, against a single-process client in the same run.

Two systems run side by side against one `livepipe emulator`, each with its own private
speaker / mic feed / virtual microphone (services/dev/pulse.py):
- pipeline: broker, gemini-bridge, capture-audio, playback and capture-video (test pattern,
  1 FPS; `--no-video` leaves it out), each a real process on free ports;
- baseline: services/bench/v2v_baseline.py, one process shaped like Google's Live API example.

Spoken utterances (espeak-ng) are played into each system's microphone in turn, rounds
interleaved. Each system's mic feed and speaker are recorded from their monitors on the wall
clock (MonitorRecorder), so the end of each utterance and the onset of its reply are found in
the recorded signals, not taken from livepipe's own stamps. voice-to-voice = reply onset -
end of the utterance (the emulator spends 500 ms of silence detection and 300 ms of think time
of it, by design, for both systems).

Also per system: CPU as % of one core summed over its processes during its own turns (psutil),
RSS per process at the end, underruns, `startup_ms` (launch -> model session connected and
first audio.in published; for the baseline, its first audio chunk sent), and `stretch_ms`
(recorded reply length minus utterance length: a gap in the reply shows here whatever counted it).
The pipeline's turns also carry the latency-budget stamps (README); the per-stage medians are in
`pipeline_stages_ms`, and `--plot` draws one turn's timeline (needs matplotlib: livepipe[bench]).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig
from livepipe.services.bench.report import cpu_seconds, print_result
from livepipe.services.dev.harness import HarnessError, spawn_livepipe, start_broker, stop_process
from livepipe.services.dev.pulse import DeviceSet, MonitorRecorder, PulseDaemon, PulseError, loud_spans, play_wav
from livepipe.services.lib.audio import read_wav_int16, write_wav_int16
from livepipe.services.lib.verb import VerbParser

LOUD = 500                 # |sample| above this (-36 dBFS) is speech, in the mic feed and the speaker alike
UTTERANCES = [
    "Hello there, how are you today?",
    "What is the weather like?",
    "Please tell me a short story.",
    "Can you see my screen?",
    "Turn the lights off in the kitchen.",
    "What time is it in Tokyo?",
]
IN_RATE, OUT_RATE = 16000, 24000


class BenchError(RuntimeError):
    pass


@dataclass
class Turn:
    system: str
    utterance: int
    v2v_ms: float
    stretch_ms: float
    end_ns: int
    onset_ns: int
    stamps: dict[str, int] = field(default_factory=dict)


@dataclass
class System:
    name: str
    devices: DeviceSet
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    mic: MonitorRecorder | None = None
    speaker: MonitorRecorder | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)   # per process, over its own turns
    wall_s: float = 0.0
    startup_ms: float | None = None
    turns: list[Turn] = field(default_factory=list)
    missed: int = 0
    underrun_at_ms: list[int] = field(default_factory=list)   # playback underrun events, ms after the onset

    def cpu_times(self) -> dict[str, float]:
        return cpu_seconds(self.procs)

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
            except psutil.Error:
                out[name] = None
        return out

    def check_alive(self, workdir: Path) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = workdir / f"{self.name}-{name}.log"
                tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
                raise BenchError(f"{self.name}: {name} exited with code {proc.returncode}: {tail.strip()}")


# ------------------------------------------------------------------ signals
def make_utterances(workdir: Path, count: int) -> list[tuple[Path, float]]:
    """espeak-ng utterances at 16 kHz with 100 ms of silence around: (path, loud length s)."""
    if shutil.which("espeak-ng") is None:
        raise BenchError("espeak-ng is needed to speak the utterances (Debian: apt install espeak-ng)")
    out = []
    for i in range(count):
        raw = workdir / f"utt{i}.espeak.wav"
        subprocess.run(["espeak-ng", "-w", str(raw), UTTERANCES[i % len(UTTERANCES)]], check=True,
                       capture_output=True, timeout=30)
        x, _ = read_wav_int16(raw, IN_RATE)
        pad = np.zeros(IN_RATE // 10, np.int16)
        path = workdir / f"utt{i}.wav"
        write_wav_int16(path, np.concatenate([pad, x, pad]), IN_RATE)
        spans = loud_spans(x, IN_RATE, LOUD)
        out.append((path, (spans[-1][1] - spans[0][0]) / IN_RATE))
    return out


# ------------------------------------------------------------------ systems
def wait_file(path: Path, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not start")
        time.sleep(0.05)


def start_pipeline(sysm: System, env: dict[str, str], workdir: Path, video: bool,
                   playback_args: list[str], capture_args: list[str]) -> dict[str, str]:
    launch = time.time_ns()
    broker, env = start_broker(env, log=workdir / "pipeline-broker.log")
    sysm.procs["broker"] = broker
    cfg = BusConfig.from_env(env)
    with BusClient("bench-pipeline-start", cfg, ["control", "audio.in"]) as client:
        client.wait_ready()
        dev = sysm.devices
        sysm.procs["gemini-bridge"] = spawn_livepipe(["gemini-bridge"], env, log=workdir / "pipeline-gemini-bridge.log")
        sysm.procs["capture-audio"] = spawn_livepipe(["capture-audio", *capture_args], {**env, **dev.capture_env()},
                                                     log=workdir / "pipeline-capture-audio.log")
        sysm.procs["playback"] = spawn_livepipe(["playback", *playback_args], {**env, **dev.playback_env()},
                                                log=workdir / "pipeline-playback.log")
        if video:
            sysm.procs["capture-video"] = spawn_livepipe(["capture-video", "test"], env,
                                                         log=workdir / "pipeline-capture-video.log")
        connected = first_audio = 0
        deadline = time.monotonic() + 40
        while not (connected and first_audio):
            sysm.check_alive(workdir)
            if time.monotonic() > deadline:
                raise BenchError("pipeline: the bridge did not connect, or no audio.in came, within 40 s")
            msg = client.recv(0.2)
            if msg is None:
                continue
            if msg.topic == "control" and msg.kind == "session" and msg["state"] == "connected":
                connected = connected or time.time_ns()
            elif msg.topic == "audio.in":
                first_audio = first_audio or time.time_ns()
        sysm.startup_ms = round((max(connected, first_audio) - launch) / 1e6, 1)
    return env


class BaselineReader:
    """The baseline's stdout lines (`connected NS`, `first_audio NS`, `stats {...}`)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: dict[str, str] = {}
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            key, _, value = line.strip().partition(" ")
            self.lines[key] = value

    def join(self) -> None:
        self._thread.join(3)


def start_baseline(sysm: System, env: dict[str, str], state: Path, workdir: Path) -> BaselineReader:
    launch = time.time_ns()
    dev = sysm.devices
    env = {**env, **dev.capture_env(), **dev.playback_env()}
    with open(workdir / "baseline-client.log", "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "livepipe.services.bench.v2v_baseline", "--state-dir",
                                 str(state)], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    sysm.procs["client"] = proc
    reader = BaselineReader(proc)
    deadline = time.monotonic() + 40
    while "first_audio" not in reader.lines:
        sysm.check_alive(workdir)
        if time.monotonic() > deadline:
            raise BenchError("baseline: no audio sent within 40 s")
        time.sleep(0.02)
    sysm.startup_ms = round((int(reader.lines["first_audio"]) - launch) / 1e6, 1)
    return reader


# ------------------------------------------------------------------ turns
def run_turn(sysm: System, index: int, wav: Path, loud_s: float, daemon_env: dict[str, str],
             client: BusClient | None, workdir: Path) -> None:
    sysm.check_alive(workdir)
    mic, spk = sysm.mic, sysm.speaker
    t_play = time.time_ns()
    cpu0, wall0 = sysm.cpu_times(), time.monotonic()
    play_wav(wav, sysm.devices.mic_feed, daemon_env)
    mic_t0 = mic.t0_ns()
    x = mic.samples(max(0, mic.index_at(t_play, mic_t0)))
    spans = loud_spans(x, IN_RATE, LOUD)
    if not spans:
        raise BenchError(f"{sysm.name}: the utterance was not heard at the mic feed's monitor")
    base = max(0, mic.index_at(t_play, mic_t0))
    utt_start, utt_end = base + spans[0][0], base + spans[-1][1]
    end_ns = mic.time_of(utt_end, mic_t0)
    # Wait for the whole reply: as long as the utterance, then 400 ms quiet (or give up).
    deadline = time.monotonic() + 3.0 + 2 * loud_s
    reply: list[tuple[int, int]] = []
    start_idx = 0
    while time.monotonic() < deadline:
        time.sleep(0.05)
        spk_t0 = spk.t0_ns()
        start_idx = max(0, spk.index_at(end_ns, spk_t0))
        y = spk.samples(start_idx)
        reply = loud_spans(y, OUT_RATE, LOUD)
        if reply and (reply[-1][1] - reply[0][0]) / OUT_RATE >= loud_s - 0.05 and len(y) - reply[-1][1] > 0.4 * OUT_RATE:
            break
    for name, t in sysm.cpu_times().items():
        sysm.cpu_s[name] = sysm.cpu_s.get(name, 0.0) + t - cpu0.get(name, t)
    sysm.wall_s += time.monotonic() - wall0
    if not reply:
        sysm.missed += 1
        return
    spk_t0 = spk.t0_ns()
    onset_ns = spk.time_of(start_idx + reply[0][0], spk_t0)
    stretch = ((reply[-1][1] - reply[0][0]) / OUT_RATE - (utt_end - utt_start) / IN_RATE) * 1000
    stamps: dict[str, int] = {}
    if client is not None:   # the pipeline's own account of the same turn
        while (msg := client.recv(0)) is not None:
            if msg.topic == "playback" and msg.kind == "turn_started":
                stamps = {**msg.get("stamps", {}), "first_sample_ts": msg["first_sample_ts"]}
            elif msg.topic == "playback" and msg.kind == "underrun":   # where in the reply it was
                sysm.underrun_at_ms.append(round((msg["ts"] - onset_ns) / 1e6))
            elif msg.topic == "status" and msg["src"] == "playback":
                sysm.__dict__["playback_metrics"] = msg.get("metrics", {})
    sysm.turns.append(Turn(sysm.name, index, round((onset_ns - end_ns) / 1e6, 1), round(stretch, 1),
                           end_ns, onset_ns, stamps))
    time.sleep(0.2)


# ------------------------------------------------------------------ figures
STAGES = [   # (label, from stamp, to stamp) along one turn; "end"/"onset" come from the recordings
    ("capture: device -> callback", "in_adc_end", "in_callback_ts"),
    ("capture -> audio.in published", "in_callback_ts", "in_pub_ts"),
    ("bus -> bridge", "in_pub_ts", "in_recv_ts"),
    ("bridge -> socket", "in_recv_ts", "in_sent_ts"),
    ("model (emulator: 500 ms silence + 300 ms think)", "in_sent_ts", "reply_recv_ts"),
    ("bridge -> audio.out published", "reply_recv_ts", "out_pub_ts"),
    ("bus -> playback", "out_pub_ts", "play_recv_ts"),
    ("playback buffer -> device", "play_recv_ts", "handed_ts"),
    ("device buffer -> DAC", "handed_ts", "first_sample_ts"),
    ("DAC -> heard at the speaker monitor", "first_sample_ts", "onset"),
]


def turn_points(turn: Turn, chunk_ms: float = 20.0) -> dict[str, float] | None:
    """The turn's stamps in ms from the end of speech. The input-path stamps belong to the newest
    audio.in chunk before the reply; they are shifted so that chunk's end falls on the end of
    speech (the last word takes the same path)."""
    s = turn.stamps
    need = ("in_capture_ts", "in_pub_ts", "in_recv_ts", "in_sent_ts", "reply_recv_ts", "out_pub_ts",
            "play_recv_ts", "handed_ts", "first_sample_ts")
    if not all(s.get(k) for k in need):
        return None
    adc_end = s["in_capture_ts"] + chunk_ms * 1e6
    shift = turn.end_ns - adc_end
    pts = {"in_adc_end": 0.0}
    for k in ("in_callback_ts", "in_pub_ts", "in_recv_ts", "in_sent_ts"):
        if s.get(k):
            pts[k] = (s[k] + shift - turn.end_ns) / 1e6
    if "in_callback_ts" not in pts:
        pts["in_callback_ts"] = pts["in_adc_end"]
    for k in ("reply_recv_ts", "out_pub_ts", "play_recv_ts", "handed_ts", "first_sample_ts"):
        pts[k] = (s[k] - turn.end_ns) / 1e6
    pts["onset"] = turn.v2v_ms
    return pts


def stage_medians(turns: list[Turn]) -> dict[str, float]:
    rows: dict[str, list[float]] = {}
    for t in turns:
        pts = turn_points(t)
        if pts is None:
            continue
        for label, a, b in STAGES:
            rows.setdefault(label, []).append(pts[b] - pts[a])
    return {label: round(float(np.median(v)), 1) for label, v in rows.items()}


def plot_turn(turn: Turn, path: str, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or livepipe[bench])") from None
    pts = turn_points(turn)
    if pts is None:
        raise BenchError("--plot: the turn carries no latency-budget stamps")
    fig, (ax_in, ax_out) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True,
                                        gridspec_kw={"width_ratios": [1, 1.6]})
    labels = [label for label, _, _ in STAGES]
    for row, (label, a, b) in enumerate(STAGES):
        start, dur = pts[a], pts[b] - pts[a]
        color = "#bbbbbb" if a == "in_sent_ts" else ("#4c72b0" if row < 4 else "#dd8452")
        for ax in (ax_in, ax_out):
            ax.barh(row, max(dur, 0.15), left=start, color=color, height=0.6)
        if a != "in_sent_ts":
            ax = ax_in if row < 4 else ax_out
            ax.text(start + max(dur, 0.15) + 0.3, row, f"{dur:.1f} ms", va="center", fontsize=7)
    ax_in.set_xlim(-2, max(pts["in_sent_ts"], 5) + 12)
    lo = pts["reply_recv_ts"] - 3
    ax_out.set_xlim(lo, max(pts["onset"], pts["first_sample_ts"]) + 20)
    ax_out.text(lo + 1, 4, f"model {pts['reply_recv_ts'] - pts['in_sent_ts']:.0f} ms (grey)", va="center",
                fontsize=7, color="#555555")
    ax_in.set_yticks(range(len(labels)), labels, fontsize=7)
    ax_in.invert_yaxis()
    ax_in.set_xlabel("ms after the end of speech (input path)", fontsize=8)
    ax_out.set_xlabel(f"ms after the end of speech (output path); heard at {turn.v2v_ms:.0f} ms", fontsize=8)
    for ax in (ax_in, ax_out):
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


# ------------------------------------------------------------------ bench
def bench(utterances: int, rounds: int, video: bool, playback_args: list[str], capture_args: list[str],
          plot: str | None, keep: bool) -> dict[str, Any]:
    t_start = time.monotonic()
    daemon = PulseDaemon.ensure()
    workdir = Path(tempfile.mkdtemp(prefix="livepipe-bench-pipeline-"))
    state = workdir / "state"
    tag = uuid.uuid4().hex[:4]
    systems = {"pipeline": System("pipeline", daemon.private_devices(f"p{tag}")),
               "baseline": System("baseline", daemon.private_devices(f"b{tag}"))}
    emulator = None
    client = None
    reader = None
    try:
        utts = make_utterances(workdir, utterances)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LIVEPIPE_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "PULSE_SINK",
                                                              "PULSE_SOURCE")}
        env.update(daemon.env, PYTHONUNBUFFERED="1", LIVEPIPE_STATE_DIR=str(state), LIVEPIPE_BACKEND="emulator")
        emulator = spawn_livepipe(["emulator", "--port", "0", "--state-dir", str(state), "--timeline", "off"], env,
                                  log=workdir / "emulator.log")
        wait_file(state / "emulator" / "emulator.json", emulator, 20, "the emulator")
        # Recorders first: they also keep the null sinks on a short clock.
        for s in systems.values():
            s.mic = MonitorRecorder(f"{s.devices.mic_feed}.monitor", IN_RATE, daemon.env)
            s.speaker = MonitorRecorder(f"{s.devices.speaker}.monitor", OUT_RATE, daemon.env)
            s.mic.wait_started()
            s.speaker.wait_started()
        try:
            penv = start_pipeline(systems["pipeline"], env, workdir, video, playback_args, capture_args)
        except HarnessError as exc:
            raise BenchError(str(exc)) from None
        client = BusClient("bench-pipeline", BusConfig.from_env(penv), ["playback", "status"])
        client.wait_ready()
        reader = start_baseline(systems["baseline"], env, state, workdir)
        time.sleep(0.5)   # both sessions idle for a moment before the first word
        order = ["pipeline", "baseline"]
        for r in range(rounds):
            for i, (wav, loud_s) in enumerate(utts):
                for name in (order if (r + i) % 2 == 0 else order[::-1]):
                    run_turn(systems[name], i, wav, loud_s, daemon.env,
                             client if name == "pipeline" else None, workdir)
        # The playback's last heartbeat: its underrun counters.
        try:
            hb = client.wait_for("status", "heartbeat", 3.0, src="playback")
            systems["pipeline"].__dict__["playback_metrics"] = hb.get("metrics", {})
        except BusTimeout:
            pass
        rss = {name: s.rss_mb() for name, s in systems.items()}
    finally:
        if client is not None:
            client.close()
        for s in systems.values():
            for proc in reversed(list(s.procs.values())):
                stop_process(proc)
            for rec in (s.mic, s.speaker):
                if rec is not None:
                    rec.stop()
            s.devices.close()
        if emulator is not None:
            stop_process(emulator)
        daemon.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if reader is not None:
        reader.join()
    base_stats = json.loads(reader.lines.get("stats", "{}")) if reader else {}
    pm = systems["pipeline"].__dict__.get("playback_metrics", {})
    result: dict[str, Any] = {}
    for name, s in systems.items():
        v = [t.v2v_ms for t in s.turns]
        result[f"{name}_v2v_p50_ms"] = _pct(v, 50)
        result[f"{name}_v2v_p99_ms"] = _pct(v, 99)
        result[f"{name}_v2v_ms"] = v
        result[f"{name}_cpu_pct_of_core"] = round(100 * sum(s.cpu_s.values()) / s.wall_s, 1) if s.wall_s else None
        result[f"{name}_cpu_pct_by_process"] = {k: round(100 * v / s.wall_s, 1) for k, v in s.cpu_s.items()} if s.wall_s else {}
        result[f"{name}_turns_missed"] = s.missed
        result[f"{name}_stretch_max_ms"] = max((t.stretch_ms for t in s.turns), default=None)
    p50p, p50b = result["pipeline_v2v_p50_ms"], result["baseline_v2v_p50_ms"]
    result["added_p50_ms"] = round(p50p - p50b, 1) if p50p is not None and p50b is not None else None
    p99p, p99b = result["pipeline_v2v_p99_ms"], result["baseline_v2v_p99_ms"]
    result["added_p99_ms"] = round(p99p - p99b, 1) if p99p is not None and p99b is not None else None
    result["rss_mb"] = rss
    result["underruns"] = {"pipeline": pm.get("underruns"), "pipeline_device_underflows": pm.get("device_underflows"),
                           "baseline": base_stats.get("underruns"),
                           "pipeline_at_ms_after_onset": systems["pipeline"].underrun_at_ms}
    result["startup_ms"] = {name: s.startup_ms for name, s in systems.items()}
    result["pipeline_stages_ms"] = stage_medians(systems["pipeline"].turns)
    result["settings"] = {"utterances": utterances, "rounds": rounds, "video": video,
                          "playback_args": " ".join(playback_args), "capture_args": " ".join(capture_args),
                          "baseline_chunk_frames": 1024}
    result["bench_s"] = round(time.monotonic() - t_start, 1)
    if plot:
        turns = sorted((t for t in systems["pipeline"].turns if turn_points(t)), key=lambda t: t.v2v_ms)
        if not turns:
            raise BenchError("--plot: no pipeline turn carried latency-budget stamps")
        median = turns[len(turns) // 2]
        plot_turn(median, plot, f"livepipe bench pipeline: the median turn ({median.v2v_ms:.0f} ms; baseline "
                                f"p50 {p50b} ms)")
        result["plot"] = plot
    if keep:
        result["workdir"] = str(workdir)
    return result


def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe bench pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--utterances", type=int, default=4, help="different utterances (default 4)")
    # 5 rounds (20 turns a system, ~3 minutes): with 3, the p50 of either system moved by up to 20 ms
    # between runs on one machine, as much as the difference being measured.
    p.add_argument("--rounds", type=int, default=5, help="rounds over them, systems interleaved (default 5)")
    p.add_argument("--no-video", action="store_true", help="leave capture-video out of the pipeline")
    p.add_argument("--playback-args", default="", help="extra arguments for playback, e.g. '--latency-ms 40'")
    p.add_argument("--capture-args", default="", help="extra arguments for capture-audio")
    p.add_argument("--plot", metavar="FILE.png", help="draw the median pipeline turn's timeline (matplotlib)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (process logs)")
    args = p.parse_args(argv)
    if args.utterances < 1 or args.rounds < 1:
        print("livepipe bench pipeline: --utterances and --rounds must be >= 1", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("livepipe bench pipeline: --plot needs matplotlib: pip install matplotlib (or livepipe[bench])",
                  file=sys.stderr)
            return 2
    try:
        result = bench(args.utterances, args.rounds, not args.no_video, shlex.split(args.playback_args),
                       shlex.split(args.capture_args), args.plot, args.keep)
    except (PulseError, BenchError) as exc:
        print(f"livepipe bench pipeline: {exc}", file=sys.stderr)
        return 1
    print_result(result, args.json)
    return 0
