"""`livepipe emulator`: a local Live API emulator, the default backend with no key and no internet.

It speaks the Gemini Live API WebSocket protocol as the google-genai SDK speaks it (wss only, v1
and v1beta paths, snake_case or camelCase, URL-safe base64), so the real SDK connects to it
unchanged. It is a deterministic stand-in, not a model: it answers each utterance with the same
audio resampled to 24 kHz ("parrot"), so tests and benchmarks can check what came back.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from livepipe.services.lib.settings import env, non_negative, positive, state_dir
from livepipe.services.lib.verb import VerbParser, fail, verb

HELP_EPILOG = """\
behaviour
  Turns: webrtcvad on the 16 kHz input, honouring setup.realtimeInputConfig.automaticActivityDetection
  (sensitivities, prefixPaddingMs, silenceDurationMs; disabled -> the client sends activityStart/End).
  An utterance ends after silenceDurationMs of silence (default 500 ms) or at audioStreamEnd; after
  --latency the reply streams: modelTurn inlineData audio/pcm;rate=24000 chunks of --chunk-ms, then
  generationComplete, then turnComplete with usageMetadata (32 tokens per second of audio).
  The reply audio IS the utterance (from 40 ms before its first voiced frame to the end of its last),
  resampled 16 kHz -> 24 kHz with soxr. A frame is voiced when webrtcvad says so and it is louder
  than -55 dBFS. Input rates 8..48 kHz are accepted when the mime type states them (resampled;
  what the filter holds back is flushed at activityEnd and audioStreamEnd).
  Speech (or text) while a turn is thinking, waiting for a tool or streaming ends it: interrupted:
  true, then turnComplete (activityHandling NO_INTERRUPTION turns this off: turns queue instead).
  Text (clientContent with turnComplete, or realtimeInput text) gets a 330 Hz tone of 0.4 s + 30 ms
  a character (max 3 s). Every utterance and every text input is one turn: one turnComplete each.
  Not a model: it understands nothing, ignores systemInstruction, voices and history, and its
  usageMetadata token counts are estimates (32 a second of audio, 64/256 a frame, 1 per 4 chars).

transcriptions (only when setup asks for input/output audio transcription), n = turn number:
  input   "utterance N: D.DD s"                       D = utterance seconds
          "utterance N: D.DD s, frames K, last WxH"   K video frames since the previous utterance
          "utterance N: D.DD s, frames K, last WxH, F.FF fps"   (K >= 2: arrival rate)
  output  "reply N: D.DD s"                           (a reply to utterance N)
          "reply N: D.DD s, after tool NAME"          (after a tool call round trip)
          'reply N: text "TEXT"'                      (a reply to text; TEXT cut at 200 chars)
  With responseModalities ["TEXT"] the same output text comes as a modelTurn text part, no audio.
  inputAudioTranscription.customVocabulary (or the deprecated adaptationPhrases) adds ', said "TERM"'
  to each utterance, the listed terms in turn (utterance 1 the first, then the next, round again),
  exactly as listed: the parrot hears no words, so this stands for a listed term recognised and
  spelled as given. An unknown field in either transcription config closes 1007
  'Invalid JSON payload received. Unknown name "X" at ...'.

tools: when setup declares functions, an utterance of at least --tool-trigger seconds makes the
  model send toolCall {id "fc-SESSION-N", name = the first declared function, args {"utterance": N,
  "seconds": D}} and wait for the toolResponse with that id before replying. Speech meanwhile sends
  toolCallCancellation {ids}, interrupted, turnComplete.

model generations: setup.model names the generation ("gemini-3.1-..." is 3, anything else 2.5).
  3.x, as the public docs and users' reports describe it:
  - client content only as the initial history: with setup.historyConfig.initialHistoryInClientContent
    the clientContent messages up to the one with turnComplete true are history (no model turn; timeline
    event "history"); any other clientContent closes 1007 "Request contains an invalid argument.";
  - proactivity or enableAffectiveDialog in setup closes 1007 the same way;
  - several parts in one message: the first reply chunk carries the output transcription, and
    generationComplete comes with turnComplete, which also carries interactionStatus IDLE;
  - voiceActivity {type ACTIVITY_START|ACTIVITY_END, audioOffset} at speech start and end;
  - functions declared NON_BLOCKING are called synchronously (not supported yet on 3.1).
  2.5: clientContent without turnComplete is context only (timeline event "context", no model turn);
  a function declared behavior NON_BLOCKING is called without holding the reply; its
  toolResponse is scheduled as it says: INTERRUPT (stop the reply in progress, answer now), WHEN_IDLE
  (default: answer after what is queued), SILENT (context only); willContinue keeps the call open for
  more responses. The answer is a tone with output transcription "reply N: tool NAME result, SCHEDULING".

extras: with generationConfig.thinkingConfig.includeThoughts a reply starts with a thought part
  "thinking about turn N"; with the built-in tools in setup.tools it carries, before its audio:
  codeExecution -> executableCode "print(N * N)" and codeExecutionResult OUTCOME_OK "N*N";
  googleSearch -> groundingMetadata {webSearchQueries ["turn N"], groundingChunks [web {uri, title}]};
  urlContext -> urlContextMetadata {urlMetadata [{retrievedUrl, URL_RETRIEVAL_STATUS_SUCCESS}]}.

sessions: with setup.sessionResumption a sessionResumptionUpdate {newHandle, resumable: true} follows
  setupComplete and every turnComplete. Handles are opaque ("emu-..."), valid 2 h. A handle stands
  for everything the session had received when it was issued: finished turns (numbers continue),
  utterances heard but not answered yet (the resumed session answers them), and the utterance the
  user is in the middle of, with its VAD pre-roll and what the input resampler held back (the
  resumed session goes on with it), so a resumed session never misses audio the handle covers.
  lastConsumedClientMessageIndex (setup = 0, counted per connection) is sent only when setup asks
  sessionResumption {transparent: true}, as on the real service (the SDK allows that only on
  Vertex AI); a client then sends again every message after it and nothing is heard twice. Without it a client cannot tell which of its last
  messages a handle covers (those in flight when it was issued are not): resending from a little
  before the handle arrived loses nothing, and what the handle did cover of that is heard twice.
  A repeated activityStart inside an activity is ignored (counted), so a resend cannot cut one.

close codes and reasons (what the SDK raises as google.genai.errors.APIError(code)):
  1007 "API key not valid. Please pass a valid API key."    wrong key (with --api-key)
  1008 "Method doesn't allow unregistered callers ..."     no key at all (with --api-key)
  1007 "Invalid JSON payload received. ..." / "Invalid argument: ..." / "Unsupported audio mime type
       ..." / "Unable to process input image: ..."           bad input (first message not setup,
       malformed frame, audio not audio/pcm;rate=N 16-bit, image that does not decode)
  1007 "Invalid argument: session resumption handle is unknown or expired."   a dead handle (also
       every handle of a session that reached --session-limit): start a new session without one
  1011 "Deadline expired before operation could complete."  when a --goaway-after goAway runs out
  1008 "Connection aborted because the client failed to close the connection after a GoAway:
       session duration expired."                            at --session-limit
  1011 "Internal error encountered."                         --drop-after, --drop-in-reply, or an emulator bug
  1001                                                       the emulator is shutting down

timeline (--timeline): one JSON line per event {"session", "conn", "turn", "event", "t_ns", ...};
  events: session_start (resumed; carried_audio_s, carried_turns: what the handle brought along;
  input_transcription: languageCodes and customVocabulary as received; sdk: the client's google-genai
  version from its x-goog-api-client header),
  speech_start, speech_end (seconds, speech_stop_ns = arrival of the last voiced audio, silence_ms),
  text_in, tool_call, tool_response, tool_cancelled, first_byte,
  interrupted (phase, sent_seconds), turn_complete, goaway, drop, closed (code, reason).

discovery: once listening it writes <state>/emulator/emulator.json {"url", "ca_file", "pid",
  "api_key_required"} (removed on exit) and prints one line on stderr:
  emulator: listening on https://127.0.0.1:PORT (CA <state>/emulator/ca.pem)
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe emulator", description=__doc__, epilog=HELP_EPILOG,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=env("LIVEPIPE_EMULATOR_PORT", "7720"),
                   help="port (env LIVEPIPE_EMULATOR_PORT, default 7720; 0 picks a free port)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="state directory; certificates, emulator.json and the timeline go in its emulator/ "
                        "(env LIVEPIPE_STATE_DIR, default ~/.local/state/livepipe)")
    p.add_argument("--api-key", default=os.environ.get("LIVEPIPE_EMULATOR_API_KEY") or None,
                   help="require this key (x-goog-api-key header or ?key=); a wrong one is refused like the real "
                        "service: close 1007 'API key not valid...' (env LIVEPIPE_EMULATOR_API_KEY; default: any key)")
    p.add_argument("--latency", type=non_negative, default=0.3, metavar="S",
                   help="think time between end of speech (or a tool response) and the reply (default 0.3)")
    p.add_argument("--pace", type=non_negative, default=2.0, metavar="X",
                   help="reply streaming speed as a multiple of real time; the real service sends faster than "
                        "real time (default 2.0; 0 = as fast as possible)")
    p.add_argument("--chunk-ms", type=int, default=40, metavar="MS",
                   help="reply audio per serverContent message, in ms (default 40)")
    p.add_argument("--goaway-after", type=non_negative, default=None, metavar="S",
                   help="per connection: send goAway S seconds after setup, close 1011 when its timeLeft runs out")
    p.add_argument("--goaway-at-tool-call", action="store_true",
                   help="per connection: send goAway as a (blocking) tool call goes out, so it is pending")
    p.add_argument("--goaway-grace", type=non_negative, default=5.0, metavar="S",
                   help="timeLeft announced in goAway (default 5; the real service gives about 60)")
    p.add_argument("--session-limit", type=positive, default=None, metavar="S",
                   help="session duration limit over all its resumed connections (lifted by "
                        "contextWindowCompression, as on the real service): goAway, then close 1008")
    p.add_argument("--drop-after", type=positive, default=None, metavar="S",
                   help="per connection: close abruptly with 1011 'Internal error encountered.' after S seconds")
    p.add_argument("--drop-in-reply", type=positive, default=None, metavar="S",
                   help="a new (not resumed) session's connection closes with 1011 like --drop-after, S seconds "
                        "after its first reply began, whatever the timing of the input (with --pace 1 a reply longer "
                        "than S is cut)")
    p.add_argument("--tool-trigger", type=non_negative, default=2.0, metavar="S",
                   help="when setup declares functions, an utterance at least S seconds long triggers a toolCall "
                        "for the first one (default 2.0)")
    p.add_argument("--interim-every", type=non_negative, default=0.0, metavar="S",
                   help="send interimInputTranscription every S seconds of an utterance in progress, when setup "
                        "asks for input transcription (default 0: none)")
    p.add_argument("--need-more-input", type=non_negative, default=0.0, metavar="S",
                   help="an utterance shorter than S seconds gets no reply: turnComplete with turnCompleteReason "
                        "NEED_MORE_INPUT and waitingForInput (default 0: off)")
    p.add_argument("--timeline", default=None, metavar="FILE",
                   help="per-turn timeline, JSON lines (default <state>/emulator/timeline.jsonl; 'off' for none)")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} is not a port number")
    if not 5 <= args.chunk_ms <= 1000:
        p.error("--chunk-ms must be between 5 and 1000")
    return args


@verb("emulator")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from livepipe.bus.runtime import setup_logging
    setup_logging("emulator")
    logging.getLogger("websockets").setLevel(logging.CRITICAL)   # handshake noise: we count and log our own

    from livepipe.services.processes.emulator.certs import ensure_certificates
    from livepipe.services.processes.emulator.server import ServerConfig, run_server
    from livepipe.services.processes.emulator.session import Options

    state = (args.state_dir or state_dir()).expanduser() / "emulator"
    try:
        certs = ensure_certificates(state, args.host)
    except OSError as e:
        return fail("emulator", f"cannot create certificates in {state}: {e.strerror or e}")
    timeline = None if args.timeline == "off" else Path(args.timeline) if args.timeline else state / "timeline.jsonl"
    opts = Options(api_key=args.api_key, latency=args.latency, pace=args.pace, chunk_ms=args.chunk_ms,
                   goaway_after=args.goaway_after, goaway_grace=args.goaway_grace,
                   goaway_at_tool_call=args.goaway_at_tool_call,
                   session_limit=args.session_limit, drop_after=args.drop_after, drop_in_reply=args.drop_in_reply, tool_trigger=args.tool_trigger,
                   interim_every=args.interim_every, need_more_input=args.need_more_input)
    return run_server(ServerConfig(args.host, args.port, state, certs, timeline, opts))


__all__ = ["main", "parse_args"]
