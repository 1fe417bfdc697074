"""The Live API's newer parts (issue 16): options checked against the model's generation before
connecting, and what they add to the LiveConnectConfig.

3.x models (gemini-3.1-flash-live-preview) take client content only as the initial history, set
thinking by level, and do not support affective dialog, proactive audio, URL context or code
execution yet; 2.5 native-audio models set thinking by budget. A setting the chosen model refuses is
one line here, before connecting, instead of a 1007 close mid-conversation."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from livepipe.bus.config import ConfigError
from livepipe.services.lib.conversation import load_history

if TYPE_CHECKING:
    from livepipe.services.processes.gemini_bridge.settings import Settings


def _helpers() -> Any:
    # settings.py imports this module: take its helpers when called, not at import time
    from livepipe.services.processes.gemini_bridge import settings
    return settings


THINKING_LEVELS = ("minimal", "low", "medium", "high")
SCHEDULINGS = ("INTERRUPT", "WHEN_IDLE", "SILENT")
BUILTIN_TOOLS = ("google_search", "url_context", "code_execution")
# What a user turn includes: 2.5 defaults to activity only, 3.x to audio activity plus every video frame.
TURN_COVERAGES = {"activity": "TURN_INCLUDES_ONLY_ACTIVITY", "all": "TURN_INCLUDES_ALL_INPUT",
                  "activity-and-video": "TURN_INCLUDES_AUDIO_ACTIVITY_AND_ALL_VIDEO"}
# Google documents up to 1,000 custom vocabulary terms (best results with about 100).
VOCABULARY_MAX = 1000
# google-genai before 2.15 refuses AudioTranscriptionConfig.language_codes with a Gemini API key
# (ValueError at connect: "only supported in ... Agent Platform mode"); 2.15 sends it to both.
LANGUAGE_CODES_SDK = (2, 15)
STREAM_END_MARK = "audio_stream_end"    # audio queue marker: the user's stream paused (mute, silence)


def model_generation(model: str) -> int:
    """gemini-3.1-flash-live-preview -> 3; a name without a generation counts as 2 (2.5)."""
    m = re.search(r"gemini-(\d+)(?:\.\d+)?-", model)
    return int(m.group(1)) if m else 2


@dataclass
class LiveOptions:
    history: list[dict[str, Any]] | None = None   # [{"role": "user"|"model", "parts": [{"text": ...}]}]
    history_turns: int = 20                      # latest turns of the conversation a fresh session is seeded with
    thinking_level: str | None = None
    thinking_budget: int | None = None
    include_thoughts: bool = False
    affective_dialog: bool = False
    proactive_audio: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_output_tokens: int | None = None
    seed: int | None = None
    builtin_tools: tuple[str, ...] = ()
    transcription_languages: tuple[str, ...] = ()
    transcription_vocabulary: tuple[str, ...] = ()
    stream_end_after: float = 1.0
    context_update: str = "live"                 # live (send_context_update) | reconnect
    turn_coverage: str | None = None             # TURN_COVERAGES key

    @property
    def api_version(self) -> str | None:
        # The docs put affective dialog and proactive audio on v1alpha only.
        return "v1alpha" if self.affective_dialog or self.proactive_audio else None


def add_live_arguments(p: argparse.ArgumentParser) -> None:
    _env = _helpers()._env
    g = p.add_argument_group("newer Live API features")
    g.add_argument("--history", default=_env("LIVEPIPE_HISTORY"), metavar="FILE",
                   help="JSON list of earlier turns [{\"role\": \"user\"|\"model\", \"text\": \"...\"}] seeded into a new "
                        "session at connect (3.x: historyConfig + client content; 2.5: client content) (env LIVEPIPE_HISTORY)")
    g.add_argument("--history-turns", default=_env("LIVEPIPE_HISTORY_TURNS", "20"), metavar="N",
                   help="a fresh session (its resumption refused: service or emulator restarted, handle expired) is "
                        "seeded with the latest N turns of the conversation so far (at most 8000 characters) after "
                        "--history; 0 = it starts without them (env LIVEPIPE_HISTORY_TURNS, default 20)")
    g.add_argument("--thinking-level", default=_env("LIVEPIPE_THINKING_LEVEL"),
                   help="3.x models: minimal | low | medium | high (env LIVEPIPE_THINKING_LEVEL, default: the model's, minimal)")
    g.add_argument("--thinking-budget", default=_env("LIVEPIPE_THINKING_BUDGET"), metavar="TOKENS",
                   help="2.5 models: thinking tokens, 0 = off, -1 = dynamic (env LIVEPIPE_THINKING_BUDGET)")
    g.add_argument("--include-thoughts", default=_env("LIVEPIPE_INCLUDE_THOUGHTS", "off"),
                   help="on | off: publish the model's thought summaries as transcript kind thought, never spoken "
                        "(env LIVEPIPE_INCLUDE_THOUGHTS, default off)")
    g.add_argument("--affective-dialog", default=_env("LIVEPIPE_AFFECTIVE_DIALOG", "off"),
                   help="on | off: 2.5 native audio adapts to the user's tone; uses API v1alpha "
                        "(env LIVEPIPE_AFFECTIVE_DIALOG, default off)")
    g.add_argument("--proactive-audio", default=_env("LIVEPIPE_PROACTIVE_AUDIO", "off"),
                   help="on | off: 2.5 native audio may stay silent when not addressed; uses API v1alpha "
                        "(env LIVEPIPE_PROACTIVE_AUDIO, default off)")
    g.add_argument("--temperature", default=_env("LIVEPIPE_TEMPERATURE"), help="0..2 (env LIVEPIPE_TEMPERATURE)")
    g.add_argument("--top-p", default=_env("LIVEPIPE_TOP_P"), help="0..1 (env LIVEPIPE_TOP_P)")
    g.add_argument("--top-k", default=_env("LIVEPIPE_TOP_K"), help="1..1000 (env LIVEPIPE_TOP_K)")
    g.add_argument("--max-output-tokens", default=_env("LIVEPIPE_MAX_OUTPUT_TOKENS"), metavar="N",
                   help="most tokens a reply may use (env LIVEPIPE_MAX_OUTPUT_TOKENS)")
    g.add_argument("--seed", default=_env("LIVEPIPE_SEED"), help="sampling seed (env LIVEPIPE_SEED)")
    g.add_argument("--builtin-tools", default=_env("LIVEPIPE_BUILTIN_TOOLS"), metavar="LIST",
                   help="comma list of google_search, url_context, code_execution; what they return is published on "
                        "topic grounding (env LIVEPIPE_BUILTIN_TOOLS)")
    g.add_argument("--transcription-languages", default=_env("LIVEPIPE_TRANSCRIPTION_LANGUAGES"), metavar="CODES",
                   help="comma list of language codes for the input transcription, e.g. en-US,fr-FR "
                        "(env LIVEPIPE_TRANSCRIPTION_LANGUAGES)")
    g.add_argument("--transcription-vocabulary", default=_env("LIVEPIPE_TRANSCRIPTION_VOCABULARY"), metavar="LIST",
                   help="words and phrases the input transcription should recognise and spell as given (names, "
                        "jargon): a comma list, or @FILE with one per line; sets inputAudioTranscription."
                        "customVocabulary, google-genai >= 2.13 (env LIVEPIPE_TRANSCRIPTION_VOCABULARY)")
    g.add_argument("--context-update", default=_env("LIVEPIPE_CONTEXT_UPDATE", "live"),
                   help="how a control context_update (new system instruction / tools) is applied: live "
                        "(send_context_update on the open session) | reconnect (resume on a new connection "
                        "with the handle) (env LIVEPIPE_CONTEXT_UPDATE, default live; reconnect when the "
                        "installed google-genai has no send_context_update)")
    g.add_argument("--turn-coverage", default=_env("LIVEPIPE_TURN_COVERAGE"),
                   help="what a user turn includes: activity | all | activity-and-video (env LIVEPIPE_TURN_COVERAGE, "
                        "default: the model's; 3.x counts every video frame, 2.5 only input during speech)")
    g.add_argument("--stream-end-after", default=_env("LIVEPIPE_STREAM_END_AFTER", "1"), metavar="S",
                   help="audio.in paused this long (or control mute) sends audio_stream_end so the service's VAD "
                        "closes the turn; 0 = only on mute (env LIVEPIPE_STREAM_END_AFTER, default 1)")


def _sdk_has(model: str, field_name: str) -> bool:
    from google.genai import types   # only when the option is used: --help stays fast
    return field_name in getattr(types, model).model_fields


def _sdk_version() -> tuple[int, ...]:
    import google.genai
    return tuple(int(n) for n in re.findall(r"\d+", google.genai.__version__)[:2])


def load_vocabulary(value: str) -> tuple[str, ...]:
    """Terms from "a,b,c" or from @FILE (one per line; blank lines and # comments skipped), in order, once each."""
    where = f"--transcription-vocabulary {value if len(value) <= 60 else value[:57] + '...'}"
    if value.startswith("@"):
        try:
            lines = Path(value[1:]).expanduser().read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise ConfigError(f"{where}: no such file (env LIVEPIPE_TRANSCRIPTION_VOCABULARY)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({exc})") from None
        terms = [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    else:
        terms = [t.strip() for t in value.split(",") if t.strip()]
    terms = list(dict.fromkeys(terms))
    if not terms:
        raise ConfigError(f"{where}: no terms; give a comma list like \"Ilsenmoor,Wrenholt\" or @FILE with one per line")
    if len(terms) > VOCABULARY_MAX:
        raise ConfigError(f"{where}: {len(terms)} terms; the service takes at most {VOCABULARY_MAX} "
                          "(Google advises about 100)")
    return tuple(terms)


def live_options_from_args(args: argparse.Namespace, s: Settings) -> LiveOptions:
    """The newer options, checked against what the chosen model's generation accepts, so a setting it
    refuses is one line before connecting instead of a 1007 close mid-conversation."""
    h = _helpers()
    _choice, _number, _switch = h._choice, h._number, h._switch
    o = LiveOptions()
    gen = model_generation(s.model)
    model = f"--model {s.model}"
    if args.history:
        o.history = load_history(args.history, f"--history {args.history}", "LIVEPIPE_HISTORY")
        if gen >= 3 and not _sdk_has("LiveConnectConfig", "history_config"):
            raise ConfigError(f"--history with {s.model} needs a google-genai with LiveConnectConfig.history_config: "
                              "pip install -U google-genai")
    o.history_turns = _number("--history-turns", "LIVEPIPE_HISTORY_TURNS", args.history_turns, int, 0, 1000)
    if gen >= 3 and s.text_mode == "content":
        raise ConfigError(f"--text-mode content: {s.model} takes client content only as the initial history; "
                          "typed text goes as realtime input (use --text-mode realtime)")
    o.thinking_level = _choice("--thinking-level", "LIVEPIPE_THINKING_LEVEL", args.thinking_level, THINKING_LEVELS, True)
    o.thinking_budget = _number("--thinking-budget", "LIVEPIPE_THINKING_BUDGET", args.thinking_budget, int, -1, 32768, True)
    if o.thinking_level and gen < 3:
        raise ConfigError(f"--thinking-level is for 3.x models; {model} sets thinking with --thinking-budget")
    if o.thinking_level and not _sdk_has("ThinkingConfig", "thinking_level"):
        raise ConfigError("--thinking-level needs a google-genai with ThinkingConfig.thinking_level: pip install -U google-genai")
    if o.thinking_budget is not None and gen >= 3:
        raise ConfigError(f"--thinking-budget is for 2.5 models; {model} sets thinking with --thinking-level")
    o.include_thoughts = _switch("--include-thoughts", "LIVEPIPE_INCLUDE_THOUGHTS", args.include_thoughts)
    o.affective_dialog = _switch("--affective-dialog", "LIVEPIPE_AFFECTIVE_DIALOG", args.affective_dialog)
    o.proactive_audio = _switch("--proactive-audio", "LIVEPIPE_PROACTIVE_AUDIO", args.proactive_audio)
    for flag, on in (("--affective-dialog", o.affective_dialog), ("--proactive-audio", o.proactive_audio)):
        if on and gen >= 3:
            raise ConfigError(f"{flag}: {s.model} does not support it yet (use a 2.5 native-audio model)")
    o.temperature = _number("--temperature", "LIVEPIPE_TEMPERATURE", args.temperature, float, 0, 2, True)
    o.top_p = _number("--top-p", "LIVEPIPE_TOP_P", args.top_p, float, 0, 1, True)
    o.top_k = _number("--top-k", "LIVEPIPE_TOP_K", args.top_k, int, 1, 1000, True)
    o.max_output_tokens = _number("--max-output-tokens", "LIVEPIPE_MAX_OUTPUT_TOKENS", args.max_output_tokens,
                                  int, 1, 1_000_000, True)
    o.seed = _number("--seed", "LIVEPIPE_SEED", args.seed, int, -2**31, 2**31 - 1, True)
    if args.builtin_tools:
        names = tuple(dict.fromkeys(n.strip().lower() for n in args.builtin_tools.split(",") if n.strip()))
        bad = [n for n in names if n not in BUILTIN_TOOLS]
        if bad:
            raise ConfigError(f"--builtin-tools {bad[0]!r}: use {', '.join(BUILTIN_TOOLS)} (env LIVEPIPE_BUILTIN_TOOLS)")
        if gen >= 3 and {"url_context", "code_execution"} & set(names):
            raise ConfigError(f"--builtin-tools: {s.model} supports google_search only (no url_context or code_execution)")
        o.builtin_tools = names
    if args.transcription_languages:
        codes = tuple(c.strip() for c in args.transcription_languages.split(",") if c.strip())
        for c in codes:
            if not re.match(r"^[a-zA-Z]{2,3}(-[A-Za-z0-9]{2,8})*$", c):
                raise ConfigError(f"--transcription-languages {c!r}: not a language code like en-US "
                                  "(env LIVEPIPE_TRANSCRIPTION_LANGUAGES)")
        if not _sdk_has("AudioTranscriptionConfig", "language_codes") or _sdk_version() < LANGUAGE_CODES_SDK:
            raise ConfigError("--transcription-languages needs google-genai >= 2.15 (before, the SDK refuses "
                              "AudioTranscriptionConfig.language_codes with a Gemini API key): pip install -U google-genai")
        o.transcription_languages = codes
    if args.transcription_vocabulary:
        o.transcription_vocabulary = load_vocabulary(args.transcription_vocabulary)
        if not _sdk_has("AudioTranscriptionConfig", "custom_vocabulary"):
            raise ConfigError("--transcription-vocabulary needs google-genai >= 2.13 (AudioTranscriptionConfig."
                              "custom_vocabulary): pip install -U google-genai")
    if (o.transcription_languages or o.transcription_vocabulary) and not s.input_transcription:
        flag = "--transcription-vocabulary" if o.transcription_vocabulary else "--transcription-languages"
        raise ConfigError(f"{flag} configures the input transcription, which is off: use --input-transcription on")
    o.context_update = _choice("--context-update", "LIVEPIPE_CONTEXT_UPDATE", args.context_update,
                               ("live", "reconnect"))
    o.turn_coverage = _choice("--turn-coverage", "LIVEPIPE_TURN_COVERAGE", args.turn_coverage,
                              tuple(TURN_COVERAGES), True)
    o.stream_end_after = _number("--stream-end-after", "LIVEPIPE_STREAM_END_AFTER", args.stream_end_after,
                                 float, 0, 60)
    return o


def extend_live_config(cfg: dict[str, Any], s: Settings, handle: str | None, seeding: bool = False) -> None:
    """Add the newer options to the LiveConnectConfig dict of one connection (`seeding`: a new session
    that will be sent history)."""
    o = s.live
    if seeding and model_generation(s.model) >= 3 and not handle:
        # A new 3.x session takes the history as client content before anything else; a resumed one has it.
        cfg["history_config"] = {"initial_history_in_client_content": True}
    thinking: dict[str, Any] = {}
    if o.thinking_level:
        thinking["thinking_level"] = o.thinking_level.upper()
    if o.thinking_budget is not None:
        thinking["thinking_budget"] = o.thinking_budget
    if o.include_thoughts:
        thinking["include_thoughts"] = True
    if thinking:
        cfg["thinking_config"] = thinking
    if o.affective_dialog:
        cfg["enable_affective_dialog"] = True
    if o.proactive_audio:
        cfg["proactivity"] = {"proactive_audio": True}
    for name in ("temperature", "top_p", "top_k", "max_output_tokens", "seed"):
        if getattr(o, name) is not None:
            cfg[name] = getattr(o, name)
    if o.builtin_tools:
        cfg.setdefault("tools", []).extend({name: {}} for name in o.builtin_tools)
    if o.turn_coverage:
        cfg["realtime_input_config"]["turn_coverage"] = TURN_COVERAGES[o.turn_coverage]
    if s.input_transcription:
        if o.transcription_languages:
            cfg["input_audio_transcription"]["language_codes"] = list(o.transcription_languages)
        if o.transcription_vocabulary:
            cfg["input_audio_transcription"]["custom_vocabulary"] = list(o.transcription_vocabulary)
