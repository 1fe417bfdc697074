"""Audio chunks written to the socket exactly as the SDK writes them, without its per-call model work,
and reply audio read as the SDK reads it, without its per-message model work (see "receiving").

`AsyncSession.send_realtime_input(audio=Blob(...))` validates a pydantic model, converts it, walks the
dict to base64 the bytes and json-dumps it: about 100 us of Python for a 640-byte chunk, 50 times a
second (py-spy: half of the bridge's send path). The text differs between chunks only in the base64
of the data, so the SDK in use is asked once per connection what it would write for two probe chunks;
when its text is prefix + urlsafe-base64(data) + suffix for both, later chunks are built that way and
go through the same websocket `send` the SDK calls. Otherwise (an SDK that writes differently, or has
no `_ws`) every chunk goes through the SDK as before.

`write_now` goes one step further for the usual chunk: when websockets' asyncio `Connection.send` would
not wait (the connection open, its transport not paused, no fragmented message in progress), it does
what that `send` does, synchronously: the protocol object frames the same text and `send_data` writes
it. So the bridge writes a chunk from the bus callback that received it, without waking a task (each
wakeup of an idle process costs about 100 us of CPU on a small VM, 50 times a second)."""
from __future__ import annotations

import base64
import copy
import json
import logging
import re
from typing import Any, Awaitable, Callable

from livepipe.services.processes.gemini_bridge.settings import MODEL_MIME, NAME

log = logging.getLogger(NAME)

# Two lengths (with and without base64 padding) and bytes whose base64 holds '-' and '_' (urlsafe).
PROBES = (bytes(range(0xE0, 0x100)) + b"\xfb\xef\xbe\xff\x00", b"\xff\xfe\xfd\xfc\x3e\x3f" * 7)

SendAudio = Callable[[bytes], Awaitable[None]]
WriteNow = Callable[[bytes], bool]


class _Recorder:
    """Stands in for the websocket of a copy of the session: keeps what the SDK would write."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send(self, message: Any, *args: Any, **kwargs: Any) -> None:
        self.sent.append((message, args, kwargs))


async def _sdk_text(session: Any, data: bytes) -> str | None:
    from google.genai import types
    probe = copy.copy(session)      # shallow: only the copy's websocket is replaced
    recorder = _Recorder()
    probe._ws = recorder
    await probe.send_realtime_input(audio=types.Blob(data=data, mime_type=MODEL_MIME))
    if len(recorder.sent) != 1:
        return None
    message, args, kwargs = recorder.sent[0]
    return message if isinstance(message, str) and not args and not kwargs else None


async def learn_audio_text(session: Any) -> tuple[str, str] | None:
    """(prefix, suffix) such that the SDK writes prefix + urlsafe-base64(chunk) + suffix, or None."""
    if getattr(session, "_ws", None) is None or not callable(getattr(session._ws, "send", None)):
        return None
    try:
        first = await _sdk_text(session, PROBES[0])
        if first is None:
            return None
        b64 = base64.urlsafe_b64encode(PROBES[0]).decode("ascii")
        if first.count(b64) != 1:
            return None
        prefix, suffix = first.split(b64)
        for data in PROBES[1:]:
            if await _sdk_text(session, data) != prefix + base64.urlsafe_b64encode(data).decode("ascii") + suffix:
                return None
    except Exception as exc:  # an SDK that works differently: keep sending through it
        log.debug("audio messages go through the SDK: %s: %s", type(exc).__name__, exc)
        return None
    return prefix, suffix


class DirectSender:
    """Sends one chunk as prefix + urlsafe-base64(chunk) + suffix: awaited like the SDK's send, or
    `write_now` (None where the websocket is not websockets' asyncio Connection)."""

    def __init__(self, ws: Any, prefix: str, suffix: str) -> None:
        self._ws_send = ws.send
        self._prefix, self._suffix = prefix, suffix
        self.write_now: WriteNow | None = _frame_writer(ws, prefix.encode(), suffix.encode())

    async def __call__(self, chunk: bytes) -> None:
        await self._ws_send(self._prefix + base64.urlsafe_b64encode(chunk).decode("ascii") + self._suffix)


def _frame_writer(ws: Any, prefix: bytes, suffix: bytes) -> WriteNow | None:
    """write(chunk) -> True once the chunk's text frame is handed to the transport, exactly as
    `await ws.send(text)` would hand it; False (nothing done) whenever that send could wait."""
    try:
        from websockets.asyncio.connection import Connection
        from websockets.protocol import OPEN
    except ImportError:
        return None
    protocol = getattr(ws, "protocol", None)
    transport = getattr(ws, "transport", None)
    if (not isinstance(ws, Connection) or protocol is None or transport is None
            or not all(hasattr(ws, a) for a in ("send_in_progress", "paused", "send_data"))
            or not callable(getattr(protocol, "send_text", None))):
        return None
    encode = base64.urlsafe_b64encode

    def write(chunk: bytes) -> bool:
        if (ws.send_in_progress is not None or ws.paused or protocol.state is not OPEN
                or transport.is_closing()):
            return False
        protocol.send_text(prefix + encode(chunk) + suffix)   # the UTF-8 of the SDK's text
        try:
            ws.send_data()
        except Exception:
            transport.abort()   # as Connection.send does: the receive loop then sees the connection end
            raise
        return True
    return write


async def audio_sender_for(session: Any) -> tuple[SendAudio, bool]:
    """A coroutine function that sends one 16 kHz PCM chunk on `session`, and whether it is the
    direct one (the SDK's own text, built without the SDK; then a DirectSender, see write_now)."""
    learned = await learn_audio_text(session)
    if learned is None:
        from google.genai import types

        async def through_sdk(chunk: bytes) -> None:
            await session.send_realtime_input(audio=types.Blob(data=chunk, mime_type=MODEL_MIME))
        return through_sdk, False
    prefix, suffix = learned
    return DirectSender(session._ws, prefix, suffix), True


# ----------------------------------------------------------------------------------- receiving
# A reply streams as many server messages a second that each hold one audio part and nothing else.
# The SDK parses every message into pydantic models (LiveServerMessage._from_response): about 1.2 ms
# of CPU for a 40 ms chunk on a small VM, against 0.1 ms for json.loads and base64. Messages of exactly
# that shape are taken from the websocket before the SDK sees them, once the SDK in use is shown to
# read probes of that shape as the same bytes and mime type; every other message goes to the SDK.
AUDIO_PROBES = (bytes(range(256)) + b"\xfb\xff\xbf", b"\xff\xfe\xfd\xfc\x3e\x3f" * 7 + b"\x00")
PROBE_MIME = "audio/pcm;rate=24000"
_ALPHABETS = {   # base64 alphabet -> (a whole string in it, with its padding; its decoder)
    "standard": (re.compile(r"[A-Za-z0-9+/]*={0,2}\Z"), base64.b64encode, base64.b64decode),
    "urlsafe": (re.compile(r"[A-Za-z0-9_-]*={0,2}\Z"), base64.urlsafe_b64encode, base64.urlsafe_b64decode),
}

ParseAudio = Callable[[Any], "tuple[bytes, str] | None"]


class _Replay:
    """Stands in for the websocket of a copy of the session: hands the SDK one message."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def recv(self, *args: Any, **kwargs: Any) -> bytes:
        return self.raw


def _audio_message(data: str, role: bool) -> bytes:
    turn: dict[str, Any] = {"parts": [{"inlineData": {"mimeType": PROBE_MIME, "data": data}}]}
    if role:
        turn["role"] = "model"
    return json.dumps({"serverContent": {"modelTurn": turn}}).encode()


async def learn_audio_parse(session: Any) -> ParseAudio | None:
    """parse(raw) -> (pcm, mime) for a server message holding one audio part and nothing else, as
    the SDK in use reads it (None for any other message); None when the SDK reads the probes otherwise."""
    if getattr(session, "_ws", None) is None or not callable(getattr(session, "_receive", None)):
        return None
    alphabets = []
    try:
        for name, (_, encode, _) in _ALPHABETS.items():
            ok = True
            for data in AUDIO_PROBES:
                for role in (True, False):
                    probe = copy.copy(session)   # shallow: only the copy's websocket is replaced
                    probe._ws = _Replay(_audio_message(encode(data).decode("ascii"), role))
                    msg = await probe._receive()
                    want = {"server_content": {"model_turn": {
                        "parts": [{"inline_data": {"data": data, "mime_type": PROBE_MIME}}],
                        **({"role": "model"} if role else {})}}}
                    ok = ok and msg.model_dump(exclude_none=True) == want
            if ok:
                alphabets.append(name)
    except Exception as exc:  # an SDK that works differently: it parses every message
        log.debug("server messages all go through the SDK: %s: %s", type(exc).__name__, exc)
        return None
    if not alphabets:
        return None
    checks = [(_ALPHABETS[a][0].match, _ALPHABETS[a][2]) for a in alphabets]

    def parse(raw: Any) -> tuple[bytes, str] | None:
        if not isinstance(raw, (bytes, str)) or len(raw) < 64:
            return None
        try:
            msg = json.loads(raw)
        except ValueError:
            return None   # the SDK says what is wrong with it
        if type(msg) is not dict or len(msg) != 1:
            return None
        sc = msg.get("serverContent")
        if type(sc) is not dict or len(sc) != 1:
            return None
        turn = sc.get("modelTurn")
        if type(turn) is not dict or not (turn.keys() == {"parts"} or (turn.keys() == {"parts", "role"}
                                                                       and turn["role"] == "model")):
            return None
        parts = turn["parts"]
        if type(parts) is not list or len(parts) != 1 or type(parts[0]) is not dict or parts[0].keys() != {"inlineData"}:
            return None
        blob = parts[0]["inlineData"]
        if type(blob) is not dict or blob.keys() != {"mimeType", "data"}:
            return None
        mime, data = blob["mimeType"], blob["data"]
        if type(mime) is not str or not mime.startswith("audio/") or type(data) is not str or not data \
                or len(data) % 4:
            return None
        for match, decode in checks:
            if match(data):
                return decode(data), mime
        return None
    return parse


def tap_audio_messages(session: Any, parse: ParseAudio, on_audio: Callable[[bytes, str], None]) -> bool:
    """Hand the audio-only server messages of `session` to on_audio(pcm, mime) in the order they
    arrive, the others to the SDK's receive (its websocket's recv skips the audio ones)."""
    ws = session._ws
    recv = ws.recv

    async def tapped_recv(*args: Any, **kwargs: Any) -> Any:
        while True:
            raw = await recv(*args, **kwargs)
            audio = parse(raw)
            if audio is None:
                return raw
            on_audio(*audio)

    try:
        ws.recv = tapped_recv   # on this connection object only
    except AttributeError:
        return False
    return True
