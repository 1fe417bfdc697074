"""The Live API's newer parts on the bus (issue 16): what the service says besides audio and final
transcripts (its voice activity, interim transcription, why a turn ended, thoughts, grounding and
code), audio_stream_end when the user's stream pauses, history at connect, non-blocking tool
results, and context updates applied live or by resuming on a new connection."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from livepipe.bus.config import ConfigError
from livepipe.bus.message import Message
from livepipe.services.lib.conversation import join_pieces, parse_history
from livepipe.services.processes.gemini_bridge.link import Link, parse_duration_ms
from livepipe.services.processes.gemini_bridge.live_options import SCHEDULINGS, STREAM_END_MARK, model_generation
from livepipe.services.processes.gemini_bridge.settings import ACTIVITY_END, NAME
from livepipe.services.processes.gemini_bridge.tools import valid_declarations

log = logging.getLogger(NAME)
MAX_MEMORY_CHARS = 8000        # the conversation a fresh session is seeded with, at most
MAX_BUS_HISTORY_TURNS = 500    # a control history larger than this is refused (one line, counted)
MAX_BUS_HISTORY_CHARS = 200_000


def _enum(value: Any) -> str:
    """An SDK enum (or a plain string from an older SDK) as its wire name; '' for None."""
    if value is None:
        return ""
    return str(getattr(value, "value", value))


class SignalSide:
    """The newer Live API parts. Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    def _api_version(self) -> dict[str, str]:
        v = self.s.live.api_version
        return {"api_version": v} if v else {}

    async def _seed_history(self, link: Link, history: list[dict[str, Any]]) -> None:
        """A new session (a resumed one holds its history) gets its history first: on 3.x as the
        initial history historyConfig announced (turnComplete ends it, no model turn), on 2.5 as
        client content without turnComplete (context, no reply)."""
        if not history or link.resumed:
            return
        from google.genai import types
        turns = [types.Content(role=t["role"], parts=[types.Part(text=p["text"]) for p in t["parts"]]) for t in history]
        try:
            link.next_index()
            await link.session.send_client_content(turns=turns, turn_complete=model_generation(self.s.model) >= 3)
        except BaseException:
            await link.close(0.5)
            raise
        self.svc.metrics["history_turns_sent"] = len(turns)
        log.info("seeded the session with %d turns of history", len(turns))

    # ------------------------------------------------------------ continuity
    def _remember(self, role: str, text: str, turn: int) -> None:
        """A transcript the bridge published, kept for the next fresh session (fragments of one
        turn joined). Only turns the service completed are seeded (_remembered_done)."""
        if self.s.live.history_turns <= 0:
            return
        last = self.memory[-1] if self.memory else None
        if last is not None and last["role"] == role and last["turn"] == turn and not last["done"]:
            last["pieces"].append(text)
        else:
            self.memory.append({"role": role, "pieces": [text], "turn": turn, "done": False})
            if len(self.memory) > 4 * self.s.live.history_turns + 16:
                del self.memory[0]

    def _remembered_done(self, turn: int) -> None:
        """The service completed `turn`: its words are part of the conversation. (A turn cut by a
        lost connection is not: its line is sent again and answered anew.)"""
        for m in reversed(self.memory):
            if m["turn"] == turn:
                m["done"] = True
            elif m["turn"] < turn:
                break

    def _history_to_seed(self) -> list[dict[str, Any]]:
        """What a new session starts with: --history, the conversation from the bus (control
        history), then the latest --history-turns turns said since, at most MAX_MEMORY_CHARS."""
        said: list[dict[str, Any]] = []
        for m in self.memory:
            text = join_pieces(m["pieces"])
            if not m["done"] or not text:
                continue
            if said and said[-1]["role"] == m["role"]:
                said[-1]["parts"][0]["text"] += " " + text
            else:
                said.append({"role": m["role"], "parts": [{"text": text}]})
        said = said[-self.s.live.history_turns:] if self.s.live.history_turns > 0 else []
        while said and sum(len(t["parts"][0]["text"]) for t in said) > MAX_MEMORY_CHARS:
            del said[0]
        return [*(self.s.live.history or []), *self.bus_history, *said]

    def _bus_history(self, msg: Message) -> None:
        """control history: the conversation the next new session starts with, after --history (it
        replaces what the bridge remembered). Applied at once when the session has had no turn yet
        (a bridge just restarted); otherwise at the next new session."""
        try:
            turns = parse_history(msg["turns"], f"control history from {msg['src']}")
            chars = sum(len(p["text"]) for t in turns for p in t["parts"])
            if len(turns) > MAX_BUS_HISTORY_TURNS or chars > MAX_BUS_HISTORY_CHARS:
                raise ConfigError(f"control history from {msg['src']}: {len(turns)} turns, {chars} characters "
                                  f"(at most {MAX_BUS_HISTORY_TURNS} turns, {MAX_BUS_HISTORY_CHARS} characters)")
        except ConfigError as exc:
            self.svc.metrics["history_rejected"] = self.svc.metrics.get("history_rejected", 0) + 1
            self.svc.ratelog.warning("history", f"{exc}: ignored")
            return
        if turns == self.bus_history:
            return   # the same answer again (two `transcript`s answered the query): nothing new, nothing forgotten
        self.bus_history = turns
        self.memory.clear()
        self.svc.metrics["history_updates"] = self.svc.metrics.get("history_updates", 0) + 1
        self.history_version += 1
        log.info("history of %d turns from %s: for the next new session", len(turns), msg["src"])
        self._apply_history_now()

    def _apply_history_now(self) -> None:
        """A new session with the bus history, if the current one started without it and nothing
        was said in it yet (a bridge just restarted). Called on the history and on every new connection."""
        link = self.link
        if link is None or link.closed.is_set() or link.retired or link.go_away_ms is not None:
            return      # connecting: _install calls this again
        if link.history_version == self.history_version:
            return
        # A session that heard a turn or a typed text has begun: it keeps its history.
        if (self.turn_open or self.turn != self.session_turns_from
                or self.svc.metrics["text_sent"] != self.session_texts_from):
            link.history_version = self.history_version   # begun: the next new session has it
            return
        self.fresh_next = True
        link.go_away_ms, link.replace_why = 1500, "a new session with the history from the bus"
        self.go_away_at = time.monotonic()
        self.link_ready.clear()
        self.wake.set()
        log.info("nothing said yet: starting a new session with the history from the bus")

    def _result_options(self, msg: Message) -> dict[str, Any] | None:
        """scheduling / will_continue of a tool.result, for the FunctionResponse; None (counted, one
        line) when scheduling is not one the service knows."""
        extra: dict[str, Any] = {}
        sched = msg.get("scheduling")
        if sched is not None:
            if str(sched).upper() not in SCHEDULINGS:
                self.svc.metrics["tool_results_rejected"] = self.svc.metrics.get("tool_results_rejected", 0) + 1
                self.svc.ratelog.warning("tool-sched", f"tool.result for {msg['id']!r}: scheduling {sched!r} is not "
                                         f"one of {', '.join(SCHEDULINGS)}: ignored")
                return None
            extra["scheduling"] = str(sched).upper()
        if msg.get("will_continue") is not None:
            extra["will_continue"] = msg["will_continue"]
        return extra

    def note_audio(self, msg: Message) -> None:
        """audio.in flows: a pause longer than --stream-end-after ends the stream for the service."""
        self.stream_open = True
        after = self.s.live.stream_end_after
        if after > 0:
            # One timer that moves itself on (_pause_check), not a new TimerHandle per 20 ms chunk.
            loop = asyncio.get_running_loop()
            self._last_audio_at = loop.time()
            if self._pause_timer is None:
                self._pause_timer = loop.call_later(after, self._pause_check)

    def _pause_check(self) -> None:
        loop = asyncio.get_running_loop()
        left = self._last_audio_at + self.s.live.stream_end_after - loop.time()
        if left > 0:
            self._pause_timer = loop.call_later(left, self._pause_check)
        else:
            self._pause_timer = None
            self._end_stream("paused")

    def on_control(self, msg: Message) -> None:
        if msg.kind == "mute":
            self._end_stream("muted")
        elif msg.kind == "context_update":
            self._context_update(msg)
        elif msg.kind == "history":
            self._bus_history(msg)

    def _context_update(self, msg: Message) -> None:
        """New system instruction and/or tools from the bus. They become the session's settings (every
        later connection uses them) and reach the model at once: by send_context_update, or by
        resuming on a new connection with the handle, as after a goAway, so nothing said is lost."""
        si, tools = msg.get("system_instruction"), msg.get("tools")
        problem = ""
        if si is None and tools is None:
            problem = "needs system_instruction or tools"
        elif si is not None and not si.strip():
            problem = "system_instruction is empty"
        elif tools is not None and not valid_declarations(tools):
            problem = "every tool needs a \"name\" (letters, digits, _ . -)"
        if problem:
            self.svc.metrics["context_updates_rejected"] = self.svc.metrics.get("context_updates_rejected", 0) + 1
            self.svc.ratelog.warning("context-update", f"control context_update from {msg['src']}: {problem}: ignored")
            return
        if si is not None:
            self.s.system_instruction = si
        if tools is not None:   # they replace --tools; functions announced on the bus stay (tools.py)
            self.base_tools = list(tools)
            tools = self.merged_tools()
            self.s.tools = tools or None
        self.svc.metrics["context_updates"] = self.svc.metrics.get("context_updates", 0) + 1
        self._push_context(si, tools)

    def _push_context(self, si: str | None, tools: list[dict[str, Any]] | None) -> None:
        """Bring the session's new settings to the model: send_context_update on the open session,
        or a resumption on a new connection."""
        live = self.s.live.context_update == "live" and self.link is not None and hasattr(self.link.session,
                                                                                       "send_context_update")
        if live:
            from google.genai import types
            kw: dict[str, Any] = {}
            if si is not None:
                kw["system_instruction"] = types.Content(role="user", parts=[types.Part(text=si)])
            if tools is not None:
                kw["tools"] = ([{"function_declarations": tools}] if tools else []) + [
                    {name: {}} for name in self.s.live.builtin_tools]
            self._enqueue_event("context", lambda ses: ses.send_context_update(**kw))
            log.info("context update: sent on the open session")
            return
        link = self.link
        if link is None or link.closed.is_set() or link.retired or link.go_away_ms is not None:
            return      # a connection is being replaced anyway: the next one has the new settings
        # The goAway switch: let the current turn finish, resume with the handle, resend what it missed.
        link.go_away_ms, link.replace_why = 1500, "applying a context update"
        self.go_away_at = time.monotonic()
        self.link_ready.clear()
        self.wake.set()
        log.info("context update: resuming on a new connection to apply it%s",
                 "" if self.handle else " (no resumption handle: a fresh session)")

    def _end_stream(self, why: str) -> None:
        """The user's audio stopped (mute, or capture paused): tell the service, so its VAD closes the
        turn now instead of waiting for audio that will not come (audioStreamEnd, as documented). With
        --vad off the bridge's own marker ends the activity instead."""
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        if not self.stream_open:
            return
        self.stream_open = False
        if self.speech is not None:
            if self.speech.active:
                self.speech.active, self.speech.quiet, self.speech.pending = False, 0, b""
                self._enqueue_audio(ACTIVITY_END)
        else:
            self._enqueue_audio(STREAM_END_MARK)
        self.svc.metrics["audio_stream_ends"] = self.svc.metrics.get("audio_stream_ends", 0) + 1
        log.info("audio.in %s: sending audio_stream_end", why)

    def _next_turn(self) -> int:
        """The model turn that what arrives now belongs to (without opening it)."""
        return self.turn if (self.turn_open and not self.turn_interrupted) else self.turn + 1

    def _server_signals(self, msg: Any) -> None:
        """What the service says besides audio and final transcripts: its voice activity, interim
        input transcription, thoughts (never spoken, never in the transcript), grounding and code."""
        svc = self.svc
        for sig, kind_of in ((getattr(msg, "voice_activity", None), "voice_activity_type"),
                             (getattr(msg, "voice_activity_detection_signal", None), "vad_signal_type")):
            kind = _enum(getattr(sig, kind_of, None)) if sig is not None else ""
            if kind.endswith(("START", "SOS")) or kind.endswith(("END", "EOS")):
                fields = {}
                offset = getattr(sig, "audio_offset", None)
                if offset:
                    fields["offset_ms"] = parse_duration_ms(offset)
                svc.publish("control", "voice_activity", state="start" if kind.endswith(("START", "SOS")) else "end",
                            **fields)
        sc = msg.server_content
        if sc is None:
            return
        interim = getattr(sc, "interim_input_transcription", None)
        if interim is not None and interim.text:
            svc.publish("transcript", "interim", role="user", text=interim.text, turn=self._next_turn())
        for part in (sc.model_turn.parts or []) if sc.model_turn is not None else []:
            if part.thought and part.text:
                svc.publish("transcript", "thought", role="model", text=part.text, turn=self._next_turn())
            if part.executable_code is not None and part.executable_code.code:
                svc.publish("grounding", "code", turn=self._next_turn(), code=part.executable_code.code,
                            language=_enum(part.executable_code.language))
            if part.code_execution_result is not None:
                svc.publish("grounding", "code_result", turn=self._next_turn(),
                            output=part.code_execution_result.output or "",
                            outcome=_enum(part.code_execution_result.outcome))
        gm = sc.grounding_metadata
        if gm is not None:
            sources = [{"title": c.web.title or "", "uri": c.web.uri or ""}
                       for c in (gm.grounding_chunks or []) if c.web is not None]
            svc.publish("grounding", "search", turn=self._next_turn(), queries=list(gm.web_search_queries or []),
                        sources=sources)
        ucm = sc.url_context_metadata
        if ucm is not None:
            urls = [{"url": u.retrieved_url or "", "status": _enum(u.url_retrieval_status)}
                    for u in (ucm.url_metadata or [])]
            svc.publish("grounding", "url_context", turn=self._next_turn(), urls=urls)

    def _turn_signals(self, sc: Any) -> None:
        """Why a turn ended and whether the model waits for the user: control turn_status, after the
        turn_complete it qualifies (the turn number is that turn's)."""
        fields: dict[str, Any] = {}
        reason = _enum(getattr(sc, "turn_complete_reason", None))
        if reason:
            fields["reason"] = reason
        if getattr(sc, "waiting_for_input", None) is not None:
            fields["waiting_for_input"] = bool(sc.waiting_for_input)
        status = _enum(getattr(sc, "interaction_status", None))
        if status:
            fields["status"] = status
        if fields:
            self.svc.publish("control", "turn_status", turn=self.turn, **fields)
