"""`livepipe bench barge [--json]`: coughs over the model's reply, and a real barge-in, through a
real acoustic path, per protection against false interruptions.

A PulseAudio room as in tests/test_echo.py: the speaker's monitor is fed back into the virtual
microphone by module-loopback (80 ms, 60 % volume, about -13 dB). The emulator, gemini-bridge,
playback and capture-audio (`--echo cancel`) run as real processes on free ports. The user (this
process) asks a long question; while the model (the emulator parrots) answers, synthetic coughs
are played into the microphone: 150-250 ms of band-passed noise with a 15 ms attack and a fast
decay, as loud as the user's speech, 1.3 s apart. A reply the emulator interrupts during the
coughs was cut off by a cough (nothing else was said). Then, per configuration, a spoken barge-in
("Stop. Just say hello.") over a reply: the delay from its first sound at the microphone (found
in a recording of the mic feed) to the bridge's `control: interrupt`.

Configurations: the canceller alone (the service decides), capture-audio's `--barge-in-ms`
guard at several lengths, and the service's own `prefix_padding_ms` (bridge `--vad-prefix-ms`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.bench.report import cpu_seconds
from livepipe.services.dev.harness import BenchError, spawn_livepipe, start_broker, stop_process
from livepipe.services.dev.pulse import DeviceSet, MonitorRecorder, PulseDaemon
from livepipe.services.lib.audio import read_wav_int16, write_wav_int16
from livepipe.services.lib.verb import VerbParser, verb

RATE = 16000
ECHO_LATENCY_MS = 80
ECHO_VOLUME = "60%"
QUESTION = ("Tell me a long story about a quick brown fox and a lazy dog who lived by the river, "
            "and went fishing together every single morning.")
BARGE_IN = "Stop. Just say hello."
COUGH_GAP_S = 1.3
CONFIGS: dict[str, tuple[list[str], list[str]]] = {     # name -> (capture-audio args, bridge args)
    "cancel_only": (["--barge-in-ms", "0"], []),
    "guard_200ms": (["--barge-in-ms", "200"], []),
    "guard_260ms": (["--barge-in-ms", "260"], []),
    "guard_300ms": (["--barge-in-ms", "300"], []),
    "service_prefix_300ms": (["--barge-in-ms", "0"], ["--vad-prefix-ms", "300"]),
    "guard_260ms_no_ref_wait": (["--barge-in-ms", "260", "--echo-ref-wait-ms", "0"], []),
}
DEFAULT_CONFIGS = ["cancel_only", "guard_200ms", "guard_260ms", "guard_300ms", "service_prefix_300ms"]


def speak(text: str, workdir: Path) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        raise BenchError("espeak-ng is needed to speak (Debian: apt install espeak-ng)")
    raw = workdir / "espeak.wav"
    subprocess.run(["espeak-ng", "-s", "190", "-w", str(raw), text], check=True, capture_output=True, timeout=30)
    x, _ = read_wav_int16(raw, RATE)
    return x


def cough(ms: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """A cough-like burst: band-passed noise (about 200 Hz - 5 kHz), 15 ms attack, decaying."""
    n = 16 * ms
    x = rng.standard_normal(n + 200)
    x = np.convolve(x, np.ones(3) / 3, "same") - np.convolve(x, np.ones(25) / 25, "same")
    env = np.minimum(1, np.arange(n) / (16 * 15)) * np.exp(-np.arange(n) / (16 * ms / 3))
    y = x[:n] * env
    return np.clip(y * rms / np.sqrt(np.mean(y[: n // 3] ** 2)), -32768, 32767).astype(np.int16)


class Rig:
    """One configuration: its processes, a bus client, and what it saw."""

    def __init__(self, env: dict[str, str], dev: DeviceSet, workdir: Path, name: str,
                 capture_args: list[str], bridge_args: list[str]) -> None:
        self.dev, self.workdir, self.name = dev, workdir, name
        self.broker, self.env = start_broker(env, log=workdir / f"{name}-broker.log")
        self.procs: dict[str, subprocess.Popen] = {}
        self.msgs: list[Any] = []
        self.notes: list[tuple[int, str]] = []       # (wall ns, what the bench did)
        self.client: BusClient | None = None
        try:   # a process that fails to start or connect: stop the others, never leave them running
            self.client = BusClient("bench-barge", BusConfig.from_env(self.env), ["control", "playback", "status"])
            self.client.wait_ready()
            self.procs["gemini-bridge"] = spawn_livepipe(["gemini-bridge", *bridge_args], self.env,
                                                         log=workdir / f"{name}-bridge.log")
            self.procs["playback"] = spawn_livepipe(["playback"], {**self.env, **dev.playback_env()},
                                                    log=workdir / f"{name}-playback.log")
            self.procs["capture-audio"] = spawn_livepipe(["capture-audio", "--echo", "cancel", *capture_args],
                                                         {**self.env, **dev.capture_env()},
                                                         log=workdir / f"{name}-capture-audio.log")
            self.until(lambda: any(m.topic == "control" and m.kind == "session" and m["state"] == "connected"
                                   for m in self.msgs), 30, "the bridge to connect")
            self.until(lambda: any(m.topic == "status" and m["src"] == "capture-audio"
                                   and m["metrics"].get("echo_reference") == "local" for m in self.msgs),
                       15, "capture-audio to find the local playback")
        except BaseException:
            self.close()
            raise
        self.cpu0 = self.cpu_times()
        self.t0 = time.monotonic()

    def pump(self, timeout: float = 0.02) -> None:
        assert self.client is not None
        msg = self.client.recv(timeout)
        while msg is not None:
            self.msgs.append(msg)
            msg = self.client.recv(0)

    def until(self, pred: Any, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            v = pred()
            if v:
                return v
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise BenchError(f"{self.name}: {name} exited ({p.returncode}); see {self.workdir}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: timed out after {timeout} s waiting for {what}")

    def wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(min(0.02, max(0.0, deadline - time.monotonic())))

    def settle(self) -> None:
        """Until every reply has finished and none started for 1.5 s (a cough that got through is
        a turn of its own: the emulator answers it)."""
        def quiet() -> bool:
            started, finished = self.select("playback", "turn_started"), self.select("playback", "turn_finished")
            last = max([m["ts"] for m in started + finished], default=0)
            return len(finished) >= len(started) and time.time_ns() - last > 1_500_000_000
        self.until(quiet, 30, "the conversation to settle")

    def select(self, topic: str, kind: str) -> list[Any]:
        return [m for m in self.msgs if m.topic == topic and m.kind == kind]

    def cpu_times(self) -> dict[str, float]:
        return cpu_seconds(self.procs)

    def cpu_pct(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        now = self.cpu_times()
        return {k: round(100 * (now[k] - self.cpu0[k]) / dt, 1) for k in ("capture-audio", "playback")}

    def capture_metrics(self) -> dict[str, Any]:
        self.pump(0.3)
        beats = [m for m in self.msgs if m.topic == "status" and m.kind == "heartbeat" and m["src"] == "capture-audio"]
        return beats[-1]["metrics"] if beats else {}

    def play(self, path: Path) -> subprocess.Popen:
        return subprocess.Popen(["paplay", f"--device={self.dev.mic_feed}", "--latency-msec=20", str(path)],
                                env={**os.environ, **self.dev.daemon.env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def ask(self, question: Path) -> tuple[int, Any]:
        """Say the question; return (turn number, playback turn_started of its reply): the first turn
        that starts after the question was said. A turn that started while it was being said is the
        model's answer to what was said before (a barge-in or a cough that got through: the emulator
        answers it, sometimes more than settle()'s 1.5 s after the interrupted turn), cut off by the
        question; taking it for the reply played the barge-in before the reply and the bench timed
        out waiting for it to interrupt."""
        self.note("question starts")
        self.play(question).wait(60)
        said = time.time_ns()
        self.note("question said")
        started = self.until(lambda: [m for m in self.select("playback", "turn_started") if m["ts"] > said],
                             20, "the reply")[0]
        return int(started["turn"]), started

    def finished(self, turn: int, timeout: float = 40) -> Any:
        return self.until(lambda: [m for m in self.select("playback", "turn_finished") if m["turn"] == turn],
                          timeout, f"turn {turn} to finish")[0]

    def note(self, what: str) -> None:
        self.notes.append((time.time_ns(), what))

    def write_timeline(self) -> None:
        """What the bench did and the turns it saw, in seconds, to NAME-turns.txt in the workdir
        (a run that times out explains itself)."""
        ev = list(self.notes)
        for m in self.msgs:
            if m.topic == "playback" and m.kind == "turn_started":
                ev.append((m["ts"], f"turn {m['turn']} started (first sample at +{(m['first_sample_ts'] - m['ts']) / 1e6:.0f} ms)"))
            elif m.topic == "playback" and m.kind == "turn_finished":
                ev.append((m["ts"], f"turn {m['turn']} finished{' (interrupted)' if m['interrupted'] else ''}"))
            elif m.topic == "control" and m.kind == "interrupt":
                ev.append((m["ts"], f"interrupt turn {m['turn']}"))
        t0 = min((t for t, _ in ev), default=0)
        (self.workdir / f"{self.name}-turns.txt").write_text("".join(f"{(t - t0) / 1e9:8.2f}  {w}\n" for t, w in sorted(ev)))

    def close(self) -> None:
        if self.client is not None:
            self.write_timeline()
            self.client.close()
        for p in reversed(list(self.procs.values())):
            stop_process(p)
        stop_process(self.broker)


def onset_in_mic(mic: MonitorRecorder, pcm: np.ndarray, after_ns: int) -> int:
    """Wall time the first sound of `pcm` reached the microphone, found in the mic feed's recording
    (which also holds the room's echo: cross-correlation finds the utterance under it)."""
    rec = mic.samples()
    t0 = mic.t0_ns()
    start = max(0, mic.index_at(after_ns, t0) - RATE // 10)
    seg = rec[start:start + len(pcm) + 2 * RATE].astype(np.float64)
    a = pcm.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(seg) + len(a))))
    corr = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(a, n)), n)[:max(1, len(seg) - len(a) + 1)]
    lag = int(np.argmax(corr))
    first = int(np.flatnonzero(np.abs(pcm) > 300)[0])
    return mic.time_of(start + lag + first, t0)


def run_config(name: str, capture_args: list[str], bridge_args: list[str], env: dict[str, str],
               daemon: PulseDaemon, workdir: Path, coughs: int, barge_ins: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    dev = daemon.private_devices(f"bg{uuid.uuid4().hex[:4]}")
    rig = None
    try:
        dev.add_room(ECHO_LATENCY_MS, ECHO_VOLUME)
        q = speak(QUESTION, workdir)
        level = float(np.sqrt(np.mean(q[np.abs(q) > 300].astype(np.float64) ** 2)))
        qpath = workdir / "question.wav"
        write_wav_int16(qpath, np.concatenate([q, np.zeros(RATE // 5, np.int16)]), RATE)
        b = speak(BARGE_IN, workdir)
        bpath = workdir / "barge.wav"
        write_wav_int16(bpath, b, RATE)
        with MonitorRecorder(f"{dev.speaker}.monitor", RATE, daemon.env) as spk, \
                MonitorRecorder(f"{dev.mic_feed}.monitor", RATE, daemon.env) as mic:
            spk.wait_started()   # also keeps the null sinks rendering in short blocks
            mic.wait_started()
            rig = Rig(env, dev, workdir, name, capture_args, bridge_args)
            rig.wait(1.0)
            over, cut, lengths = 0, 0, []
            while over < coughs:
                turn, started = rig.ask(qpath)
                # coughs from 0.6 s into the reply, 1.3 s apart, as many as fit in it
                k = max(1, min(coughs - over, int((len(q) / RATE - 1.2) / COUGH_GAP_S)))
                track = np.zeros(int(RATE * (0.3 + k * COUGH_GAP_S)), np.int16)
                for i in range(k):
                    ms = int(rng.integers(150, 251))
                    lengths.append(ms)
                    c = cough(ms, level, rng)
                    at = int(RATE * (0.1 + i * COUGH_GAP_S))
                    track[at:at + len(c)] = c
                cpath = workdir / f"coughs{turn}.wav"
                write_wav_int16(cpath, track, RATE)
                rig.wait((started["first_sample_ts"] + 500_000_000 - time.time_ns()) / 1e9)
                t_play = time.time_ns()
                rig.note(f"{k} coughs start over turn {turn}")
                proc = rig.play(cpath)
                done = rig.finished(turn)
                proc.kill()   # the rest of the coughs would fall after the reply
                proc.wait(5)
                end = done.get("silent_ts") or done["ts"]
                # coughs whose sound began before the reply went silent
                onsets = [t_play + int((0.1 + i * COUGH_GAP_S) * 1e9) for i in range(k)]
                n_over = sum(1 for t in onsets if t < end - 100_000_000)
                over += max(1, n_over) if done["interrupted"] else n_over
                cut += int(bool(done["interrupted"]))
                rig.settle()
            delays = []
            cut_early = 0
            for _ in range(barge_ins):
                for _attempt in range(3):
                    turn, started = rig.ask(qpath)
                    rig.wait((started["first_sample_ts"] + 800_000_000 - time.time_ns()) / 1e9)
                    if not [m for m in rig.select("playback", "turn_finished") if m["turn"] == turn]:
                        break
                    # The reply was cut off before the barge-in (the model's own echo, or the end of
                    # the question taken for more speech): counted, and asked again
                    cut_early += 1
                    rig.note(f"turn {turn} was over before the barge-in: asked again")
                    rig.settle()
                t_play = time.time_ns()
                n_int = len(rig.select("control", "interrupt"))
                rig.note(f"barge-in starts over turn {turn}")
                rig.play(bpath).wait(30)
                rig.note("barge-in said")
                ints = rig.until(lambda: rig.select("control", "interrupt")[n_int:], 10, "the barge-in to interrupt")
                rig.finished(turn)
                time.sleep(0.3)
                onset = onset_in_mic(mic, b, t_play)
                delays.append(round((ints[0]["ts"] - onset) / 1e6))
                # The model answers the barge-in: let that answer play out before the next question,
                # which would otherwise cut it off (settle() alone may end before it starts)
                try:
                    answer = rig.until(lambda: [m for m in rig.select("playback", "turn_started") if m["turn"] > turn],
                                       10, "the answer to the barge-in")[0]
                    rig.finished(int(answer["turn"]))
                except BenchError:
                    pass
                rig.settle()
            m = rig.capture_metrics()
            cpu = rig.cpu_pct()
        return {"coughs_over_model": over, "coughs_that_cut_the_model_off": cut, "cough_ms": [min(lengths), max(lengths)] if lengths else None,
                "barge_in_interrupt_after_onset_ms": delays, "replies_cut_before_the_barge_in": cut_early, "echo_erle_db": m.get("echo_erle_db"),
                "echo_delay_ms": m.get("echo_delay_ms"), "guard": {k: v for k, v in m.items() if k.startswith("barge_in")},
                "ref_wait": {k: m.get(k) for k in ("echo_ref_waits", "echo_ref_wait_ms_max", "echo_ref_timeouts", "echo_ref_late",
                                                     "echo_ref_missed", "echo_ref_missed_ms_max", "echo_ref_lead_ms_min")},
                "cpu_pct_core": cpu}
    finally:
        if rig is not None:
            rig.close()
        dev.close()


BUSY = "import time\nt = time.monotonic() + {s}\nwhile time.monotonic() < t:\n    pass\n"


def bench(configs: list[str], coughs: int, barge_ins: int, seed: int, load: int = 0) -> dict[str, Any]:
    daemon = PulseDaemon.ensure()
    workdir = Path(tempfile.mkdtemp(prefix="livepipe-bench-barge-"))
    state = workdir / "state"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LIVEPIPE_") and k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "PULSE_SINK", "PULSE_SOURCE")}
    env.update(daemon.env, PYTHONUNBUFFERED="1", LIVEPIPE_STATE_DIR=str(state), LIVEPIPE_BACKEND="emulator")
    emulator = spawn_livepipe(["emulator", "--port", "0", "--state-dir", str(state), "--timeline", "off"], env,
                              log=workdir / "emulator.log")
    result: dict[str, Any] = {"room": f"module-loopback {ECHO_LATENCY_MS} ms, volume {ECHO_VOLUME}", "workdir": str(workdir),
                              "busy_loops": load}
    # CPU load: busy Python loops, each ending by itself after 20 minutes at most
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(s=1200)]) for _ in range(load)]
    try:
        deadline = time.monotonic() + 20
        while not (state / "emulator" / "emulator.json").exists():
            if emulator.poll() is not None or time.monotonic() > deadline:
                raise BenchError("the emulator did not start")
            time.sleep(0.05)
        for i, name in enumerate(configs):
            cap, br = CONFIGS[name]
            result[name] = run_config(name, cap, br, env, daemon, workdir, coughs, barge_ins, seed + i)
    finally:
        for b in busy:
            b.kill()
            b.wait()
        stop_process(emulator)
        daemon.close()
    return result


@verb("bench barge")
def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe bench barge", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="one JSON object (the default output too)")
    p.add_argument("--coughs", type=int, default=20, help="coughs over the model per configuration (default 20)")
    p.add_argument("--barge-ins", type=int, default=3, help="spoken barge-ins per configuration (default 3)")
    p.add_argument("--config", action="append", choices=list(CONFIGS),
                   help=f"configurations to run (default: {', '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--load", type=int, default=0, metavar="N", help="N busy Python loops running meanwhile (CPU load)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not 0 <= args.load <= 8:
        p.error("--load must be within 0..8")
    if args.coughs < 0 or args.barge_ins < 0:
        p.error("--coughs and --barge-ins must be >= 0")
    print(json.dumps(bench(args.config or DEFAULT_CONFIGS, args.coughs, args.barge_ins, args.seed, args.load), indent=2))
    return 0
