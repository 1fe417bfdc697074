"""Audio devices by the names users see (issue 11 point 5), on a real PulseAudio server.

What a user would notice: `--list-devices` shows the sound server's sources and sinks by name
and description; `--device NAME` with such a name opens that very source or sink (the sound
goes there, not to the default) and the log names it instead of PortAudio's 'default'.
Processes get no PULSE_SOURCE / PULSE_SINK here: the name on the command line alone decides.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.lib.audio import IN_RATE, OUT_RATE, dominant_frequency, rms_dbfs, tone, write_wav_int16
from tests.conftest import spawn, stop
from tests.playback_burst import publish_turn, start_playback, wait_event
from tests.pulse_support import loud_spans, play_into_mic, pulse, pulse_devices, record_speaker  # noqa: F401


@pytest.mark.parametrize("verb", ["capture-audio", "playback"])
def test_list_devices_names_the_servers_sources_and_sinks(pulse_devices, bus_env, verb):  # noqa: F811
    proc = spawn([verb, "--list-devices"], {**bus_env, **pulse_devices.daemon.env})
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    sources = out.split("sound server sources")[1].split("sound server sinks")[0]
    sinks = out.split("sound server sinks")[1]
    assert pulse_devices.virtual_mic in sources and f"{pulse_devices.speaker}.monitor" in sources
    assert pulse_devices.speaker in sinks and pulse_devices.mic_feed in sinks
    assert "Null Output" in sinks                     # descriptions too, as desktop settings show them
    assert "pulse" in out and "default" in out        # PortAudio's own devices are still listed


def test_capture_from_a_server_source_by_name(pulse_devices, bus_env, bus_cfg, tmp_path):  # noqa: F811
    wav = tmp_path / "beep.wav"
    write_wav_int16(wav, tone(700.0, 0.6, IN_RATE, -12.0), IN_RATE)
    with BusClient("test", bus_cfg, ["audio.in"]) as client:
        client.wait_ready()
        proc = spawn(["capture-audio", "--device", pulse_devices.virtual_mic], {**bus_env, **pulse_devices.daemon.env})
        try:
            client.wait_for("audio.in", timeout=15)   # the first input stream takes up to 2 s
            play_into_mic(pulse_devices, wav)          # returns once played: its chunks are queued
            got, deadline = [], time.monotonic() + 0.4
            while (left := deadline - time.monotonic()) > 0:
                if (msg := client.recv(left)) is not None:
                    got.append(msg.payload)
        finally:
            _, err = stop(proc)
    assert proc.returncode == 0, err
    heard = np.frombuffer(b"".join(got), dtype="<i2")
    spans = loud_spans(heard, IN_RATE)
    assert spans, "the tone played into the named source never reached audio.in"
    a, b = spans[0]
    assert dominant_frequency(heard[a:b], IN_RATE) == pytest.approx(700.0, abs=2.0)
    line = next(x for x in err.splitlines() if "capturing from" in x)
    assert f"source {pulse_devices.virtual_mic}" in line and "'default'" not in line, line


def test_play_to_a_server_sink_by_name(pulse_devices, bus_env, bus_cfg):  # noqa: F811
    rec = record_speaker(pulse_devices)
    with BusClient("test", bus_cfg, ["playback"]) as client:
        client.wait_ready()
        proc = start_playback(["--device", pulse_devices.speaker], {**bus_env, **pulse_devices.daemon.env}, client)
        try:
            publish_turn(client, 1, tone(440.0, 0.5, OUT_RATE, -12.0))
            client.publish("control", "turn_complete", turn=1)
            finished = wait_event(client, "turn_finished", 1, timeout=10)
            assert rec.wait_frames(rec.index_at(finished["silent_ts"]) + 2400, 5)
        finally:
            _, err = stop(proc)
            heard = rec.stop()
    assert proc.returncode == 0, err
    spans = loud_spans(heard, OUT_RATE)
    assert len(spans) == 1, spans
    got = heard[spans[0][0]:spans[0][1]]
    assert dominant_frequency(got, OUT_RATE) == pytest.approx(440.0, abs=0.5)
    assert rms_dbfs(got) == pytest.approx(-12.0, abs=0.2)
    line = next(x for x in err.splitlines() if "playing audio.out to" in x)
    assert f"sink {pulse_devices.speaker}" in line and "'default'" not in line, line
