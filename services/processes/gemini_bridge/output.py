"""The output side: one handler per field of a server message; model turns numbered and published."""
from __future__ import annotations

import logging
import re
import time
from typing import Any

from livepipe.services.processes.gemini_bridge.link import Link, parse_duration_ms
from livepipe.services.processes.gemini_bridge.settings import BYTES_PER_SECOND_IN, NAME

log = logging.getLogger(NAME)

MAX_CUT_AUDIO_BYTES = 60 * 24000 * 2   # a cut reply is remembered up to 60 s (its repeat is skipped)


class OutputSide:
    """One handler per field of a server message; model turns numbered and published.

    Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    def _open_turn(self) -> int:
        if not self.turn_open:
            self.turn += 1
            self.turn_open, self.turn_interrupted = True, False
            self.complete_owed = 0
            self.turn_answered = False
            # The input the reply follows: once the turn completes, a fresh session need not hear it again.
            self.reply_from = (self.link, self.link.sent_index) if self.link is not None else None
            self.turn_audio.clear()
            self.turn_text = ""
            self.turn_done.clear()
            self.svc.metrics["turns"] = self.turn
        return self.turn

    def _close_turn(self) -> None:
        self.turn_open = False
        if self.turn > self.cut_turn:   # the turn after the cut one is over
            if self.cut_audio is not None:
                self._repeat_done()
            self.cut_text, self.repeat_text = None, ""
        self.turn_done.set()

    def on_server_message(self, link: Link, msg: Any) -> None:
        """Dispatch one LiveServerMessage: one handler per field, the interruption first."""
        self.reply_recv_ts = time.time_ns()   # latency budget
        if link.retired:
            return   # replaced: its state is resumed elsewhere, its output would duplicate
        self._server_signals(msg)   # voice activity, interim transcription, thoughts, grounding (signals.py)
        sc = msg.server_content
        if sc is not None and sc.interrupted:
            self._on_interrupted()   # first: nothing of that turn may be published after it
        if msg.session_resumption_update is not None:
            self._on_resumption_update(link, msg.session_resumption_update)
        if msg.go_away is not None:
            self._on_go_away(link, msg.go_away)
        if msg.tool_call is not None:
            self._on_tool_calls(msg.tool_call)
        if msg.tool_call_cancellation is not None:
            self._on_tool_cancellation(msg.tool_call_cancellation)
        usage = msg.usage_metadata
        if sc is not None:
            if sc.input_transcription is not None and sc.input_transcription.text:
                self._on_input_transcription(sc.input_transcription)
            if sc.model_turn is not None and sc.model_turn.parts:
                self._on_model_turn(sc.model_turn)
            if sc.output_transcription is not None and sc.output_transcription.text:
                self._on_output_transcription(sc.output_transcription)
            if sc.generation_complete:
                self.svc.publish("control", "generation_complete", turn=self._open_turn())
            if sc.turn_complete:
                self._on_turn_complete(usage)
                self._turn_signals(sc)
                return   # the usage went with the turn_complete
            self._turn_signals(sc)
        if usage is not None:
            self._usage(usage)

    def on_audio_message(self, link: Link, data: bytes, mime: str) -> None:
        """A server message holding one audio part and nothing else (wire.py reads it without the
        SDK): what on_server_message does for it."""
        self.reply_recv_ts = time.time_ns()   # latency budget
        if link.retired:
            return
        self._model_audio(data, mime)

    def _on_interrupted(self) -> None:
        if not self.turn:
            return
        turn = self.turn
        if not self.turn_interrupted:
            self.svc.publish_interrupt(turn, "barge-in")
            self.svc.metrics["interrupts"] += 1
        self.turn_interrupted = True
        if not self.turn_open:
            # Generation had ended (playback may still be playing it): the turnComplete
            # that follows belongs to this turn, not to a new one.
            self.complete_owed = turn

    def _on_resumption_update(self, link: Link, upd: Any) -> None:
        if upd.resumable and upd.new_handle:
            self.handle = upd.new_handle
            link.covered(upd.last_consumed_client_message_index)
            self.svc.metrics["resumption_handles"] += 1
            self.handle_event.set()

    def _on_go_away(self, link: Link, go_away: Any) -> None:
        if link is not self.link or link.go_away_ms is not None:
            return   # once per connection, and only for the current one
        link.go_away_ms = parse_duration_ms(go_away.time_left)
        self.go_away_at = time.monotonic()
        self.svc.metrics["go_aways"] += 1
        self.svc.publish("control", "go_away", time_left_ms=link.go_away_ms)
        log.info("goAway on connection %d (%d ms left): opening the next one", link.number, link.go_away_ms)
        self.link_ready.clear()      # hold audio.in until the next connection is up
        self.wake.set()

    def _on_input_transcription(self, tr: Any) -> None:
        # The user's words carry the id of the model turn that answers them.
        turn = self.turn if (self.turn_open and not self.turn_interrupted) else self.turn + 1
        fields = {"final": True} if tr.finished else {}
        self.svc.publish("transcript", "transcript", role="user", text=tr.text, turn=turn, **fields)
        self._remember("user", tr.text, turn)

    def _on_model_turn(self, content: Any) -> None:
        for part in content.parts:
            blob = part.inline_data
            if blob is not None and blob.data and (blob.mime_type or "").startswith("audio/"):
                self._model_audio(blob.data, blob.mime_type or "")
            elif part.text and not part.thought:
                turn = self._open_turn()
                self.turn_answered = True
                if not self.turn_interrupted:
                    self._model_text(part.text, turn, {})

    def _on_output_transcription(self, tr: Any) -> None:
        if self.turn_open and self.turn_interrupted:
            return   # words of a reply the user cut off were never heard
        turn = self._open_turn()
        self.turn_answered = True
        self._model_text(tr.text or "", turn, {"final": True} if tr.finished else {})

    def _model_text(self, text: str, turn: int, fields: dict[str, Any]) -> None:
        self._remember("model", text, turn)   # the whole reply: it is the turn the service completes
        self.turn_text += text
        if self.cut_text is not None and turn > self.cut_turn:
            text = self._unrepeated_text(text)
        if text or fields:
            self.svc.publish("transcript", "transcript", role="model", text=text, turn=turn, **fields)

    def _unrepeated_text(self, text: str) -> str:
        """The words of `text` not already published: like the audio (_unrepeated), the reply that
        follows a cut one repeats its words; while it does they are held back, the rest is published.
        A reply worded anew is published whole (what was held back included)."""
        assert self.cut_text is not None
        self.repeat_text += text
        said, again = " ".join(self.cut_text.split()), " ".join(self.repeat_text.split())
        if said.startswith(again):
            return ""                                  # still the words already published
        held, self.cut_text, self.repeat_text = self.repeat_text, None, ""
        return " " + again[len(said):].lstrip() if again.startswith(said) else held

    def _on_turn_complete(self, usage: Any) -> None:
        turn = self.complete_owed if (not self.turn_open and self.complete_owed) else self._open_turn()
        self.complete_owed = 0
        fields = {"usage": self._usage(usage)} if usage is not None else {}
        self.svc.publish("control", "turn_complete", turn=turn, **fields)
        self._remembered_done(turn)
        if self.turn_open and self.turn_answered and not self.turn_interrupted:
            self._forget_answered()
        self._close_turn()

    def _forget_answered(self) -> None:
        """The model answered: the audio its reply followed is not sent again to a fresh session
        (the one after a refused resumption), which would answer the same words twice (issue 15)."""
        link, index = self.reply_from or (None, 0)
        if link is None or link is not self.link or link.retired:
            return
        silence = (self.s.vad_silence_ms or 500) * BYTES_PER_SECOND_IN // 1000
        link.answered(index, silence, markers=not self.s.vad)

    def _model_audio(self, data: bytes, mime: str) -> None:
        m = re.search(r"rate=(\d+)", mime)
        rate = int(m.group(1)) if m else 24000
        turn = self._open_turn()
        self.turn_answered = True
        if self.turn_interrupted:
            self.svc.metrics["audio_out_dropped_interrupted"] += 1
            return
        if len(data) % 2:
            data = data[:-1]   # a torn sample would shift every later one
        if self.cut_audio is not None and turn > self.cut_turn:
            data = self._unrepeated(data, rate)
            if not data:
                return
        frames = len(data) // 2
        extra: dict[str, Any] = {}
        if self.stamped_turn != turn:   # the first chunk of a turn carries the latency budget
            self.stamped_turn = turn
            extra["stamps"] = {**{k: v for k, v in self.in_stamps.items() if v}, "reply_recv_ts": self.reply_recv_ts}
        if self.svc.publish("audio.out", "audio", data, rate=rate, channels=1, sample_width=2, frames=frames,
                            turn=turn, **extra):
            self.svc.metrics["audio_out_chunks"] += 1
            self.svc.metrics["audio_out_ms"] += frames * 1000 // rate
            if len(self.turn_audio) < MAX_CUT_AUDIO_BYTES:
                self.turn_audio += data

    def _unrepeated(self, data: bytes, rate: int) -> bytes:
        """The part of `data` not already published: the resumed session's reply to the utterance
        whose reply a lost connection cut starts over; while it repeats the cut turn's audio
        byte for byte that audio is skipped, and the rest follows the cut turn without a gap. A
        different reply (a real model may word it anew) is published whole."""
        assert self.cut_audio is not None
        ref = self.cut_audio[self.cut_pos:self.cut_pos + len(data)]
        if not ref or data[:len(ref)] != ref:
            self._repeat_done()
            return data
        self.cut_pos += len(ref)
        self.svc.metrics["audio_out_repeat_skipped_ms"] = (self.svc.metrics.get("audio_out_repeat_skipped_ms", 0)
                                                           + len(ref) * 500 // rate)
        if len(ref) < len(data):
            self._repeat_done()
        return data[len(ref):]

    def _repeat_done(self) -> None:
        if self.cut_pos:
            log.info("the resumed session repeated %d ms of turn %d, cut by the lost connection: "
                     "published once", self.cut_pos * 500 // 24000, self.cut_turn)
        self.cut_audio, self.cut_pos = None, 0

    def _usage(self, um: Any) -> dict[str, int]:
        usage = {k: v for k, v in {
            "prompt_tokens": um.prompt_token_count, "response_tokens": um.response_token_count,
            "total_tokens": um.total_token_count, "cached_tokens": um.cached_content_token_count,
            "thoughts_tokens": um.thoughts_token_count, "tool_prompt_tokens": um.tool_use_prompt_token_count,
        }.items() if isinstance(v, int)}
        for k in self.totals:
            self.totals[k] += usage.get(k, 0)
            self.svc.metrics[k] = self.totals[k]
        return usage

