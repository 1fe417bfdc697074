"""`livepipe capture-audio` through a real audio stack (a PulseAudio virtual microphone) and from files.

What a user would notice: what they say reaches audio.in unchanged (pitch, level, shape),
also when the device runs at another rate, also when nothing listened yet when they spoke;
a WAV file is streamed in real time and survives the whole trip to a playback file; mute
works; without a sound card the program says so in one line.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from livepipe.services.lib.audio import (IN_RATE, OUT_RATE, StreamResampler, WavReader, dominant_frequency, float_to_int16,
                       rms_dbfs, to_mono, tone, write_wav_int16)
from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message
from tests.conftest import spawn, stop
from tests.playback_burst import playback_burst  # noqa: F401  (its minute of playing overlaps these tests)
from tests.pulse_support import (align, loud_spans, play_into_mic, pulse, pulse_devices,  # noqa: F401
                                 similarity, speech_wav, without_portaudio)

CHUNK_FRAMES = 320   # the default 20 ms at 16 kHz

pytestmark = pytest.mark.usefixtures("playback_burst")


@pytest.fixture
def audio_client(bus_cfg: BusConfig) -> Iterator[BusClient]:
    with BusClient("test", bus_cfg, ["audio.in", "status"]) as c:
        c.wait_ready()
        yield c


LAST_METRICS: dict[str, dict] = {}   # newest heartbeat metrics per process, for failure messages


def next_audio(client: BusClient, timeout: float) -> Message | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.recv(max(0.0, deadline - time.monotonic()))
        if msg is None:
            continue
        if msg.topic == "audio.in":
            return msg
        if msg.topic == "status":
            LAST_METRICS[msg["src"]] = msg["metrics"]
    return None


def wait_heartbeat(client: BusClient, src: str, ok, timeout: float = 10.0) -> dict:
    """The first heartbeat of `src` whose metrics satisfy ok(metrics) (other messages are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.recv(max(0.0, deadline - time.monotonic()))
        if msg is not None and msg.topic == "status" and msg["src"] == src and ok(msg["metrics"]):
            return msg["metrics"]
    raise AssertionError(f"no heartbeat from {src} matching the condition within {timeout} s")


def pcm_of(msgs: list[Message]) -> np.ndarray:
    return np.frombuffer(b"".join(m.payload for m in msgs), dtype="<i2")


def start_mic_capture(devices, bus_env: dict, client: BusClient, *args: str) -> tuple[subprocess.Popen, list[Message]]:
    """capture-audio on the private virtual microphone; returns once its first chunk arrived
    (the first input stream of a process takes up to 2 s to deliver)."""
    proc = spawn(["capture-audio", *args], {**bus_env, **devices.capture_env()})
    first = next_audio(client, 15)
    assert first is not None, stop(proc)
    return proc, [first]


def collect_while(proc_or_fn, client: BusClient, msgs: list[Message], extra_s: float) -> None:
    """Collect audio.in while `proc_or_fn()` runs (e.g. paplay feeding the mic), then extra_s more."""
    proc_or_fn()
    deadline = time.monotonic() + extra_s
    while time.monotonic() < deadline:
        msg = next_audio(client, max(0.0, deadline - time.monotonic()))
        if msg is not None:
            msgs.append(msg)


def mic_signal(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Speech, a pause, then a 700 Hz tone at -12 dBFS, as a 16 kHz WAV: (path, speech, tone)."""
    _, speech, _ = speech_wav(tmp_path / "speech.wav", "Hello, can you hear me clearly?", rate=IN_RATE)
    beep = tone(700.0, 0.6, IN_RATE, -12.0)
    path = tmp_path / "mic.wav"
    write_wav_int16(path, np.concatenate([speech, np.zeros(IN_RATE // 2, np.int16), beep]), IN_RATE)
    return path, speech, beep


# ---------------------------------------------------------------- microphone
def test_speech_into_the_microphone_arrives_on_audio_in_intact(pulse_devices, bus_env, audio_client, tmp_path):  # noqa: F811
    wav, speech, beep = mic_signal(tmp_path)
    proc, msgs = start_mic_capture(pulse_devices, bus_env, audio_client)
    try:
        # Receive while paplay speaks into the microphone (collecting in a thread would race
        # nothing here: the broker queues what arrives while paplay blocks).
        collect_while(lambda: play_into_mic(pulse_devices, wav), audio_client, msgs, 0.4)
    finally:
        out, err = stop(proc)
    assert "Traceback" not in err, err
    assert "through libpulse" in err, err   # a sound server's source is read directly (no PortAudio)
    got = pcm_of(msgs)
    assert all(m["rate"] == IN_RATE and m["channels"] == 1 and m["sample_width"] == 2 for m in msgs)
    assert all(m["frames"] == CHUNK_FRAMES for m in msgs), {m["frames"] for m in msgs}
    # capture_ts follows the sample clock: 20 ms apart.
    steps = np.diff([m["capture_ts"] for m in msgs]) / 1e6
    assert np.all(np.abs(steps - 20.0) < 0.5), steps[np.abs(steps - 20.0) >= 0.5]
    # The speech: same shape and level as what was said.
    off = align(speech, got)
    heard = got[off:off + len(speech)]
    assert similarity(speech, heard) > 0.999, LAST_METRICS.get("capture-audio")
    assert rms_dbfs(heard) == pytest.approx(rms_dbfs(speech), abs=0.2)
    # The tone: right pitch and level.
    t_off = align(beep, got)
    heard_beep = got[t_off:t_off + len(beep)]
    assert dominant_frequency(heard_beep, IN_RATE) == pytest.approx(700.0, abs=1.0)
    assert rms_dbfs(heard_beep) == pytest.approx(-12.0, abs=0.2)
    # Nothing was lost or stretched between them.
    assert t_off - off == len(speech) + IN_RATE // 2, LAST_METRICS.get("capture-audio")


def test_a_microphone_at_another_rate_is_resampled_without_clicks(pulse_devices, bus_env, audio_client, tmp_path):  # noqa: F811
    beep = tone(1000.0, 1.0, IN_RATE, -12.0)
    wav = tmp_path / "beep.wav"
    write_wav_int16(wav, beep, IN_RATE)
    # Through PortAudio (--portaudio), so its callback stream is exercised too.
    proc, msgs = start_mic_capture(pulse_devices, bus_env, audio_client, "--device-rate", "48000", "--portaudio")
    try:
        collect_while(lambda: play_into_mic(pulse_devices, wav), audio_client, msgs, 0.3)
    finally:
        out, err = stop(proc)
    assert "48000 Hz, resampled to 16000 Hz through PortAudio" in err, err
    got = pcm_of(msgs)
    spans = loud_spans(got, IN_RATE)
    assert len(spans) == 1, spans
    a, b = spans[0]
    assert (b - a) == pytest.approx(len(beep), abs=IN_RATE * 0.004)
    body = got[a + 160:b - 160].astype(np.float64)
    assert dominant_frequency(body, IN_RATE) == pytest.approx(1000.0, abs=1.0)
    assert rms_dbfs(body.astype(np.int16)) == pytest.approx(-12.0, abs=0.3)
    # Clicks at 10 ms block edges would spread energy across the spectrum: everything away
    # from 1 kHz must stay 60 dB below the tone.
    spec = np.abs(np.fft.rfft(body * np.hanning(len(body)))) ** 2
    freqs = np.fft.rfftfreq(len(body), 1 / IN_RATE)
    near = np.abs(freqs - 1000.0) < 30
    assert 10 * np.log10(spec[~near].sum() / spec[near].sum()) < -60


def test_speech_before_anyone_subscribes_is_held_not_lost(pulse_devices, bus_env, bus_cfg, tmp_path):  # noqa: F811
    wav, speech, beep = mic_signal(tmp_path)
    with BusClient("watch", bus_cfg, ["status"]) as watch:
        watch.wait_ready()
        proc = spawn(["capture-audio"], {**bus_env, **pulse_devices.capture_env()})
        try:
            # Capturing (the backlog grows) while nobody subscribes to audio.in.
            wait_heartbeat(watch, "capture-audio", lambda m: m.get("backlog_ms", 0) > 0, timeout=15)
            play_into_mic(pulse_devices, wav)                      # the user speaks to nobody
            t_subscribe = time.time_ns()
            with BusClient("late", bus_cfg, ["audio.in"]) as late:
                late.wait_ready()
                msgs: list[Message] = []
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    msg = next_audio(late, 0.5)
                    if msg is not None:
                        msgs.append(msg)
                    if msgs and msgs[-1]["capture_ts"] > t_subscribe + 200_000_000:
                        break
        finally:
            out, err = stop(proc)
    assert "holding up to 30 s" in err and "sending the" in err, err
    got = pcm_of(msgs)
    off = align(speech, got)
    assert similarity(speech, got[off:off + len(speech)]) > 0.999
    assert msgs[off // CHUNK_FRAMES]["capture_ts"] < t_subscribe   # spoken before anyone listened


# ---------------------------------------------------------------- files
def test_a_wav_file_goes_through_capture_and_playback_files_intact(bus_env, audio_client, bus_cfg, tmp_path):
    # A 44.1 kHz stereo 24-bit file: any rate, channel count and width must be converted.
    src, speech, rate = speech_wav(tmp_path / "src.wav", "One, two, three. Testing the file source.")
    stereo = tmp_path / "in.wav"
    subprocess.run(["sox", str(src), "-r", "44100", "-c", "2", "-b", "24", str(stereo)], check=True)
    with WavReader(stereo) as r:
        assert (r.rate, r.channels, r.sample_width) == (44100, 2, 3)
        duration = r.duration_s
        reference = StreamResampler(44100, IN_RATE).process(float_to_int16(to_mono(r.read(r.frames))), last=True)
    out_path = tmp_path / "out.wav"
    playback = spawn(["playback", "--file", str(out_path)], bus_env)
    with BusClient("relay", bus_cfg, ["playback"]) as relay:
        relay.wait_ready()
        relay.wait_subscriber("audio.out", 15)
        capture = spawn(["capture-audio", "--file", str(stereo)], bus_env)
        msgs, arrivals = [], []
        while True:
            msg = next_audio(audio_client, 0.3)
            if msg is None:
                if capture.poll() is not None:
                    break   # the file ended and nothing more is in flight
                continue
            msgs.append(msg)
            arrivals.append(time.monotonic())
        # The relay: what a model would say back, here the user's own words at 24 kHz, sent
        # in one burst (as the Live API does) so the relay's own timing cannot cause gaps.
        up = StreamResampler(IN_RATE, OUT_RATE)
        relayed = [up.process(np.frombuffer(m.payload, dtype="<i2")) for m in msgs]
        relayed.append(up.process(np.empty(0, np.int16), last=True))
        for pcm in relayed:
            relay.publish("audio.out", "audio", pcm.tobytes(), rate=OUT_RATE, channels=1, sample_width=2,
                          frames=len(pcm), turn=1)
        relay.publish("control", "turn_complete", turn=1)
        deadline = time.monotonic() + 10
        while True:
            msg = relay.recv(max(0.0, deadline - time.monotonic()))
            assert msg is not None, "playback never finished the turn"
            if msg.topic == "playback" and msg.kind == "turn_finished":
                break
        _, cap_err = capture.communicate(timeout=5)
        _, pb_err = stop(playback)
    assert capture.returncode == 0 and "Traceback" not in cap_err + pb_err, cap_err + pb_err
    got = pcm_of(msgs)
    # The source: whole, converted, in real time.
    assert abs(len(got) - len(reference)) <= CHUNK_FRAMES
    n = min(len(got), len(reference))
    assert similarity(reference[:n], got[:n]) > 0.9999
    assert arrivals[-1] - arrivals[0] == pytest.approx(duration, rel=0.05, abs=0.05)
    steps = np.diff([m["capture_ts"] for m in msgs])
    assert np.all(steps == 20_000_000)
    # The sink: the file holds exactly what was relayed.
    sent = np.concatenate(relayed)
    with WavReader(out_path) as r:
        heard = float_to_int16(r.read(r.frames)[:, 0])
    spans = loud_spans(heard, OUT_RATE, threshold=50, min_gap_ms=400)
    assert spans, "nothing in the playback file"
    lo = max(0, spans[0][0] - 2400)
    off = lo + align(sent, heard[lo:])
    assert np.array_equal(heard[off:off + len(sent)], sent)


def test_the_file_source_rejects_a_file_that_is_not_wav(bus_env, tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all\n")
    proc = spawn(["capture-audio", "--file", str(bad)], bus_env)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert err.strip().count("\n") == 0 and "is not a WAV file" in err, err


# ---------------------------------------------------------------- mute, errors
def test_mute_stops_audio_in_and_unmute_resumes_it(bus_env, audio_client, tmp_path):
    # A test tone needs no PortAudio: it runs where importing sounddevice would fail.
    proc = spawn(["capture-audio", "--tone", "440"], without_portaudio(bus_env, tmp_path))
    try:
        assert next_audio(audio_client, 15) is not None
        audio_client.publish("control", "mute")
        wait_heartbeat(audio_client, "capture-audio", lambda m: m["muted"] == 1)
        # Muted: heartbeats keep coming, audio does not.
        t_muted = time.time_ns()
        m = wait_heartbeat(audio_client, "capture-audio", lambda m: m["muted_chunks"] >= 10)
        assert m["muted"] == 1
        audio_client.publish("control", "unmute")
        after = next_audio(audio_client, 5)
        assert after is not None and after["capture_ts"] > t_muted + 200_000_000
        m = wait_heartbeat(audio_client, "capture-audio", lambda m: m["muted"] == 0)
    finally:
        out, err = stop(proc)
    assert "muted: audio.in paused" in err and "unmuted: audio.in resumed" in err, err
    assert m["dropped_chunks"] == 0 and m["source"] == "tone" and m["level_dbfs"] == pytest.approx(-12.0, abs=0.2)


def test_no_sound_card_gives_one_clear_line_naming_the_file_source(bus_env):
    env = {**bus_env, "PULSE_SERVER": "unix:/nonexistent/pulse/native"}
    t0 = time.monotonic()
    proc = spawn(["capture-audio"], env)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1
    assert time.monotonic() - t0 < 10
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "no audio input device" in lines[0] and "--file" in lines[0] and "Traceback" not in err


def test_a_sound_server_that_goes_away_ends_capture_with_one_clear_line(bus_env, audio_client, tmp_path):
    """The microphone is read on the event loop (libpulse, no thread): when its server dies the
    process says so in one line and exits 1 (a supervisor restarts it), it does not hang deaf."""
    if shutil.which("pulseaudio") is None:
        pytest.skip("pulseaudio is not installed")
    home = tmp_path / "pulse"
    home.mkdir()
    (home / "server.pa").write_text(f"load-module module-native-protocol-unix socket={home}/native auth-anonymous=1\n"
                                    "load-module module-null-sink sink_name=feed rate=16000 channels=1\n"
                                    "set-default-source feed.monitor\n")
    server = subprocess.Popen(["pulseaudio", "-n", "-F", str(home / "server.pa"), "--daemonize=no",
                               "--exit-idle-time=-1", "--use-pid-file=no"],
                              env={**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(home)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**bus_env, "PULSE_SERVER": f"unix:{home}/native"}
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, "the private PulseAudio did not start"
            time.sleep(0.05)   # poll interval for the daemon's socket
        proc = spawn(["capture-audio"], env)
        assert next_audio(audio_client, 15) is not None, stop(proc)
    finally:
        server.terminate()
        server.wait(10)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1, err
    errors = [line for line in err.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "stopped delivering audio" in errors[0], err
    assert "Traceback" not in err


def test_list_devices_shows_the_pulse_devices(pulse, bus_env):  # noqa: F811
    pulse.ensure_running()
    proc = spawn(["capture-audio", "--list-devices"], {**bus_env, **pulse.env})
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "pulse" in out and "default" in out


def test_the_microphone_process_exits_cleanly_on_sigterm_every_time(pulse_devices, bus_env, audio_client):  # noqa: F811
    """Stopped while the device delivers a block every 10 ms, capture-audio used to miss the
    cancellation now and then (asyncio.wait_for before 3.12) and was SIGKILLed: rc -9."""
    for i in range(4):
        proc, _ = start_mic_capture(pulse_devices, bus_env, audio_client)
        _, err = stop(proc)
        assert proc.returncode == 0, f"stop {i + 1}: rc {proc.returncode}\n{err}"
        assert "Traceback" not in err
