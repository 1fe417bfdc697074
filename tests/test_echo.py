"""Echo cancellation through a real acoustic path: the speaker's output is fed back into the
virtual microphone (PulseAudio module-loopback, with a delay and an attenuation), as a laptop's
loudspeaker is heard by its microphone. The test is the user: it speaks into the microphone at
its turns, and once over the model (a barge-in).

With `--echo cancel` the emulator hears no speech while the model talks except the real
barge-in (no self-interruption); with `--echo off` the same room makes the model interrupt
itself, which shows the test can fail. A cough over the model's reply (a burst of noise) does not
interrupt it with `cancel`: capture-audio's barge-in guard holds it and sends it as silence."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from livepipe.services.dev.pulse import DeviceSet
from livepipe.services.lib.audio import write_wav_int16
from tests.bridge_support import Live, live_factory, speech, wait_for  # noqa: F401
from tests.conftest import spawn, stop
from livepipe.services.dev.pulse import MonitorRecorder
from tests.pulse_support import align, play_into_mic, pulse, pulse_devices, record_source, record_speaker  # noqa: F401

pytestmark = [pytest.mark.timeout(90), pytest.mark.solo]   # solo: ERLE is measured in real time

pytest.importorskip("livekit.rtc", reason="the echo canceller is the `aec` extra (pip install 'livepipe[aec]')")

ECHO_LATENCY_MS = 80      # the room: speaker -> microphone delay asked of module-loopback
ECHO_VOLUME = "60%"       # and its attenuation (PulseAudio's cubic scale: about -13 dB)

TURNS = ["What is the weather like in the city today?", "And what about tomorrow morning?",
         "Tell me a story about a quick brown fox and a lazy dog."]
BARGE_IN = "Stop. Just say hello."


class Conversation:
    """The pipeline on real devices in a room with an echo, and the user's turns in it."""

    def __init__(self, live: Live, env: dict[str, str], devices: DeviceSet, echo: str, tmp: Path) -> None:
        self.live, self.devices, self.tmp = live, devices, tmp
        self.user: list[tuple[int, int]] = []          # (start, end) wall ns of each user utterance
        self.playback = spawn(["playback"], {**env, **devices.playback_env()})
        self.capture = spawn(["capture-audio", "--echo", echo], {**env, **devices.capture_env()})
        self.live.rec.until(lambda ms: {"playback", "capture-audio"} <= {m["src"] for m in ms if m.topic == "status"},
                            20, "playback and capture-audio heartbeats")
        self.live.rec.until(lambda ms: any(m.topic == "status" and m["src"] == "capture-audio"
                                           and m["metrics"].get("echo_reference") == "local" for m in ms),
                            10, "capture-audio to find the local playback")
        self.procs = {"capture-audio": psutil.Process(self.capture.pid), "playback": psutil.Process(self.playback.pid)}
        self.cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in self.procs.items()}
        self.t0 = time.monotonic()

    def cpu(self) -> str:
        """CPU per process since the conversation began, in % of one core (a figure, not asserted)."""
        dt = time.monotonic() - self.t0
        return ", ".join(f"{k} {100 * (sum(p.cpu_times()[:2]) - self.cpu0[k]) / dt:.1f} %" for k, p in self.procs.items())

    def say(self, text: str, wait: bool = True):
        pcm = speech(text)
        path = self.tmp / f"u{len(self.user)}.wav"
        write_wav_int16(path, np.concatenate([pcm, np.zeros(3200, np.int16)]), 16000)
        start = time.time_ns()
        proc = play_into_mic(self.devices, path, wait=wait)
        self.user.append((start, start + int(len(pcm) / 16000 * 1e9)))
        return proc

    def cough(self, ms: int = 170) -> None:
        """A cough-like burst (services/bench/barge.py) into the microphone, as loud as the speech."""
        from livepipe.services.bench.barge import cough
        said = speech(BARGE_IN).astype(np.float64)
        level = float(np.sqrt(np.mean(said[np.abs(said) > 300] ** 2)))   # as loud as the user's voice
        path = self.tmp / "cough.wav"
        write_wav_int16(path, np.concatenate([cough(ms, level, np.random.default_rng(ms)), np.zeros(1600, np.int16)]), 16000)
        play_into_mic(self.devices, path, wait=False)

    def turns_finished(self) -> list:
        return self.live.rec.select("playback", "turn_finished")

    def wait_turns_finished(self, n: int, timeout: float = 20) -> None:
        self.live.rec.until(lambda ms: len(self.turns_finished()) >= n, timeout, f"{n} replies heard")

    def heard_user(self, t_ns: int, within_ns: int = 1_200_000_000) -> bool:
        """Did the user start speaking just before `t_ns`? (The emulator detects the start of an
        utterance within a few hundred ms of its first word, and a barge-in interrupts then.)"""
        return any(a <= t_ns <= a + within_ns for a, _ in self.user)

    def self_interruptions(self) -> list[int]:
        """Interrupts that no utterance of the user caused."""
        return [m["ts"] for m in self.live.rec.select("control", "interrupt") if not self.heard_user(m["ts"])]

    def phantom_speech(self) -> list[dict]:
        """Speech starts the emulator detected that no utterance of the user explains (the model's own voice)."""
        return [e for e in self.live.emu.events("speech_start") if not self.heard_user(int(e["t_ns"]))]

    def capture_metrics(self) -> dict:
        self.live.rec.pump()
        beats = [m for m in self.live.rec.select("status", "heartbeat") if m["src"] == "capture-audio"]
        return beats[-1]["metrics"]

    def story(self) -> str:
        """What happened when, in seconds from the first utterance (printed for a failing run)."""
        t0 = self.user[0][0] if self.user else 0
        ev = [(a, f"user {i} speaks ({(b - a) / 1e9:.1f} s)") for i, (a, b) in enumerate(self.user)]
        ev += [(m["first_sample_ts"], f"model turn {m['turn']} heard") for m in self.live.rec.select("playback", "turn_started")]
        ev += [(m.get("silent_ts") or m["ts"], f"model turn {m['turn']} ends{' (interrupted)' if m['interrupted'] else ''}")
               for m in self.turns_finished()]
        ev += [(int(e["t_ns"]), "emulator: speech_start") for e in self.live.emu.events("speech_start")]
        ev += [(m["ts"], f"interrupt turn {m['turn']}") for m in self.live.rec.select("control", "interrupt")]
        return "\n".join(f"  {(t - t0) / 1e9:7.2f}  {what}" for t, what in sorted(ev))

    def close(self) -> None:
        # Their logs, shown by pytest when the test fails (a late reference, a held burst...).
        for name, proc in (("capture-audio", self.capture), ("playback", self.playback)):
            err = stop(proc)[1]
            print(f"--- {name} log (last 40 lines)\n" + "\n".join(err.splitlines()[-40:]))


def room_delay_ms(spk: MonitorRecorder, mic: MonitorRecorder) -> float:
    """Delay from a sample at the speaker's monitor to its echo at the microphone, on the wall
    clock: the loudest second of the speaker found in the microphone recording after it."""
    s, m = spk.samples(), mic.samples()
    t_s, t_m = spk.t0_ns(), mic.t0_ns()
    k = max(0, int(np.argmax(np.abs(s))) - 8000)
    piece = s[k:k + 16000]
    start_m = max(0, k + (t_s - t_m) * 16000 // 1_000_000_000)     # the same wall time in the mic recording
    lag = align(piece, m[start_m:start_m + 16000 + 8000])
    return lag * 1000 / 16000


# One rerun: on a loaded machine the reference on audio.ref can reach capture-audio after the echo
# of a reply's first syllable (seen once in about six suite runs). Microphone chunks now wait for
# it up to 40 ms (echo_ref_waits); a reference later than that still lets the echo through.
# Seen more often (session 7, none with a late reference): the cough is 160-220 ms of speech to the
# guard's webrtcvad (its own ~100 ms plus what the canceller leaves of the echo around it), close to
# its 260 ms, and one that reached it interrupted the reply (session 8: the guard now also needs a
# vowel, and leaves out voice no louder than the echo: test_guard_tells_a_cough_from_words_over_the_model);
# the reply after the barge-in cut off by its own echo 1.2 s in; a speech start 30 ms before a reply's
# end, merged with the user's next words.
@pytest.mark.flaky(reruns=1)
@pytest.mark.parametrize("echo", ["cancel", "off"])
def test_echo_on_plain_speakers(echo: str, tmp_path: Path, pulse_devices, live_factory, bus_env) -> None:
    pulse_devices.add_room(ECHO_LATENCY_MS, ECHO_VOLUME)   # the microphone hears the speaker
    # The emulator speaks in real time (as a reply is heard), so a barge-in late in a reply still
    # finds it talking.
    live = live_factory(emulator_args=("--pace", "1"))
    conv = Conversation(live, bus_env, pulse_devices, echo, tmp_path)
    try:
        # The speaker's monitor and the microphone, both recorded: the room's true delay. (Recording
        # the speaker also keeps its null sink rendering in small blocks.)
        with record_speaker(pulse_devices, 16000) as spk, record_source(pulse_devices, pulse_devices.virtual_mic, 16000) as mic:
            if echo == "off":
                # One question is enough: the model hears its own answer and cuts itself off.
                conv.say(TURNS[0])
                live.rec.until(lambda ms: conv.self_interruptions(), 15, "the model to interrupt itself")
                true_ms = room_delay_ms(spk, mic)
                print(conv.story())
                assert conv.self_interruptions() and conv.phantom_speech()
                print(f"\necho off: {len(conv.self_interruptions())} self-interruption(s), "
                      f"{len(conv.phantom_speech())} phantom speech start(s); room delay {true_ms:.1f} ms; "
                      f"CPU {conv.cpu()}")
                return
            for i, text in enumerate(TURNS):
                conv.say(text)
                if i < len(TURNS) - 1:
                    conv.wait_turns_finished(i + 1)
            # The user coughs, then talks, over the third reply: only the talk interrupts it.
            live.rec.until(lambda ms: len(live.rec.select("playback", "turn_started")) >= 3, 15, "the third reply")
            # Cough once the reply's echo is at the microphone: the guard holds bursts only while the
            # model is heard there (a cough played as turn_started arrived could reach the microphone
            # before the reply's first echo, and be the user's barge-in: seen once in ~8 runs).
            heard_from = mic.index_at(live.rec.select("playback", "turn_started")[2]["first_sample_ts"])
            wait_for(lambda: int(np.max(np.abs(mic.samples(heard_from)), initial=0)) > 300, 5,
                     "the third reply's echo at the microphone")
            conv.cough()
            # The cough's burst ends 400 ms after its last voiced frame (up to ~300 ms in): the
            # barge-in must start after that, whatever each paplay takes to start, or the guard
            # takes both for one burst (the reply, 3.2 s, is still playing at 1.2 s).
            time.sleep(1.0)
            barge_start = time.time_ns()
            conv.say(BARGE_IN)
            try:
                live.rec.until(lambda ms: live.rec.select("control", "interrupt"), 5, "the barge-in to interrupt")
            except AssertionError:
                print(conv.story(), {k: v for k, v in conv.capture_metrics().items() if k.startswith(("barge", "echo_ref"))})
                raise
            conv.wait_turns_finished(4)
            true_ms = room_delay_ms(spk, mic)
        interrupts = live.rec.select("control", "interrupt")
        metrics = conv.capture_metrics()
        print(f"\necho cancel: interrupts {len(interrupts)}, self-interruptions {len(conv.self_interruptions())}, "
              f"phantom speech {len(conv.phantom_speech())}; ERLE {metrics.get('echo_erle_db')} dB, "
              f"delay estimate {metrics.get('echo_delay_ms')} ms, room delay measured at the devices {true_ms:.1f} ms")
        print(f"barge-in guard: {({k: v for k, v in metrics.items() if k.startswith('barge_in')})}; reference waits: "
              f"{({k: v for k, v in metrics.items() if k.startswith('echo_ref_')})}")
        print(f"CPU {conv.cpu()}; canceller re-alignments {metrics.get('echo_realigns')}")
        print(conv.story())
        assert conv.phantom_speech() == [], "the emulator heard speech while the user was silent"
        assert conv.self_interruptions() == []
        assert len(interrupts) == 1 and 0 < (interrupts[0]["ts"] - barge_start) / 1e6 < 1500
        finished = {m["turn"]: m for m in conv.turns_finished()}
        assert sum(m["interrupted"] for m in finished.values()) == 1
        assert metrics["echo_mode"] == "cancel" and metrics["echo_erle_db"] is not None
        assert abs(metrics["echo_delay_ms"] - true_ms) < 50, "the delay estimate is off the room's delay"
        assert metrics["barge_in_silenced"] >= 1 and metrics["barge_in_released"] >= 1, metrics
    finally:
        conv.close()


# ----------------------------------------------------------------------------- the DSP alone
def _scene(delay_ms: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The model's voice (espeak) and a microphone that hears it `delay_ms` later through a small
    room, attenuated, then the user alone for 2 s."""
    far = np.concatenate([speech(TURNS[2]), speech(TURNS[0])])
    rng = np.random.default_rng(5)
    h = rng.standard_normal(800) * np.exp(-np.arange(800) / 150)
    h *= 0.3 / np.sqrt(np.sum(h * h))
    d = delay_ms * 16
    echo = np.concatenate([np.zeros(d), np.convolve(far.astype(np.float64), h)])[:len(far) + d]
    user = speech(BARGE_IN)
    mic = np.concatenate([echo, np.zeros(8000), user]).astype(np.float64) + rng.standard_normal(len(echo) + 8000 + len(user)) * 5
    return far, np.clip(mic, -32768, 32767).astype(np.int16), len(mic) - len(user)


def test_canceller_removes_a_delayed_echo_and_leaves_the_user_alone() -> None:
    from livepipe.services.lib.echo import ApmCanceller, EchoStage
    far, mic, user_at = _scene(delay_ms=90)
    stage = EchoStage("cancel", ApmCanceller)
    lat = stage.latency
    # Three turns: the model speaks, then the user alone. While the user speaks in the second, the
    # model has been silent long enough that the canceller is not run (echo_idle_frames); the third
    # reply's echo shows it resumes where it was.
    for turn in range(3):
        t0 = 1_800_000_000 * 1_000_000_000 + turn * len(mic) * 62_500
        idle_before = stage.idle_frames
        stage.add_reference(far, 16000, t0)    # what playback handed the device, sounding from t0
        out = np.concatenate([stage.process(mic[i:i + 320], t0 + i * 62_500) for i in range(0, len(mic) - 319, 320)])
        m = stage.metrics()
        assert m["echo_delay_ms"] is not None and abs(m["echo_delay_ms"] - 90) < 5, (turn, m)
        assert m["echo_erle_db"] > 25, (turn, m)
        # The user, alone after the model: published unchanged (only the canceller's latency later).
        user_out = out[user_at + lat:]
        assert np.array_equal(user_out, mic[user_at:user_at + len(user_out)]), turn
        # ... and, in the second turn, from 0.84 s after the model's last sound (its echo can be 0.5 s
        # late) not even run. (The first turn ends with a re-alignment to the estimated delay: a fresh
        # canceller, which runs through AEC3's initial state, 3 s, before it may idle.)
        if turn >= 1:
            assert m["echo_realigns"] == 1 and stage.idle_frames - idle_before >= (len(mic) - user_at - 4800) // 160, m


def test_gate_silences_the_microphone_while_the_model_is_heard() -> None:
    from livepipe.services.lib.echo import EchoStage
    far, mic, user_at = _scene(delay_ms=90)
    stage = EchoStage("gate")
    t0 = 1_800_000_000 * 1_000_000_000
    stage.add_reference(far, 16000, t0)
    out = np.concatenate([stage.process(mic[i:i + 320], t0 + i * 62_500) for i in range(0, len(mic) - 319, 320)])
    voiced = np.flatnonzero(np.abs(far) > 300)
    heard = slice(voiced[0] + 90 * 16 + 8000, voiced[-1] + 90 * 16)   # well inside the echo, after the first estimate
    e_mic = np.mean(mic[heard].astype(np.float64) ** 2)
    e_out = np.mean(out[heard].astype(np.float64) ** 2)
    assert 10 * np.log10(e_mic / max(e_out, 1.0)) > 30   # open only in the model's pauses (noise floor)
    assert np.array_equal(out[user_at:], mic[user_at:len(out)])


class _LeakyCanceller:
    """A canceller in the state AEC3 was in around tests/test_echo.py's failing coughs (double talk):
    it takes only 6 dB off the microphone, so what is left of the model's echo stays voiced."""

    name = "leaky"
    latency = 0

    def process(self, mic: np.ndarray, ref: np.ndarray, delay_hint_ms: int) -> np.ndarray:
        return (mic // 2).astype(np.int16)


def _guarded(mic: np.ndarray, far: np.ndarray, canceller) -> dict:
    """`mic` through the echo stage and the barge-in guard, 20 ms chunks, the reference arriving
    100 ms ahead of its sound as playback sends it; the guard's counts."""
    from livepipe.services.lib.echo import BargeInGuard, EchoStage
    stage, guard = EchoStage("cancel", canceller), BargeInGuard(260)
    stage.estimator.accepted.append(80 * 16)        # the room's delay, as estimated earlier in the turn
    stage.estimator._delay = stage.applied_delay = 80 * 16
    t0 = 1_800_000_000 * 1_000_000_000
    sent = 0
    for i in range(0, len(mic) - 319, 320):
        j = i + 1600
        if j < len(far) and np.any(far[j:j + 320]):
            stage.add_reference(far[j:j + 320], 16000, t0 + j * 62_500)
        processed = stage.process(mic[i:i + 320], t0 + i * 62_500)
        sent += sum(len(c) for c, _ in guard.push(processed, t0 + i * 62_500, stage.heard, stage.near_end_db))
    assert sent + sum(len(c) for c, _ in guard._held) == len(mic) // 320 * 320   # nothing lost or duplicated
    return guard.metrics()


@pytest.mark.parametrize("canceller", ["webrtc", "leaky"])
def test_guard_tells_a_cough_from_words_over_the_model(canceller: str) -> None:
    """Over the model's echo (the room of tests/test_echo.py: 80 ms, -13 dB), a cough as loud as the
    user goes out as silence and "Stop. Just say hello." goes out: with WebRTC's canceller, a 250 ms
    cough (as long as "Stop." is voiced: it cut the model off before, in `bench barge`), and with a
    canceller that leaves the echo 6 dB down (AEC3 in double talk), a 170 ms cough whose echo left
    around it is voiced (it cut the model off before, in tests/test_echo.py)."""
    from livepipe.services.bench.barge import cough
    from livepipe.services.lib.echo import ApmCanceller
    far = np.concatenate([speech(TURNS[2]), speech(TURNS[0])])
    echo = np.concatenate([np.zeros(80 * 16), far.astype(np.float64) * 0.216])   # module-loopback at 60 %
    user = speech(BARGE_IN)
    level = float(np.sqrt(np.mean(user[np.abs(user) > 300].astype(np.float64) ** 2)))
    make = ApmCanceller if canceller == "webrtc" else _LeakyCanceller
    ms = 250 if canceller == "webrtc" else 170
    at = 16000 * 3 // 2                                                           # 1.5 s into the reply
    for near, released in ((cough(ms, level, np.random.default_rng(ms)), False), (user, True)):
        mic = echo.copy()
        mic[at:at + len(near)] += near
        m = _guarded(np.clip(mic, -32768, 32767).astype(np.int16), far[:len(mic)], make)
        assert m["barge_in_held"] >= 1, m
        assert (m["barge_in_released"] >= 1) == released, m
