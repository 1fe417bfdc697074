"""The bridge and the Live API as users meet it now (issue 16): broker + emulator + gemini-bridge as real
processes, the real google-genai SDK over TLS. 3.x history and refusals, non-blocking tools, turn
signals, audio_stream_end on mute or pause, thoughts and built-in tools on the bus."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.bridge_support import live_factory, silence, speech, wait_for  # noqa: F401
from tests.conftest import ROOT
from tests.test_first_hour import readme_block

MODEL25 = "gemini-2.5-flash-native-audio-preview-12-2025"


def bridge_config_error(*args: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "livepipe.services", "gemini-bridge", "--backend", "emulator", *args],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    return r.returncode, r.stderr.strip()


def test_settings_the_model_refuses_are_one_line_before_connecting():
    """The default model is 3.1: what it refuses (or what belongs to the other generation) is one line."""
    cases = {("--text-mode", "content"): "takes client content only as the initial history",
             ("--affective-dialog", "on"): "does not support it yet",
             ("--proactive-audio", "on"): "does not support it yet",
             ("--thinking-budget", "512"): "sets thinking with --thinking-level",
             ("--builtin-tools", "google_search,code_execution"): "supports google_search only",
             ("--model", MODEL25, "--thinking-level", "low"): "sets thinking with --thinking-budget",
             ("--builtin-tools", "web"): "use google_search, url_context, code_execution",
             ("--transcription-vocabulary", " , "): "no terms",
             ("--transcription-vocabulary", ",".join(f"t{i}" for i in range(1001))): "the service takes at most 1000",
             ("--transcription-vocabulary", "Ilsenmoor", "--input-transcription", "off"): "use --input-transcription on"}
    for args, words in cases.items():
        code, err = bridge_config_error(*args)
        assert code == 2 and len(err.splitlines()) == 1 and words in err, (args, err)


def test_history_is_seeded_at_connect_and_typed_text_goes_as_realtime_input(live_factory, tmp_path):
    history = tmp_path / "history.json"
    history.write_text(json.dumps([{"role": "user", "text": "My name is Ada."},
                                   {"role": "model", "text": "Hello Ada, nice to meet you."}]))
    rig = live_factory(emulator_args=("--pace", "0"), bridge_args=("--history", str(history), "--turn-coverage",
                                                                   "activity"))
    rig.pub.publish("text.in", "text", text="What is my name?")
    rig.reply(1)        # a 3.x emulator closes 1007 on client content after the history: this is realtime text
    assert any(m["text"] == 'reply 1: text "What is my name?"' for m in rig.rec.select("transcript", "transcript"))
    start = rig.emu.events("session_start")[0]     # the default model is of the 3.x generation
    assert start["generation"] == 3 and start["turn_coverage"] == "TURN_INCLUDES_ONLY_ACTIVITY"
    seeded = rig.emu.events("history")
    assert len(seeded) == 1 and seeded[0]["turns"] == 2 and seeded[0]["roles"] == ["user", "model"]
    # 3.x bundles generationComplete with turnComplete: both still reach the bus, in order
    assert rig.rec.select("control", "generation_complete", turn=1) and rig.rec.select("control", "turn_complete", turn=1)
    out, err = rig.close()
    assert rig.bridge.returncode == 0 and "seeded the session with 2 turns of history" in err
    # 2.5: the same history goes as client content without turnComplete: context, no reply.
    before = len(rig.emu.timeline())     # the next emulator appends to the same timeline file
    rig25 = live_factory(emulator_args=("--pace", "0"), bridge_args=("--history", str(history), "--model", MODEL25))
    seeded = wait_for(lambda: [e for e in rig25.emu.timeline()[before:] if e["event"] == "context"], 5,
                      "the history on 2.5")
    assert seeded[0]["turns"] == 2 and seeded[0]["roles"] == ["user", "model"]
    assert not [e for e in rig25.emu.timeline()[before:] if e["event"] == "history"]
    assert not rig25.rec.select("control", "turn_complete")


def test_non_blocking_tool_result_scheduling_reaches_the_model(live_factory, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "look_up", "description": "slow search", "behavior": "NON_BLOCKING"}]))
    rig = live_factory(emulator_args=("--pace", "1", "--tool-trigger", "1.0"),
                       bridge_args=("--model", MODEL25, "--tools", str(tools)))
    said = speech("Please look this up for me, and tell me what you find out about it.")
    rig.say(np.concatenate([said, silence(0.8)]))
    call = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.call" and m.kind == "call"], 15, "tool.call")[0]
    # The model goes on speaking while the call runs: reply audio of turn 1 arrives before any result.
    rig.rec.until(lambda ms: any(m.topic == "audio.out" and m["turn"] == 1 for m in ms), 10, "reply audio")
    rig.pub.publish("tool.result", "result", id=call["id"], name="look_up", response={"r": 1}, scheduling="LATER")
    wait_for(lambda: rig.metrics().get("tool_results_rejected") == 1, 5, "the bad scheduling to be rejected")
    # A partial result (will_continue): context only; the call stays open for the last one.
    rig.pub.publish("tool.result", "result", id=call["id"], name="look_up", response={"partial": 1},
                    scheduling="SILENT", will_continue=True)
    wait_for(lambda: rig.emu.events("tool_response"), 5, "the partial result")
    rig.pub.publish("tool.result", "result", id=call["id"], name="look_up", response={"r": 1}, scheduling="interrupt")
    rig.reply(2)
    assert rig.rec.select("control", "interrupt", turn=1)              # INTERRUPT stopped the reply
    assert any(m["text"] == "reply 2: tool look_up result, interrupt" for m in rig.rec.select("transcript", role="model", turn=2))
    resp = [(e["scheduling"], e["will_continue"]) for e in rig.emu.events("tool_response")]
    assert resp == [("SILENT", True), ("INTERRUPT", False)]
    assert rig.metrics().get("tool_results_unknown") == 0


def test_turn_signals_on_the_bus(live_factory, tmp_path):
    """Also the transcription options: language codes and custom vocabulary reach the service, and the
    user's transcript spells a listed term as given."""
    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("# names the transcription should get right\nIlsenmoor\n\nNykvist Roan\n")
    rig = live_factory(emulator_args=("--pace", "0", "--interim-every", "0.5", "--need-more-input", "0.6"),
                       bridge_args=("--transcription-vocabulary", f"@{vocabulary}",
                                    "--transcription-languages", "en-GB,fr-FR"))
    rig.say(np.concatenate([speech("Hello there, how are you today my friend"), silence(0.8)]))
    rig.reply(1)
    rig.rec.until(lambda ms: any(m.topic == "control" and m.kind == "turn_status" and m["turn"] == 1 for m in ms),
                  5, "turn_status 1")
    activity = [m["state"] for m in rig.rec.select("control", "voice_activity")]
    assert activity == ["start", "end"]
    interim = rig.rec.select("transcript", "interim", role="user", turn=1)
    final = rig.rec.select("transcript", "transcript", role="user", turn=1)
    assert len(interim) >= 2 and all(re.match(r"^utterance 1: \d\.\d\d s so far$", m["text"]) for m in interim)
    assert final and interim[-1]["seq"] < final[0]["seq"]
    assert re.match(r'^utterance 1: \d\.\d\d s, said "Ilsenmoor"$', final[0]["text"])
    assert rig.emu.events("session_start")[0]["input_transcription"] == {
        "language_codes": ["en-GB", "fr-FR"], "custom_vocabulary": ["Ilsenmoor", "Nykvist Roan"]}
    assert rig.rec.select("control", "turn_status", turn=1)[0]["status"] == "IDLE"
    # Too short an utterance: the service says it waits for more instead of answering.
    rig.say(np.concatenate([speech("Hi."), silence(0.8)]))
    status = rig.rec.until(lambda ms: [m for m in ms if m.topic == "control" and m.kind == "turn_status"
                                       and m["turn"] == 2], 10, "turn_status 2")[0]
    assert status["reason"] == "NEED_MORE_INPUT" and status["waiting_for_input"] is True
    assert not [m for m in rig.rec.select("audio.out") if m["turn"] == 2]


def test_mute_or_a_paused_capture_sends_audio_stream_end(live_factory):
    """Speech with no silence after it: only audio_stream_end tells the service's VAD the turn is over."""
    rig = live_factory(emulator_args=("--pace", "0"))
    said = speech("Hello there, how are you")
    rig.say(said)
    chunks = -(-len(said) // 320)
    wait_for(lambda: rig.metrics().get("audio_in_chunks", 0) >= chunks, 10, "the speech to reach the model")
    rig.pub.publish("control", "mute")
    rig.reply(1)
    wait_for(lambda: rig.metrics().get("audio_stream_ends") == 1, 5, "audio_stream_ends 1")
    rig.pub.publish("control", "unmute")
    rig.say(said)                 # then capture just stops: the pause ends the stream
    rig.reply(2)
    out, err = rig.close()
    assert "audio.in muted: sending audio_stream_end" in err and "audio.in paused: sending audio_stream_end" in err


def test_thoughts_and_builtin_tools_are_published_apart_from_the_transcript(live_factory):
    rig = live_factory(emulator_args=("--pace", "0"),
                       bridge_args=("--model", MODEL25, "--thinking-budget", "256", "--include-thoughts", "on",
                                    "--builtin-tools", "google_search,url_context,code_execution"))
    rig.say(np.concatenate([speech("What is the weather like in Paris"), silence(0.8)]))
    rig.reply(1)
    thought = rig.rec.select("transcript", "thought", turn=1)
    assert [m["text"] for m in thought] == ["thinking about turn 1"]
    assert all("thinking" not in m["text"] for m in rig.rec.select("transcript", "transcript"))
    rig.rec.until(lambda ms: len([m for m in ms if m.topic == "grounding"]) >= 4, 5, "grounding")
    search = rig.rec.select("grounding", "search", turn=1)[0]
    assert search["queries"] == ["turn 1"] and search["sources"] == [{"title": "result 1", "uri": "https://emulator.invalid/search/1"}]
    assert rig.rec.select("grounding", "url_context", turn=1)[0]["urls"] == [
        {"url": "https://emulator.invalid/page/1", "status": "URL_RETRIEVAL_STATUS_SUCCESS"}]
    assert rig.rec.select("grounding", "code", turn=1)[0]["code"] == "print(1 * 1)"
    result = rig.rec.select("grounding", "code_result", turn=1)[0]
    assert result["output"] == "1\n" and result["outcome"] == "OUTCOME_OK"


def _update(bus_env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "livepipe.services", "update", *args], env=bus_env,
                          capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_context_update_live_gives_the_model_new_tools(live_factory, bus_env, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "look_up", "description": "search"}]))
    rig = live_factory(emulator_args=("--pace", "0", "--tool-trigger", "1.0"), bridge_args=("--model", MODEL25))
    r = _update(bus_env, "--system-instruction", "Answer briefly.", "--tools", str(tools))
    assert r.returncode == 0, r.stderr
    update = wait_for(lambda: rig.emu.events("context_update"), 10, "the update to reach the model")[0]
    assert update["system_instruction"] is True and update["functions"] == ["look_up"]
    rig.say(np.concatenate([speech("Please look this up for me, and tell me what you find."), silence(0.8)]))
    call = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.call" and m.kind == "call"], 15, "tool.call")[0]
    assert call["name"] == "look_up"
    assert len([s for s in rig.rec.select("control", "session") if s["state"] == "connected"]) == 1


# One rerun: it failed once in about ten runs on a loaded machine, cause not yet found (an open item);
# solo (tests/conftest.py): no other worker's test beside it.
@pytest.mark.flaky(reruns=1)
@pytest.mark.solo
def test_context_update_by_reconnecting_resumes_with_the_handle(live_factory, bus_env, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "look_up", "description": "search"}]))
    rig = live_factory(emulator_args=("--pace", "0", "--tool-trigger", "1.0"),
                       bridge_args=("--model", MODEL25, "--context-update", "reconnect"))
    rig.say(np.concatenate([speech("Hello there"), silence(0.8)]))
    rig.reply(1)
    assert _update(bus_env, "--tools", str(tools)).returncode == 0
    rig.rec.until(lambda ms: len([m for m in ms if m.topic == "control" and m.kind == "session"
                                  and m["state"] == "connected"]) == 2, 10, "the second connection")
    # the emulator's timeline is a file it appends to: wait for the second start to be written
    starts = wait_for(lambda: (e := rig.emu.events("session_start")) and len(e) >= 2 and e, 5, "two session starts")
    assert [s["resumed"] for s in starts] == [False, True]      # the same conversation, resumed
    rig.say(np.concatenate([speech("Please look this up for me, and tell me what you find."), silence(0.8)]))
    call = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.call" and m.kind == "call"], 15, "tool.call")[0]
    assert call["name"] == "look_up" and call["args"]["utterance"] >= 2    # numbering goes on: not a new session
    assert _update(bus_env, "--system-instruction", "").returncode == 2   # bad input: one line, nothing sent


def test_history_from_the_bus_starts_the_session_and_a_fresh_session_keeps_the_conversation(live_factory, bus_env,
                                                                                             tmp_path):
    """control history (`livepipe update --history`): a session with nothing said yet is replaced by
    one seeded with it; later, kept for the next new session, which also gets what was said since."""
    import signal

    from tests.bridge_support import Emulator
    first = tmp_path / "first.json"
    first.write_text(json.dumps([{"role": "user", "text": "My name is Ada."}, {"role": "model", "text": "Hello Ada."}]))
    rig = live_factory(emulator_args=("--pace", "0"))
    assert _update(bus_env, "--history", str(first)).returncode == 0
    seeded = wait_for(lambda: rig.emu.events("history"), 10, "a new session seeded from the bus")
    assert seeded[0]["texts"] == ["My name is Ada.", "Hello Ada."]
    rig.pub.publish("control", "history", turns=[{"role": "robot", "text": "x"}])   # refused: one line, counted
    rig.pub.publish("text.in", "text", text="What is my name?")
    rig.reply(1)
    second = [{"role": "user", "text": "I live in Paris."}, {"role": "model", "text": "Paris is lovely."}]
    rig.pub.publish("control", "history", turns=second)      # mid-conversation: for the next new session
    rig.pub.publish("text.in", "text", text="Where do I live?")
    rig.reply(2)
    wait_for(lambda: rig.metrics().get("history_rejected") == 1, 5, "the bad history to be counted")
    assert len(rig.emu.events("history")) == 1
    # The emulator restarts: its sessions are gone, the bridge starts a fresh one.
    rig.emu.proc.send_signal(signal.SIGKILL)
    rig.emu.proc.wait(5)
    rig.emu = Emulator(bus_env, "--latency", "0.05", "--pace", "0")
    seeded = wait_for(lambda: rig.emu.events("history")[1:], 20, "the fresh session's history")
    reply2 = [m["text"] for m in rig.rec.select("transcript", "transcript", turn=2, role="model")]
    assert seeded[0]["texts"] == ["I live in Paris.", "Paris is lovely.", "Where do I live?", *reply2]
    out, err = rig.close()
    assert err.count("nothing said yet: starting a new session with the history from the bus") == 1, err
    assert err.count("control history from test-pub: turn 0 needs") == 1, err


def weather_tool(bus_env: dict, tmp_path) -> subprocess.Popen:
    """README's "Serving functions to the model" example, run as it is."""
    script = tmp_path / "weather.py"
    script.write_text(readme_block("### Serving functions to the model"))
    return subprocess.Popen([sys.executable, str(script)], env=bus_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def announcer(rig) -> str:
    """The inst of the process that announced get_weather."""
    return rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.announce" and m.kind == "announce"], 10,
                         "tool.announce")[0]["inst"]


def test_a_process_started_mid_session_serves_its_announced_function(live_factory, bus_env, tmp_path):
    rig = live_factory(emulator_args=("--pace", "0", "--tool-trigger", "1.0"), bridge_args=("--model", MODEL25))
    rig.rec.until(lambda ms: [m for m in ms if m.topic == "control" and m.kind == "session"
                              and m["state"] == "connected"], 15, "the session")
    tool = weather_tool(bus_env, tmp_path)
    try:
        inst = announcer(rig)
        # Announced mid-session: the bridge gives the model the function on the open session.
        update = wait_for(lambda: rig.emu.events("context_update"), 10, "the announced function to reach the model")[0]
        assert update["functions"] == ["get_weather"]
        rig.say(np.concatenate([speech("What is the weather like where I am today?"), silence(0.8)]))
        call = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.call" and m.kind == "call"], 15,
                             "tool.call")[0]
        assert call["name"] == "get_weather" and call["to"] == inst      # routed to the announcer
        result = rig.rec.until(lambda ms: [m for m in ms if m.topic == "tool.result"], 10, "tool.result")[0]
        assert result["src"] == "weather" and result["inst"] == inst and result["id"] == call["id"]
        assert result["response"] == {"weather": "sunny"}
        answered = wait_for(lambda: [e for e in rig.emu.events("tool_response") if e["id"] == call["id"]], 10,
                            "the result to reach the model")
        assert answered
        # A clean stop withdraws the function: the model no longer has it.
        tool.terminate()
        assert tool.wait(10) == 0
        update = wait_for(lambda: rig.emu.events("context_update")[1:], 10, "the withdrawal to reach the model")[0]
        assert update["functions"] == []
    finally:
        if tool.poll() is None:
            tool.kill()
        tool.communicate(timeout=5)
    assert len([s for s in rig.rec.select("control", "session") if s["state"] == "connected"]) == 1


def test_functions_of_a_process_running_before_the_bridge_and_gone_after_it_dies(live_factory, bus_env, tmp_path):
    tool = weather_tool(bus_env, tmp_path)
    try:
        # The bridge starts after it: its tool.query brings the announcement.
        rig = live_factory(emulator_args=("--pace", "0", "--tool-trigger", "1.0"), bridge_args=("--model", MODEL25))
        inst = announcer(rig)
        wait_for(lambda: rig.metrics().get("tools_announced") == 1, 10, "the bridge to know the function")
        said = speech("What is the weather like where I am today?")
        rig.say(np.concatenate([said, silence(0.8)]))
        rig.reply(1)
        calls = rig.rec.select("tool.call", "call")
        assert [(c["name"], c["to"]) for c in calls] == [("get_weather", inst)]
        assert rig.rec.select("tool.result", id=calls[0]["id"], src="weather")
        # Killed (no withdraw): its heartbeats stop, and the bridge takes the function away.
        tool.kill()
        tool.wait(5)
        wait_for(lambda: [e for e in rig.emu.events("context_update") if e.get("functions") == []], 10,
                 "the dead process's function to be removed")
        rig.say(np.concatenate([said, silence(0.8)]))
        rig.reply(2)
        assert len(rig.rec.select("tool.call", "call")) == 1        # no call to a function nobody serves
        wait_for(lambda: rig.metrics().get("tools_announced") == 0, 5, "tools_announced back to 0")
        # A nameless declaration: refused with one line, counted, nothing sent to the model.
        updates = len(rig.emu.events("context_update"))
        rig.pub.publish("tool.announce", "announce", functions=[{"description": "no name"}])
        wait_for(lambda: rig.metrics().get("tool_announces_rejected") == 1, 5, "the refusal to be counted")
        assert len(rig.emu.events("context_update")) == updates
    finally:
        if tool.poll() is None:
            tool.kill()
        tool.communicate(timeout=5)
