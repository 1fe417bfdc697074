"""The Live API wire format: decoding client frames, building server messages, close reasons.

Client frames arrive with mixed casing (snake_case top level, camelCase or snake_case below,
varying by SDK version), so every key is normalised to snake_case before anything reads it.
Server messages go out camelCase with only fields every supported SDK version knows: the SDK's
pydantic models forbid unknown fields, and a message with only an unknown top-level key breaks
its receive().
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

# Close codes as the real service uses them (observed by users of the SDK):
INVALID_ARGUMENT = 1007      # bad request content, bad API key
POLICY_VIOLATION = 1008      # missing credentials, session duration expired after goAway
INTERNAL_ERROR = 1011        # "Internal error encountered." / "Deadline expired ..." after goAway
GOING_AWAY = 1001            # emulator shutting down

REASON_BAD_KEY = "API key not valid. Please pass a valid API key."
REASON_NO_KEY = ("Method doesn't allow unregistered callers (callers without established identity). "
                 "Please use API Key or other form of API consumer identity to call this API.")
REASON_DEADLINE = "Deadline expired before operation could complete."
# The service's own wording is longer than a close reason may be (123 bytes): same words, shortened.
REASON_SESSION_EXPIRED = ("Connection aborted because the client failed to close the connection after a GoAway: "
                          "session duration expired.")
REASON_INTERNAL = "Internal error encountered."
REASON_BAD_HANDLE = "Invalid argument: session resumption handle is unknown or expired."
# What users report the service closes with when a 3.x model gets client content mid-session
# (google/adk-python#5018, livekit/agents#5251): the generic invalid-argument wording.
REASON_INVALID_ARGUMENT = "Request contains an invalid argument."

_GENERATION_RE = re.compile(r"gemini-(\d+)(?:\.\d+)?-")


def model_generation(model: str) -> int:
    """'models/gemini-3.1-flash-live-preview' -> 3; anything unrecognised counts as 2 (2.5 native audio)."""
    m = _GENERATION_RE.search(model)
    return int(m.group(1)) if m else 2

_CAMEL_RE = re.compile(r"(?<=[a-z0-9])([A-Z])")
_TOP_LEVEL = ("setup", "client_content", "realtime_input", "tool_response", "context_update")


class ProtocolError(Exception):
    """A client message the real service would refuse: the session closes with `code` and `reason`."""

    def __init__(self, reason: str, code: int = INVALID_ARGUMENT) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def snake(key: str) -> str:
    return _CAMEL_RE.sub(lambda m: "_" + m.group(1).lower(), key)


def camel(key: str) -> str:
    """custom_vocabulary -> customVocabulary (how the service names a field in its errors)."""
    head, *rest = key.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def normalise(value: Any) -> Any:
    """Every dict key at every nesting level to snake_case (mimeType -> mime_type)."""
    if isinstance(value, dict):
        return {snake(k) if isinstance(k, str) else k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def close_reason(text: str) -> str:
    """A WebSocket close reason is at most 123 bytes of UTF-8: cut on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= 123:
        return text
    return data[:120].decode("utf-8", "ignore") + "..."


def parse_frame(raw: str | bytes) -> tuple[str, dict[str, Any]]:
    """One client frame -> (kind, body) with snake_case keys; kind is one of _TOP_LEVEL."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("Invalid JSON payload received. Frame is not UTF-8 text.") from None
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("Invalid JSON payload received. Unexpected token.") from None
    if not isinstance(msg, dict):
        raise ProtocolError("Invalid JSON payload received. Expected a JSON object.")
    msg = normalise(msg)
    unknown = [k for k in msg if k not in _TOP_LEVEL]
    if unknown:
        raise ProtocolError(f'Invalid JSON payload received. Unknown name "{unknown[0]}": Cannot find field.')
    present = [k for k in _TOP_LEVEL if k in msg]
    if len(present) != 1:
        raise ProtocolError("Invalid request: a message must set exactly one of setup, client_content, "
                            "realtime_input, tool_response, context_update.")
    body = msg[present[0]]
    if not isinstance(body, dict):
        raise ProtocolError(f"Invalid JSON payload received. {present[0]} must be an object.")
    return present[0], body


def b64decode(text: Any, where: str) -> bytes:
    """Standard or URL-safe base64 (the SDK sends URL-safe), padding optional."""
    if not isinstance(text, str):
        raise ProtocolError(f"Invalid value at '{where}' (TYPE_BYTES): expected a base64 string.")
    text = text.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"Invalid value at '{where}' (TYPE_BYTES): not valid base64.") from None


_PCM_RE = re.compile(r"^audio/(?:pcm|l16)\s*(?:;(.*))?$", re.I)


def pcm_rate(mime: str) -> int:
    """Sample rate from 'audio/pcm;rate=16000'; anything else is refused like the real service."""
    m = _PCM_RE.match(mime.strip())
    if not m:
        raise ProtocolError(close_reason(f"Unsupported audio mime type '{mime}': send 16-bit PCM as "
                                         "audio/pcm;rate=N."))
    params = dict(p.strip().lower().partition("=")[::2] for p in (m.group(1) or "").split(";") if p.strip())
    try:
        rate = int(params.get("rate", ""))
    except ValueError:
        raise ProtocolError(close_reason(f"Audio mime type '{mime}' does not state a sample rate: "
                                         "use audio/pcm;rate=16000.")) from None
    if not 8000 <= rate <= 48000:
        raise ProtocolError(f"Unsupported audio sample rate {rate}: use 8000..48000 Hz.")
    return rate


# --- server messages --------------------------------------------------------------------------

def setup_complete(session_id: str) -> dict[str, Any]:
    return {"setupComplete": {"sessionId": session_id}}


def audio_chunk(pcm24k: bytes, transcription: str | None = None) -> dict[str, Any]:
    """One reply chunk; with `transcription`, the output transcription rides in the same message
    (3.x models bundle several parts in one serverContent)."""
    data = base64.b64encode(pcm24k).decode("ascii")
    content: dict[str, Any] = {"modelTurn": {"role": "model", "parts": [
        {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": data}}]}}
    if transcription is not None:
        content["outputTranscription"] = {"text": transcription}
    return {"serverContent": content}


def model_parts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"serverContent": {"modelTurn": {"role": "model", "parts": parts}}}


def interim_input_transcription(text: str) -> dict[str, Any]:
    return {"serverContent": {"interimInputTranscription": {"text": text}}}


def voice_activity(start: bool, offset_s: float) -> dict[str, Any]:
    """The service's own voice activity signal (3.x), with the audio time it was detected at."""
    return {"voiceActivity": {"type": "ACTIVITY_START" if start else "ACTIVITY_END",
                              "audioOffset": f"{offset_s:.3f}s"}}


def text_part(text: str) -> dict[str, Any]:
    return {"serverContent": {"modelTurn": {"role": "model", "parts": [{"text": text}]}}}


def input_transcription(text: str) -> dict[str, Any]:
    return {"serverContent": {"inputTranscription": {"text": text, "finished": True}}}


def output_transcription(text: str) -> dict[str, Any]:
    return {"serverContent": {"outputTranscription": {"text": text}}}


def generation_complete() -> dict[str, Any]:
    return {"serverContent": {"generationComplete": True}}


def interrupted() -> dict[str, Any]:
    return {"serverContent": {"interrupted": True}}


def turn_complete(prompt_tokens: dict[str, int], response_tokens: dict[str, int],
                  **signals: Any) -> dict[str, Any]:
    """`signals`: further serverContent fields sent with turnComplete (generationComplete on 3.x,
    turnCompleteReason, waitingForInput, interactionStatus)."""
    def details(counts: dict[str, int]) -> list[dict[str, Any]]:
        return [{"modality": m, "tokenCount": n} for m, n in counts.items() if n]
    prompt, response = sum(prompt_tokens.values()), sum(response_tokens.values())
    usage: dict[str, Any] = {"promptTokenCount": prompt, "responseTokenCount": response,
                             "totalTokenCount": prompt + response}
    if details(prompt_tokens):
        usage["promptTokensDetails"] = details(prompt_tokens)
    if details(response_tokens):
        usage["responseTokensDetails"] = details(response_tokens)
    return {"serverContent": {**signals, "turnComplete": True}, "usageMetadata": usage}


def tool_call(call_id: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"toolCall": {"functionCalls": [{"id": call_id, "name": name, "args": args}]}}


def tool_call_cancellation(ids: list[str]) -> dict[str, Any]:
    return {"toolCallCancellation": {"ids": ids}}


def go_away(seconds: float) -> dict[str, Any]:
    # google.protobuf.Duration in JSON: decimal seconds with an "s" suffix.
    return {"goAway": {"timeLeft": f"{max(0.0, seconds):.3f}".rstrip("0").rstrip(".") + "s"}}


def resumption_update(handle: str, consumed_index: int | None) -> dict[str, Any]:
    update: dict[str, Any] = {"newHandle": handle, "resumable": True}
    if consumed_index is not None:       # only with setup.sessionResumption.transparent
        update["lastConsumedClientMessageIndex"] = consumed_index
    return {"sessionResumptionUpdate": update}
