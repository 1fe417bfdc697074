"""The bridge's subtlest rules, fast and in-process, driven by the SDK's own message objects:
turn numbering around interrupts and goAway, what is sent again after a switchover, tool timeouts.

The bridge publishes through its real Service and ZeroMQ (inproc) sockets; what it publishes is
decoded by the bus's own decoder, so every message also passes the topic schema. The end-to-end
tests (test_gemini_bridge*.py) cover the same rules against the emulator over TLS."""
from __future__ import annotations

import asyncio
import itertools
from typing import Any, Iterator

import numpy as np
import pytest
import zmq
from google.genai import types

from livepipe.bus import Service
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message, decode
from livepipe.services.processes import gemini_bridge as gb

PCM = b"\x01\x00" * 480   # 20 ms at 24 kHz
_ids = itertools.count()


class Published:
    """What a bridge publishes, read back from inproc sockets in order."""

    def __init__(self, svc: Service) -> None:
        self.ctx = zmq.Context.instance()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        n = next(_ids)
        for lane in ("control", "data"):
            pub = self.ctx.socket(zmq.PUB)
            pub.bind(f"inproc://bridge-rules-{n}-{lane}")
            self.sub.connect(f"inproc://bridge-rules-{n}-{lane}")
            svc._sync_pubs[lane] = pub
        self.messages: list[Message] = []

    def read(self) -> list[Message]:
        while self.sub.poll(0):
            self.messages.append(decode(self.sub.recv_multipart(), ""))
        return self.messages

    def select(self, topic: str, kind: str | None = None) -> list[Message]:
        return [m for m in self.read() if m.topic == topic and (kind is None or m.kind == kind)]

    def kinds(self) -> list[tuple[str, str, Any]]:
        return [(m.topic, m.kind, m.get("turn")) for m in self.read() if m.topic != "status"]

    def audio_turns(self) -> list[int]:
        return [m["turn"] for m in self.select("audio.out")]

    def control(self) -> list[tuple[str, Any]]:
        """Control messages in order (their own lane: across lanes, control overtakes data by design)."""
        return [(m.kind, m.get("turn")) for m in self.select("control")]

    def close(self) -> None:
        self.sub.close(0)


@pytest.fixture
def rig() -> Iterator[tuple[gb.Bridge, Published]]:
    svc = Service(gb.NAME, BusConfig())
    published = Published(svc)
    settings = gb.Settings(backend="emulator", api_key="k", tool_timeout=0.05)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    bridge = loop.run_until_complete(_make(svc, settings))
    yield bridge, published
    published.close()
    for sock in svc._sync_pubs.values():
        sock.close(0)
    loop.close()
    asyncio.set_event_loop(None)


async def _make(svc: Service, settings: gb.Settings) -> gb.Bridge:
    return gb.Bridge(svc, settings, gb.KeyScrubber("k"))


def link(number: int = 1) -> gb.Link:
    return gb.Link(number, session=None, stack=None)


def audio() -> types.LiveServerMessage:
    blob = types.Blob(data=PCM, mime_type="audio/pcm;rate=24000")
    return types.LiveServerMessage(server_content=types.LiveServerContent(
        model_turn=types.Content(role="model", parts=[types.Part(inline_data=blob)])))


def content(**fields: Any) -> types.LiveServerMessage:
    return types.LiveServerMessage(server_content=types.LiveServerContent(**fields))


def test_turns_are_numbered_from_one_and_close_on_turn_complete(rig) -> None:
    bridge, pub = rig
    lk = link()
    for msg in (audio(), audio(), content(generation_complete=True), content(turn_complete=True), audio(),
                content(turn_complete=True)):
        bridge.on_server_message(lk, msg)
    assert pub.audio_turns() == [1, 1, 2]
    assert pub.control() == [("generation_complete", 1), ("turn_complete", 1), ("turn_complete", 2)]


def test_an_interrupt_is_published_at_once_and_nothing_of_that_turn_follows(rig) -> None:
    bridge, pub = rig
    lk = link()
    bridge.on_server_message(lk, audio())
    bridge.on_server_message(lk, content(interrupted=True))
    bridge.on_server_message(lk, audio())             # the service may still flush a chunk of that turn
    bridge.on_server_message(lk, content(turn_complete=True))
    bridge.on_server_message(lk, audio())             # the answer to what the user said over it
    assert pub.audio_turns() == [1, 2]
    assert pub.control() == [("interrupt", 1), ("turn_complete", 1)]
    assert bridge.svc.metrics["audio_out_dropped_interrupted"] == 1
    assert bridge.svc.metrics["interrupts"] == 1


def test_an_interrupt_after_the_turn_ended_owns_the_turn_complete_that_follows(rig) -> None:
    # The model's turn is complete but playback still plays its tail when the user barges in: the
    # service says interrupted, then turnComplete. Both belong to that turn; no empty turn is opened.
    bridge, pub = rig
    lk = link()
    for msg in (audio(), content(generation_complete=True), content(turn_complete=True),
                content(interrupted=True), content(turn_complete=True), audio()):
        bridge.on_server_message(lk, msg)
    assert pub.control() == [("generation_complete", 1), ("turn_complete", 1), ("interrupt", 1),
                             ("turn_complete", 1)]
    assert pub.audio_turns() == [1, 2]


def test_the_users_words_carry_the_turn_that_answers_them(rig) -> None:
    bridge, pub = rig
    lk = link()
    said = types.Transcription(text="hello", finished=True)
    bridge.on_server_message(lk, content(input_transcription=said))   # before any reply: turn 1
    bridge.on_server_message(lk, audio())
    bridge.on_server_message(lk, content(turn_complete=True))
    bridge.on_server_message(lk, content(input_transcription=said))   # the next question: turn 2
    users = [(m["turn"], m.get("final")) for m in pub.select("transcript") if m["role"] == "user"]
    assert users == [(1, True), (2, True)]


def test_go_away_holds_input_and_wakes_the_supervisor_once(rig) -> None:
    bridge, pub = rig
    lk = link()
    bridge.link = lk
    bridge.link_ready.set()
    msg = types.LiveServerMessage(go_away=types.LiveServerGoAway(time_left="3s"))
    bridge.on_server_message(lk, msg)
    bridge.on_server_message(lk, msg)                  # a repeated goAway changes nothing
    assert [m["time_left_ms"] for m in pub.select("control", "go_away")] == [3000]
    assert lk.go_away_ms == 3000 and not bridge.link_ready.is_set() and bridge.wake.is_set()


def test_a_retired_connection_publishes_nothing(rig) -> None:
    # After a switchover the old connection's output would duplicate what the resumed one says.
    bridge, pub = rig
    old = link(1)
    old.retired = True
    bridge.on_server_message(old, audio())
    bridge.on_server_message(old, content(turn_complete=True))
    assert pub.kinds() == []


def test_after_a_switchover_exactly_the_audio_the_handle_does_not_cover_is_sent_again_first(rig) -> None:
    bridge, _ = rig
    old = link(1)
    limit = 10 * gb.BYTES_PER_SECOND_IN
    chunks = [bytes([i]) * 640 for i in range(6)]
    for chunk in chunks:
        old.sent_audio(old.next_index(), chunk, limit)       # client messages 1..6
    upd = types.LiveServerMessage(session_resumption_update=types.LiveServerSessionResumptionUpdate(
        new_handle="h2", resumable=True, last_consumed_client_message_index=4))
    bridge.link = old
    bridge.on_server_message(old, upd)
    assert bridge.handle == "h2"
    bridge._enqueue_audio(b"\x09" * 640)                     # said while the next connection opened
    bridge._replay_from(old)
    assert list(bridge.audio_q) == [chunks[4], chunks[5], b"\x09" * 640]
    assert bridge.svc.metrics["audio_in_replayed_ms"] == 2 * 640 * 1000 // gb.BYTES_PER_SECOND_IN


def test_a_fresh_session_is_sent_the_speech_no_reply_followed_and_not_the_answered_line(rig) -> None:
    # A (answered), its closing silence, then B begun before the reply arrived: once the turn
    # completes A is forgotten; B stays whole for a fresh session even after a handle covered it.
    from tests.bridge_support import silence, speech
    bridge, _ = rig
    lk = link()
    bridge.link = lk
    limit = 30 * gb.BYTES_PER_SECOND_IN
    pcm = np.concatenate([speech("Good morning"), silence(0.8), speech("Tell me a story")])
    a_end = len(speech("Good morning")) + len(silence(0.8))
    chunks = [pcm[i:i + 320].tobytes() for i in range(0, len(pcm), 320)]
    # The voice check (all frames at once) says what a VoiceFramer fed chunk by chunk says, frames
    # straddling chunks of any size included.
    from livepipe.services.lib.vad import VoiceFramer, rms_of_dbfs
    from livepipe.services.processes.gemini_bridge.link import voiced_chunks
    for size in (320, 77, 1000):
        pieces = [pcm[i:i + size].tobytes() for i in range(0, len(pcm), size)]
        framer = VoiceFramer(16000, 30, 2, floor_rms=rms_of_dbfs(-50))
        assert voiced_chunks(pieces) == [any(v for *_, v in framer.feed(np.frombuffer(p, "<i2"))) for p in pieces]
    for chunk in chunks:
        lk.sent_audio(lk.next_index(), chunk, limit)
    bridge.on_server_message(lk, audio())                      # the reply to A begins (B under way)
    bridge.on_server_message(lk, content(turn_complete=True))
    bridge.on_server_message(lk, types.LiveServerMessage(session_resumption_update=types.LiveServerSessionResumptionUpdate(
        new_handle="h2", resumable=True, last_consumed_client_message_index=len(chunks))))
    assert lk.to_send_again(fresh=False) == []                 # resumed: the handle covers it all
    again = np.frombuffer(b"".join(lk.to_send_again(fresh=True)), "<i2")
    b_start = np.flatnonzero(np.abs(pcm[a_end:]) > 300)[0] + a_end
    assert a_end - 320 * 3 <= len(pcm) - len(again) <= b_start   # A is not sent again; all of B is
    # --vad off: the activityStart/End the bridge sent say where each utterance is.
    bridge.s.vad = False
    lk = link(2)
    bridge.link = lk
    from livepipe.services.processes.gemini_bridge.settings import ACTIVITY_END as end, ACTIVITY_START as start
    items = [start, chunks[0], chunks[1], end, chunks[2], start, chunks[3]]
    for item in items:
        lk.sent_audio(lk.next_index(), item, limit)
    bridge.on_server_message(lk, audio())
    bridge.on_server_message(lk, content(turn_complete=True))
    assert lk.to_send_again(fresh=True) == [start, chunks[3]]


def test_typed_words_are_sent_again_until_a_reply_to_them_completes(rig) -> None:
    # A resumed session gets what its handle does not cover; a fresh one (seeded only with completed
    # turns) all not yet answered; once a reply that began after them completes, never again.
    bridge, _ = rig
    lk = link()
    bridge.link = lk
    first, second = (lambda ses: None), (lambda ses: None)
    lk.texts += [(lk.next_index(), first), (lk.next_index(), second)]     # client messages 1 and 2
    lk.covered(1)
    assert lk.texts_to_send_again(fresh=False) == [second]
    assert lk.texts_to_send_again(fresh=True) == [first, second]
    lk.answered(1, silence_bytes=16000)                                   # a reply to the first completed
    assert lk.texts_to_send_again(fresh=True) == [second]
    bridge.events_q.append(("text", lambda ses: None))                    # typed while reconnecting
    bridge._replay_from(lk)
    assert [send for _, send in bridge.events_q][:1] == [second] and len(bridge.events_q) == 2
    assert bridge.svc.metrics["text_resent"] == 1


def test_a_context_update_with_an_unusable_function_name_is_refused_and_counted(rig) -> None:
    bridge, _ = rig

    def update(*tools: dict[str, Any]) -> None:
        bridge.on_control(Message("control", {"kind": "context_update", "src": "t", "inst": "t1", "tools": list(tools)}))
    update({"name": "look_up"}, {"name": "2fast"})              # a name the service refuses
    assert bridge.svc.metrics["context_updates_rejected"] == 1 and not bridge.s.tools
    update({"name": "look_up", "description": "search"})
    assert [d["name"] for d in bridge.s.tools] == ["look_up"] and bridge.svc.metrics["context_updates"] == 1


def test_the_same_bus_history_twice_is_taken_once(rig) -> None:
    # Two `livepipe transcript`s answer a restarted bridge's history_query with the same lines: the
    # second neither replaces the session again nor forgets what was said since the first.
    bridge, _ = rig
    turns = [{"role": "user", "text": "My name is Ada."}]

    def history() -> None:
        bridge.on_control(Message("control", {"kind": "history", "src": "transcript", "inst": "t1", "turns": turns}))
    history()
    bridge.link = link()                                 # the session seeded with it is up
    bridge.link.history_version = bridge.history_version
    bridge._remember("user", "I live in Paris.", 1)
    history()
    assert bridge.history_version == 1 and bridge.svc.metrics["history_updates"] == 1
    assert not bridge.fresh_next and bridge.link.go_away_ms is None and len(bridge.memory) == 1


class _Session:
    """A connection's session as far as _open_link uses it: history sent, nothing received."""

    def __init__(self) -> None:
        self.client_content: list[dict[str, Any]] = []

    async def send_client_content(self, **kw: Any) -> None:
        self.client_content.append(kw)

    async def receive(self):
        await asyncio.Event().wait()
        yield


def test_a_session_started_for_a_bus_history_is_never_resumed_as_the_one_it_replaced(rig) -> None:
    # The old session's handle must not outlive it: if the new session's connection dropped before
    # its first handle, resuming with the old one would bring back the session without the history.
    import contextlib
    from types import SimpleNamespace
    bridge, _ = rig
    old = link()
    bridge.link, bridge.handle = old, "h-old"
    bridge.bus_history = [{"role": "user", "parts": [{"text": "My name is Ada."}]}]
    bridge.history_version = 1
    bridge._apply_history_now()                           # nothing said yet: a new session at once
    assert bridge.fresh_next and old.go_away_ms is not None
    configs, session = [], _Session()

    @contextlib.asynccontextmanager
    async def connect(model: str, config: Any):
        configs.append(config)
        yield session

    async def client() -> Any:
        return SimpleNamespace(aio=SimpleNamespace(live=SimpleNamespace(connect=connect)))
    bridge._client = client

    async def scenario() -> None:
        new = await bridge._open_link()
        try:
            assert not new.resumed and configs[0].session_resumption.handle is None
            assert [t.parts[0].text for t in session.client_content[0]["turns"]] == ["My name is Ada."]
            assert bridge._resume_handle() is None          # a drop now reconnects fresh, with the history
        finally:
            await new.close()
    asyncio.get_event_loop().run_until_complete(scenario())


def test_a_tool_call_without_a_handler_or_a_result_gets_an_error_response(rig) -> None:
    bridge, pub = rig
    lk = link()
    call = types.LiveServerMessage(tool_call=types.LiveServerToolCall(function_calls=[
        types.FunctionCall(id="c1", name="lookup", args={"q": "x"})]))

    async def scenario() -> None:
        bridge.on_server_message(lk, call)                   # nobody subscribes to tool.call
        assert [w for w, _ in bridge.events_q] == ["tool"]
        bridge.events_q.clear()
        bridge.svc._subscribed.add(b"tool.call")             # as the broker reports a subscriber
        bridge.on_server_message(lk, call)
        assert [m["id"] for m in pub.select("tool.call", "call")] == ["c1"] and not bridge.events_q
        await asyncio.sleep(0.1)                             # past --tool-timeout (0.05 s here)
        assert [w for w, _ in bridge.events_q] == ["tool"] and "c1" not in bridge.pending_tools

    asyncio.get_event_loop().run_until_complete(scenario())
    assert bridge.svc.metrics["tool_timeouts"] == 1 and bridge.svc.metrics["tool_calls"] == 2


@pytest.mark.parametrize("again, published", [
    (["Once upon", " a time"], []),                              # the same words: nothing new
    (["Once upon", " a time there", " was"], ["there", "was"]),  # the words after them follow on
    (["Once", " there was"], ["Once there was"]),                # worded anew: published whole
])
def test_the_reply_after_a_cut_one_publishes_only_words_not_yet_published(rig, again, published) -> None:
    bridge, pub = rig
    lk = link()
    bridge.link = lk
    for text in ("Once upon", " a time"):
        bridge.on_server_message(lk, content(output_transcription=types.Transcription(text=text)))
    bridge._end_cut_turn()                                       # the connection was lost mid-reply
    for text in again:                                           # the resumed session starts over
        bridge.on_server_message(lk, content(output_transcription=types.Transcription(text=text)))
    bridge.on_server_message(lk, content(turn_complete=True))
    words = [m["text"].strip() for m in pub.select("transcript") if m["turn"] == 2 and m["text"]]
    assert words == published
    assert bridge.memory[-1]["pieces"] == again                  # the completed turn, whole, for history
