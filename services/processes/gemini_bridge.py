"""`livepipe gemini-bridge`: the Live API session on the bus.

The one process that talks to the model (google-genai's `client.aio.live.connect`) and the only
module that imports google-genai (lazily, so `--help` stays fast).

    audio.in, video.in, text.in, tool.result  ->  model  ->  audio.out, transcript, control, tool.call

Backend: the real Gemini Live API when GEMINI_API_KEY (or GOOGLE_API_KEY) is set, else the local
emulator found through `<state>/emulator/emulator.json`; `--backend` forces either. Both go through
the same SDK calls; only the address and the CA to trust differ.

Long sessions: on goAway the next connection is opened with the latest resumption handle before
the old one closes, and audio.in is held (bounded) until it is up; an abrupt close reconnects with
the handle and backoff; a fatal error (bad key, policy close) is one line and exit 1.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Awaitable

import numpy as np

from livepipe.bus import Service, setup_logging
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.bus.message import Message

NAME = "gemini-bridge"
DEFAULT_MODEL = "gemini-2.5-flash-native-audio-preview-12-2025"
# The emulator ignores the key unless started with --api-key; the SDK refuses to connect without one.
EMULATOR_PLACEHOLDER_KEY = "livepipe-emulator-placeholder-key"
MODEL_RATE = 16000                      # what the Live API takes: 16 kHz mono s16le
MODEL_MIME = f"audio/pcm;rate={MODEL_RATE}"
BYTES_PER_SECOND_IN = MODEL_RATE * 2
FATAL_CLOSE_CODES = {1007, 1008}        # invalid argument / policy: bad key, unknown model, quota
FATAL_HTTP = {400, 401, 403, 404}
ACTIVITY_START, ACTIVITY_END = "activity_start", "activity_end"   # queue markers (--vad off)

log = logging.getLogger(NAME)


# ---------------------------------------------------------------- settings
def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def state_dir() -> Path:
    return Path(_env("LIVEPIPE_STATE_DIR") or Path.home() / ".local/state/livepipe").expanduser()


@dataclass
class Settings:
    backend: str                          # "gemini" | "emulator" (resolved from auto)
    api_key: str = field(repr=False)
    model: str = DEFAULT_MODEL
    modality: str = "AUDIO"
    media_resolution: str = "low"
    voice: str | None = None
    language: str | None = None
    system_instruction: str | None = None
    input_transcription: bool = True
    output_transcription: bool = True
    vad: bool = True
    vad_start: str | None = None          # "high" | "low"
    vad_end: str | None = None
    vad_prefix_ms: int | None = None
    vad_silence_ms: int | None = None
    barge_in: bool = True
    compression: bool = True
    compression_trigger: int | None = None
    compression_target: int | None = None
    resumption: bool = True
    tools: list[dict[str, Any]] | None = None
    tools_file: str | None = None
    video_fps: float = 1.0
    video_max_side: int = 768
    text_mode: str = "realtime"
    tool_timeout: float = 30.0
    buffer_seconds: float = 8.0
    connect_timeout: float = 15.0
    reconnect_max: float = 10.0
    silent_server: float = 5.0
    emulator_wait: float = 30.0
    state_dir: Path = field(default_factory=state_dir)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="livepipe gemini-bridge", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    b = p.add_argument_group("backend")
    b.add_argument("--backend", default=_env("LIVEPIPE_BACKEND", "auto"),
                   help="auto | gemini | emulator (env LIVEPIPE_BACKEND, default auto: gemini when "
                        "GEMINI_API_KEY or GOOGLE_API_KEY is set, else the local emulator)")
    b.add_argument("--emulator-wait", default=_env("LIVEPIPE_EMULATOR_WAIT", "30"), metavar="S",
                   help="how long to wait for <state>/emulator/emulator.json (env LIVEPIPE_EMULATOR_WAIT, default 30)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=_env("LIVEPIPE_MODEL", DEFAULT_MODEL),
                   help=f"Live model (env LIVEPIPE_MODEL, default {DEFAULT_MODEL})")
    m.add_argument("--modality", default=_env("LIVEPIPE_MODALITY", "audio"),
                   help="response modality: audio | text (env LIVEPIPE_MODALITY, default audio)")
    m.add_argument("--media-resolution", default=_env("LIVEPIPE_MEDIA_RESOLUTION", "low"),
                   help="low | medium | high (env LIVEPIPE_MEDIA_RESOLUTION, default low: 64 tokens a frame)")
    m.add_argument("--voice", default=_env("LIVEPIPE_VOICE"), help="prebuilt voice, e.g. Puck, Kore (env LIVEPIPE_VOICE)")
    m.add_argument("--language", default=_env("LIVEPIPE_LANGUAGE"),
                   help="speech language code, e.g. en-US (env LIVEPIPE_LANGUAGE)")
    m.add_argument("--system-instruction", default=_env("LIVEPIPE_SYSTEM_INSTRUCTION"), metavar="TEXT|@FILE",
                   help="system instruction, or @path to read it from a file (env LIVEPIPE_SYSTEM_INSTRUCTION)")
    m.add_argument("--tools", default=_env("LIVEPIPE_TOOLS"), metavar="FILE",
                   help="JSON file of function declarations (a list, or {\"function_declarations\": [...]}) "
                        "(env LIVEPIPE_TOOLS)")
    m.add_argument("--input-transcription", default=_env("LIVEPIPE_INPUT_TRANSCRIPTION", "on"),
                   help="on | off (env LIVEPIPE_INPUT_TRANSCRIPTION, default on)")
    m.add_argument("--output-transcription", default=_env("LIVEPIPE_OUTPUT_TRANSCRIPTION", "on"),
                   help="on | off (env LIVEPIPE_OUTPUT_TRANSCRIPTION, default on)")
    v = p.add_argument_group("activity detection (server-side VAD)")
    v.add_argument("--vad", default=_env("LIVEPIPE_VAD", "on"),
                   help="on | off: automatic activity detection by the service (env LIVEPIPE_VAD, default on; "
                        "off: the bridge marks speech start/end itself with webrtcvad)")
    v.add_argument("--vad-start-sensitivity", default=_env("LIVEPIPE_VAD_START_SENSITIVITY"),
                   help="high | low (env LIVEPIPE_VAD_START_SENSITIVITY, default: the service's)")
    v.add_argument("--vad-end-sensitivity", default=_env("LIVEPIPE_VAD_END_SENSITIVITY"),
                   help="high | low (env LIVEPIPE_VAD_END_SENSITIVITY, default: the service's)")
    v.add_argument("--vad-prefix-ms", default=_env("LIVEPIPE_VAD_PREFIX_MS"), metavar="MS",
                   help="speech needed before a start is committed (env LIVEPIPE_VAD_PREFIX_MS)")
    v.add_argument("--vad-silence-ms", default=_env("LIVEPIPE_VAD_SILENCE_MS"), metavar="MS",
                   help="silence that ends an utterance (env LIVEPIPE_VAD_SILENCE_MS)")
    v.add_argument("--barge-in", default=_env("LIVEPIPE_BARGE_IN", "on"),
                   help="on | off: user speech interrupts the model (env LIVEPIPE_BARGE_IN, default on)")
    s = p.add_argument_group("session")
    s.add_argument("--compression", default=_env("LIVEPIPE_COMPRESSION", "on"),
                   help="on | off: context window compression (env LIVEPIPE_COMPRESSION, default on; "
                        "without it audio+video sessions end after 2 minutes)")
    s.add_argument("--compression-trigger-tokens", default=_env("LIVEPIPE_COMPRESSION_TRIGGER_TOKENS"), metavar="N",
                   help="context size that triggers compression (env LIVEPIPE_COMPRESSION_TRIGGER_TOKENS)")
    s.add_argument("--compression-target-tokens", default=_env("LIVEPIPE_COMPRESSION_TARGET_TOKENS"), metavar="N",
                   help="size the sliding window keeps (env LIVEPIPE_COMPRESSION_TARGET_TOKENS)")
    s.add_argument("--resumption", default=_env("LIVEPIPE_RESUMPTION", "on"),
                   help="on | off: session resumption across connections (env LIVEPIPE_RESUMPTION, default on)")
    s.add_argument("--text-mode", default=_env("LIVEPIPE_TEXT_MODE", "realtime"),
                   help="how text.in is sent: realtime (send_realtime_input) | content (a client turn) "
                        "(env LIVEPIPE_TEXT_MODE, default realtime)")
    s.add_argument("--video-fps", default=_env("LIVEPIPE_MODEL_VIDEO_FPS", "1"), metavar="FPS",
                   help="most video frames a second sent to the model, 0 < FPS <= 1 (env LIVEPIPE_MODEL_VIDEO_FPS, default 1)")
    s.add_argument("--video-max-side", default=_env("LIVEPIPE_VIDEO_MAX_SIDE", "768"), metavar="PX",
                   help="frames larger than this are fitted inside PXxPX (env LIVEPIPE_VIDEO_MAX_SIDE, default 768)")
    s.add_argument("--tool-timeout", default=_env("LIVEPIPE_TOOL_TIMEOUT", "30"), metavar="S",
                   help="a tool call with no tool.result after S seconds gets an error response "
                        "(env LIVEPIPE_TOOL_TIMEOUT, default 30)")
    s.add_argument("--buffer-seconds", default=_env("LIVEPIPE_BUFFER_SECONDS", "8"), metavar="S",
                   help="audio.in held while (re)connecting; older audio beyond it is dropped and counted "
                        "(env LIVEPIPE_BUFFER_SECONDS, default 8)")
    s.add_argument("--connect-timeout", default=_env("LIVEPIPE_CONNECT_TIMEOUT", "15"), metavar="S",
                   help="give up one connection attempt after S seconds (env LIVEPIPE_CONNECT_TIMEOUT, default 15)")
    s.add_argument("--reconnect-max", default=_env("LIVEPIPE_RECONNECT_MAX", "10"), metavar="S",
                   help="longest backoff between reconnection attempts (env LIVEPIPE_RECONNECT_MAX, default 10)")
    s.add_argument("--silent-server-s", default=_env("LIVEPIPE_SILENT_SERVER_S", "5"), metavar="S",
                   help="a server that answers no websocket ping for S seconds is treated as gone: reconnect "
                        "with the resumption handle and resend what it may not have heard "
                        "(env LIVEPIPE_SILENT_SERVER_S, default 5)")
    add_bus_arguments(p)
    return p


def _switch(name: str, env: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{name} {value!r}: use on or off (env {env})")


def _number(name: str, env: str, value: str | None, kind: type, low: float, high: float,
            optional: bool = False) -> Any:
    if value is None and optional:
        return None
    try:
        n = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {value!r}: not a{'n integer' if kind is int else ' number'} (env {env})") from None
    if not low <= n <= high or n != n:  # n != n: NaN
        raise ConfigError(f"{name} {value!r}: must be between {low:g} and {high:g} (env {env})")
    return n


def _choice(name: str, env: str, value: str | None, choices: tuple[str, ...], optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    v = str(value).strip().lower()
    if v not in choices:
        raise ConfigError(f"{name} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]} (env {env})")
    return v


def load_tools(path: str) -> list[dict[str, Any]]:
    """Function declarations from a JSON file: a list of declarations, {"function_declarations": [...]},
    or a list of tools each holding function_declarations."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--tools {path}: no such file (env LIVEPIPE_TOOLS)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--tools {path}: not readable JSON ({exc})") from None
    decls: list[Any]
    if isinstance(data, dict):
        decls = data.get("function_declarations", data.get("functionDeclarations"))  # type: ignore[assignment]
        if decls is None:
            decls = [data]
    elif isinstance(data, list) and data and all(isinstance(t, dict) and
                                                 ("function_declarations" in t or "functionDeclarations" in t)
                                                 for t in data):
        decls = [d for t in data for d in t.get("function_declarations", t.get("functionDeclarations", []))]
    else:
        decls = data
    if not isinstance(decls, list) or not decls:
        raise ConfigError(f"--tools {path}: expected a non-empty list of function declarations")
    for i, d in enumerate(decls):
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not re.match(r"^[A-Za-z_][\w.-]{0,63}$", d["name"]):
            raise ConfigError(f"--tools {path}: declaration {i} needs a \"name\" (letters, digits, _ . -)")
    return decls


def settings_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    """Validate every option; raise ConfigError (one line) on the first bad one. Connects to nothing."""
    environ = dict(os.environ if environ is None else environ)
    key = environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY") or ""
    backend = _choice("--backend", "LIVEPIPE_BACKEND", args.backend, ("auto", "gemini", "emulator"))
    if backend == "auto":
        backend = "gemini" if key else "emulator"
    if backend == "gemini" and not key:
        raise ConfigError("--backend gemini needs GEMINI_API_KEY (or GOOGLE_API_KEY) in the environment")
    if not re.match(r"^[A-Za-z0-9][\w.\-/]{0,127}$", args.model or ""):
        raise ConfigError(f"--model {args.model!r}: not a model name like {DEFAULT_MODEL} (env LIVEPIPE_MODEL)")
    s = Settings(backend=backend, api_key=key or EMULATOR_PLACEHOLDER_KEY, model=args.model)
    s.modality = _choice("--modality", "LIVEPIPE_MODALITY", args.modality, ("audio", "text")).upper()
    s.media_resolution = _choice("--media-resolution", "LIVEPIPE_MEDIA_RESOLUTION", args.media_resolution,
                                 ("low", "medium", "high"))
    if args.voice is not None and not re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$", args.voice):
        raise ConfigError(f"--voice {args.voice!r}: not a voice name like Puck or Kore (env LIVEPIPE_VOICE)")
    s.voice = args.voice
    if args.language is not None and not re.match(r"^[a-zA-Z]{2,3}(-[A-Za-z0-9]{2,8})*$", args.language):
        raise ConfigError(f"--language {args.language!r}: not a language code like en-US (env LIVEPIPE_LANGUAGE)")
    s.language = args.language
    si = args.system_instruction
    if si is not None and si.startswith("@"):
        try:
            si = Path(si[1:]).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--system-instruction {args.system_instruction}: cannot read "
                              f"({type(exc).__name__}: {getattr(exc, 'strerror', None) or exc})") from None
    if si is not None and not si.strip():
        raise ConfigError("--system-instruction is empty")
    s.system_instruction = si
    s.input_transcription = _switch("--input-transcription", "LIVEPIPE_INPUT_TRANSCRIPTION", args.input_transcription)
    s.output_transcription = _switch("--output-transcription", "LIVEPIPE_OUTPUT_TRANSCRIPTION", args.output_transcription)
    s.vad = _switch("--vad", "LIVEPIPE_VAD", args.vad)
    s.vad_start = _choice("--vad-start-sensitivity", "LIVEPIPE_VAD_START_SENSITIVITY", args.vad_start_sensitivity,
                          ("high", "low"), optional=True)
    s.vad_end = _choice("--vad-end-sensitivity", "LIVEPIPE_VAD_END_SENSITIVITY", args.vad_end_sensitivity,
                        ("high", "low"), optional=True)
    s.vad_prefix_ms = _number("--vad-prefix-ms", "LIVEPIPE_VAD_PREFIX_MS", args.vad_prefix_ms, int, 0, 10000, True)
    s.vad_silence_ms = _number("--vad-silence-ms", "LIVEPIPE_VAD_SILENCE_MS", args.vad_silence_ms, int, 0, 10000, True)
    s.barge_in = _switch("--barge-in", "LIVEPIPE_BARGE_IN", args.barge_in)
    s.compression = _switch("--compression", "LIVEPIPE_COMPRESSION", args.compression)
    s.compression_trigger = _number("--compression-trigger-tokens", "LIVEPIPE_COMPRESSION_TRIGGER_TOKENS",
                                    args.compression_trigger_tokens, int, 1000, 10_000_000, True)
    s.compression_target = _number("--compression-target-tokens", "LIVEPIPE_COMPRESSION_TARGET_TOKENS",
                                   args.compression_target_tokens, int, 100, 10_000_000, True)
    if s.compression_trigger and s.compression_target and s.compression_target >= s.compression_trigger:
        raise ConfigError("--compression-target-tokens must be below --compression-trigger-tokens")
    s.resumption = _switch("--resumption", "LIVEPIPE_RESUMPTION", args.resumption)
    s.text_mode = _choice("--text-mode", "LIVEPIPE_TEXT_MODE", args.text_mode, ("realtime", "content"))
    s.video_fps = _number("--video-fps", "LIVEPIPE_MODEL_VIDEO_FPS", args.video_fps, float, 0.01, 1.0)
    s.video_max_side = _number("--video-max-side", "LIVEPIPE_VIDEO_MAX_SIDE", args.video_max_side, int, 64, 4096)
    s.tool_timeout = _number("--tool-timeout", "LIVEPIPE_TOOL_TIMEOUT", args.tool_timeout, float, 0.1, 3600)
    s.buffer_seconds = _number("--buffer-seconds", "LIVEPIPE_BUFFER_SECONDS", args.buffer_seconds, float, 0.5, 120)
    s.connect_timeout = _number("--connect-timeout", "LIVEPIPE_CONNECT_TIMEOUT", args.connect_timeout, float, 1, 300)
    s.reconnect_max = _number("--reconnect-max", "LIVEPIPE_RECONNECT_MAX", args.reconnect_max, float, 0.1, 600)
    s.silent_server = _number("--silent-server-s", "LIVEPIPE_SILENT_SERVER_S", args.silent_server_s, float, 0.5, 300)
    s.emulator_wait = _number("--emulator-wait", "LIVEPIPE_EMULATOR_WAIT", args.emulator_wait, float, 0, 3600)
    if args.tools:
        s.tools, s.tools_file = load_tools(args.tools), args.tools
    s.state_dir = Path(environ.get("LIVEPIPE_STATE_DIR") or Path.home() / ".local/state/livepipe").expanduser()
    return s


def live_config(s: Settings, handle: str | None) -> Any:
    """The LiveConnectConfig for one connection (`handle`: resume that session)."""
    from google.genai import types
    cfg: dict[str, Any] = {
        "response_modalities": [s.modality],
        "media_resolution": f"MEDIA_RESOLUTION_{s.media_resolution.upper()}",
    }
    speech: dict[str, Any] = {}
    if s.voice:
        speech["voice_config"] = {"prebuilt_voice_config": {"voice_name": s.voice}}
    if s.language:
        speech["language_code"] = s.language
    if speech:
        cfg["speech_config"] = speech
    if s.system_instruction:
        cfg["system_instruction"] = types.Content(role="user", parts=[types.Part(text=s.system_instruction)])
    if s.input_transcription:
        cfg["input_audio_transcription"] = {}
    if s.output_transcription:
        cfg["output_audio_transcription"] = {}
    aad: dict[str, Any] = {"disabled": not s.vad}
    if s.vad_start:
        aad["start_of_speech_sensitivity"] = f"START_SENSITIVITY_{s.vad_start.upper()}"
    if s.vad_end:
        aad["end_of_speech_sensitivity"] = f"END_SENSITIVITY_{s.vad_end.upper()}"
    if s.vad_prefix_ms is not None:
        aad["prefix_padding_ms"] = s.vad_prefix_ms
    if s.vad_silence_ms is not None:
        aad["silence_duration_ms"] = s.vad_silence_ms
    cfg["realtime_input_config"] = {
        "automatic_activity_detection": aad,
        "activity_handling": "START_OF_ACTIVITY_INTERRUPTS" if s.barge_in else "NO_INTERRUPTION",
    }
    if s.compression:
        window: dict[str, Any] = {}
        if s.compression_target:
            window["target_tokens"] = s.compression_target
        comp: dict[str, Any] = {"sliding_window": window}
        if s.compression_trigger:
            comp["trigger_tokens"] = s.compression_trigger
        cfg["context_window_compression"] = comp
    if s.resumption:
        cfg["session_resumption"] = {"handle": handle} if handle else {}
    if s.tools:
        cfg["tools"] = [{"function_declarations": s.tools}]
    return types.LiveConnectConfig.model_validate(cfg)


# ---------------------------------------------------------------- key scrubbing
class KeyScrubber(logging.Filter):
    """Replace the API key in every log record (ours, the SDK's, websockets') before it is written."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret and self.secret in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.scrub(msg), None
        return True


def install_scrubber(secret: str) -> KeyScrubber:
    scrubber = KeyScrubber(secret)
    for handler in logging.getLogger().handlers:
        handler.addFilter(scrubber)
    return scrubber


# ---------------------------------------------------------------- audio / video helpers
class AudioNormalizer:
    """Make any audio.in chunk 16 kHz mono s16le, with one streaming resampler per source."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, int], Any] = {}

    def convert(self, msg: Message) -> bytes:
        rate, ch, width = msg["rate"], msg["channels"], msg["sample_width"]
        data = msg.payload or b""
        if (rate, ch, width) == (MODEL_RATE, 1, 2):
            return data
        if width == 1:      # unsigned 8-bit
            x = (np.frombuffer(data, np.uint8).astype(np.int32) - 128) << 8
        elif width == 2:
            x = np.frombuffer(data, "<i2").astype(np.int32)
        elif width == 3:    # packed 24-bit little-endian
            b = np.frombuffer(data, np.uint8).reshape(-1, 3).astype(np.int32)
            x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8) >> 16
        elif width == 4:    # 32-bit signed integer PCM
            x = np.frombuffer(data, "<i4") >> 16
        else:
            raise ValueError(f"sample width {width}")
        x = x.reshape(-1, ch).mean(axis=1) if ch > 1 else x
        mono = np.clip(x, -32768, 32767).astype(np.int16)
        if rate != MODEL_RATE:
            import soxr
            key = (msg["inst"], rate)
            stream = self._streams.get(key)
            if stream is None:
                if len(self._streams) > 32:   # bounded: sources come and go
                    self._streams.pop(next(iter(self._streams)))
                stream = self._streams[key] = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="int16")
            mono = stream.resample_chunk(mono)
        return mono.astype("<i2").tobytes()


def prepare_frame(data: bytes, mime: str, max_side: int) -> tuple[bytes, int, int]:
    """Decode (which proves the frame is an image) and fit inside max_side x max_side as JPEG."""
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"undecodable {mime} frame of {len(data)} bytes")
    h, w = img.shape[:2]
    if max(h, w) <= max_side and mime == "image/jpeg":
        return data, w, h
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes(), w, h


def parse_duration_ms(text: str | None) -> int:
    """'10s' / '9.5s' / '1.000000001s' (protobuf Duration JSON) -> milliseconds (0 if unknown)."""
    if not text:
        return 0
    m = re.match(r"^\s*([0-9.]+)\s*s?\s*$", str(text))
    return int(float(m.group(1)) * 1000) if m else 0


class SpeechMarker:
    """Client-side activity detection for --vad off: sends activityStart/End around speech (webrtcvad)."""

    FRAME = 480  # 30 ms at 16 kHz, in samples

    def __init__(self, silence_ms: int) -> None:
        import webrtcvad
        self.vad = webrtcvad.Vad(2)
        self.silence_frames = max(1, silence_ms // 30)
        self.pending = b""
        self.active = False
        self.quiet = 0

    def feed(self, pcm: bytes) -> list[str]:
        """Events ('start' / 'end') the chunk causes, in order."""
        events: list[str] = []
        self.pending += pcm
        n = self.FRAME * 2
        while len(self.pending) >= n:
            frame, self.pending = self.pending[:n], self.pending[n:]
            speech = self.vad.is_speech(frame, MODEL_RATE)
            if speech:
                self.quiet = 0
                if not self.active:
                    self.active = True
                    events.append("start")
            elif self.active:
                self.quiet += 1
                if self.quiet >= self.silence_frames:
                    self.active = False
                    events.append("end")
        return events


# ---------------------------------------------------------------- errors
class FatalBridgeError(Exception):
    """An error retrying cannot fix (bad key, unknown model, policy close): one line, exit 1."""


def _fatal_close(code: Any, reason: str) -> bool:
    """1007 (bad key, invalid argument) and 1008 (no credentials, unknown model, quota) are final,
    except the 1008 the service sends when a connection outlives its goAway: that one is resumable."""
    if code == 1008 and re.search(r"go ?away|session duration|deadline", reason, re.I):
        return False
    return code in FATAL_CLOSE_CODES


class SilentServer(Exception):
    """The server stopped answering pings while the connection stayed open."""


def describe_error(exc: BaseException, scrub: Callable[[str], str]) -> tuple[bool, str]:
    """(fatal, one line) for an exception from connecting, sending or receiving."""
    if isinstance(exc, SilentServer):
        return False, str(exc)
    from google.genai import errors as genai_errors
    import websockets.exceptions as wsx
    if isinstance(exc, genai_errors.APIError):
        code = exc.code
        reason = exc.message or (exc.details if isinstance(exc.details, str) else "") or exc.status or ""
        line = f"connection closed {code}" + (f": {reason}" if reason else "")
        return _fatal_close(code, str(reason)) or (isinstance(code, int) and code in FATAL_HTTP), scrub(line)
    if isinstance(exc, wsx.InvalidStatus):
        status = exc.response.status_code
        return status in FATAL_HTTP, scrub(f"the service refused the connection: HTTP {status}")
    if isinstance(exc, wsx.ConnectionClosed):
        rcvd = exc.rcvd
        code = rcvd.code if rcvd else 1006
        reason = rcvd.reason if rcvd else "no close frame"
        return _fatal_close(code, reason), scrub(f"connection closed {code}: {reason}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True, scrub(f"TLS certificate not trusted: {exc.verify_message}")
    if isinstance(exc, asyncio.TimeoutError):
        return False, "connection attempt timed out"
    if isinstance(exc, OSError):
        return False, scrub(f"cannot connect: {exc.strerror or exc}")
    return False, scrub(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- the bridge
class Link:
    """One websocket connection (one `live.connect`) and its receive task."""

    def __init__(self, number: int, session: Any, stack: contextlib.AsyncExitStack) -> None:
        self.number = number
        self.session = session
        self.stack = stack
        self.task: asyncio.Task | None = None
        self.watchdog: asyncio.Task | None = None
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        self.go_away_ms: int | None = None
        self.retired = False                    # replaced: whatever it still says is ignored
        self.opened = time.monotonic()
        # Client messages are numbered as the service counts them (setup = 0). Audio sent since the
        # state the latest resumption handle covers is kept, to be sent again on the next connection.
        self.sent_index = 0
        self.replay: deque[tuple[int, bytes | str, float]] = deque()
        self.replay_bytes = 0
        self.last_audio_sent = 0.0

    def next_index(self) -> int:
        self.sent_index += 1
        return self.sent_index

    def sent_audio(self, index: int, item: bytes | str, limit_bytes: int) -> None:
        now = time.monotonic()
        self.replay.append((index, item, now))
        if isinstance(item, bytes):
            self.replay_bytes += len(item)
            self.last_audio_sent = now
        while self.replay_bytes > limit_bytes and len(self.replay) > 1:
            self._pop()

    def covered(self, last_index: int | None) -> None:
        """A resumption handle now covers messages up to last_index (None: up to about now)."""
        horizon = time.monotonic() - 0.2   # without an index, keep what may still be in flight
        while self.replay and (self.replay[0][0] <= last_index if last_index is not None
                               else self.replay[0][2] < horizon):
            self._pop()

    def _pop(self) -> None:
        _, item, _ = self.replay.popleft()
        if isinstance(item, bytes):
            self.replay_bytes -= len(item)

    async def close(self, timeout: float = 1.0) -> None:
        for task in (self.task, self.watchdog):
            if task is not None and not task.done():
                task.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self.stack.aclose(), timeout)


class Bridge:
    def __init__(self, svc: Service, s: Settings, scrubber: KeyScrubber) -> None:
        self.svc, self.s, self.scrub = svc, s, scrubber.scrub
        self.link: Link | None = None
        self.link_ready = asyncio.Event()       # set while self.link takes input
        self.wake = asyncio.Event()             # supervisor: a link closed or got a goAway
        self.links_opened = 0
        self.handle: str | None = None
        self.handle_event = asyncio.Event()     # set on every new resumption handle
        self._gap_from = 0.0                    # last audio write on a replaced connection
        self._clients: dict[tuple[str, str], Any] = {}
        # input side
        self.normalizer = AudioNormalizer()
        self.audio_q: deque[bytes | str] = deque()   # PCM chunks, and ACTIVITY_* markers with --vad off
        self.audio_q_bytes = 0
        self.audio_event = asyncio.Event()
        self.speech = SpeechMarker(s.vad_silence_ms or 800) if not s.vad else None
        self.frame: Message | None = None
        self.frame_event = asyncio.Event()
        self.last_frame_sent = 0.0
        self.events_q: deque[tuple[str, Callable[[Any], Awaitable[None]]]] = deque()
        self.events_event = asyncio.Event()
        self.pending_tools: dict[str, tuple[str, asyncio.TimerHandle]] = {}
        # output side
        self.turn = 0
        self.turn_open = False
        self.turn_interrupted = False
        self.complete_owed = 0                  # turn an expected turnComplete belongs to
        self.turn_done = asyncio.Event()
        self.go_away_at = 0.0
        self.totals = {"prompt_tokens": 0, "response_tokens": 0, "total_tokens": 0}
        for k in ("audio_in_chunks", "audio_in_sent_ms", "audio_in_converted", "audio_in_rejected",
                  "audio_in_dropped_ms", "audio_buffered_ms", "audio_out_chunks", "audio_out_ms",
                  "audio_out_dropped_interrupted", "video_frames_sent", "video_frames_skipped",
                  "video_frames_rejected", "text_sent", "tool_calls", "tool_results", "tool_timeouts",
                  "tool_results_unknown", "turns", "interrupts", "connections", "reconnects", "go_aways",
                  "resumption_handles", "silent_server_detected"):
            svc.metrics[k] = 0
        svc.metrics["server_ping_ms"] = None
        svc.metrics["backend"] = s.backend
        svc.metrics["state"] = "connecting"

    # ------------------------------------------------------------ bus inputs
    def on_audio(self, msg: Message) -> None:
        try:
            pcm = self.normalizer.convert(msg)
        except Exception as exc:
            self.svc.metrics["audio_in_rejected"] += 1
            self.svc.ratelog.warning("audio-reject", f"rejected an audio.in chunk ({msg['rate']} Hz, "
                                     f"{msg['channels']} ch, {msg['sample_width']} B): {exc}")
            return
        if pcm is not msg.payload:
            self.svc.metrics["audio_in_converted"] += 1
            self.svc.ratelog.warning("audio-convert", f"converting audio.in from {msg['rate']} Hz, "
                                     f"{msg['channels']} ch, {msg['sample_width']} B to 16 kHz mono s16")
        if not pcm:
            return
        starts = ends = False
        if self.speech is not None:
            events = self.speech.feed(pcm)
            starts, ends = "start" in events, events[-1:] == ["end"]
        if starts:
            self._enqueue_audio(ACTIVITY_START)   # markers keep their place between the chunks
        self._enqueue_audio(pcm)
        if ends:
            self._enqueue_audio(ACTIVITY_END)

    def _enqueue_audio(self, pcm: bytes | str) -> None:
        self.audio_q.append(pcm)
        self.audio_q_bytes += len(pcm) if isinstance(pcm, bytes) else 0
        limit = int(self.s.buffer_seconds * BYTES_PER_SECOND_IN)
        while self.audio_q_bytes > limit and len(self.audio_q) > 1:
            old = self.audio_q.popleft()
            if isinstance(old, bytes):
                self.audio_q_bytes -= len(old)
                self.svc.metrics["audio_in_dropped_ms"] += len(old) * 1000 // BYTES_PER_SECOND_IN
            self.svc.ratelog.warning("audio-drop", f"audio.in buffer over {self.s.buffer_seconds:g} s while "
                                     "the model is unreachable: dropping the oldest audio")
        self.svc.metrics["audio_buffered_ms"] = self.audio_q_bytes * 1000 // BYTES_PER_SECOND_IN
        self.audio_event.set()

    def on_video(self, msg: Message) -> None:
        if self.frame is not None:
            self.svc.metrics["video_frames_skipped"] += 1   # replaced before it could be sent
        self.frame = msg
        self.frame_event.set()

    def on_text(self, msg: Message) -> None:
        text = msg["text"]
        if not text.strip():
            return
        if self.s.text_mode == "content":
            from google.genai import types
            content = types.Content(role="user", parts=[types.Part(text=text)])
            self._enqueue_event("text", lambda ses: ses.send_client_content(turns=content, turn_complete=True))
        else:
            self._enqueue_event("text", lambda ses: ses.send_realtime_input(text=text))

    def on_tool_result(self, msg: Message) -> None:
        call_id = msg["id"]
        pending = self.pending_tools.pop(call_id, None)
        if pending is None:
            self.svc.metrics["tool_results_unknown"] += 1
            self.svc.ratelog.warning("tool-unknown", f"tool.result for call {call_id!r} that is not pending "
                                     "(answered, timed out or cancelled): ignored")
            return
        name, timer = pending
        timer.cancel()
        self.svc.metrics["tool_results"] += 1
        self._send_tool_response(call_id, msg["name"] or name, msg["response"])

    def _send_tool_response(self, call_id: str, name: str, response: dict[str, Any]) -> None:
        from google.genai import types
        fr = types.FunctionResponse(id=call_id, name=name, response=response)
        self._enqueue_event("tool", lambda ses: ses.send_tool_response(function_responses=[fr]))

    def _enqueue_event(self, what: str, send: Callable[[Any], Awaitable[None]]) -> None:
        self.events_q.append((what, send))
        self.events_event.set()

    # ------------------------------------------------------------ senders
    async def _usable_link(self) -> Link:
        while True:
            await self.link_ready.wait()
            link = self.link
            if link is not None and not link.closed.is_set():
                return link
            self.link_ready.clear()

    def _send_failed(self, link: Link, exc: BaseException) -> None:
        """A send hit a closed connection: stop sending until the supervisor replaces the link."""
        if self.link is link:
            self.link_ready.clear()
        if link.error is None:
            link.error = exc
        self.svc.ratelog.warning("send-fail", f"send failed on connection {link.number}: "
                                 f"{describe_error(exc, self.scrub)[1]}")

    async def audio_sender(self) -> None:
        from google.genai import types
        while True:
            await self.audio_event.wait()
            link = await self._usable_link()
            while self.audio_q and self.link is link and self.link_ready.is_set():
                chunk = self.audio_q[0]
                index = link.next_index()   # no await before the SDK writes the frame: order is exact
                try:
                    if chunk == ACTIVITY_START:
                        await link.session.send_realtime_input(activity_start=types.ActivityStart())
                    elif chunk == ACTIVITY_END:
                        await link.session.send_realtime_input(activity_end=types.ActivityEnd())
                    else:
                        await link.session.send_realtime_input(audio=types.Blob(data=chunk, mime_type=MODEL_MIME))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the chunk stays queued for the next connection
                    self._send_failed(link, exc)
                    break
                if self.audio_q and self.audio_q[0] is chunk:
                    self.audio_q.popleft()
                    if isinstance(chunk, bytes):
                        self.audio_q_bytes -= len(chunk)
                link.sent_audio(index, chunk, int(self.s.buffer_seconds * BYTES_PER_SECOND_IN))
                if self._gap_from and isinstance(chunk, bytes):
                    gap = round((time.monotonic() - self._gap_from) * 1000, 1)
                    self._gap_from = 0.0
                    self.svc.metrics["switch_audio_gap_ms"] = gap
                    self.svc.metrics["switch_audio_gap_ms_max"] = max(gap, self.svc.metrics.get("switch_audio_gap_ms_max", 0))
                    log.info("audio to the model resumed on connection %d: %.1f ms after the last write "
                             "to the previous one", link.number, gap)
                if isinstance(chunk, bytes):
                    self.svc.metrics["audio_in_chunks"] += 1
                    self.svc.metrics["audio_in_sent_ms"] += len(chunk) * 1000 // BYTES_PER_SECOND_IN
            self.svc.metrics["audio_buffered_ms"] = self.audio_q_bytes * 1000 // BYTES_PER_SECOND_IN
            if not self.audio_q:
                self.audio_event.clear()

    async def video_sender(self) -> None:
        from google.genai import types
        interval = 1.0 / self.s.video_fps
        while True:
            await self.frame_event.wait()
            wait = self.last_frame_sent + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)   # newer frames replace this one meanwhile
            link = await self._usable_link()
            msg, self.frame = self.frame, None
            self.frame_event.clear()
            if msg is None:
                continue
            try:
                # Decoding proves the JPEG is whole; off the loop so audio never waits for it.
                data, w, h = await asyncio.to_thread(prepare_frame, msg.payload or b"", msg["mime"],
                                                     self.s.video_max_side)
            except Exception as exc:
                self.svc.metrics["video_frames_rejected"] += 1
                self.svc.ratelog.warning("video-reject", f"rejected a video.in frame: {exc}")
                continue
            try:
                link.next_index()
                await link.session.send_realtime_input(video=types.Blob(data=data, mime_type="image/jpeg"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._send_failed(link, exc)
                if self.frame is None:    # keep it for the next connection unless a newer one came
                    self.frame = msg
                    self.frame_event.set()
                continue
            self.last_frame_sent = time.monotonic()
            self.svc.metrics["video_frames_sent"] += 1
            self.svc.metrics["video_last_size"] = f"{w}x{h}"

    async def events_sender(self) -> None:
        while True:
            await self.events_event.wait()
            if not self.events_q:
                self.events_event.clear()
                continue
            what, send = self.events_q[0]
            link = self.link
            if what != "tool" or link is None or link.closed.is_set() or link.retired:
                # Text is user input: it waits for the next connection like audio. A tool response
                # goes on the open connection even during a goAway hold: that connection's model is
                # waiting for it to finish the turn we are letting it finish.
                link = await self._usable_link()
            try:
                link.next_index()
                await send(link.session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._send_failed(link, exc)
                await asyncio.sleep(0.05)   # until the receive loop sees the close
                continue
            self.events_q.popleft()
            if what == "text":
                self.svc.metrics["text_sent"] += 1

    # ------------------------------------------------------------ receiving
    def _open_turn(self) -> int:
        if not self.turn_open:
            self.turn += 1
            self.turn_open, self.turn_interrupted = True, False
            self.complete_owed = 0
            self.turn_done.clear()
            self.svc.metrics["turns"] = self.turn
        return self.turn

    def _close_turn(self) -> None:
        self.turn_open = False
        self.turn_done.set()

    def on_server_message(self, link: Link, msg: Any) -> None:
        if link.retired:
            return   # replaced: its state is resumed elsewhere, its output would duplicate
        svc = self.svc
        sc = msg.server_content
        # Interrupt first: nothing of that turn may be published after it.
        if sc is not None and sc.interrupted:
            if self.turn:
                turn = self.turn
                if not self.turn_interrupted:
                    svc.publish_interrupt(turn, "barge-in")
                    svc.metrics["interrupts"] += 1
                self.turn_interrupted = True
                if not self.turn_open:
                    # Generation had ended (playback may still be playing it): the turnComplete
                    # that follows belongs to this turn, not to a new one.
                    self.complete_owed = turn
        upd = msg.session_resumption_update
        if upd is not None and upd.resumable and upd.new_handle:
            self.handle = upd.new_handle
            link.covered(upd.last_consumed_client_message_index)
            svc.metrics["resumption_handles"] += 1
            self.handle_event.set()
        if msg.go_away is not None and link is self.link and link.go_away_ms is None:
            link.go_away_ms = parse_duration_ms(msg.go_away.time_left)
            self.go_away_at = time.monotonic()
            svc.metrics["go_aways"] += 1
            svc.publish("control", "go_away", time_left_ms=link.go_away_ms)
            log.info("goAway on connection %d (%d ms left): opening the next one", link.number, link.go_away_ms)
            self.link_ready.clear()      # hold audio.in until the next connection is up
            self.wake.set()
        if msg.tool_call is not None:
            for fc in msg.tool_call.function_calls or []:
                self._on_tool_call(fc)
        if msg.tool_call_cancellation is not None:
            ids = [i for i in (msg.tool_call_cancellation.ids or []) if isinstance(i, str)]
            for i in ids:
                pending = self.pending_tools.pop(i, None)
                if pending:
                    pending[1].cancel()
            svc.publish("tool.call", "cancel", ids=ids)
        if sc is None:
            if msg.usage_metadata is not None:
                self._usage(msg.usage_metadata)
            return
        if sc.input_transcription is not None and sc.input_transcription.text:
            # The user's words carry the id of the model turn that answers them.
            turn = self.turn if (self.turn_open and not self.turn_interrupted) else self.turn + 1
            fields = {"final": True} if sc.input_transcription.finished else {}
            svc.publish("transcript", "transcript", role="user", text=sc.input_transcription.text, turn=turn, **fields)
        if sc.model_turn is not None and sc.model_turn.parts:
            for part in sc.model_turn.parts:
                blob = part.inline_data
                if blob is not None and blob.data and (blob.mime_type or "").startswith("audio/"):
                    self._model_audio(blob.data, blob.mime_type or "")
                elif part.text and not part.thought:
                    turn = self._open_turn()
                    if not self.turn_interrupted:
                        svc.publish("transcript", "transcript", role="model", text=part.text, turn=turn)
        if sc.output_transcription is not None and sc.output_transcription.text:
            if not (self.turn_open and self.turn_interrupted):
                turn = self._open_turn()
                fields = {"final": True} if sc.output_transcription.finished else {}
                svc.publish("transcript", "transcript", role="model", text=sc.output_transcription.text,
                            turn=turn, **fields)
        if sc.generation_complete:
            svc.publish("control", "generation_complete", turn=self._open_turn())
        if sc.turn_complete:
            if not self.turn_open and self.complete_owed:
                turn = self.complete_owed
            else:
                turn = self._open_turn()
            self.complete_owed = 0
            fields = {}
            if msg.usage_metadata is not None:
                fields["usage"] = self._usage(msg.usage_metadata)
            svc.publish("control", "turn_complete", turn=turn, **fields)
            self._close_turn()
        elif msg.usage_metadata is not None:
            self._usage(msg.usage_metadata)

    def _model_audio(self, data: bytes, mime: str) -> None:
        m = re.search(r"rate=(\d+)", mime)
        rate = int(m.group(1)) if m else 24000
        turn = self._open_turn()
        if self.turn_interrupted:
            self.svc.metrics["audio_out_dropped_interrupted"] += 1
            return
        if len(data) % 2:
            data = data[:-1]   # a torn sample would shift every later one
        frames = len(data) // 2
        if self.svc.publish("audio.out", "audio", data, rate=rate, channels=1, sample_width=2, frames=frames,
                            turn=turn):
            self.svc.metrics["audio_out_chunks"] += 1
            self.svc.metrics["audio_out_ms"] += frames * 1000 // rate

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

    def _on_tool_call(self, fc: Any) -> None:
        call_id = fc.id or f"call-{time.monotonic_ns()}"
        name = fc.name or ""
        self._open_turn()   # a tool call is part of the model turn it answers
        args = fc.args if isinstance(fc.args, dict) else {}
        self.svc.metrics["tool_calls"] += 1
        if not self.svc.has_subscriber("tool.call"):
            log.warning("tool call %s(%s): no process subscribes to tool.call: answering with an error", name, call_id)
            self._send_tool_response(call_id, name, {"error": "no tool handler is running"})
            return
        try:
            self.svc.publish("tool.call", "call", id=call_id, name=name, args=args)
        except Exception as exc:   # args that msgpack cannot carry
            self._send_tool_response(call_id, name, {"error": f"arguments not transportable: {exc}"})
            return
        timer = asyncio.get_running_loop().call_later(self.s.tool_timeout, self._tool_timed_out, call_id)
        self.pending_tools[call_id] = (name, timer)

    def _tool_timed_out(self, call_id: str) -> None:
        pending = self.pending_tools.pop(call_id, None)
        if pending is None:
            return
        self.svc.metrics["tool_timeouts"] += 1
        log.warning("tool call %s(%s): no tool.result within %g s: answering with an error",
                    pending[0], call_id, self.s.tool_timeout)
        self._send_tool_response(call_id, pending[0], {"error": f"no result within {self.s.tool_timeout:g} s"})

    async def _watch_server(self, link: Link) -> None:
        """Detect a server that stops answering without closing the connection.

        The SDK's websocket pings every 20 s and gives up 20 s later, so a stalled server went
        unnoticed for up to 40 s while the audio written to it was lost. A ping every third of
        --silent-server-s, each awaited for its pong, bounds that: past the bound the connection
        is ended, the supervisor reconnects with the resumption handle and resends the audio the
        handle does not cover."""
        ws = getattr(link.session, "_ws", None)   # the SDK's websocket: it has no public accessor
        if ws is None or not hasattr(ws, "ping"):
            log.info("this google-genai version hides its websocket: a silent server is noticed only by the SDK")
            return
        period = min(2.0, self.s.silent_server / 3)
        while not link.closed.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.closed.wait(), period)
                return
            t0 = time.monotonic()
            try:
                # ping() itself can block once a dead peer's socket buffers are full: bound both steps
                async def ping_and_pong() -> None:
                    await (await ws.ping())
                await asyncio.wait_for(ping_and_pong(), self.s.silent_server)
            except asyncio.TimeoutError:
                if link.closed.is_set() or link.retired:
                    return
                self.svc.metrics["silent_server_detected"] += 1
                link.error = SilentServer(f"the server answered no ping for {self.s.silent_server:g} s")
                if link.task is not None:
                    link.task.cancel()   # its finally marks the link closed and wakes the supervisor
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                return   # the connection is closing: the receive loop reports why
            self.svc.metrics["server_ping_ms"] = round((time.monotonic() - t0) * 1000, 1)

    async def _receive_loop(self, link: Link) -> None:
        try:
            while True:
                # receive() ends at every turnComplete: one loop for the connection's whole life.
                async for msg in link.session.receive():
                    self.on_server_message(link, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if link.error is None or not isinstance(link.error, type(exc)):
                link.error = exc
        finally:
            link.closed.set()
            if self.link is link:
                self.link_ready.clear()
                self.wake.set()
            if link.retired:
                self.turn_done.set()

    # ------------------------------------------------------------ connections
    def publish_state(self, state: str, detail: str = "") -> None:
        self.svc.metrics["state"] = state
        fields = {"detail": self.scrub(detail)} if detail else {}
        self.svc.publish("control", "session", state=state, backend=self.s.backend, **fields)

    async def _emulator_address(self) -> tuple[str, str]:
        path = self.s.state_dir / "emulator" / "emulator.json"
        t0 = time.monotonic()
        next_log = 0.0
        while True:
            try:
                info = json.loads(path.read_text())
                url, ca = info["url"], info["ca_file"]
                if isinstance(url, str) and isinstance(ca, str) and Path(ca).is_file():
                    return url, ca
            except (OSError, ValueError, KeyError, TypeError):
                pass   # not there yet, or being written
            waited = time.monotonic() - t0
            if waited >= self.s.emulator_wait:
                raise FatalBridgeError(f"no emulator: {path} did not appear within {self.s.emulator_wait:g} s "
                                       "(start `livepipe emulator`, or set GEMINI_API_KEY for the real service)")
            if waited >= next_log:
                log.info("waiting for the emulator (%s)", path)
                self.publish_state("connecting", "waiting for the emulator")
                next_log = waited + 5.0
            await asyncio.sleep(0.1)

    async def _client(self) -> Any:
        from google import genai
        from google.genai import types
        if self.s.backend == "emulator":
            url, ca = await self._emulator_address()
        else:
            url, ca = "", ""
        key = (url, ca)
        client = self._clients.get(key)
        if client is None:
            if url:
                ctx = ssl.create_default_context(cafile=ca)
                opts = types.HttpOptions(base_url=url, async_client_args={"ssl": ctx})
                client = genai.Client(api_key=self.s.api_key, http_options=opts)
            else:
                client = genai.Client(api_key=self.s.api_key)
            self._clients = {key: client}   # an emulator restart may move it: keep only the current one
        return client

    async def _open_link(self) -> Link:
        client = await self._client()
        stack = contextlib.AsyncExitStack()
        try:
            cm = client.aio.live.connect(model=self.s.model, config=live_config(self.s, self.handle))
            session = await asyncio.wait_for(stack.enter_async_context(cm), self.s.connect_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stack.aclose(), 1.0)
            raise
        self.links_opened += 1
        link = Link(self.links_opened, session, stack)
        link.task = asyncio.create_task(self._receive_loop(link))
        link.watchdog = asyncio.create_task(self._watch_server(link))
        self.svc.metrics["connections"] = self.links_opened
        return link

    async def _connect(self, why: str) -> Link:
        """Open a connection (resuming when we hold a handle), retrying transient failures with backoff."""
        delay = 0.2
        fresh_retry_used = False
        while True:
            resuming = self.handle is not None
            self.publish_state("resuming" if resuming else "connecting", why)
            try:
                link = await self._open_link()
            except asyncio.CancelledError:
                raise
            except FatalBridgeError:
                raise
            except Exception as exc:
                fatal, line = describe_error(exc, self.scrub)
                refused = getattr(exc, "code", None) in FATAL_CLOSE_CODES   # closed during setup
                if (fatal or refused) and resuming and not fresh_retry_used:
                    # An expired or foreign handle is refused like a bad argument: try once without it.
                    log.warning("resuming was refused (%s): starting a fresh session, the context is lost", line)
                    self.handle, fresh_retry_used = None, True
                    continue
                if fatal:
                    raise FatalBridgeError(line) from None
                log.warning("connection failed (%s): retrying in %.1f s", line, delay)
                self.publish_state("reconnecting", line)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.s.reconnect_max)
                why = f"retry after: {line}"
                continue
            log.info("connected (connection %d, %s, %s%s)", link.number, self.s.backend, self.s.model,
                     ", resumed" if resuming else "")
            self.publish_state("connected", f"connection {link.number}" + (" (resumed)" if resuming else ""))
            return link

    def _install(self, link: Link) -> None:
        self.link = link
        self.link_ready.set()
        self.audio_event.set()     # flush what was held
        self.events_event.set()

    def _end_cut_turn(self) -> None:
        """A model turn the old connection will not finish: close it for the bus."""
        if self.turn_open:
            self.svc.publish("control", "turn_complete", turn=self.turn)
            self._close_turn()

    async def _finish_turn_on(self, old: Link, budget: float) -> None:
        """goAway while the model speaks: let that turn end (and its handle arrive) on the old
        connection, so the next one resumes after it instead of answering the same words again."""
        if not self.turn_open or old.closed.is_set():
            return
        t0 = time.monotonic()
        self.handle_event.clear()
        closed = asyncio.create_task(old.closed.wait())
        done = asyncio.create_task(self.turn_done.wait())
        try:
            await asyncio.wait({closed, done}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            if done.done() and not old.closed.is_set():
                # The handle covering the finished turn follows its turnComplete.
                left = max(0.1, min(0.5, budget - (time.monotonic() - t0)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.handle_event.wait(), left)
        finally:
            closed.cancel()
            done.cancel()

    def _replay_from(self, old: Link) -> None:
        """Queue again, ahead of what was held, the audio the resumed state does not cover."""
        items = [item for _, item, _ in old.replay]
        old.replay.clear()
        if not items:
            return
        replayed = sum(len(i) for i in items if isinstance(i, bytes))
        self.audio_q.extendleft(reversed(items))
        self.audio_q_bytes += replayed
        self.svc.metrics["audio_in_replayed_ms"] = (self.svc.metrics.get("audio_in_replayed_ms", 0)
                                                    + replayed * 1000 // BYTES_PER_SECOND_IN)
        log.info("sending again %d ms of audio the resumed session has not heard",
                 replayed * 1000 // BYTES_PER_SECOND_IN)

    async def _replace(self, old: Link, why: str) -> None:
        old.retired = True
        self._end_cut_turn()
        new = await self._connect(why)
        self._replay_from(old)
        self._install(new)
        asyncio.create_task(old.close())
        if old.last_audio_sent:
            # Wall time between the last audio written to the old connection and the first to the
            # new one (the new one's first write happens once the sender runs: measured there).
            self._gap_from = old.last_audio_sent

    async def supervise(self) -> None:
        self._install(await self._connect("starting"))
        while True:
            await self.wake.wait()
            self.wake.clear()
            link = self.link
            assert link is not None
            if link.closed.is_set():
                fatal, line = describe_error(link.error or ConnectionError("closed"), self.scrub)
                if fatal:
                    raise FatalBridgeError(line)
                self.svc.metrics["reconnects"] += 1
                log.warning("connection %d lost (%s): reconnecting%s", link.number, line,
                            " with the resumption handle" if self.handle else "")
                self.publish_state("reconnecting", line)
                await self._replace(link, f"after: {line}")
            elif link.go_away_ms is not None and not link.retired:
                t0 = self.go_away_at
                budget = max(0.5, min(5.0, link.go_away_ms / 1000 - 1.0))
                await self._finish_turn_on(link, budget)
                waited_ms = (time.monotonic() - t0) * 1000
                if not self.handle:
                    log.warning("goAway without a resumption handle: the next connection starts a fresh session")
                await self._replace(link, f"goAway, {link.go_away_ms} ms left")
                self.svc.metrics["switchover_ms"] = round((time.monotonic() - t0) * 1000, 1)
                log.info("switched to connection %d %.0f ms after the goAway (%.0f ms of it letting the "
                         "model finish its turn)", self.link.number, self.svc.metrics["switchover_ms"], waited_ms)

    async def run(self) -> None:
        tasks = [asyncio.create_task(t()) for t in (self.audio_sender, self.video_sender, self.events_sender)]
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        bus_cfg = BusConfig.from_args(args)
    except ConfigError as exc:
        print(f"{NAME}: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(NAME)
    scrubber = install_scrubber(settings.api_key)
    try:
        live_config(settings, None)   # the SDK's own validation, before anything connects
    except Exception as exc:
        print(f"{NAME}: error: invalid session configuration: {scrubber.scrub(str(exc)).splitlines()[0]}",
              file=sys.stderr)
        return 2
    svc = Service(NAME, bus_cfg, log)
    bridge = Bridge(svc, settings, scrubber)
    svc.on("audio.in", bridge.on_audio)
    svc.on("video.in", bridge.on_video)
    svc.on("text.in", bridge.on_text)
    svc.on("tool.result", bridge.on_tool_result)
    log.info("backend %s, model %s", settings.backend, settings.model)

    async def run(_: Service) -> None:
        await bridge.run()

    return svc.main(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
