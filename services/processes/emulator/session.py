"""One Live API session: the deterministic "parrot" model behind a WebSocket connection.

It answers each user utterance with the same audio resampled to 24 kHz, answers text with a short
tone, calls the first declared function for long utterances, and behaves like the real service
around interruption, transcription, resumption and session limits. See services/emulator/__init__.py
for the transcription formats and close codes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import numpy as np
import soxr
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from livepipe.bus.runtime import RateLimitedLog
from livepipe.services.processes.emulator import wire
from livepipe.services.processes.emulator.timeline import Timeline
from livepipe.services.processes.emulator.turns import (FRAME, RATE, HeldAudio, HeldInput, InputResampler, SpeechEnd, SpeechStart,
                                     TurnDetector, VadSettings)
from livepipe.services.processes.emulator.wire import ProtocolError

log = logging.getLogger("emulator")
ratelog = RateLimitedLog(log)          # a storm of bad clients must not flood the log

OUT_RATE = 24000
AUDIO_TOKENS_PER_S = 32                       # the Gemini API counts audio at 32 tokens a second
FRAME_TOKENS = {"MEDIA_RESOLUTION_LOW": 64, "MEDIA_RESOLUTION_MEDIUM": 256, "MEDIA_RESOLUTION_HIGH": 256}
HANDLE_TTL_S = 2 * 3600                       # the real service keeps a handle valid 2 h
SETUP_TIMEOUT_S = 60.0
# AudioTranscriptionConfig's fields (google-genai 3.6 types.py; the Gemini API has taken all of them
# since 2.15, when the SDK stopped filtering them): anything else is an unknown field.
TRANSCRIPTION_FIELDS = frozenset({"language_codes", "language_auto", "language_hints", "custom_vocabulary",
                                  "adaptation_phrases", "word_timestamp", "diarization", "mode", "source_text"})


@dataclass(frozen=True)
class Options:
    api_key: str | None = None
    latency: float = 0.3
    pace: float = 2.0                         # reply speed as a multiple of real time; 0 = unpaced
    chunk_ms: int = 40
    goaway_after: float | None = None
    goaway_grace: float = 5.0
    goaway_at_tool_call: bool = False         # goAway as a blocking tool call goes out (a call pending)
    session_limit: float | None = None
    drop_after: float | None = None
    drop_in_reply: float | None = None         # a new session's first reply is cut S s in
    tool_trigger: float = 2.0
    interim_every: float = 0.0                # interim input transcription every S of speech (0: none)
    need_more_input: float = 0.0              # shorter utterances: NEED_MORE_INPUT, no reply (0: off)


@dataclass
class Conversation:
    """What survives a resumption: the conversation's identity, turn count and time used."""
    id: str
    turns: int = 0
    used_s: float = 0.0                       # connected time of earlier connections (session limit)
    expired: bool = False


@dataclass(frozen=True)
class Snapshot:
    """The state a resumption handle stands for: everything the session had consumed when it was
    issued, including what is not a finished turn yet (a half-spoken utterance, its VAD pre-roll,
    utterances heard but not answered), so that the handle covers every message received."""
    turns: int                                # turns counted (heard) so far
    held: HeldAudio                           # the turn detector's unfinished input
    inputs: tuple[HeldInput, ...]             # input resamplers (other rates than 16 kHz) and what they hold
    waiting: tuple["Turn", ...]               # heard, not answered yet: answered after resuming
    frames: int                               # video frames since the last utterance, and their times
    frame_first_ns: int
    frame_last_ns: int
    frame_size: tuple[int, int]
    arrivals: tuple[tuple[int, int], ...]     # input position -> arrival time, for held audio


class Registry:
    """Resumption handles -> (conversation, its state when issued). Shared by all sessions."""

    def __init__(self) -> None:
        self._handles: dict[str, tuple[Conversation, Snapshot, float]] = {}
        self._next = 0

    def new_conversation(self) -> Conversation:
        self._next += 1
        return Conversation(f"s{self._next}")

    def issue(self, conv: Conversation, state: Snapshot) -> str:
        now = time.monotonic()
        for h in [h for h, (_, _, exp) in self._handles.items() if exp < now]:
            del self._handles[h]
        handle = f"emu-{conv.id}-{conv.turns}-{secrets.token_urlsafe(12)}"
        self._handles[handle] = (conv, state, now + HANDLE_TTL_S)
        return handle

    def resume(self, handle: str) -> tuple[Conversation, Snapshot] | None:
        """The conversation and its state when the handle was issued, or None if unknown/expired."""
        entry = self._handles.get(handle)
        if entry is None or entry[2] < time.monotonic():
            return None
        conv, state, _ = entry
        conv.turns = state.turns
        return conv, state


@dataclass
class Turn:
    number: int
    kind: str                                 # "audio" | "text"
    audio: np.ndarray | None = None           # the utterance, 16 kHz int16
    text: str = ""
    seconds: float = 0.0
    tool: str | None = None                   # function to call before replying
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task | None = None
    phase: str = "queued"                     # queued | thinking | tool | speaking | done
    call_id: str | None = None                # tool call awaiting its response
    sent_samples: int = 0                     # reply samples (24 kHz) sent so far
    reply_text: str = ""                      # TEXT modality: the reply sent
    completed: bool = False                   # turnComplete sent
    label: str = ""                           # a tool result turn: what the reply says

    def fresh(self) -> "Turn":
        """The same user input as a turn not yet started (a resumed session answers it anew)."""
        return Turn(self.number, self.kind, audio=self.audio, text=self.text, seconds=self.seconds, tool=self.tool,
                    prompt_tokens=dict(self.prompt_tokens), label=self.label)


class LiveSession:
    def __init__(self, ws: ServerConnection, conn_id: int, opts: Options, registry: Registry,
                 timeline: Timeline, counters: Counter) -> None:
        self.ws, self.conn_id, self.opts, self.registry = ws, conn_id, opts, registry
        self.timeline, self.counters = timeline, counters
        self.conv: Conversation | None = None
        self.started = time.monotonic()
        self.client_index = -1                # index of the last client message consumed
        self.closing = False
        self.tasks: list[asyncio.Task] = []
        self.waiting: deque[Turn] = deque()  # heard, not started: the turn worker takes them in order
        self.turn_ready = asyncio.Event()
        self.current: Turn | None = None
        self.tool_waiters: dict[str, asyncio.Future] = {}
        self._resamplers: dict[int, InputResampler] = {}
        self._carried_input: list[np.ndarray] = []   # resumed: 16 kHz the old resamplers still held
        self._arrivals: deque[tuple[int, int]] = deque(maxlen=512)   # (input position after chunk, t_ns)
        # set from setup
        self.vad = VadSettings()
        self.detector = TurnDetector(self.vad)
        self.text_mode = False
        self.want_input_text = self.want_output_text = False
        self.resumption = self.resumed = False
        self._reply_drop_armed = False        # --drop-in-reply
        self.transparent = False              # setup.sessionResumption.transparent: report consumed indexes
        self.restored: Snapshot | None = None
        self.functions: list[str] = []
        self.non_blocking: set[str] = set()   # functions declared behavior NON_BLOCKING
        self.async_calls: dict[str, tuple[str, int]] = {}   # non-blocking call id -> (name, turn)
        self.generation = 2                   # model generation from setup.model: 3 = gemini-3.x
        self.history_open = False             # 3.x: initial history still accepted as client content
        self.history_turns = 0
        self.interim_next = 0.0               # utterance seconds at which the next interim is due
        self.builtin: set[str] = set()        # built-in tools setup turned on
        self.vocabulary: list[str] = []       # setup.inputAudioTranscription.customVocabulary
        self.transcription: dict[str, Any] = {}   # language codes and vocabulary, as received (timeline)
        self.include_thoughts = False
        self.turn_coverage = ""               # noted in the timeline; the parrot's turns are activity only
        self.frame_tokens = 258
        self.compression = False
        # video frames since the last utterance
        self.frames = 0
        self.frame_first_ns = self.frame_last_ns = 0
        self.frame_size = (0, 0)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def sid(self) -> str:
        return self.conv.id if self.conv else f"c{self.conn_id}"

    def mark(self, event: str, turn: int = 0, t_ns: int | None = None, **fields: Any) -> None:
        self.timeline.write(self.sid, turn, event, t_ns, conn=self.conn_id, **fields)

    async def run(self) -> None:
        """Serve the connection until it closes; never raises."""
        try:
            await self._serve()
        except ProtocolError as e:
            self.counters["rejected"] += 1
            ratelog.warning(f"close-{e.code}", f"session {self.sid}: closing {e.code}: {e.reason}")
            await self.close(e.code, e.reason)
        except ConnectionClosed:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:   # a bug of ours must end this session only, with the real service's 1011
            self.counters["internal_errors"] += 1
            log.error("session %s: internal error %s: %s", self.sid, type(e).__name__, e)
            await self.close(wire.INTERNAL_ERROR, wire.REASON_INTERNAL)
        finally:
            await self._teardown()

    async def _teardown(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.current and self.current.task:
            self.current.task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.conv:
            self.conv.used_s += time.monotonic() - self.started
        rcvd = self.ws.close_code
        ignored = round(self.detector.ignored_samples / RATE, 2)
        self.counters["audio_outside_activity_s"] += ignored
        self.mark("closed", self.conv.turns if self.conv else 0, code=rcvd, reason=self.ws.close_reason or "",
                  **({"ignored_audio_s": ignored} if ignored else {}))

    async def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.counters[f"close_{code}"] += 1
        try:
            await self.ws.close(code, wire.close_reason(reason))
        except Exception:           # already gone: nothing left to tell the client
            pass

    async def send(self, msg: dict[str, Any]) -> None:
        # The real service sends binary frames; the SDK json.loads either kind.
        await self.ws.send(json.dumps(msg, separators=(",", ":")).encode())

    def _spawn(self, coro: Any) -> None:
        self.tasks.append(asyncio.create_task(self._guard(coro)))

    async def _guard(self, coro: Any) -> None:
        """Background work of this session: its failure closes this session, nothing else."""
        try:
            await coro
        except (asyncio.CancelledError, ConnectionClosed):
            pass
        except Exception as e:
            self.counters["internal_errors"] += 1
            log.error("session %s: internal error %s: %s", self.sid, type(e).__name__, e)
            await self.close(wire.INTERNAL_ERROR, wire.REASON_INTERNAL)

    # --- setup -----------------------------------------------------------------------------

    def _client_sdk(self) -> str:
        """The google-genai version the client announces (x-goog-api-client: google-genai-sdk/1.30.0 ...)."""
        req = self.ws.request
        header = (req.headers.get("x-goog-api-client") or req.headers.get("user-agent") or "") if req else ""
        m = re.search(r"google-genai-sdk/([\w.+-]+)", header)
        return m.group(1) if m else ""

    def _check_key(self) -> None:
        if self.opts.api_key is None:
            return
        req = self.ws.request
        key = req.headers.get("x-goog-api-key") if req else None
        if key is None and req is not None:
            key = (parse_qs(req.path.partition("?")[2]).get("key") or [None])[0]
        auth = req.headers.get("authorization", "") if req else ""
        if key is None and auth.lower().startswith("token "):
            key = auth[6:].strip()          # ephemeral-token path (BidiGenerateContentConstrained)
        if not key:
            self.counters["bad_key"] += 1
            raise ProtocolError(wire.REASON_NO_KEY, wire.POLICY_VIOLATION)
        if not secrets.compare_digest(key.encode(), self.opts.api_key.encode()):
            self.counters["bad_key"] += 1
            raise ProtocolError(wire.REASON_BAD_KEY, wire.INVALID_ARGUMENT)

    async def _serve(self) -> None:
        try:
            raw = await asyncio.wait_for(self.ws.recv(), SETUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ProtocolError(wire.REASON_DEADLINE, wire.INTERNAL_ERROR) from None
        self.client_index += 1
        # The real service accepts the upgrade and refuses the key on the first message, so the
        # SDK's connect() raises APIError(1007) rather than a handshake error.
        self._check_key()
        kind, body = wire.parse_frame(raw)
        if kind != "setup":
            raise ProtocolError(f"Invalid request: the first message must be setup, not {kind}.")
        self._configure(body)
        await self.send(wire.setup_complete(f"{self.sid}-{self.conn_id}"))
        self.counters["sessions"] += 1
        carried = {}
        if self.restored is not None:
            carried = {"carried_audio_s": round(self.restored.held.seconds, 3),
                       "carried_turns": len(self.restored.waiting)}
        self.mark("session_start", self.conv.turns, resumed=self.resumed, generation=self.generation,
                  **({"turn_coverage": self.turn_coverage} if self.turn_coverage else {}),
                  **({"input_transcription": self.transcription} if self.transcription else {}),
                  **({"sdk": self._client_sdk()} if self._client_sdk() else {}), **carried)
        self._spawn(self._turn_worker())
        self._start_timers()
        for samples in self._carried_input:      # before any new input: it came earlier
            await self._feed(samples, time.time_ns())
        self._carried_input.clear()
        if self.resumption:
            await self._resumption_update()
        async for raw in self.ws:
            self.client_index += 1
            kind, body = wire.parse_frame(raw)
            if kind == "setup":
                raise ProtocolError("Invalid request: setup may only be sent once, as the first message.")
            elif kind == "realtime_input":
                await self._realtime_input(body)
            elif kind == "client_content":
                await self._client_content(body)
            elif kind == "context_update":
                self._context_update(body)
            else:
                await self._tool_response(body)

    def _configure(self, setup: dict[str, Any]) -> None:
        model = setup.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ProtocolError("Invalid argument: setup.model is required, e.g. models/NAME.")
        self.generation = wire.model_generation(model)
        gen = _obj(setup.get("generation_config"), "setup.generation_config")
        if self.generation >= 3:
            self._check_generation3(setup, gen)
        modalities = [str(m).upper() for m in (gen.get("response_modalities") or ["AUDIO"])]
        self.text_mode = "TEXT" in modalities and "AUDIO" not in modalities
        self.frame_tokens = FRAME_TOKENS.get(str(gen.get("media_resolution") or ""), 258)
        ric = _obj(setup.get("realtime_input_config"), "setup.realtime_input_config")
        _obj(ric.get("automatic_activity_detection"), "setup.realtime_input_config.automatic_activity_detection")
        try:
            self.vad = VadSettings.from_setup(ric)
        except (TypeError, ValueError):
            raise ProtocolError("Invalid argument: setup.realtime_input_config.automatic_activity_detection "
                                "has a value of the wrong type.") from None
        self.detector = TurnDetector(self.vad)
        self.turn_coverage = str(ric.get("turn_coverage") or "")
        self.want_input_text = setup.get("input_audio_transcription") is not None
        self.want_output_text = setup.get("output_audio_transcription") is not None
        self._transcription_config(setup)
        self.compression = setup.get("context_window_compression") is not None
        self.include_thoughts = bool(_obj(gen.get("thinking_config"), "setup.generation_config.thinking_config")
                                     .get("include_thoughts"))
        for tool in _list(setup.get("tools"), "setup.tools"):
            self.builtin.update(k for k in _obj(tool, "setup.tools[]") if k in ("google_search", "url_context",
                                                                                 "code_execution"))
            for decl in _list(_obj(tool, "setup.tools[]").get("function_declarations"), "setup.tools[].function_declarations"):
                name = decl.get("name") if isinstance(decl, dict) else None
                if not isinstance(name, str) or not name:
                    raise ProtocolError("Invalid argument: every function declaration needs a name.")
                self._declare(decl)
        resumption = _obj(setup.get("session_resumption"), "setup.session_resumption")
        self.resumption = setup.get("session_resumption") is not None
        handle = resumption.get("handle")
        self.transparent = bool(resumption.get("transparent"))
        self.resumed = bool(handle)
        if handle:
            found = self.registry.resume(str(handle))
            limit = self.opts.session_limit
            # A session past its duration limit is over: its handles are dead like unknown ones, so a
            # client has one rule (drop the handle, start a new session) for both.
            if found is None or found[0].expired or (limit is not None and not self.compression
                                                     and found[0].used_s >= limit):
                raise ProtocolError(wire.REASON_BAD_HANDLE)
            self.conv, self.restored = found
            self._restore(self.restored)
        else:
            self.conv = self.registry.new_conversation()

    def _transcription_config(self, setup: dict[str, Any]) -> None:
        """AudioTranscriptionConfig as the service parses it: an unknown field closes 1007, as protobuf
        JSON parsing does; customVocabulary and languageCodes must be lists of strings."""
        for where in ("input_audio_transcription", "output_audio_transcription"):
            cfg = _obj(setup.get(where), f"setup.{where}")
            unknown = [k for k in cfg if k not in TRANSCRIPTION_FIELDS]
            if unknown:
                raise ProtocolError(f'Invalid JSON payload received. Unknown name "{wire.camel(unknown[0])}" '
                                    f"at 'setup.{where}': Cannot find field.")
            for name in ("language_codes", "custom_vocabulary", "adaptation_phrases"):
                values = _list(cfg.get(name), f"setup.{where}.{name}")
                if not all(isinstance(v, str) for v in values):
                    raise ProtocolError(f"Invalid value at 'setup.{where}.{name}' (TYPE_STRING): expected strings.")
        iat = _obj(setup.get("input_audio_transcription"), "setup.input_audio_transcription")
        # The deprecated name still biases recognition; the new one wins when both come.
        self.vocabulary = list(iat.get("custom_vocabulary") or iat.get("adaptation_phrases") or [])
        self.transcription = {k: list(iat[k]) for k in ("language_codes", "custom_vocabulary", "adaptation_phrases")
                              if iat.get(k)}

    def _declare(self, decl: dict[str, Any]) -> None:
        self.functions.append(decl["name"])
        # 3.x calls functions synchronously only (public docs): NON_BLOCKING acts as blocking.
        if str(decl.get("behavior") or "").upper() == "NON_BLOCKING" and self.generation < 3:
            self.non_blocking.add(decl["name"])

    def _context_update(self, body: dict[str, Any]) -> None:
        """New system instruction and/or tools mid-session (send_context_update): the tools replace
        the declared ones for the next turns; the system instruction is noted (the parrot ignores it)."""
        tools = body.get("tools")
        if tools is not None:
            self.functions, self.non_blocking = [], set()
            for tool in _list(_obj(tools, "context_update.tools").get("tools"), "context_update.tools.tools"):
                for decl in _list(_obj(tool, "context_update.tools.tools[]").get("function_declarations"),
                                  "context_update.tools.tools[].function_declarations"):
                    if not isinstance(decl, dict) or not isinstance(decl.get("name"), str) or not decl["name"]:
                        raise ProtocolError("Invalid argument: every function declaration needs a name.")
                    self._declare(decl)
        self.mark("context_update", self.conv.turns if self.conv else 0,
                  system_instruction=body.get("system_instruction") is not None,
                  **({"functions": list(self.functions)} if tools is not None else {}))

    def _check_generation3(self, setup: dict[str, Any], gen: dict[str, Any]) -> None:
        """What a 3.x model refuses at setup, refused as the service does (close 1007). From the public
        docs: proactive audio and affective dialog are not supported yet; thinking is set by level."""
        if gen.get("enable_affective_dialog") or _obj(setup.get("proactivity"), "setup.proactivity"):
            raise ProtocolError(wire.REASON_INVALID_ARGUMENT)
        history = _obj(setup.get("history_config"), "setup.history_config")
        # A resumed session already holds its history: only a new one takes it as client content.
        self.history_open = bool(history.get("initial_history_in_client_content"))

    def _restore(self, state: Snapshot) -> None:
        """Continue from a handle's state: the unfinished utterance, unanswered turns, frame counts."""
        self.detector.restore(state.held)
        for held in state.inputs:
            self._resamplers[held.rate], carried = InputResampler.restore(held)
            self._carried_input.append(carried)
        self._arrivals.extend(state.arrivals)
        self.waiting.extend(t.fresh() for t in state.waiting)
        if self.waiting:
            self.turn_ready.set()
        self.frames, self.frame_first_ns, self.frame_last_ns = state.frames, state.frame_first_ns, state.frame_last_ns
        self.frame_size = state.frame_size

    def _snapshot(self) -> Snapshot:
        assert self.conv is not None
        unanswered = [self.current] if self.current is not None and not self.current.completed else []
        held = self.detector.hold()
        # Only the arrival times of held audio (a handle lives 2 h: keep it small).
        first_held = held.position - FRAME * (len(held.frames) if held.speaking else len(held.recent))
        return Snapshot(self.conv.turns, held, tuple(r.hold() for r in self._resamplers.values()),
                        tuple(t.fresh() for t in unanswered + list(self.waiting)),
                        self.frames, self.frame_first_ns, self.frame_last_ns, self.frame_size,
                        tuple(a for a in self._arrivals if a[0] >= first_held))

    def _start_timers(self) -> None:
        o = self.opts
        if o.goaway_after is not None:
            self._spawn(self._goaway_timer(o.goaway_after, o.goaway_grace, wire.INTERNAL_ERROR, wire.REASON_DEADLINE))
        if o.session_limit is not None and not self.compression:
            assert self.conv is not None
            left = o.session_limit - self.conv.used_s
            grace = min(o.goaway_grace, max(0.0, left))
            self._spawn(self._goaway_timer(left - grace, grace, wire.POLICY_VIOLATION,
                                           wire.REASON_SESSION_EXPIRED, expire=True))
        if o.drop_after is not None:
            self._spawn(self._drop_timer(o.drop_after))

    async def _goaway_timer(self, after: float, grace: float, code: int, reason: str, expire: bool = False) -> None:
        await asyncio.sleep(max(0.0, after))
        await self.send(wire.go_away(grace))
        self.mark("goaway", self.conv.turns, time_left_s=grace)
        await asyncio.sleep(grace)
        if expire:
            self.conv.expired = True
        await self.close(code, reason)

    async def _drop_timer(self, after: float) -> None:
        await asyncio.sleep(after)
        self.mark("drop", self.conv.turns)
        await self.close(wire.INTERNAL_ERROR, wire.REASON_INTERNAL)

    # --- input -----------------------------------------------------------------------------

    async def _realtime_input(self, body: dict[str, Any]) -> None:
        if "audio" in body:
            await self._audio(_obj(body.get("audio"), "realtime_input.audio"), "realtime_input.audio")
        if "video" in body:
            self._frame(_obj(body.get("video"), "realtime_input.video"), "realtime_input.video")
        for i, blob in enumerate(_list(body.get("media_chunks"), "realtime_input.media_chunks")):
            where = f"realtime_input.media_chunks[{i}]"
            blob = _obj(blob, where)
            mime = str(blob.get("mime_type") or "")
            if mime.lower().startswith("image/"):
                self._frame(blob, where)
            else:
                await self._audio(blob, where)
        if body.get("activity_start") is not None:
            await self._activity(start=True)
        if body.get("activity_end") is not None:
            await self._activity(start=False)
        if body.get("audio_stream_end"):
            await self._flush_resamplers()
            end = self.detector.flush()
            if end:
                await self._speech_end(end, time.time_ns())
        text = body.get("text")
        if isinstance(text, str) and text:
            await self._text_turn(text)

    async def _audio(self, blob: dict[str, Any], where: str) -> None:
        mime = blob.get("mime_type")
        if not isinstance(mime, str):
            raise ProtocolError(f"Invalid argument: {where}.mime_type is required, e.g. audio/pcm;rate=16000.")
        rate = wire.pcm_rate(mime)
        data = wire.b64decode(blob.get("data"), f"{where}.data")
        if len(data) % 2:
            raise ProtocolError(f"Invalid argument: {where} is not 16-bit PCM ({len(data)} bytes, an odd count).")
        samples = np.frombuffer(data, "<i2")
        if rate != RATE:
            rs = self._resamplers.get(rate)
            if rs is None:
                rs = self._resamplers[rate] = InputResampler(rate)
            samples = rs.push(samples)
        self.counters["audio_chunks"] += 1
        await self._feed(samples, time.time_ns())

    async def _flush_resamplers(self) -> None:
        """The input stream ends: what the resampling filters still hold belongs to the utterance."""
        for rs in self._resamplers.values():
            held = rs.flush()
            if len(held):
                await self._feed(held, time.time_ns())

    async def _feed(self, samples: np.ndarray, now: int) -> None:
        """16 kHz input to the turn detector, and the turn events it completes."""
        ignored = self.detector.ignored_samples
        events = self.detector.feed(samples)
        if self.detector.ignored_samples > ignored and ignored == 0:
            log.info("session %s: audio outside activityStart/activityEnd is not part of any turn", self.sid)
        self._arrivals.append((self.detector.position, now))
        for ev in events:
            if isinstance(ev, SpeechStart):
                await self._speech_start(now)
            else:
                await self._speech_end(ev, now)
        await self._interim()

    async def _activity(self, start: bool) -> None:
        if not self.vad.disabled:
            raise ProtocolError("Invalid argument: explicit activity control (activityStart/activityEnd) "
                                "needs automatic activity detection disabled.")
        now = time.time_ns()
        if start:
            if self.detector.activity_start() is None:
                self.counters["activity_start_repeated"] += 1
                return
            await self._speech_start(now)
        else:
            await self._flush_resamplers()
            end = self.detector.activity_end()
            if end is not None:
                await self._speech_end(end, now)

    def _frame(self, blob: dict[str, Any], where: str) -> None:
        mime = blob.get("mime_type")
        if not isinstance(mime, str) or not mime.lower().startswith("image/"):
            raise ProtocolError(wire.close_reason(f"Unsupported mime type '{mime}' for {where}: send image/jpeg "
                                                  "frames."))
        data = wire.b64decode(blob.get("data"), f"{where}.data")
        import cv2        # only sessions that send video pay for OpenCV
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
        if img is None:
            self.counters["bad_images"] += 1
            raise ProtocolError(f"Unable to process input image: {where} ({mime}, {len(data)} bytes) does not decode.")
        now = time.time_ns()
        if self.frames == 0:
            self.frame_first_ns = now
        self.frames += 1
        self.frame_last_ns = now
        self.frame_size = (img.shape[1], img.shape[0])
        self.counters["frames"] += 1

    def _arrival_of(self, position: int) -> int:
        """Wall-clock arrival of the input chunk that contained `position`."""
        for end, t_ns in self._arrivals:
            if end >= position:
                return t_ns
        return time.time_ns()

    async def _speech_start(self, now: int) -> None:
        self.mark("speech_start", self.conv.turns + 1, now)
        self.interim_next = self.opts.interim_every
        if self.generation >= 3:
            await self.send(wire.voice_activity(True, self.detector.position / RATE))
        if self.vad.interrupts:
            await self._interrupt_all(now)

    async def _interrupt_all(self, now: int) -> None:
        """Barge-in ends the turn in progress and any committed turn not yet started."""
        # Taken out of the queue first: the worker must not start them, and the handle sent with
        # each turnComplete must not count them as still to be answered.
        queued = list(self.waiting)
        self.waiting.clear()
        if self.current is not None and not self.current.completed:
            await self._interrupt(self.current, now)
        for turn in queued:
            await self._interrupt(turn, now)

    def _enqueue(self, turn: Turn) -> None:
        self.waiting.append(turn)
        self.turn_ready.set()

    async def _speech_end(self, end: SpeechEnd, now: int) -> None:
        assert self.conv is not None
        self.conv.turns += 1
        n = self.conv.turns
        seconds = end.seconds
        text = f"utterance {n}: {seconds:.2f} s"
        prompt = {"AUDIO": round(seconds * AUDIO_TOKENS_PER_S)}
        if self.frames:
            w, h = self.frame_size
            text += f", frames {self.frames}, last {w}x{h}"
            if self.frames >= 2:
                fps = (self.frames - 1) / max(1e-9, (self.frame_last_ns - self.frame_first_ns) / 1e9)
                text += f", {fps:.2f} fps"
            prompt["IMAGE"] = self.frames * self.frame_tokens
        if self.vocabulary:
            # Stands for a listed term the user said, spelled as given (the parrot hears no words).
            text += f', said "{self.vocabulary[(n - 1) % len(self.vocabulary)]}"'
        self.mark("speech_end", n, now, seconds=round(seconds, 3), manual=end.manual, frames=self.frames,
                  speech_stop_ns=self._arrival_of(end.last_voiced_sample), silence_ms=0 if end.manual else self.vad.silence_ms)
        self.frames = 0
        if self.generation >= 3:
            await self.send(wire.voice_activity(False, end.last_voiced_sample / RATE))
        if self.want_input_text:
            await self.send(wire.input_transcription(text))
        if seconds < self.opts.need_more_input:
            # Too short to answer: the service ends the turn saying it waits for the user to go on.
            self.mark("need_more_input", n, seconds=round(seconds, 3))
            await self.send(wire.turn_complete(prompt, {}, turnCompleteReason="NEED_MORE_INPUT",
                                               waitingForInput=True, **self._status()))
            self.counters["turns"] += 1
            if self.resumption:
                await self._resumption_update()
            return
        tool = self.functions[0] if self.functions and seconds >= self.opts.tool_trigger else None
        self._enqueue(Turn(n, "audio", audio=end.audio, seconds=seconds, tool=tool, prompt_tokens=prompt))

    def _status(self) -> dict[str, Any]:
        """3.x sends interactionStatus with every turnComplete."""
        return {"interactionStatus": "IDLE"} if self.generation >= 3 else {}

    async def _interim(self) -> None:
        """Interim input transcription while the user speaks (--interim-every), when asked for."""
        if not (self.opts.interim_every > 0 and self.want_input_text and self.detector.speaking):
            return
        so_far = self.detector.speaking_seconds
        if so_far >= self.interim_next:
            self.interim_next = so_far + self.opts.interim_every
            await self.send(wire.interim_input_transcription(f"utterance {self.conv.turns + 1}: {so_far:.2f} s so far"))

    async def _client_content(self, body: dict[str, Any]) -> None:
        if self.generation >= 3:
            # 3.x takes client content only as the initial history (setup.historyConfig), and
            # closes 1007 on any other, as users of the service report.
            if not self.history_open:
                raise ProtocolError(wire.REASON_INVALID_ARGUMENT)
            turns = _list(body.get("turns"), "client_content.turns")
            self.history_turns += len(turns)
            if body.get("turn_complete"):
                self.history_open = False     # history seeded; it never starts a model turn
                self.mark("history", self.conv.turns, turns=self.history_turns,
                          roles=[str(_obj(t, "client_content.turns[]").get("role", "user")) for t in turns],
                          texts=[_text_of(t) for t in turns])
            return
        texts: list[str] = []
        for content in _list(body.get("turns"), "client_content.turns"):
            content = _obj(content, "client_content.turns[]")
            if content.get("role", "user") != "user":
                continue
            for part in _list(content.get("parts"), "client_content.turns[].parts"):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        if body.get("turn_complete"):
            await self._text_turn(" ".join(texts))
        else:   # context only (2.5): no model turn; noted so a client can see what it seeded
            turns = _list(body.get("turns"), "client_content.turns")
            self.mark("context", self.conv.turns if self.conv else 0, turns=len(turns),
                      roles=[str(_obj(t, "client_content.turns[]").get("role", "user")) for t in turns],
                      texts=[_text_of(t) for t in turns])

    async def _text_turn(self, text: str) -> None:
        # Text interrupts a generation in progress, as the real service documents for client content.
        now = time.time_ns()
        if self.vad.interrupts:
            await self._interrupt_all(now)
        assert self.conv is not None
        self.conv.turns += 1
        n = self.conv.turns
        self.mark("text_in", n, now, chars=len(text))
        self._enqueue(Turn(n, "text", text=text, prompt_tokens={"TEXT": max(1, math.ceil(len(text) / 4))}))

    async def _tool_response(self, body: dict[str, Any]) -> None:
        for resp in _list(body.get("function_responses"), "tool_response.function_responses"):
            call_id = resp.get("id") if isinstance(resp, dict) else None
            if str(call_id) in self.async_calls:
                await self._async_result(str(call_id), resp)
                continue
            waiter = self.tool_waiters.pop(str(call_id), None)
            if waiter is None or waiter.done():
                self.counters["tool_responses_unmatched"] += 1
                ratelog.warning("tool-id", f"session {self.sid}: tool response for unknown call id {call_id!r} ignored")
                continue
            waiter.set_result(resp)

    async def _async_result(self, call_id: str, resp: dict[str, Any]) -> None:
        """A NON_BLOCKING call's response, scheduled as it asks: INTERRUPT stops the reply in progress
        and answers now, WHEN_IDLE (the default) answers after what is queued, SILENT only adds it to
        the context. will_continue: more responses for this call follow."""
        name, asked_in = self.async_calls[call_id]
        will_continue = bool(resp.get("will_continue"))
        if not will_continue:
            del self.async_calls[call_id]
        scheduling = str(resp.get("scheduling") or "WHEN_IDLE").upper()
        if scheduling == "SCHEDULING_UNSPECIFIED":
            scheduling = "WHEN_IDLE"
        if scheduling not in ("INTERRUPT", "WHEN_IDLE", "SILENT"):
            raise ProtocolError(wire.REASON_INVALID_ARGUMENT)
        self.mark("tool_response", asked_in, id=call_id, scheduling=scheduling, will_continue=will_continue)
        if scheduling == "SILENT":
            return
        assert self.conv is not None
        self.conv.turns += 1
        n = self.conv.turns
        turn = Turn(n, "tool", text=name, prompt_tokens={"TEXT": 8},
                    label=f"reply {n}: tool {name} result, {scheduling.lower()}")
        if scheduling == "INTERRUPT":
            if self.current is not None and not self.current.completed:
                await self._interrupt(self.current, time.time_ns())
            self.waiting.appendleft(turn)
            self.turn_ready.set()
        else:
            self._enqueue(turn)

    # --- output ----------------------------------------------------------------------------

    async def _turn_worker(self) -> None:
        while True:
            while not self.waiting:
                self.turn_ready.clear()
                await self.turn_ready.wait()
            turn = self.waiting.popleft()
            self.current = turn
            turn.task = asyncio.create_task(self._play(turn))
            await asyncio.wait({turn.task})      # wait() does not raise when the turn was interrupted
            if not turn.task.cancelled() and turn.task.exception() is not None:
                raise turn.task.exception()
            self.current = None

    async def _play(self, turn: Turn) -> None:
        o = self.opts
        turn.phase = "thinking"
        await asyncio.sleep(o.latency)
        label = f"reply {turn.number}: {turn.seconds:.2f} s"
        if turn.tool and turn.tool in self.non_blocking:
            # NON_BLOCKING: the call goes out and the conversation goes on; the response is
            # scheduled when it comes (_async_result).
            call_id = f"fc-{self.sid}-{turn.number}"
            self.async_calls[call_id] = (turn.tool, turn.number)
            await self.send(wire.tool_call(call_id, turn.tool, {"utterance": turn.number,
                                                                 "seconds": round(turn.seconds, 2)}))
            self.counters["tool_calls"] += 1
            self.mark("tool_call", turn.number, name=turn.tool, id=call_id, non_blocking=True)
        elif turn.tool:
            turn.phase = "tool"
            turn.call_id = f"fc-{self.sid}-{turn.number}"
            waiter = asyncio.get_running_loop().create_future()
            self.tool_waiters[turn.call_id] = waiter
            await self.send(wire.tool_call(turn.call_id, turn.tool,
                                           {"utterance": turn.number, "seconds": round(turn.seconds, 2)}))
            self.counters["tool_calls"] += 1
            self.mark("tool_call", turn.number, name=turn.tool, id=turn.call_id)
            if o.goaway_at_tool_call:
                self._spawn(self._goaway_timer(0.0, o.goaway_grace, wire.INTERNAL_ERROR, wire.REASON_DEADLINE))
            await waiter
            self.mark("tool_response", turn.number, id=turn.call_id)
            turn.call_id = None
            label += f", after tool {turn.tool}"
            await asyncio.sleep(o.latency)
        if turn.kind == "text":
            label = f'reply {turn.number}: text "{turn.text[:200]}"'
            pcm = synthetic_reply(turn.text)
        elif turn.kind == "tool":
            label = turn.label
            pcm = synthetic_reply(label)
        else:
            pcm = soxr.resample(turn.audio, RATE, OUT_RATE).astype(np.int16) if len(turn.audio) else np.zeros(0, np.int16)
        turn.phase = "speaking"
        await self._extras(turn)
        if self.text_mode:
            await self.send(wire.text_part(label))
            turn.reply_text = label
            self.mark("first_byte", turn.number)
        elif len(pcm):
            await self._stream(turn, pcm, label)
        elif self.want_output_text:          # an empty manual activity: nothing to say back
            await self.send(wire.output_transcription(label))
        if self.generation >= 3:
            await self._complete(turn, "turn_complete", generationComplete=True)   # one message on 3.x
            return
        await self.send(wire.generation_complete())
        await self._complete(turn, "turn_complete")

    async def _extras(self, turn: Turn) -> None:
        """What a reply carries besides its words, when setup asked: a thought summary
        (includeThoughts), search grounding, URL context, and code run with its result."""
        n = turn.number
        if self.include_thoughts:
            await self.send(wire.model_parts([{"text": f"thinking about turn {n}", "thought": True}]))
        if "code_execution" in self.builtin:
            await self.send(wire.model_parts([
                {"executableCode": {"language": "PYTHON", "code": f"print({n} * {n})"}},
                {"codeExecutionResult": {"outcome": "OUTCOME_OK", "output": f"{n * n}\n"}}]))
        if "google_search" in self.builtin:
            await self.send({"serverContent": {"groundingMetadata": {
                "webSearchQueries": [f"turn {n}"],
                "groundingChunks": [{"web": {"uri": f"https://emulator.invalid/search/{n}", "title": f"result {n}"}}]}}})
        if "url_context" in self.builtin:
            await self.send({"serverContent": {"urlContextMetadata": {"urlMetadata": [
                {"retrievedUrl": f"https://emulator.invalid/page/{n}",
                 "urlRetrievalStatus": "URL_RETRIEVAL_STATUS_SUCCESS"}]}}})

    async def _stream(self, turn: Turn, pcm: np.ndarray, label: str) -> None:
        o = self.opts
        step = max(1, OUT_RATE * o.chunk_ms // 1000)
        t0 = time.monotonic()
        for k, off in enumerate(range(0, len(pcm), step)):
            if o.pace > 0:
                delay = t0 + k * (step / OUT_RATE) / o.pace - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif k:
                await asyncio.sleep(0)      # unpaced: still let a barge-in be read between chunks
            chunk = pcm[off:off + step]
            bundle = k == 0 and self.want_output_text and self.generation >= 3
            await self.send(wire.audio_chunk(chunk.tobytes(), label if bundle else None))
            turn.sent_samples += len(chunk)
            if k == 0:
                self.mark("first_byte", turn.number, reply_seconds=round(len(pcm) / OUT_RATE, 3))
                if o.drop_in_reply is not None and not self.resumed and not self._reply_drop_armed:
                    self._reply_drop_armed = True     # once: timed from the reply, not from the setup
                    self._spawn(self._drop_timer(o.drop_in_reply))
                if self.want_output_text and not bundle:
                    await self.send(wire.output_transcription(label))

    async def _complete(self, turn: Turn, event: str, **signals: Any) -> None:
        if self.text_mode:
            response = {"TEXT": math.ceil(len(turn.reply_text) / 4)}
        else:
            response = {"AUDIO": round(turn.sent_samples / OUT_RATE * AUDIO_TOKENS_PER_S)}
        turn.completed = True
        turn.phase = "done"
        await self.send(wire.turn_complete(turn.prompt_tokens, response, **signals, **self._status()))
        self.counters["turns"] += 1
        self.mark(event, turn.number, sent_seconds=round(turn.sent_samples / OUT_RATE, 3))
        if self.resumption:
            await self._resumption_update()

    async def _interrupt(self, turn: Turn, now: int) -> None:
        """User barge-in: stop the reply, cancel a pending tool call, then interrupted + turnComplete."""
        phase = turn.phase
        if turn.task is not None and not turn.task.done():
            turn.task.cancel()
            await asyncio.wait({turn.task})
        if turn.completed:
            return
        if turn.call_id is not None:
            self.tool_waiters.pop(turn.call_id, None)
            await self.send(wire.tool_call_cancellation([turn.call_id]))
            self.mark("tool_cancelled", turn.number, id=turn.call_id)
            turn.call_id = None
        self.counters["interrupted"] += 1
        self.mark("interrupted", turn.number, now, phase=phase, sent_seconds=round(turn.sent_samples / OUT_RATE, 3))
        await self.send(wire.interrupted())
        await self._complete(turn, "turn_complete")

    async def _resumption_update(self) -> None:
        """A handle for the state as of now: it covers every client message received so far, which is
        what lastConsumedClientMessageIndex says (sent only when setup asked for transparent
        resumption, as the real service does)."""
        assert self.conv is not None
        handle = self.registry.issue(self.conv, self._snapshot())
        await self.send(wire.resumption_update(handle, self.client_index if self.transparent else None))


def synthetic_reply(text: str) -> np.ndarray:
    """A short deterministic reply to text: a 330 Hz tone, 0.4 s + 30 ms a character, at most 3 s."""
    seconds = min(3.0, 0.4 + 0.03 * len(text))
    t = np.arange(int(seconds * OUT_RATE)) / OUT_RATE
    env = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)      # 10 ms fades: no clicks
    return (0.3 * 32767 * env * np.sin(2 * np.pi * 330 * t)).astype(np.int16)


def _text_of(content: Any) -> str:
    """The text of one history turn, for the timeline (a client can see what it seeded); 200 characters at most."""
    parts = _list(_obj(content, "client_content.turns[]").get("parts"), "client_content.turns[].parts")
    return " ".join(p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))[:200]


def _obj(value: Any, where: str) -> dict[str, Any]:
    """A JSON object field: {} when absent; anything else than an object is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"Invalid JSON payload received. {where} must be an object.")
    return value


def _list(value: Any, where: str) -> list[Any]:
    """A JSON list field: [] when absent; anything else than a list is refused."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProtocolError(f"Invalid JSON payload received. {where} must be a list.")
    return value
