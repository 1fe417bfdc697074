"""The Live API as users meet it now (issue 16), through the real google-genai SDK against the emulator:
3.x models (history only at connect, 1007 on what they refuse, bundled parts), non-blocking tools and
their scheduling, and the turn signals (voice activity, interim transcription, waiting for input)."""
from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from google.genai import errors, types

from tests.test_emulator_sdk_compat import old_sdk_python  # noqa: F401  (fixture: google-genai 1.30 venv)
from tests.emulator_support import (Emulator, TurnResult, collect_turn, make_client, receive_until, send_audio,
                                    silence, speech, start_all)

MODEL3 = "models/gemini-3.1-flash-live-preview"
MODEL25 = "models/gemini-2.5-flash-native-audio-preview-12-2025"
TRANSCRIBE = dict(input_audio_transcription={}, output_audio_transcription={})


@pytest.fixture(scope="module")
def voice(tmp_path_factory) -> dict[str, np.ndarray]:
    d = tmp_path_factory.mktemp("voice")
    return {"long": speech("Please look this up for me, and tell me what you find out about it.", d),
            "short": speech("Hi.", d),
            "hello": speech("Hello there, this is a test of the emulator.", d)}


@pytest.fixture(scope="module")
def emus(tmp_path_factory):
    base = tmp_path_factory.mktemp("emu")
    e = {"fast": Emulator(base / "fast", "--latency", "0.05", "--pace", "0", "--tool-trigger", "1.0",
                          "--interim-every", "0.5", "--need-more-input", "0.6"),
         "slow": Emulator(base / "slow", "--latency", "0.05", "--pace", "1", "--tool-trigger", "1.0")}
    start_all(list(e.values()))
    yield e
    for emu in e.values():
        code, err = emu.stop()
        assert code == 0 and "Traceback" not in err, err


def client(emu: Emulator):
    return make_client(emu.url, emu.info["ca_file"])


def run(coro):
    return asyncio.run(coro)


async def gather(session, until, seen: list, timeout: float = 10.0) -> None:
    async def go() -> None:
        while True:
            async for msg in session.receive():
                seen.append(msg)
                if until(seen):
                    return
    await asyncio.wait_for(go(), timeout)


# --- 3.x models --------------------------------------------------------------------------------

def test_gemini3_takes_client_content_only_as_initial_history(emus, voice):
    emu = emus["fast"]

    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], history_config={"initial_history_in_client_content": True},
                                      **TRANSCRIBE)
        async with client(emu).aio.live.connect(model=MODEL3, config=cfg) as s:
            history = [types.Content(role="user", parts=[types.Part(text="My name is Ada.")]),
                       types.Content(role="model", parts=[types.Part(text="Hello Ada.")])]
            await s.send_client_content(turns=history, turn_complete=True)      # seeds, no model turn
            await s.send_realtime_input(text="What is my name?")                  # text: realtime input
            turn = await collect_turn(s)
            assert turn.output_text == ['reply 1: text "What is my name?"'] and turn.seconds > 0.3
            # After the history, client content is refused the way the service refuses it.
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="hi")]),
                                        turn_complete=True)
            with pytest.raises(errors.APIError) as closed:
                await collect_turn(s, timeout=5)
            return closed.value
    err = run(scenario())
    assert err.code == 1007 and "Request contains an invalid argument." in str(err)
    history = [e for e in emu.timeline() if e["event"] == "history"]
    assert history and history[-1]["turns"] == 2 and history[-1]["roles"] == ["user", "model"]


def test_gemini3_without_history_config_refuses_client_content_but_25_takes_it(emus):
    emu = emus["fast"]

    async def one(model: str) -> TurnResult | errors.APIError:
        async with client(emu).aio.live.connect(model=model, config=types.LiveConnectConfig(
                response_modalities=["AUDIO"], **TRANSCRIBE)) as s:
            await s.send_client_content(turns=types.Content(role="user", parts=[types.Part(text="hi")]),
                                        turn_complete=True)
            try:
                return await collect_turn(s, timeout=5)
            except errors.APIError as e:
                return e
    refused, answered = run(one(MODEL3)), run(one(MODEL25))
    assert isinstance(refused, errors.APIError) and refused.code == 1007
    assert isinstance(answered, TurnResult) and answered.output_text == ['reply 1: text "hi"']


@pytest.mark.parametrize("setting", [dict(enable_affective_dialog=True),
                                     dict(proactivity={"proactive_audio": True})])
def test_gemini3_refuses_affective_dialog_and_proactive_audio_at_setup(emus, setting):
    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], **setting)
        async with client(emus["fast"]).aio.live.connect(model=MODEL3, config=cfg):
            pass
    with pytest.raises(errors.APIError) as closed:
        run(scenario())
    assert closed.value.code == 1007 and "Request contains an invalid argument." in str(closed.value)


def test_gemini3_bundles_parts_and_sends_turn_signals(emus, voice):
    """One message carries audio and its transcription, another generationComplete and turnComplete
    (with interactionStatus); voiceActivity marks the speech; interim transcription runs during it."""
    emu = emus["fast"]
    said = voice["hello"]
    seen: list = []

    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], **TRANSCRIBE)
        async with client(emu).aio.live.connect(model=MODEL3, config=cfg) as s:
            await send_audio(s, np.concatenate([said, silence(0.8)]), speed=0)
            await gather(s, lambda ms: any(m.server_content and m.server_content.turn_complete for m in ms), seen)
    run(scenario())
    contents = [m.server_content for m in seen if m.server_content]
    bundled = [c for c in contents if c.model_turn and c.output_transcription]
    assert len(bundled) == 1 and bundled[0].output_transcription.text.startswith("reply 1: ")
    last = contents[-1]
    assert last.turn_complete and last.generation_complete and last.interaction_status == types.InteractionStatus.IDLE
    activity = [m.voice_activity.voice_activity_type for m in seen if m.voice_activity]
    assert activity == [types.VoiceActivityType.ACTIVITY_START, types.VoiceActivityType.ACTIVITY_END]
    interim = [c.interim_input_transcription.text for c in contents if c.interim_input_transcription]
    assert len(interim) >= 3 and all(re.match(r"^utterance 1: \d\.\d\d s so far$", t) for t in interim)
    assert interim.index(interim[-1]) < [c.input_transcription is not None for c in contents].index(True)


def test_a_too_short_utterance_waits_for_input(emus, voice):
    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], **TRANSCRIBE)
        async with client(emus["fast"]).aio.live.connect(model=MODEL3, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["short"], silence(0.8)]), speed=0)
            seen: list = []
            await gather(s, lambda ms: any(m.server_content and m.server_content.turn_complete for m in ms), seen)
            return seen
    seen = run(scenario())
    done = [m.server_content for m in seen if m.server_content and m.server_content.turn_complete][0]
    assert done.turn_complete_reason == types.TurnCompleteReason.NEED_MORE_INPUT and done.waiting_for_input
    assert not any(m.server_content and m.server_content.model_turn for m in seen)   # no reply


def test_custom_vocabulary_and_language_codes_reach_the_input_transcription(emus, voice):
    """AudioTranscriptionConfig.custom_vocabulary (google-genai >= 2.13) goes out as customVocabulary and
    the transcript spells a listed term as given; language_codes arrive as sent."""
    emu = emus["fast"]
    terms = ["Ilsenmoor", "Nykvist Roan", "Wrenholt"]

    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], output_audio_transcription={},
                                      input_audio_transcription=types.AudioTranscriptionConfig(
                                          custom_vocabulary=terms, language_codes=["en-GB"]))
        async with client(emu).aio.live.connect(model=MODEL3, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["hello"], silence(0.8)]), speed=0)
            return await collect_turn(s)
    turn = run(scenario())
    assert len(turn.input_text) == 1 and re.match(r'^utterance 1: \d\.\d\d s, said "Ilsenmoor"$', turn.input_text[0])
    start = [e for e in emu.timeline() if e["event"] == "session_start" and e.get("input_transcription")][-1]
    assert start["input_transcription"] == {"language_codes": ["en-GB"], "custom_vocabulary": terms}


# --- non-blocking tools ------------------------------------------------------------------------

NB_TOOL = [{"function_declarations": [{"name": "look_up", "description": "slow search", "behavior": "NON_BLOCKING"}]}]


@pytest.mark.parametrize("scheduling", ["INTERRUPT", "WHEN_IDLE", "SILENT"])
def test_non_blocking_call_does_not_hold_the_reply_and_its_response_is_scheduled(emus, voice, scheduling):
    """2.5: the tool call goes out and the reply streams at once; the response sent mid-reply then
    interrupts it (INTERRUPT), is answered after it (WHEN_IDLE), or only joins the context (SILENT)."""
    emu = emus["slow"]           # the reply streams in real time: there is a "mid-reply"

    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], tools=NB_TOOL, **TRANSCRIBE)
        async with client(emu).aio.live.connect(model=MODEL25, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["long"], silence(0.8)]), speed=0)
            first = await receive_until(s, lambda r: r.tool_calls and r.first_audio_at, TurnResult())
            call = first.tool_calls[0]
            await s.send_tool_response(function_responses=[types.FunctionResponse(
                id=call.id, name=call.name, response={"result": "found"}, scheduling=scheduling)])
            if scheduling == "SILENT":
                r = await collect_turn(s, first)
                return r, None
            r1 = await collect_turn(s, first)
            r2 = await collect_turn(s)
            return r1, r2
    r1, r2 = run(scenario())
    assert r1.tool_calls[0].name == "look_up"
    assert r1.output_text == [f"reply 1: {r1.output_text[0].split(': ')[1]}"]     # the reply to the utterance
    events = emu.timeline()
    resp = [e for e in events if e["event"] == "tool_response"][-1]
    assert resp["scheduling"] == scheduling and resp["will_continue"] is False
    if scheduling == "INTERRUPT":
        assert r1.interrupted and r2.output_text == ["reply 2: tool look_up result, interrupt"]
    elif scheduling == "WHEN_IDLE":
        assert not r1.interrupted and r2.output_text == ["reply 2: tool look_up result, when_idle"]
        assert r1.seconds > 2.0           # the whole reply played before the result was spoken
    else:
        assert not r1.interrupted and r2 is None


def test_will_continue_keeps_a_non_blocking_call_open(emus, voice):
    emu = emus["fast"]

    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], tools=NB_TOOL, **TRANSCRIBE)
        async with client(emu).aio.live.connect(model=MODEL25, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["long"], silence(0.8)]), speed=0)
            first = await collect_turn(s)
            call = first.tool_calls[0]
            for i, more in enumerate((True, False)):
                await s.send_tool_response(function_responses=[types.FunctionResponse(
                    id=call.id, name=call.name, response={"part": i}, will_continue=more, scheduling="WHEN_IDLE")])
                await collect_turn(s)
    run(scenario())
    resp = [e for e in emu.timeline() if e["event"] == "tool_response"]
    assert [r["will_continue"] for r in resp[-2:]] == [True, False]


def test_gemini3_calls_non_blocking_functions_synchronously(emus, voice):
    async def scenario():
        cfg = types.LiveConnectConfig(response_modalities=["AUDIO"], tools=NB_TOOL, **TRANSCRIBE)
        async with client(emus["fast"]).aio.live.connect(model=MODEL3, config=cfg) as s:
            await send_audio(s, np.concatenate([voice["long"], silence(0.8)]), speed=0)
            r = await collect_turn(s, until_tool_call=True)
            assert not r.audio                       # nothing until the response
            call = r.tool_calls[0]
            await s.send_tool_response(function_responses=[types.FunctionResponse(
                id=call.id, name=call.name, response={"ok": True})])
            return await collect_turn(s, r)
    r = run(scenario())
    assert r.output_text[0].endswith(", after tool look_up")


def test_oldest_supported_sdk_sends_non_blocking_scheduling(old_sdk_python, tmp_path, voice):
    """google-genai 1.30 (the floor) already has FunctionDeclaration.behavior and
    FunctionResponse.scheduling / will_continue: non-blocking tools need no higher floor."""
    import json
    import subprocess

    from tests.emulator_support import ROOT, write_wav
    write_wav(tmp_path / "long.wav", voice["long"])
    emu = Emulator(tmp_path / "state", "--latency", "0.05", "--pace", "0", "--tool-trigger", "1.0").start().wait_ready()
    try:
        r = subprocess.run([str(old_sdk_python), str(ROOT / "tests" / "emulator_support.py"), emu.url,
                            emu.info["ca_file"], str(tmp_path / "long.wav"), "non-blocking"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
        events = emu.timeline()
    finally:
        code, err = emu.stop()
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["sdk"].startswith("1.30.") and out["tool"] == "look_up"
    assert out["result"] == ["reply 2: tool look_up result, when_idle"]
    call = [e for e in events if e["event"] == "tool_call"][0]
    resp = [e for e in events if e["event"] == "tool_response"][0]
    assert call["non_blocking"] is True and (resp["scheduling"], resp["will_continue"]) == ("WHEN_IDLE", False)
    assert code == 0 and "Traceback" not in err
