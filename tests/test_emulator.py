"""The Live API emulator driven by the real google-genai SDK over TLS, as the bridge will drive it.

Every test asserts what the SDK's user sees: audio bytes, transcriptions, tool calls, close codes.
Emulators run as real subprocesses (`python -m livepipe.services emulator`), started once per module.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import websockets
from google.genai import errors, types

from tests.emulator_support import (RATE_IN, Emulator, TurnResult, collect_turn, found_in, make_client, match,
                                    receive_until, send_audio, silence, speech, start_all)

MODEL = "models/gemini-2.5-flash-native-audio-latest"
INPUT_RE = re.compile(r"^utterance (\d+): (\d+\.\d\d) s(?:, frames (\d+), last (\d+)x(\d+)(?:, (\d+\.\d\d) fps)?)?$")
OUTPUT_RE = re.compile(r'^reply (\d+): (?:(\d+\.\d\d) s(?:, after tool (\w+))?|text "(.*)")$')
TRANSCRIBE = dict(input_audio_transcription={}, output_audio_transcription={})


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("voice")
    return {"hello": speech("Hello there, this is a test of the emulator.", d),     # ~2.4 s
            "stop": speech("Stop.", d),                                               # ~0.5 s
            "weather": speech("What is the weather like in Paris?", d)}               # ~1.8 s


@pytest.fixture(scope="module")
def emus(tmp_path_factory):
    """One emulator per behaviour under test, started in parallel."""
    base = tmp_path_factory.mktemp("emu")
    e = {
        "fast": Emulator(base / "fast", "--latency", "0.05", "--pace", "0", "--tool-trigger", "1.0"),
        "slow": Emulator(base / "slow", "--latency", "0.05", "--pace", "1", "--chunk-ms", "20"),
        "key": Emulator(base / "key", "--api-key", "right-key", "--latency", "0.05", "--pace", "0"),
        "goaway": Emulator(base / "goaway", "--latency", "0.05", "--pace", "0", "--goaway-after", "1.2",
                           "--goaway-grace", "0.8"),
        "drop": Emulator(base / "drop", "--latency", "0.05", "--pace", "0", "--drop-after", "1.5"),
        "limit": Emulator(base / "limit", "--latency", "0.05", "--pace", "0", "--session-limit", "1.5",
                          "--goaway-grace", "0.5"),
        "dropslow": Emulator(base / "dropslow", "--latency", "0.05", "--pace", "2", "--chunk-ms", "20",
                             "--drop-after", "2.0"),
    }
    start_all(list(e.values()))
    yield e
    for emu in e.values():
        code, err = emu.stop()
        assert code == 0, err
        assert "Traceback" not in err, err


def client(emu: Emulator, **kw):
    return make_client(emu.url, emu.info["ca_file"], **kw)


def config(**kw) -> types.LiveConnectConfig:
    return types.LiveConnectConfig(response_modalities=["AUDIO"], **kw)


def run(coro):
    return asyncio.run(coro)


# --- full turns ------------------------------------------------------------------------------

def test_full_turn_reply_is_the_utterance_resampled(emus, voice):
    utter = voice["hello"]

    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([silence(0.3), utter, silence(0.7)]))
            return await collect_turn(s)

    turn = run(scenario())
    assert turn.turn_complete and turn.generation_complete and not turn.interrupted
    # The reply is the utterance itself at 24 kHz: as long as the speech (plus the 40 ms pre-roll
    # and frame rounding) and sample-for-sample alike at the cross-correlation peak.
    assert -0.02 < turn.seconds - len(utter) / RATE_IN < 0.1, turn.seconds
    lag, corr = match(np.concatenate([silence(0.3), utter, silence(0.7)]), turn.samples)
    assert corr > 0.98, corr
    assert 0.2 < lag < 0.35, lag            # it starts where the speech started (after 0.3 s silence)
    m = INPUT_RE.match(turn.input_text[0])
    assert m and m.group(1) == "1" and abs(float(m.group(2)) - turn.seconds) < 0.01, turn.input_text
    assert turn.output_text == [f"reply 1: {m.group(2)} s"]
    assert turn.usage.total_token_count > 0 and turn.usage.prompt_token_count == round(float(m.group(2)) * 32)


def test_timeline_records_speech_end_first_byte_and_turn_complete(emus, voice):
    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config()) as s:
            await send_audio(s, np.concatenate([voice["stop"], silence(0.7)]))
            return await collect_turn(s)

    run(scenario())
    events = emus["fast"].timeline()
    session = events[-1]["session"]       # the session just closed is the last to write
    mine = {e["event"]: e for e in events if e["session"] == session and e["turn"] == 1}
    assert {"speech_start", "speech_end", "first_byte", "turn_complete"} <= set(mine), mine
    assert mine["speech_end"]["t_ns"] <= mine["first_byte"]["t_ns"] <= mine["turn_complete"]["t_ns"]
    assert mine["first_byte"]["t_ns"] - mine["speech_end"]["t_ns"] >= 0.05e9       # --latency 0.05
    assert mine["speech_end"]["silence_ms"] == 500 and mine["speech_end"]["speech_stop_ns"] <= mine["speech_end"]["t_ns"]


def test_second_turn_counts_and_both_sdk_api_versions_connect(emus, voice):
    async def scenario(version):
        async with client(emus["fast"], api_version=version).aio.live.connect(
                model=MODEL, config=config(**TRANSCRIBE)) as s:
            turns = []
            for _ in range(2):
                await send_audio(s, np.concatenate([voice["stop"], silence(0.6)]), speed=0)
                turns.append(await collect_turn(s))
            return turns

    for version in ("v1", "v1beta"):
        first, second = run(scenario(version))
        assert first.output_text[0].startswith("reply 1: ") and second.output_text[0].startswith("reply 2: ")


def test_vad_honours_silence_duration(emus, voice):
    """A 0.7 s pause splits two phrases with silenceDurationMs 300 but not with 1200."""
    audio = np.concatenate([voice["stop"], silence(0.7), voice["stop"], silence(1.4)])

    async def scenario(silence_ms):
        vad = types.RealtimeInputConfig(automatic_activity_detection=types.AutomaticActivityDetection(
            silence_duration_ms=silence_ms, end_of_speech_sensitivity="END_SENSITIVITY_LOW"))
        async with client(emus["fast"]).aio.live.connect(
                model=MODEL, config=config(realtime_input_config=vad, **TRANSCRIBE)) as s:
            # 4x real time: the 0.7 s pause still lasts longer than the think time, so a first reply
            # completes before the second phrase starts (instead of being interrupted by it)
            await send_audio(s, audio, speed=4)
            result = TurnResult()
            want = 2 if silence_ms < 700 else 1
            # wait for the last turnComplete: leaving unread replies would make the SDK's close slow
            await receive_until(s, lambda r: r.turns_completed >= want, result)
            return result

    split = run(scenario(300))
    assert [t.split(":")[0] for t in split.input_text] == ["utterance 1", "utterance 2"], split.input_text
    whole = run(scenario(1200))
    (text,) = whole.input_text
    seconds = float(INPUT_RE.match(text).group(2))
    assert seconds > 2 * len(voice["stop"]) / RATE_IN + 0.6, text      # both phrases and the pause in one


def test_vad_honours_prefix_padding(emus, voice):
    """With prefixPaddingMs 600 a 0.4 s "Stop." never starts a turn; the longer phrase does."""
    async def scenario():
        vad = types.RealtimeInputConfig(automatic_activity_detection=types.AutomaticActivityDetection(
            prefix_padding_ms=600, start_of_speech_sensitivity="START_SENSITIVITY_LOW"))
        async with client(emus["fast"]).aio.live.connect(
                model=MODEL, config=config(realtime_input_config=vad, **TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([voice["stop"], silence(0.7), voice["hello"], silence(0.7)]), speed=0)
            return await collect_turn(s)

    turn = run(scenario())
    (text,) = turn.input_text
    assert text.startswith("utterance 1: ") and abs(float(INPUT_RE.match(text).group(2)) - len(voice["hello"]) / RATE_IN) < 0.1
    assert match(voice["hello"], turn.samples)[1] > 0.98


def test_manual_activity_when_detection_disabled(emus):
    """activityStart/activityEnd mark the turn; everything between them comes back, silence included."""
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(RATE_IN // 2) / RATE_IN)).astype(np.int16)
    audio = np.concatenate([tone, silence(0.5), tone])            # a gap VAD would have cut on

    async def scenario():
        vad = types.RealtimeInputConfig(automatic_activity_detection=types.AutomaticActivityDetection(disabled=True))
        async with client(emus["fast"]).aio.live.connect(
                model=MODEL, config=config(realtime_input_config=vad, **TRANSCRIBE)) as s:
            await send_audio(s, silence(0.5), speed=0)             # outside activity: not part of a turn
            await s.send_realtime_input(activity_start=types.ActivityStart())
            await send_audio(s, audio, speed=0)
            await s.send_realtime_input(activity_end=types.ActivityEnd())
            return await collect_turn(s)

    turn = run(scenario())
    assert turn.input_text == ["utterance 1: 1.50 s"]
    assert abs(turn.seconds - 1.5) < 0.01
    assert match(audio, turn.samples)[1] > 0.98


def test_activity_start_with_automatic_detection_is_refused(emus):
    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config()) as s:
            await s.send_realtime_input(activity_start=types.ActivityStart())
            await collect_turn(s)

    with pytest.raises(errors.APIError) as exc:
        run(scenario())
    assert exc.value.code == 1007 and "automatic activity detection" in str(exc.value)


# --- interruption, text, tools ---------------------------------------------------------------

def test_interruption_mid_reply(emus, voice):
    """Speaking while the reply streams stops it: interrupted, then turnComplete, then a new turn."""
    async def scenario():
        async with client(emus["slow"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([voice["hello"], silence(0.6)]), speed=0)
            first = TurnResult()
            await receive_until(s, lambda r: r.first_audio_at is not None, first)
            # the reply (2.4 s at real-time pace) is playing: talk over it
            barge = asyncio.create_task(send_audio(s, np.concatenate([voice["stop"], silence(0.7)]), speed=4))
            await collect_turn(s, first)
            await barge
            second = await collect_turn(s)
            return first, second

    first, second = run(scenario())
    assert first.interrupted and first.turn_complete and not first.generation_complete
    assert 0 < first.seconds < len(voice["hello"]) / RATE_IN - 0.5, first.seconds    # cut short
    assert first.output_text[0].startswith("reply 1: ")
    assert second.input_text[0].startswith("utterance 2: ") and not second.interrupted
    assert match(voice["stop"], second.samples)[1] > 0.98


def test_no_interruption_activity_handling_lets_the_reply_finish(emus, voice):
    async def scenario():
        cfg = config(realtime_input_config=types.RealtimeInputConfig(activity_handling="NO_INTERRUPTION"),
                     **TRANSCRIBE)
        async with client(emus["slow"]).aio.live.connect(model=MODEL, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["hello"], silence(0.6)]), speed=0)
            first = TurnResult()
            await receive_until(s, lambda r: r.first_audio_at is not None, first)
            await send_audio(s, np.concatenate([voice["stop"], silence(0.7)]), speed=4)
            await collect_turn(s, first)
            return first, await collect_turn(s)

    first, second = run(scenario())
    assert not first.interrupted and first.generation_complete
    assert match(voice["hello"], first.samples)[1] > 0.98 and abs(first.seconds - len(voice["hello"]) / RATE_IN) < 0.1
    assert second.output_text[0].startswith("reply 2: ")


def test_other_input_rates_are_resampled(emus, voice):
    """48 kHz input (stated in the mime type) is heard as the same utterance."""
    import soxr
    utter48 = soxr.resample(np.concatenate([voice["stop"], silence(0.7)]), RATE_IN, 48000).astype(np.int16)

    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            step = 48000 // 50
            for off in range(0, len(utter48), step):
                await s.send_realtime_input(audio=types.Blob(data=utter48[off:off + step].tobytes(),
                                                             mime_type="audio/pcm;rate=48000"))
            return await collect_turn(s)

    turn = run(scenario())
    assert match(voice["stop"], turn.samples)[1] > 0.95
    assert abs(turn.seconds - len(voice["stop"]) / RATE_IN) < 0.1


def test_text_input_gets_a_short_audio_reply_and_its_text(emus):
    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="What time is it?")]),
                                        turn_complete=True)
            by_content = await collect_turn(s)
            await s.send_realtime_input(text="and the date")
            by_realtime = await collect_turn(s)
            return by_content, by_realtime

    a, b = run(scenario())
    assert a.output_text == ['reply 1: text "What time is it?"'] and b.output_text == ['reply 2: text "and the date"']
    assert abs(a.seconds - (0.4 + 0.03 * 16)) < 0.01 and np.abs(a.samples).max() > 5000


def test_text_modality_reply(emus, voice):
    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["TEXT"])
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["stop"], silence(0.6)]), speed=0)
            return await collect_turn(s)

    turn = run(scenario())
    assert len(turn.audio) == 0 and OUTPUT_RE.match(turn.text_parts[0]), turn.text_parts


def _tools() -> list[types.Tool]:
    return [types.Tool(function_declarations=[
        types.FunctionDeclaration(name="get_weather", description="weather for a city",
                                  parameters={"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}),
        types.FunctionDeclaration(name="get_time", description="the time")])]


def test_tool_call_round_trip(emus, voice):
    async def scenario():
        async with client(emus["fast"]).aio.live.connect(
                model=MODEL, config=config(tools=_tools(), **TRANSCRIBE)) as s:
            # short utterance (< --tool-trigger 1.0 s): a plain reply, no tool call
            await send_audio(s, np.concatenate([voice["stop"], silence(0.6)]), speed=0)
            plain = await collect_turn(s)
            await send_audio(s, np.concatenate([voice["weather"], silence(0.6)]), speed=0)
            call = await collect_turn(s, until_tool_call=True)
            fc = call.tool_calls[0]
            await s.send_tool_response(function_responses=[
                types.FunctionResponse(id=fc.id, name=fc.name, response={"forecast": "sunny"})])
            reply = await collect_turn(s, call)
            return plain, reply

    plain, reply = run(scenario())
    assert not plain.tool_calls and plain.output_text[0].startswith("reply 1: ")
    (fc,) = reply.tool_calls
    assert fc.name == "get_weather" and fc.args["utterance"] == 2 and fc.args["seconds"] >= 1.0
    assert reply.output_text == [f"reply 2: {fc.args['seconds']:.2f} s, after tool get_weather"]
    assert match(voice["weather"], reply.samples)[1] > 0.98


def test_tool_call_cancelled_when_the_user_speaks(emus, voice):
    async def scenario():
        async with client(emus["fast"]).aio.live.connect(
                model=MODEL, config=config(tools=_tools(), **TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([voice["weather"], silence(0.6)]), speed=0)
            call = await collect_turn(s, until_tool_call=True)
            # no tool response: the user talks again instead
            await send_audio(s, np.concatenate([voice["stop"], silence(0.6)]), speed=0)
            await collect_turn(s, call)
            nxt = await collect_turn(s)
            return call, nxt

    call, nxt = run(scenario())
    assert call.cancelled_ids == [call.tool_calls[0].id]
    assert call.interrupted and call.turn_complete and len(call.audio) == 0
    assert nxt.output_text[0].startswith("reply 2: ") and not nxt.tool_calls


def test_video_frames_counted_and_sized(emus, voice):
    def jpeg(w, h):
        img = np.zeros((h, w, 3), np.uint8)
        cv2.putText(img, "livepipe", (20, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 2, (255, 255, 255), 3)
        return cv2.imencode(".jpg", img)[1].tobytes()

    async def scenario():
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await s.send_realtime_input(media=types.Blob(data=jpeg(640, 480), mime_type="image/jpeg"))
            for _ in range(3):
                await asyncio.sleep(0.1)
                await s.send_realtime_input(video=types.Blob(data=jpeg(768, 432), mime_type="image/jpeg"))
            await send_audio(s, np.concatenate([voice["stop"], silence(0.6)]), speed=0)
            return await collect_turn(s)

    turn = run(scenario())
    m = INPUT_RE.match(turn.input_text[0])
    assert m and m.group(3, 4, 5) == ("4", "768", "432"), turn.input_text
    assert 5 < float(m.group(6)) < 20          # 4 frames 0.1 s apart: ~10 fps as sent


# --- sessions: resumption, goAway, drop, limits ----------------------------------------------

async def _turn(s, samples) -> TurnResult:
    await send_audio(s, np.concatenate([samples, silence(0.6)]), speed=0)
    return await collect_turn(s)


def test_goaway_then_resumption_keeps_the_turn_count(emus, voice):
    cl = client(emus["goaway"])

    async def scenario():
        cfg = config(session_resumption=types.SessionResumptionConfig(), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            first = await _turn(s, voice["stop"])
            with pytest.raises(errors.APIError) as closed:
                await receive_until(s, lambda r: False, first)         # goAway, then the close
        handle = first.handles[-1]
        cfg = config(session_resumption=types.SessionResumptionConfig(handle=handle), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            second = await _turn(s, voice["stop"])
        return first, closed.value, second

    first, closed, second = run(scenario())
    assert first.go_away is not None and first.go_away.time_left == "0.8s"
    assert closed.code == 1011 and "Deadline expired" in str(closed)
    assert second.input_text[0].startswith("utterance 2: ") and second.output_text[0].startswith("reply 2: ")


def test_abrupt_drop_then_resumption(emus, voice):
    cl = client(emus["drop"])

    async def scenario():
        cfg = config(session_resumption=types.SessionResumptionConfig(), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            first = await _turn(s, voice["stop"])
            t0 = time.monotonic()
            with pytest.raises(errors.APIError) as dropped:
                await receive_until(s, lambda r: False, first)
            assert first.go_away is None                                 # no warning before a drop
        cfg = config(session_resumption=types.SessionResumptionConfig(handle=first.handles[-1]), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            second = await _turn(s, voice["stop"])
        return dropped.value, second, time.monotonic() - t0

    dropped, second, _ = run(scenario())
    assert dropped.code == 1011 and "Internal error encountered." in str(dropped)
    assert second.output_text[0].startswith("reply 2: ")


VAD_FRAME = 320          # the emulator's VAD frame: 20 ms at 16 kHz
NO_INTERRUPTION = types.RealtimeInputConfig(activity_handling="NO_INTERRUPTION")


def _whole_frames(x: np.ndarray) -> np.ndarray:
    """Padded to whole VAD frames, so what follows starts on a frame boundary in every session."""
    return np.concatenate([x, np.zeros(-len(x) % VAD_FRAME, np.int16)])


def _chunks(x: np.ndarray, ms: int = 20) -> list[np.ndarray]:
    step = RATE_IN * ms // 1000
    return [x[o:o + step] for o in range(0, len(x), step)]


def _pcm(chunk: np.ndarray) -> types.Blob:
    return types.Blob(data=chunk.tobytes(), mime_type="audio/pcm;rate=16000")


def _utterance_seconds(texts: list[str], n: int) -> float:
    for text in texts:
        m = INPUT_RE.match(text)
        if m and int(m.group(1)) == n:
            return float(m.group(2))
    raise AssertionError(f"no utterance {n} in {texts}")


@pytest.fixture
def transparent_sdk(monkeypatch):
    """The SDK refuses SessionResumptionConfig(transparent=True) client-side outside Vertex AI (its
    Vertex converter sends the same `transparent` field). Lift that one check, so the real SDK asks
    for transparent resumption on the wire the way a Vertex client does."""
    from google.genai import _live_converters
    original = _live_converters._SessionResumptionConfig_to_mldev

    def to_mldev(from_object, parent_object=None):
        out = original({"handle": _live_converters.getv(from_object, ["handle"])}, parent_object)
        transparent = _live_converters.getv(from_object, ["transparent"])
        if transparent is not None:
            out["transparent"] = transparent
        return out

    monkeypatch.setattr(_live_converters, "_SessionResumptionConfig_to_mldev", to_mldev)


def test_resumption_mid_utterance_loses_no_audio(emus, voice, transparent_sdk):
    """A handle issued while the user is mid-utterance (right after a barge-in, or when a reply ends
    while the user talks) or while a heard utterance still waits for its reply stands for all of that:
    the resumed session holds it, so the resent messages complete the utterance, nothing missing.
    Every connection of "dropslow" drops (1011) 2 s after setup; replies play at 2x real time."""
    first = _whole_frames(voice["hello"])                 # reply 1 lasts 1.24 s at --pace 2
    weather, hello = _whole_frames(voice["weather"]), _whole_frames(voice["hello"])
    cl = client(emus["dropslow"])

    async def heard_without_a_drop(second):
        """Utterance 2's duration in one unbroken session with the same input."""
        result = TurnResult()
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([first, silence(0.6), second, silence(0.7)]), speed=0)
            await receive_until(s, lambda r: r.turns_completed >= 2 and len(r.input_text) >= 2, result)
        return _utterance_seconds(result.input_text, 2)

    async def talk(s, words, sent) -> int:
        """The user talks in real time until done or the connection drops: how many chunks went out."""
        t0 = time.monotonic()
        for k, c in enumerate(words):
            try:
                await s.send_realtime_input(audio=_pcm(c))
            except websockets.ConnectionClosed:
                return k
            sent.append((time.monotonic(), c))
            await asyncio.sleep(max(0.0, t0 + (k + 1) * 0.02 - time.monotonic()))
        return len(words)

    async def drop_and_resume(cfg_kw, handle_at, second, resend):
        """Utterance 1, wait for its reply, talk (utterance 2) over it until the drop; resume from
        handle number `handle_at` and send `resend(result, sent)`, the rest of the words, silence."""
        sent: list[tuple[float, np.ndarray]] = []       # sent[i] is client message i + 1 (setup is 0)
        words = _chunks(second)
        result = TurnResult()
        resumption = dict(transparent=True) if cfg_kw.pop("transparent", False) else {}
        cfg = config(session_resumption=types.SessionResumptionConfig(**resumption), **cfg_kw, **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            for c in _chunks(np.concatenate([first, silence(0.6)])):
                await s.send_realtime_input(audio=_pcm(c))
                sent.append((time.monotonic(), c))
            await receive_until(s, lambda r: r.first_audio_at is not None, result)
            began = time.monotonic()
            speaker = asyncio.create_task(talk(s, words, sent))
            with pytest.raises(errors.APIError) as dropped:
                await receive_until(s, lambda r: False, result)
            spoken = await speaker
        again = resend(result, sent)
        cfg = config(session_resumption=types.SessionResumptionConfig(handle=result.handles[handle_at], **resumption),
                     **cfg_kw, **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            for c in again + words[spoken:]:
                await s.send_realtime_input(audio=_pcm(c))
            await send_audio(s, silence(0.7), speed=0)
            resumed = await collect_turn(s, timeout=8)
        return dict(result=result, dropped=dropped.value, spoken=spoken, resent=len(again), resumed=resumed,
                    handle_after=result.handle_times[handle_at] - began)

    def after_index(result, sent):
        """Transparent resumption: every message after the handle's lastConsumedClientMessageIndex."""
        return [c for _, c in sent[result.handle_indexes[-1]:]]

    def since_handle(result, sent):
        """No index (the real service's default, and all the bridge gets): what was sent from 200 ms
        before the handle arrived on, the bridge's rule (it may repeat up to 200 ms, never lose any)."""
        return [c for t, c in sent if t >= result.handle_times[-1] - 0.2]

    async def heard_not_answered():
        """NO_INTERRUPTION: utterance 2 ends while reply 1 plays, so reply 1's handle is issued with
        utterance 2 heard but not yet answered; the drop may cut its reply short."""
        cfg = config(session_resumption=types.SessionResumptionConfig(), realtime_input_config=NO_INTERRUPTION,
                     **TRANSCRIBE)
        result = TurnResult()
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            await send_audio(s, np.concatenate([first, silence(0.6)]), speed=0)
            await receive_until(s, lambda r: r.first_audio_at is not None, result)
            await send_audio(s, np.concatenate([weather, silence(0.6)]), speed=0)
            with pytest.raises(errors.APIError):
                await receive_until(s, lambda r: False, result)
        cfg = config(session_resumption=types.SessionResumptionConfig(handle=result.handles[1]), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            resumed = await collect_turn(s, timeout=8)
        return result, resumed

    async def scenario():
        return await asyncio.gather(
            heard_without_a_drop(hello),
            # barge-in (interrupts reply 1): handle 1 comes with the interrupted turnComplete
            drop_and_resume(dict(transparent=True), -1, hello, after_index),
            # talking when reply 1 ends: handle 1 comes with its turnComplete, mid-utterance
            drop_and_resume(dict(realtime_input_config=NO_INTERRUPTION), -1, hello, since_handle),
            heard_not_answered())

    expected, barge, through, (queued, queued_resumed) = run(scenario())
    assert abs(expected - len(hello) / RATE_IN) < 0.1, expected
    words = len(_chunks(hello))
    for run_, transparent in ((barge, True), (through, False)):
        result, resumed = run_["result"], run_["resumed"]
        assert run_["dropped"].code == 1011 and len(result.handles) == 2, (run_["dropped"], result.handles)
        assert 10 < run_["spoken"] < words, run_["spoken"]          # the drop came mid-utterance
        # the index is reported only when setup asked for transparent resumption, as on the real service
        assert all(isinstance(i, int) for i in result.handle_indexes) if transparent else \
            result.handle_indexes == [None, None]
        assert resumed.output_text[0].startswith("reply 2: ")
        # every 100 ms of the words is in the reply (without the index some may be there twice)
        pieces = [found_in(piece, resumed.samples) for piece in _chunks(hello, 100)]
        assert min(pieces) > 0.95, pieces
    print("FIGURES", json.dumps({"unbroken_s": expected,
                                 "barge_s": _utterance_seconds(barge["resumed"].input_text, 2),
                                 "barge_index": barge["result"].handle_indexes, "barge_resent": barge["resent"],
                                 "through_s": _utterance_seconds(through["resumed"].input_text, 2),
                                 "through_handle_after_s": round(through["handle_after"], 3),
                                 "through_resent": through["resent"]}))
    assert barge["result"].interrupted and not through["result"].interrupted
    # With the index: utterance 2 reached the resumed session whole and once, so it is as long as in an
    # unbroken session, within a VAD frame (the resumed webrtcvad starts afresh).
    seconds = _utterance_seconds(barge["resumed"].input_text, 2)
    assert abs(seconds - expected) <= 0.02, (seconds, expected, barge["resent"])
    # Without it: the handle came mid-utterance, well over 200 ms into the words, so the resent messages
    # alone would miss some; the resumed session held them: all there, at most 200 ms of them twice.
    assert through["handle_after"] > 0.5, through["handle_after"]
    seconds = _utterance_seconds(through["resumed"].input_text, 2)
    assert expected - 0.02 <= seconds <= expected + 0.22, (seconds, expected, through["resent"])
    # The utterance heard during reply 1 is answered by the resumed session, whole.
    assert queued.output_text[:2] == [f"reply 1: {_utterance_seconds(queued.input_text, 1):.2f} s",
                                      f"reply 2: {_utterance_seconds(queued.input_text, 2):.2f} s"]
    assert len(queued.handles) >= 2 and not queued.interrupted
    assert queued_resumed.output_text == [f"reply 2: {_utterance_seconds(queued.input_text, 2):.2f} s"]
    assert match(weather, queued_resumed.samples)[1] > 0.98
    assert abs(queued_resumed.seconds - _utterance_seconds(queued.input_text, 2)) <= 0.01


def test_resumption_inside_a_manual_activity(emus):
    """Automatic detection off, NO_INTERRUPTION, 44.1 kHz input: a handle issued inside an activity
    (reply 1 ends while the user holds the activity open) carries it, including what the resampling
    filter still held; an activityStart sent again after resuming (a client resending from before
    the handle) does not cut it short; activityEnd flushes the filter, so every activity is whole."""
    rate = 44100

    def tone(at_rate: int) -> np.ndarray:         # 1.00 s of 440 Hz
        return (8000 * np.sin(2 * np.pi * 440 * np.arange(at_rate) / at_rate)).astype(np.int16)

    words = tone(rate)
    vad = types.RealtimeInputConfig(automatic_activity_detection=types.AutomaticActivityDetection(disabled=True),
                                    activity_handling="NO_INTERRUPTION")
    cl = client(emus["slow"])

    async def send(s, samples):
        for off in range(0, len(samples), rate // 50):
            await s.send_realtime_input(audio=types.Blob(data=samples[off:off + rate // 50].tobytes(),
                                                         mime_type=f"audio/pcm;rate={rate}"))

    async def scenario():
        cfg = config(session_resumption=types.SessionResumptionConfig(), realtime_input_config=vad, **TRANSCRIBE)
        result = TurnResult()
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            await s.send_realtime_input(activity_start=types.ActivityStart())
            await send(s, words[:rate // 2])
            await s.send_realtime_input(activity_end=types.ActivityEnd())
            await receive_until(s, lambda r: r.first_audio_at is not None, result)
            await s.send_realtime_input(activity_start=types.ActivityStart())      # while reply 1 plays
            await send(s, words[:rate * 3 // 10])
            await receive_until(s, lambda r: r.turn_complete and len(r.handles) >= 2, result)
        # the client leaves; the tone it sent went out well before reply 1's handle came
        cfg = config(session_resumption=types.SessionResumptionConfig(handle=result.handles[-1]),
                     realtime_input_config=vad, **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            await s.send_realtime_input(activity_start=types.ActivityStart())      # sent again
            await send(s, words[rate * 3 // 10:])
            await s.send_realtime_input(activity_end=types.ActivityEnd())
            return result, await collect_turn(s)

    first, resumed = run(scenario())
    assert first.input_text == ["utterance 1: 0.50 s"] and not first.interrupted
    assert resumed.input_text == ["utterance 2: 1.00 s"], resumed.input_text
    assert match(tone(RATE_IN), resumed.samples)[1] > 0.98 and abs(resumed.seconds - 1.0) < 0.001, resumed.seconds


def test_unknown_resumption_handle_is_refused(emus):
    async def scenario():
        cfg = config(session_resumption=types.SessionResumptionConfig(handle="emu-nope"))
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=cfg) as s:
            await collect_turn(s)

    with pytest.raises(errors.APIError) as exc:
        run(scenario())
    assert exc.value.code == 1007 and "handle" in str(exc.value)


def test_session_limit_closes_1008_and_compression_lifts_it(emus, voice):
    cl = client(emus["limit"])

    async def limited():
        cfg = config(session_resumption=types.SessionResumptionConfig())
        result = TurnResult()
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            with pytest.raises(errors.APIError) as closed:
                await receive_until(s, lambda r: False, result)
        # the session's time is used up: resuming it is refused too
        with pytest.raises(errors.APIError) as refused:
            cfg = config(session_resumption=types.SessionResumptionConfig(handle=result.handles[-1]))
            async with cl.aio.live.connect(model=MODEL, config=cfg):
                pass
        return result, closed.value, refused.value

    async def compressed():
        cfg = config(context_window_compression=types.ContextWindowCompressionConfig(
            sliding_window=types.SlidingWindow()), **TRANSCRIBE)
        async with cl.aio.live.connect(model=MODEL, config=cfg) as s:
            await asyncio.sleep(1.7)
            return await _turn(s, voice["stop"])

    async def both():
        return await asyncio.gather(limited(), compressed())

    (result, closed, refused), turn = run(both())
    assert result.go_away is not None and result.go_away.time_left == "0.5s"
    assert closed.code == 1008 and "session duration expired" in str(closed)
    assert refused.code == 1007 and "resumption handle is unknown or expired" in str(refused)
    assert turn.output_text[0].startswith("reply 1: ") and turn.go_away is None


# --- keys and bad input ----------------------------------------------------------------------

def test_bad_api_key_is_refused_like_the_real_service(emus):
    async def connect(key):
        async with client(emus["key"], api_key=key).aio.live.connect(model=MODEL, config=config()) as s:
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="hi")]),
                                        turn_complete=True)
            return await collect_turn(s)

    with pytest.raises(errors.APIError) as exc:
        run(connect("wrong-key"))
    assert exc.value.code == 1007 and "API key not valid. Please pass a valid API key." in str(exc.value)
    assert "wrong-key" not in str(exc.value)
    assert run(connect("right-key")).turn_complete


def test_api_key_in_query_and_missing_key(emus):
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    url = emus["key"].url.replace("https://", "wss://") + path
    ctx = ssl.create_default_context(cafile=emus["key"].info["ca_file"])

    async def raw(query):
        async with websockets.connect(url + query, ssl=ctx) as ws:
            await ws.send(json.dumps({"setup": {"model": MODEL}}))
            try:
                return json.loads(await ws.recv())
            except websockets.ConnectionClosed as e:
                return (e.rcvd.code, e.rcvd.reason)

    assert "setupComplete" in run(raw("?key=right-key"))
    code, reason = run(raw(""))
    assert code == 1008 and "unregistered callers" in reason


def test_bad_mime_type_closes_1007(emus, voice):
    async def scenario(blob_kw):
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config()) as s:
            await s.send_realtime_input(**blob_kw)
            await collect_turn(s)

    cases = [
        (dict(audio=types.Blob(data=voice["stop"].tobytes(), mime_type="audio/wav")), "Unsupported audio mime type"),
        (dict(audio=types.Blob(data=voice["stop"].tobytes(), mime_type="audio/pcm")), "does not state a sample rate"),
        (dict(audio=types.Blob(data=b"\x01\x02\x03", mime_type="audio/pcm;rate=16000")), "not 16-bit PCM"),
        (dict(media=types.Blob(data=b"....", mime_type="video/mp4")), "Unsupported"),
        (dict(video=types.Blob(data=b"\xff\xd8\xff garbage, not a JPEG", mime_type="image/jpeg")), "does not decode"),
    ]
    for kw, text in cases:
        with pytest.raises(errors.APIError) as exc:
            run(scenario(kw))
        assert exc.value.code == 1007 and text in str(exc.value), (kw, exc.value)


def test_garbage_frames_close_1007_and_other_sessions_carry_on(emus, voice):
    """Malformed frames close only their own session; concurrent SDK sessions finish their turns."""
    path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    url = emus["fast"].url.replace("https://", "wss://") + path
    ctx = ssl.create_default_context(cafile=emus["fast"].info["ca_file"])
    setup = json.dumps({"setup": {"model": MODEL}})
    garbage = [
        [b"\x00\xff\xfe binary junk"],                                    # not UTF-8
        ["{not json"],                                                    # not JSON
        ["[1, 2, 3]"],                                                    # not an object
        [json.dumps({"realtime_input": {"audio": {"data": "AAAA", "mime_type": "audio/pcm;rate=16000"}}})],  # no setup
        [setup, json.dumps({"bogus": {}})],                               # unknown message
        [setup, json.dumps({"realtimeInput": {"audio": {"data": "%%%not base64", "mimeType": "audio/pcm;rate=16000"}}})],
        [setup, json.dumps({"realtime_input": {"media_chunks": {"a": 1}}})],  # wrong shape
        [setup, setup],                                                   # setup twice
        [json.dumps({"setup": {"model": MODEL, "tools": "x"}})],           # bad setup
        [json.dumps({"setup": {"model": MODEL, "inputAudioTranscription": {"vocabulary": ["x"]}}})],  # no such field
    ]

    async def garbage_session(frames):
        async with websockets.connect(url, ssl=ctx) as ws:
            try:
                for f in frames:
                    await ws.send(f)
                while True:
                    await ws.recv()
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else ""

    async def good_session(samples):
        async with client(emus["fast"]).aio.live.connect(model=MODEL, config=config(**TRANSCRIBE)) as s:
            await send_audio(s, np.concatenate([samples, silence(0.6)]), speed=4)
            return await collect_turn(s)

    async def scenario():
        return await asyncio.gather(good_session(voice["hello"]), good_session(voice["weather"]),
                                    *(garbage_session(g) for g in garbage))

    hello, weather, *closes = run(scenario())
    for frames, (code, reason) in zip(garbage, closes):
        assert code == 1007 and reason, (frames, code, reason)
    # the two concurrent sessions each got their own utterance back
    assert match(voice["hello"], hello.samples)[1] > 0.98
    assert match(voice["weather"], weather.samples)[1] > 0.98
    assert match(voice["hello"], weather.samples)[1] < 0.5
    assert emus["fast"].proc.poll() is None


def test_camelcase_and_urlsafe_base64_on_the_v1_path(emus, voice):
    """A raw client that writes camelCase everywhere and URL-safe base64, as SDK 1.x and samples do."""
    url = emus["fast"].url.replace("https://", "wss://") + \
        "//ws/google.ai.generativelanguage.v1.GenerativeService.BidiGenerateContent"       # '//' as the SDK makes it
    ctx = ssl.create_default_context(cafile=emus["fast"].info["ca_file"])
    audio = np.concatenate([voice["stop"], silence(0.6)])
    setup = {"setup": {"model": MODEL, "generationConfig": {"responseModalities": ["AUDIO"]},
                       "outputAudioTranscription": {},
                       "realtimeInputConfig": {"automaticActivityDetection": {"silenceDurationMs": 400}}}}

    async def scenario():
        async with websockets.connect(url, ssl=ctx) as ws:
            await ws.send(json.dumps(setup))
            assert "setupComplete" in json.loads(await ws.recv())
            urlsafe = 0
            for off in range(0, len(audio), 640):
                b64 = base64.urlsafe_b64encode(audio[off:off + 640].tobytes()).decode().rstrip("=")
                urlsafe += ("-" in b64) or ("_" in b64)
                await ws.send(json.dumps({"realtimeInput": {"mediaChunks": [
                    {"mimeType": "audio/pcm;rate=16000", "data": b64}]}}))
            pcm, texts = bytearray(), []
            while True:
                msg = json.loads(await ws.recv())
                sc = msg.get("serverContent", {})
                for part in sc.get("modelTurn", {}).get("parts", []):
                    pcm += base64.b64decode(part["inlineData"]["data"])
                texts += [sc["outputTranscription"]["text"]] if "outputTranscription" in sc else []
                if sc.get("turnComplete"):
                    return np.frombuffer(bytes(pcm), "<i2"), texts, urlsafe

    reply, texts, urlsafe = run(scenario())
    assert urlsafe > 0                                   # the input really used '-' / '_'
    assert match(voice["stop"], reply)[1] > 0.98 and texts[0].startswith("reply 1: ")


def test_wrong_path_is_404_and_plain_ws_fails(emus):
    ctx = ssl.create_default_context(cafile=emus["fast"].info["ca_file"])
    wss = emus["fast"].url.replace("https://", "wss://")

    async def connect(url, **kw):
        async with websockets.connect(url, **kw):
            pass

    with pytest.raises(websockets.InvalidStatus) as exc:
        run(connect(wss + "/ws/something.else", ssl=ctx))
    assert exc.value.response.status_code == 404
    with pytest.raises(Exception):
        run(connect(wss.replace("wss://", "ws://") + "/ws/google.ai.generativelanguage.v1beta."
                    "GenerativeService.BidiGenerateContent", open_timeout=3))
    assert emus["fast"].proc.poll() is None


# --- process behaviour -----------------------------------------------------------------------

def test_sigterm_exits_within_a_second_with_a_session_open(tmp_path):
    emu = Emulator(tmp_path / "state").start().wait_ready()
    assert emu.ready_line.strip() == f"emulator: listening on {emu.url} (CA {emu.info['ca_file']})"
    assert emu.info["pid"] == emu.proc.pid and emu.info["api_key_required"] is False
    assert Path(emu.info["ca_file"]).is_absolute() and Path(emu.info["ca_file"]).is_file()

    async def scenario():
        async with client(emu).aio.live.connect(model=MODEL, config=config()) as s:
            emu.proc.send_signal(15)
            t0 = time.monotonic()
            with pytest.raises(errors.APIError) as exc:
                await collect_turn(s)
            return exc.value, t0

    exc, t0 = run(scenario())
    assert exc.code == 1001
    emu.proc.wait(timeout=5)
    assert time.monotonic() - t0 < 1.0
    code, err = emu.stop()
    assert code == 0 and "Traceback" not in err
    assert not emu.info_path.exists()


def test_certificates_are_reused_and_port_in_use_is_one_line(tmp_path):
    state = tmp_path / "state"
    first = Emulator(state).start().wait_ready()
    ca = Path(first.info["ca_file"]).read_bytes()
    server_pem = (state / "emulator" / "server.pem").read_bytes()
    first.stop()
    second = Emulator(state).start().wait_ready()
    assert Path(second.info["ca_file"]).read_bytes() == ca
    assert (state / "emulator" / "server.pem").read_bytes() == server_pem
    # a second emulator on a taken port: one clear line, exit 1, no traceback
    port = int(second.url.rsplit(":", 1)[1])
    busy = subprocess.run([sys.executable, "-m", "livepipe.services", "emulator", "--port", str(port), "--state-dir",
                           str(tmp_path / "other")], capture_output=True, text=True, timeout=20)
    assert busy.returncode == 1 and "in use" in busy.stderr and "Traceback" not in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1, busy.stderr
    second.stop()


def test_help_documents_every_option():
    out = subprocess.run([sys.executable, "-m", "livepipe.services", "emulator", "--help"], capture_output=True, text=True,
                         timeout=20).stdout
    for opt in ("--host", "--port", "--state-dir", "--api-key", "--latency", "--pace", "--chunk-ms", "--goaway-after",
                "--goaway-at-tool-call", "--goaway-grace", "--session-limit", "--drop-after", "--drop-in-reply", "--tool-trigger", "--timeline",
                "LIVEPIPE_EMULATOR_PORT", "LIVEPIPE_STATE_DIR", "utterance N: D.DD s", "reply N: D.DD s", "1007"):
        assert opt in out, opt


def test_fuzzed_messages_never_cause_an_internal_error(tmp_path):
    """Random shapes and values at every level: each session either carries on or is closed 1007
    with a reason, never 1011 'internal error', and the emulator keeps serving."""
    import random
    emu = Emulator(tmp_path / "state", "--latency", "0", "--pace", "0").start().wait_ready()
    rng = random.Random(20261125)
    pcm = base64.urlsafe_b64encode((np.arange(640) % 50 * 400).astype("<i2").tobytes()).decode()
    jpeg = base64.b64encode(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()).decode()
    keys = ["audio", "video", "media_chunks", "mediaChunks", "mime_type", "mimeType", "data", "text", "activity_start",
            "activityEnd", "audio_stream_end", "turns", "parts", "role", "turn_complete", "turnComplete",
            "function_responses", "functionResponses", "id", "name", "response", "model", "tools", "handle"]
    leaves = [None, 0, -1, 1e308, "", "x", True, [], {}, pcm, jpeg, "audio/pcm;rate=16000", "image/jpeg",
              "audio/pcm;rate=abc", "audio/pcm;rate=16000;rate=8000", "models/x", "\u00e9"]

    def value(depth):
        r = rng.random()
        if depth > 3 or r < 0.4:
            return rng.choice(leaves)
        if r < 0.6:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): value(depth + 1) for _ in range(rng.randint(0, 4))}

    def message():
        kind = rng.choice(["realtime_input", "realtimeInput", "client_content", "clientContent", "tool_response",
                           "toolResponse"])
        return {kind: value(1) if rng.random() < 0.3 else {rng.choice(keys): value(2) for _ in range(rng.randint(1, 3))}}

    url = emu.url.replace("https://", "wss://") + "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
    ctx = ssl.create_default_context(cafile=emu.info["ca_file"])
    setup = {"setup": {"model": MODEL, "tools": [{"functionDeclarations": [{"name": "f"}]}],
                       "inputAudioTranscription": {}, "sessionResumption": {}}}

    async def session():
        """Setup, a few random messages, then read until the emulator closes or goes quiet."""
        async with websockets.connect(url, ssl=ctx) as ws:
            await ws.send(json.dumps(setup if rng.random() < 0.9 else value(0)))
            try:
                for _ in range(rng.randint(1, 6)):
                    await ws.send(json.dumps(message()))
                while True:
                    await asyncio.wait_for(ws.recv(), 0.5)
            except websockets.ConnectionClosed as e:
                return e.rcvd.code if e.rcvd else None
            except asyncio.TimeoutError:
                return "open"

    async def fuzz():
        return await asyncio.gather(*(session() for _ in range(60)))

    try:
        codes = run(fuzz())
    finally:
        code, err = emu.stop()
    assert set(codes) <= {1007, 1008, "open"} and codes.count(1007) > 30, codes
    assert "internal errors 0" in err and "Traceback" not in err, err
    assert code == 0
