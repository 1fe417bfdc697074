"""Settings of the bridge: flags and environment, validated in one place, and the LiveConnectConfig they make."""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livepipe.bus.config import ConfigError, add_bus_arguments
from livepipe.services.lib.settings import choice as _choice, env as _env, number as _number, state_dir, switch as _switch
from livepipe.services.lib.verb import VerbParser
from livepipe.services.processes.gemini_bridge.live_options import (LiveOptions, add_live_arguments,
                                                                    extend_live_config, live_options_from_args)

NAME = "gemini-bridge"


# What Google's Live API examples use today; `--model` picks another (e.g. the 2.5 generation's
# gemini-2.5-flash-native-audio-preview-12-2025, which has non-blocking tools, affective dialog and
# proactive audio that 3.1 does not have yet).
DEFAULT_MODEL = "gemini-3.1-flash-live-preview"


# The emulator ignores the key unless started with --api-key; the SDK refuses to connect without one.
EMULATOR_PLACEHOLDER_KEY = "livepipe-emulator-placeholder-key"


MODEL_RATE = 16000                      # what the Live API takes: 16 kHz mono s16le


MODEL_MIME = f"audio/pcm;rate={MODEL_RATE}"


BYTES_PER_SECOND_IN = MODEL_RATE * 2


ACTIVITY_START, ACTIVITY_END = "activity_start", "activity_end"   # queue markers (--vad off)


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
    live: LiveOptions = field(default_factory=LiveOptions)


def build_parser() -> argparse.ArgumentParser:
    p = VerbParser(
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
    add_live_arguments(p)
    add_bus_arguments(p)
    return p


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
    s.state_dir = Path(environ["LIVEPIPE_STATE_DIR"]).expanduser() if environ.get("LIVEPIPE_STATE_DIR") else state_dir()
    s.live = live_options_from_args(args, s)
    return s


def live_config(s: Settings, handle: str | None, seeding: bool = False) -> Any:
    """The LiveConnectConfig for one connection (`handle`: resume that session; `seeding`: a new one
    will be sent history first)."""
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
    extend_live_config(cfg, s, handle, seeding)
    return types.LiveConnectConfig.model_validate(cfg)

