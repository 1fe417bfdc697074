"""Every bus topic, its header schema and its delivery policy, declared once.

A message is `[topic, msgpack header, payload?]`. The header always carries the
common fields below; each topic adds fields per `kind`. `validate()` is the only
gate between the wire and a service handler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SCHEMA_VERSION = 1

# Common header fields: name -> accepted python types after msgpack decoding.
COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "v": (int,),        # schema version
    "kind": (str,),     # what the message is, within its topic
    "src": (str,),      # process name, e.g. "capture-audio"
    "inst": (str,),     # instance id of that process (unique per start)
    "seq": (int,),      # per (source instance, topic) sequence number, from 0
    "ts": (int,),       # wall-clock time of publishing, ns since the epoch
}

INT = (int,)
NUM = (int, float)
STR = (str,)
BOOL = (bool,)
MAP = (dict,)
LIST = (list,)
OPT_STR = (str, type(None))
OPT_INT = (int, type(None))

AUDIO_FIELDS = {"rate": INT, "channels": INT, "sample_width": INT, "frames": INT}


@dataclass(frozen=True)
class Kind:
    """Fields a kind requires and may carry; `payload` says whether a binary frame follows."""

    required: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    optional: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    payload: bool = False


# Lanes: each lane is its own socket pair, so a backlog in one never delays another.
#   control: never dropped, never behind data; its handlers run in their own task.
#   audio:   in order, deep queues (minutes of audio), loss shows as a sequence gap.
#   video:   only the newest frame matters; older queued frames are dropped and counted.
#   events:  small, ordered messages (transcripts, tools, heartbeats...).
LANES = ("control", "audio", "video", "events")


@dataclass(frozen=True)
class Topic:
    name: str
    lane: str
    kinds: Mapping[str, Kind]
    doc: str = ""


# `stamps`: optional latency-budget stamps, a map of name -> wall-clock ns (README, "Latency
# budget"). capture-audio puts `callback_ts` on audio.in; the bridge puts the input path of the
# newest audio.in chunk and `reply_recv_ts` on the first audio.out chunk of a turn; playback adds
# its own and sends them all on turn_started.
STAMPS = {"stamps": MAP}

_audio_kind = Kind(required=AUDIO_FIELDS, optional={"capture_ts": INT, **STAMPS}, payload=True)

TOPICS: dict[str, Topic] = {}


def _declare(topic: Topic) -> Topic:
    assert topic.lane in LANES, topic.lane
    TOPICS[topic.name] = topic
    return topic


AUDIO_IN = _declare(Topic("audio.in", "audio", {"audio": _audio_kind},
                          "user audio: 16 kHz mono s16le PCM chunks"))
AUDIO_OUT = _declare(Topic("audio.out", "audio", {
    "audio": Kind(required={**AUDIO_FIELDS, "turn": INT}, optional={"capture_ts": INT, **STAMPS}, payload=True)},
    "model audio: 24 kHz mono s16le PCM, tagged with the model turn id"))
AUDIO_REF = _declare(Topic("audio.ref", "audio", {
    "audio": Kind(required={**AUDIO_FIELDS, "out_ts": INT}, payload=True),
    # from out_ts on the device plays silence, and no `audio` comes until it plays sound again
    "silence": Kind(required={"out_ts": INT})},
    "echo reference: exactly what playback handed to its device (blocks with sound); out_ts = wall time its "
    "first sample sounds"))
VIDEO_IN = _declare(Topic("video.in", "video", {
    "image": Kind(required={"image_width": INT, "image_height": INT, "mime": STR},
                  optional={"capture_ts": INT}, payload=True)},
    "JPEG frames fitted to 768x768; capture_ts is when the frame was grabbed"))
TEXT_IN = _declare(Topic("text.in", "events", {"text": Kind(required={"text": STR})},
                         "text the user types, sent to the model"))
TRANSCRIPT = _declare(Topic("transcript", "events", {
    "transcript": Kind(required={"role": STR, "text": STR, "turn": INT}, optional={"final": BOOL}),
    # the service's low-latency transcription while the user speaks; superseded by `transcript`
    "interim": Kind(required={"role": STR, "text": STR, "turn": INT}),
    # the model's thought summaries (--include-thoughts): never spoken, never part of `transcript`
    "thought": Kind(required={"role": STR, "text": STR, "turn": INT}),
}, "user (input) and model (output) transcription"))
CONTROL = _declare(Topic("control", "control", {
    # `of`: the instance whose turn is cut, when another process asks (e.g. the console's button);
    # by default the sender's own turn. Either way only audio published before the interrupt is cut.
    "interrupt": Kind(required={"turn": INT}, optional={"reason": STR, "of": STR}),
    "generation_complete": Kind(required={"turn": INT}),
    "turn_complete": Kind(required={"turn": INT}, optional={"usage": MAP}),
    "session": Kind(required={"state": STR}, optional={"detail": STR, "backend": STR}),
    "go_away": Kind(required={"time_left_ms": INT}),
    # new system instruction and/or tools (function declarations) for the live session
    "context_update": Kind(optional={"system_instruction": STR, "tools": LIST}),
    # the history a new live session starts with: turns [{"role": "user"|"model", "text": ...}]
    # (`livepipe update --history FILE`); at once if the session has had no turn, else the next new one
    "history": Kind(required={"turns": LIST}),
    # a (re)started bridge asks whoever keeps the conversation (`livepipe transcript`) for its history
    "history_query": Kind(),
    # the service's own voice activity detection: the user started / stopped speaking
    "voice_activity": Kind(required={"state": STR}, optional={"offset_ms": INT}),
    # what the service says of a turn: turnCompleteReason, waitingForInput, interactionStatus
    "turn_status": Kind(required={"turn": INT}, optional={"reason": STR, "waiting_for_input": BOOL, "status": STR}),
    "mute": Kind(),
    "unmute": Kind(),
}, "system messages: jump ahead of data, never dropped"))
PLAYBACK = _declare(Topic("playback", "events", {
    "turn_started": Kind(required={"turn": INT, "first_sample_ts": INT}, optional=STAMPS),
    "turn_finished": Kind(required={"turn": INT, "played_ms": NUM, "interrupted": BOOL},
                          optional={"silent_ts": INT}),
    "underrun": Kind(required={"turn": INT}),
}, "what the user actually heard"))
TOOL_CALL = _declare(Topic("tool.call", "events", {
    # to: the inst of the process that announced `name` on tool.announce; only it answers
    "call": Kind(required={"id": STR, "name": STR, "args": MAP}, optional={"to": STR}),
    "cancel": Kind(required={"ids": LIST}),
}, "function calls from the model"))
TOOL_RESULT = _declare(Topic("tool.result", "events", {
    "result": Kind(required={"id": STR, "name": STR, "response": MAP},
                   # NON_BLOCKING functions: INTERRUPT | WHEN_IDLE | SILENT; will_continue: more results follow
                   optional={"scheduling": STR, "will_continue": BOOL}),
}, "function results, from any process"))
TOOL_ANNOUNCE = _declare(Topic("tool.announce", "events", {
    # functions: function declarations ({name, description?, parameters?...}) this process serves;
    # the announcer is the header's src/inst, and it is forgotten when its heartbeats stop
    "announce": Kind(required={"functions": LIST}),
    "withdraw": Kind(),
}, "functions a process serves, for the model (the bridge gathers them)"))
TOOL_QUERY = _declare(Topic("tool.query", "events", {
    "query": Kind(),
}, "the bridge asks every tool process to announce its functions again"))
GROUNDING = _declare(Topic("grounding", "events", {
    "search": Kind(required={"turn": INT, "queries": LIST, "sources": LIST}),     # sources: [{title, uri}]
    "url_context": Kind(required={"turn": INT, "urls": LIST}),                   # urls: [{url, status}]
    "code": Kind(required={"turn": INT, "code": STR}, optional={"language": STR}),
    "code_result": Kind(required={"turn": INT, "output": STR}, optional={"outcome": STR}),
}, "what built-in tools returned: search sources, URLs read, code run and its result"))
STATUS = _declare(Topic("status", "events", {
    "heartbeat": Kind(required={"counters": MAP}, optional={"metrics": MAP, "pid": INT, "host": STR}),
}, "heartbeats: one a second per process"))


class SchemaError(ValueError):
    """A message that does not match its topic's schema."""


# Each field spec compiled once: (name, accepted types, the exact types among them). msgpack only
# produces exact types, so a received field's type is found in a set with one lookup; anything else
# (a subclass, a wrong type, bool where only int is accepted) takes the full check below.
_Plan = tuple[tuple[str, tuple[type, ...], frozenset], ...]
_MISSING = object()
_PLANS: dict[int, tuple[Any, _Plan, _Plan]] = {}   # id(Kind) -> (the Kind, its required, its optional)


def _plan(spec: Mapping[str, tuple[type, ...]]) -> _Plan:
    return tuple((name, types, frozenset(types)) for name, types in spec.items())


_COMMON_PLAN = _plan(COMMON_FIELDS)


def _kind_plans(kind: Kind) -> tuple[_Plan, _Plan]:
    entry = _PLANS.get(id(kind))
    if entry is None or entry[0] is not kind:
        entry = _PLANS[id(kind)] = (kind, _plan(kind.required), _plan(kind.optional))
    return entry[1], entry[2]


def _check(header: Mapping[str, Any], plan: _Plan, required: bool) -> None:
    for name, types, exact in plan:
        value = header.get(name, _MISSING)
        if type(value) in exact:
            continue
        if value is _MISSING:
            if required:
                raise SchemaError(f"missing field {name!r}")
            continue
        # bool is an int subclass: keep them apart so `seq: True` is rejected
        if isinstance(value, bool) and bool not in types:
            raise SchemaError(f"field {name!r} has type bool")
        if not isinstance(value, types):
            raise SchemaError(f"field {name!r} has type {type(value).__name__}")


def validate(topic_name: str, header: Any, payload: bytes | None) -> Topic:
    """Raise SchemaError unless (header, payload) is a valid message of `topic_name`."""
    topic = TOPICS.get(topic_name)
    if topic is None:
        raise SchemaError(f"unknown topic {topic_name!r}")
    if not isinstance(header, dict):
        raise SchemaError("header is not a map")
    _check(header, _COMMON_PLAN, True)
    if header["v"] != SCHEMA_VERSION:
        raise SchemaError(f"schema version {header['v']} (expected {SCHEMA_VERSION})")
    kind = topic.kinds.get(header["kind"])
    if kind is None:
        raise SchemaError(f"unknown kind {header['kind']!r} for {topic_name}")
    required, optional = _kind_plans(kind)
    _check(header, required, True)
    _check(header, optional, False)
    if kind.payload:
        if payload is None:
            raise SchemaError("payload missing")
        if "frames" in kind.required:
            _check_audio(header, payload)
    elif payload is not None:
        raise SchemaError("unexpected payload")
    return topic


def _check_audio(header: Mapping[str, Any], payload: bytes) -> None:
    rate, ch, width, frames = header["rate"], header["channels"], header["sample_width"], header["frames"]
    if not 1000 <= rate <= 384000:
        raise SchemaError(f"sample rate {rate} out of range")
    if not 1 <= ch <= 8:
        raise SchemaError(f"channels {ch} out of range")
    if width not in (1, 2, 3, 4):
        raise SchemaError(f"sample width {width} out of range")
    if frames * ch * width != len(payload):
        raise SchemaError(f"payload is {len(payload)} bytes, header says {frames} frames x {ch} ch x {width} B")
