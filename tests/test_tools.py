"""The debugging tools against a real broker and real processes: tap, tap --stats, top, record,
replay, export, say, and the bench's plumbing; plus the tools' import hygiene."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import msgpack

from livepipe.bus.client import BusClient
from livepipe.bus.message import decode, encode, make_header
from livepipe.services.lib.recording import MAGIC, RecordingWriter, read_all
from tests.conftest import ROOT, spawn, stop
from tests.tool_publisher import sine_chunk

TOOLS = ["tap", "top", "record", "replay", "export", "say", "transcript"]


def publisher(env: dict[str, str], *args: str) -> subprocess.Popen:
    """tests/tool_publisher.py: a real Service process publishing known audio/text."""
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "tool_publisher.py"), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 20.0) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"rc {proc.returncode}: {err}"
    return out, err


def wait_stderr(proc: subprocess.Popen, text: str, timeout: float = 10.0) -> None:
    """Block until the tool says `text` on stderr (it prints it once its subscriptions are live)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no {text!r} from the tool: {seen}")


def original_messages(path: Path) -> list:
    """The recorded messages, each with the receipt time the recorder noted."""
    meta, records, _ = read_all(path)
    out = []
    for recv_ns, frames in records:
        msg = decode(frames, meta["session"])
        msg.recv_ns = recv_ns
        out.append(msg)
    return out


# ----------------------------------------------------------------------------- tap
def test_tap_prints_a_line_per_message_from_a_real_process(bus_env, bus_cfg):
    taps = [spawn(["tap", "audio.in", "text.in", "--count", "7", *extra], bus_env) for extra in ([], ["--json"])]
    for tap in taps:
        wait_stderr(tap, "listening")
    # An invalid message first (payload shorter than the header says): a REJECTED line, no crash.
    with BusClient("fuzzer", bus_cfg) as bad:
        bad.wait_ready()
        header = make_header("audio", "fuzzer", "ffffffff", 0,
                             {"rate": 16000, "channels": 1, "sample_width": 2, "frames": 320})
        bad.send_raw(encode("audio.in", header, b"\x00" * 100))
        time.sleep(0.1)   # let it leave before close() (linger also covers it)
    finish(publisher(bus_env, "--audio", "5", "--amplitude", "0.5", "--text", "hello tap"))
    lines_out, _ = finish(taps[0])
    json_out, _ = finish(taps[1])

    lines = lines_out.splitlines()
    assert len(lines) == 7, lines_out
    assert "REJECTED" in lines[0] and "'audio.in'" in lines[0] and "payload is 100 bytes" in lines[0]
    for seq, line in enumerate(lines[1:6]):
        assert re.search(rf"audio\.in +tool-publisher/\w{{8}} #{seq} +audio +\d+ B", line), line
        level = float(re.search(r"(-?[\d.]+) dBFS", line).group(1))
        assert abs(level - (-9.03)) < 0.2, line            # a sine at half of full scale
        age = float(re.search(r"([-\d.]+) ms", line).group(1))
        assert 0 <= age < 2000, line
    assert "text.in" in lines[6] and "text='hello tap'" in lines[6]

    events = [json.loads(x) for x in json_out.splitlines()]
    assert len(events) == 7
    assert events[0]["rejected"] is True and events[0]["topic"] == "audio.in" and "payload" in events[0]["error"]
    audio = events[1:6]
    assert [e["seq"] for e in audio] == [0, 1, 2, 3, 4]
    assert all(e["payload_bytes"] == 640 and e["rate"] == 16000 and abs(e["dbfs"] + 9.03) < 0.2 for e in audio)
    assert all(0 <= e["age_ms"] < 2000 and e["src"] == "tool-publisher" for e in audio)
    assert "payload" not in events[1]   # sizes and levels only, never the bytes
    assert events[6]["topic"] == "text.in" and events[6]["text"] == "hello tap"


def test_tap_stats_reports_the_published_rate(bus_env):
    tap = spawn(["tap", "--stats", "--json", "audio.in", "--count", "150", "--seconds", "20"], bus_env)
    wait_stderr(tap, "listening")
    finish(publisher(bus_env, "--audio", "150", "--interval-ms", "20"))    # 50 Hz for 3 s
    out, _ = finish(tap)
    refreshes = [json.loads(x) for x in out.splitlines()]
    final = refreshes[-1]["topics"]["audio.in"]
    assert final["count"] == 150 and final["gaps"] == 0 and final["rejected"] == 0
    assert 150 * 700 < final["bytes"] < 150 * 900                # 3 frames: topic + header + 640 B
    # Rates of the full one-second windows inside the stream (not the first or the last one).
    inside = [r["topics"]["audio.in"] for r in refreshes[:-1] if r["topics"].get("audio.in", {}).get("window_count")]
    rates = sorted(s["rate_hz"] for s in inside[1:-1])
    assert rates, refreshes
    assert 42 <= rates[len(rates) // 2] <= 58, rates
    assert all(s["latency_p50_ms"] is not None and 0 <= s["latency_p50_ms"] < 1000 for s in inside)


# ------------------------------------------------------------- record, replay, export
def test_record_replay_export_roundtrip(bus_env, bus_cfg, tmp_path):
    rec = tmp_path / "talk.lprec"
    chunks = 50
    recorder = spawn(["record", str(rec), "audio.in", "text.in", "--count", str(chunks + 2)], bus_env)
    wait_stderr(recorder, "recording")
    finish(publisher(bus_env, "--audio", str(chunks), "--interval-ms", "20", "--text", "one", "--text", "two"))
    finish(recorder)
    originals = original_messages(rec)
    assert [m.topic for m in originals] == ["audio.in"] * chunks + ["text.in"] * 2
    rec_span = originals[chunks - 1].recv_ns - originals[0].recv_ns
    assert rec_span > 0.8e9

    # export: the WAV holds exactly the published samples
    wav_path = tmp_path / "talk.wav"
    proc = spawn(["export", str(rec), "--topic", "audio.in", str(wav_path)], bus_env)
    finish(proc)
    with wave.open(str(wav_path)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.readframes(wav.getnframes()) == b"".join(sine_chunk(i, 0.5) for i in range(chunks))

    with BusClient("downstream", bus_cfg, ["audio.in", "text.in"]) as sub:
        sub.wait_ready()
        spans = {}
        for speed in ("1", "2"):
            started_ns = time.time_ns()
            replay = spawn(["replay", str(rec), "--speed", speed], bus_env)
            got = sub.collect(15, count=chunks + 2)
            finish(replay)
            assert [m.topic for m in got] == [m.topic for m in originals]
            assert [m.payload for m in got] == [m.payload for m in originals]
            assert [m.get("text") for m in got] == [m.get("text") for m in originals]
            assert [m["seq"] for m in got] == list(range(chunks)) + [0, 1]       # fresh, continuous
            assert {m["src"] for m in got} == {"tool-publisher"}
            assert {m["inst"] for m in got}.isdisjoint({m["inst"] for m in originals})
            for new, old in zip(got, originals):
                assert new["ts"] > started_ns                                    # fresh timestamps...
                assert new["capture_ts" if new.topic == "audio.in" else "ts"] > started_ns
                assert abs(new.age_ms - old.age_ms) < 500                        # ...with the age kept
            spans[speed] = got[chunks - 1].recv_ns - got[0].recv_ns
        assert 0.8 < spans["1"] / rec_span < 1.3, (spans, rec_span)
        assert 0.35 < spans["2"] / rec_span < 0.7, (spans, rec_span)


def synthetic_recording(path: Path, messages: list[tuple[int, str, dict, bytes | None]], session: str = "") -> None:
    """A recording written with the real writer, of valid messages made with the real codec."""
    seqs: dict[str, int] = {}
    with RecordingWriter(path, session) as writer:
        for recv_ns, topic, fields, payload in messages:
            fields = dict(fields)
            kind = fields.pop("kind")
            header = make_header(kind, "synth", "5e5e5e5e", seqs.get(topic, 0), fields)
            header["ts"] = recv_ns - 1_000_000
            seqs[topic] = seqs.get(topic, 0) + 1
            writer.write(recv_ns, encode(topic, header, payload, session))


def audio_fields(rate: int, frames: int, **extra) -> dict:
    return {"kind": "audio", "rate": rate, "channels": 1, "sample_width": 2, "frames": frames, **extra}


def test_replay_loop_keeps_sequence_numbers_continuous(bus_env, bus_cfg, tmp_path):
    rec = tmp_path / "loop.lprec"
    t0 = time.time_ns() - 10**9
    payloads = [bytes([i]) * 640 for i in range(10)]
    synthetic_recording(rec, [(t0 + i * 20_000_000, "audio.in", audio_fields(16000, 320), payloads[i])
                              for i in range(10)], session="old-session")
    with BusClient("downstream", bus_cfg, ["audio.in"]) as sub:
        sub.wait_ready()
        replay = spawn(["replay", str(rec), "--loop", "--speed", "2"], bus_env)
        got = sub.collect(15, count=25)
        t_stop = time.monotonic()
        stop(replay)
        assert time.monotonic() - t_stop < 2.0 and replay.returncode == 0
    assert [m["seq"] for m in got] == list(range(25))
    assert [m.payload for m in got] == [payloads[i % 10] for i in range(25)]
    assert len({m["inst"] for m in got}) == 1


def test_export_places_chunks_at_their_timestamps(tmp_path):
    rec = tmp_path / "out.lprec"
    t0 = time.time_ns()
    chunk = 960                                     # 40 ms at 24 kHz
    payloads = [bytes([0, i + 1]) * chunk for i in range(10)]
    msgs = []
    for i in range(10):
        # five chunks, a 500 ms pause, five more; all published in a burst faster than real time
        t = t0 + (i * 10_000_000 if i < 5 else 700_000_000 + (i - 5) * 10_000_000)
        msgs.append((t, "audio.out", audio_fields(24000, chunk, turn=1 + i // 5), payloads[i]))
    synthetic_recording(rec, msgs)

    def export(*extra: str) -> tuple[subprocess.CompletedProcess, bytes]:
        out = tmp_path / "out.wav"
        out.unlink(missing_ok=True)
        proc = subprocess.run([sys.executable, "-m", "livepipe.services", "export", str(rec), *extra, str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        data = b""
        if out.exists():
            with wave.open(str(out)) as wav:
                assert wav.getframerate() == 24000
                data = wav.readframes(wav.getnframes())
        return proc, data

    proc, data = export()
    assert proc.returncode == 0, proc.stderr
    first, second = b"".join(payloads[:5]), b"".join(payloads[5:])
    # The burst's first chunk starts at 0; the second turn starts 700 ms later: the first turn
    # played 200 ms, so 500 ms of silence sits between them.
    silence = data[len(first):len(data) - len(second)]
    assert data.startswith(first) and data.endswith(second)
    assert len(silence) == 2 * 24000 * 500 // 1000 and silence == bytes(len(silence))

    proc, data = export("--no-gaps")
    assert proc.returncode == 0 and data == first + second

    # A 16 kHz chunk in the same topic: refused with a clear line, nothing written.
    synthetic_recording(rec, msgs + [(t0 + 900_000_000, "audio.out", audio_fields(16000, 320, turn=3), bytes(640))])
    proc, data = export()
    assert proc.returncode == 1 and data == b""
    assert "mixes formats" in proc.stderr and "24000 Hz" in proc.stderr and "16000 Hz" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_record_survives_sigkill_mid_stream(bus_env, bus_cfg, tmp_path):
    rec = tmp_path / "killed.lprec"
    recorder = spawn(["record", str(rec), "audio.in"], bus_env)
    wait_stderr(recorder, "recording")
    pub = publisher(bus_env, "--audio", "300", "--interval-ms", "10")
    try:
        deadline = time.monotonic() + 15
        while len(read_all(rec)[1]) < 30:           # the file is readable while it grows
            assert time.monotonic() < deadline, "recorder wrote nothing"
            time.sleep(0.05)
        recorder.send_signal(signal.SIGKILL)
        recorder.communicate(timeout=5)
    finally:
        pub.kill()
        pub.communicate()
    _, records, truncated = read_all(rec)
    assert len(records) >= 30
    # A kill in the middle of a write leaves a partial last record: cut one short to prove
    # the reader (and replay) keep everything before it.
    with open(rec, "r+b") as f:
        f.truncate(os.path.getsize(rec) - truncated - 7)
    _, records_after, truncated = read_all(rec)
    assert len(records_after) == len(records) - 1 and truncated > 0
    with BusClient("downstream", bus_cfg, ["audio.in"]) as sub:
        sub.wait_ready()
        replay = spawn(["replay", str(rec), "--speed", "4"], bus_env)
        got = sub.collect(15, count=len(records_after))
        _, err = finish(replay)
    assert [m.payload for m in got] == [decode(f).payload for _, f in records_after]
    assert "cut-off record" in err


def test_record_closes_the_file_cleanly_on_sigterm(bus_env, tmp_path):
    rec = tmp_path / "all.lprec"
    recorder = spawn(["record", str(rec)], bus_env)                  # every topic
    wait_stderr(recorder, "recording")
    finish(publisher(bus_env, "--text", "first", "--text", "second"))
    deadline = time.monotonic() + 10
    while sum(m.topic == "text.in" for m in original_messages(rec)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t_stop = time.monotonic()
    _, err = stop(recorder)
    assert recorder.returncode == 0 and time.monotonic() - t_stop < 1.5, err
    meta, records, truncated = read_all(rec)
    assert truncated == 0 and meta["topics"] == [] and meta["session"] == ""
    texts = [m["text"] for m in original_messages(rec) if m.topic == "text.in"]
    assert texts == ["first", "second"] and f"{len(records)} messages" in err


def test_recording_format_is_magic_line_and_msgpack_stream(tmp_path):
    path = tmp_path / "x.lprec"
    with RecordingWriter(path, "s1", ["text.in"]) as w:
        w.write(123, [b"s1/text.in", b"\x80", b"x"])
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    meta, record = list(msgpack.Unpacker(io.BytesIO(raw[len(MAGIC):]), raw=False))
    assert meta["session"] == "s1" and meta["topics"] == ["text.in"] and record == [123, [b"s1/text.in", b"\x80", b"x"]]
    bad = tmp_path / "bad.lprec"
    bad.write_bytes(b"RIFF....WAVE")
    proc = subprocess.run([sys.executable, "-m", "livepipe.services", "replay", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "not a livepipe recording" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------- top, say
def test_top_shows_a_running_process_from_its_heartbeat(bus_env):
    target = publisher(bus_env, "--idle", "--name", "top-target")
    try:
        as_json = spawn(["top", "--once", "--json", "--window", "2.5"], bus_env)
        as_table = spawn(["top", "--once", "--window", "2.5"], bus_env)
        json_out, _ = finish(as_json)
        table_out, _ = finish(as_table)
    finally:
        stop(target)
    rows = [r for r in json.loads(json_out.strip().splitlines()[-1])["processes"] if r["src"] == "top-target"]
    assert len(rows) == 1, json_out
    row = rows[0]
    assert row["pid"] == target.pid and row["rss_bytes"] > 1_000_000 and row["cpu_percent"] is not None
    assert row["sent"] >= 1 and row["rejected"] == 0 and not row["silent"] and row["last_seen_s"] < 2.5
    line = next(x for x in table_out.splitlines() if x.startswith("top-target"))
    assert str(target.pid) in line


def test_top_once_says_when_nothing_runs(bus_env):
    proc = spawn(["top", "--once", "--window", "1.2"], bus_env)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 1 and "no heartbeat" in err


def test_say_publishes_one_text_in_message(bus_env, bus_cfg):
    # Nobody listens yet: say refuses rather than sending into the void.
    lonely = spawn(["say", "--wait", "0.5", "anyone?"], bus_env)
    _, err = lonely.communicate(timeout=20)
    assert lonely.returncode == 1 and "text.in" in err and "nothing sent" in err
    with BusClient("bridge", bus_cfg, ["text.in"]) as sub:
        sub.wait_ready()
        finish(spawn(["say", "what", "is", "on", "my", "screen?"], bus_env))
        msg = sub.recv(10)
        assert msg is not None and msg.topic == "text.in" and msg.kind == "text"
        assert msg["text"] == "what is on my screen?" and msg["src"] == "say" and msg["seq"] == 0
        assert sub.recv(0.3) is None                   # exactly one


# ------------------------------------------------------------------------- hygiene
def test_tools_never_import_genai_sounddevice_or_opencv():
    heavy = ("google.genai", "sounddevice", "cv2")
    code = ("import importlib, sys\n"
            f"for m in {[f'livepipe.services.tools.{t}' for t in TOOLS] + ['livepipe.services.bench.bus', 'livepipe.services.lib.recording', 'livepipe.services.lib.toolkit']}:\n"
            "    importlib.import_module(m)\n"
            f"print([m for m in sys.modules if m.startswith({heavy})])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    procs = {t: subprocess.Popen([sys.executable, "-X", "importtime", "-m", "livepipe.services", t, "--help"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in TOOLS}
    for tool, p in procs.items():
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and f"livepipe {tool}" in out
        imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
        assert imported and not {m for m in imported if m.startswith(heavy)}, tool


def test_bench_bus_runs_end_to_end():
    """The benchmark's plumbing (real broker, four processes, JSON out); figures are not asserted."""
    proc = subprocess.run([sys.executable, "-m", "livepipe.services", "bench", "bus", "--json", "--audio-count", "40",
                           "--jpeg-count", "8", "--warmup", "5", "--rounds", "1", "--cadence-count", "10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("audio_p50_us", "audio_p99_us", "jpeg_p50_us", "jpeg_p99_us", "raw_audio_p99_us",
                "raw_jpeg_p99_us", "lost"):
        assert isinstance(result[key], (int, float)), key
    assert result["lost"] == 0 and result["raw_lost"] == 0
    # CPU per message at the 20 ms cadence: each process of the hop ran for it
    for key in ("audio_cpu_us_per_msg", "raw_audio_cpu_us_per_msg"):
        assert set(result[key]) == {"publisher", "broker", "subscriber", "total"} and result[key]["total"] > 0, result[key]


def test_bench_pipeline_runs_end_to_end(tmp_path):
    """The voice-to-voice benchmark's plumbing (null-sink devices, emulator, the pipeline's processes and
    the one-process baseline, one utterance each, JSON out, the timeline plot); figures are not asserted."""
    plot = tmp_path / "turn.png"
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    proc = subprocess.run([sys.executable, "-m", "livepipe.services", "bench", "pipeline", "--json", "--utterances",
                           "1", "--rounds", "1", "--no-video", *(["--plot", str(plot)] if has_mpl else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("pipeline_v2v_p50_ms", "pipeline_v2v_p99_ms", "baseline_v2v_p50_ms", "baseline_v2v_p99_ms",
                "added_p50_ms", "pipeline_cpu_pct_of_core", "baseline_cpu_pct_of_core"):
        assert isinstance(result[key], (int, float)), key
    assert result["pipeline_turns_missed"] == 0 and result["baseline_turns_missed"] == 0   # every reply was heard
    assert set(result["rss_mb"]["pipeline"]) == {"broker", "gemini-bridge", "capture-audio", "playback"}
    assert set(result["rss_mb"]["baseline"]) == {"client"}
    assert set(result["startup_ms"]) == {"pipeline", "baseline"} and "pipeline" in result["underruns"]
    assert "model (emulator: 500 ms silence + 300 ms think)" in result["pipeline_stages_ms"]   # the stamps arrived
    if has_mpl:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
