"""The bridge: its state, and the tasks that run it (three senders and the connection supervisor)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, Awaitable, Callable

from livepipe.bus import Service
from livepipe.bus.message import Message
from livepipe.services.processes.gemini_bridge.connection import ConnectionSide
from livepipe.services.processes.gemini_bridge.errors import FatalBridgeError, KeyScrubber
from livepipe.services.processes.gemini_bridge.inputs import InputSide
from livepipe.services.processes.gemini_bridge.link import Link
from livepipe.services.processes.gemini_bridge.media import AudioNormalizer, SpeechMarker
from livepipe.services.processes.gemini_bridge.output import OutputSide
from livepipe.services.processes.gemini_bridge.settings import NAME, Settings
from livepipe.services.processes.gemini_bridge.signals import SignalSide
from livepipe.services.processes.gemini_bridge.tools import ToolSide

log = logging.getLogger(NAME)


class Bridge(ConnectionSide, InputSide, OutputSide, ToolSide, SignalSide):
    """The Live API session on the bus; each side lives in its own module, sharing this state."""

    def __init__(self, svc: Service, s: Settings, scrubber: KeyScrubber) -> None:
        self.svc, self.s, self.scrub = svc, s, scrubber.scrub
        self.link: Link | None = None
        self.link_ready = asyncio.Event()       # set while self.link takes input
        self.wake = asyncio.Event()             # supervisor: a link closed or got a goAway
        self.links_opened = 0
        self.handle: str | None = None
        self.handle_event = asyncio.Event()     # set on every new resumption handle
        self.fresh_next = False                 # the next connection starts a new session (bus history)
        # Continuity (issue 16): what a new session is seeded with: --history, the conversation
        # from the bus (control history), then what was said since.
        self.bus_history: list[dict[str, Any]] = []
        self.history_version = 0                # counts control history messages taken
        self.memory: list[dict[str, Any]] = []  # {"role", "pieces", "turn", "done"} as published on transcript
        self.session_turns_from = 0             # self.turn when the current session began
        self.session_texts_from = 0             # text_sent when it began (a text sent since: it has begun)
        self._gap_from = 0.0                    # last audio write on a replaced connection
        self._clients: dict[tuple[str, str], Any] = {}
        # input side
        self.normalizer = AudioNormalizer()
        self.audio_q: deque[bytes | str] = deque()   # PCM chunks, and ACTIVITY_* markers with --vad off
        self.audio_q_bytes = 0
        self.audio_event = asyncio.Event()
        self.in_stamps: dict[str, int | None] = {}   # latency budget of the newest audio.in chunk sent
        self.in_stamps_received: dict[str, int | None] = {}   # ...of the newest one received
        self.reply_recv_ts = 0                  # when the server message being handled arrived
        self.stamped_turn = 0                   # newest turn whose first audio.out carried stamps
        self.speech = SpeechMarker(s.vad_silence_ms or 800) if not s.vad else None
        self.frame: Message | None = None
        self.frame_event = asyncio.Event()
        self.last_frame_sent = 0.0
        self.events_q: deque[tuple[str, Callable[[Any], Awaitable[None]]]] = deque()
        self.events_event = asyncio.Event()
        self.pending_tools: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        self.base_tools: list[dict[str, Any]] = list(s.tools or [])   # --tools / context_update
        self.announcers: dict[str, tuple[str, list[dict[str, Any]], float]] = {}   # inst -> (src, functions, seen)
        self.tool_routes: dict[str, str] = {}   # announced function name -> announcer inst
        self.setup_tools: list[dict[str, Any]] = list(s.tools or [])   # the functions the newest connection set up with
        self.stream_open = False                # audio.in flowing since the last audio_stream_end
        self._pause_timer: asyncio.TimerHandle | None = None
        self._last_audio_at = 0.0               # loop time of the newest audio.in (signals.py)
        # output side
        self.turn = 0
        self.turn_open = False
        self.turn_interrupted = False
        self.complete_owed = 0                  # turn an expected turnComplete belongs to
        self.turn_answered = False              # the open turn has reply output (audio, text, a tool call)
        self.reply_from: tuple[Link, int] | None = None   # (connection, last client message) when it opened
        # A reply cut by a lost connection: the resumed session answers that utterance again from
        # the start (no handle covers a generation in progress), so what it resends of the audio
        # already published is not published twice (output.py).
        self.turn_audio = bytearray()           # audio.out published for the open turn (bounded)
        self.cut_audio: bytes | None = None     # the cut turn's audio, until the turn after it ends
        self.cut_turn = 0
        self.cut_pos = 0                        # how much of it the next turn repeated
        self.turn_text = ""                     # the open turn's model transcript, as published
        self.cut_text: str | None = None        # the cut turn's, until the turn after it stops repeating it
        self.repeat_text = ""                   # the next turn's transcript so far, while compared with it
        self.turn_done = asyncio.Event()
        self.go_away_at = 0.0
        self.totals = {"prompt_tokens": 0, "response_tokens": 0, "total_tokens": 0}
        for k in ("audio_in_chunks", "audio_in_sent_ms", "audio_in_converted", "audio_in_rejected",
                  "audio_in_dropped_ms", "audio_buffered_ms", "audio_out_chunks", "audio_out_ms",
                  "audio_out_dropped_interrupted", "video_frames_sent", "video_frames_skipped",
                  "video_frames_rejected", "video_frames_too_large", "text_sent", "text_resent", "tool_calls", "tool_results", "tool_timeouts",
                  "tool_results_unknown", "tool_announces_rejected", "tools_announced", "turns", "interrupts", "connections", "reconnects", "go_aways",
                  "resumption_handles", "silent_server_detected"):
            svc.metrics[k] = 0
        svc.metrics["server_ping_ms"] = None
        svc.metrics["backend"] = s.backend
        svc.metrics["state"] = "connecting"
        # Two live sources on audio.in (e.g. a replay while the microphone runs) are interleaved
        # chunk by chunk into one stream: counted and warned about (README, "replay").
        svc.metrics["audio_in_interleaved"] = 0
        self.audio_source: tuple[str, str, float] | None = None   # (src, inst, monotonic time) of the last chunk

    async def run(self) -> None:
        tasks = [asyncio.create_task(t()) for t in (self.audio_sender, self.video_sender, self.events_sender,
                                                              self.expire_announcers)]
        try:
            await self.supervise()
        except FatalBridgeError as exc:
            line = self.scrub(str(exc))
            self.publish_state("error", line)
            log.error("%s", line)
            self.svc.stop(1)
        finally:
            for t in tasks:
                t.cancel()
            if self.link is not None:
                await self.link.close(0.5)
            if not self.svc.exit_code:
                with contextlib.suppress(Exception):
                    self.publish_state("closed")

