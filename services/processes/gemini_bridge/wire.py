"""Audio chunks written to the socket exactly as the SDK writes them, without its per-call model work.

`AsyncSession.send_realtime_input(audio=Blob(...))` validates a pydantic model, converts it, walks the
dict to base64 the bytes and json-dumps it: about 100 us of Python for a 640-byte chunk, 50 times a
second (py-spy: half of the bridge's send path). The text differs between chunks only in the base64
of the data, so the SDK in use is asked once per connection what it would write for two probe chunks;
when its text is prefix + urlsafe-base64(data) + suffix for both, later chunks are built that way and
go through the same websocket `send` the SDK calls. Otherwise (an SDK that writes differently, or has
no `_ws`) every chunk goes through the SDK as before."""
from __future__ import annotations

import base64
import copy
import logging
from typing import Any, Awaitable, Callable

from livepipe.services.processes.gemini_bridge.settings import MODEL_MIME, NAME

log = logging.getLogger(NAME)

# Two lengths (with and without base64 padding) and bytes whose base64 holds '-' and '_' (urlsafe).
PROBES = (bytes(range(0xE0, 0x100)) + b"\xfb\xef\xbe\xff\x00", b"\xff\xfe\xfd\xfc\x3e\x3f" * 7)

SendAudio = Callable[[bytes], Awaitable[None]]


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


async def audio_sender_for(session: Any) -> tuple[SendAudio, bool]:
    """A coroutine function that sends one 16 kHz PCM chunk on `session`, and whether it is the
    direct one (the SDK's own text, built without the SDK)."""
    learned = await learn_audio_text(session)
    if learned is None:
        from google.genai import types

        async def through_sdk(chunk: bytes) -> None:
            await session.send_realtime_input(audio=types.Blob(data=chunk, mime_type=MODEL_MIME))
        return through_sdk, False
    prefix, suffix = learned
    ws_send = session._ws.send
    encode = base64.urlsafe_b64encode

    async def direct(chunk: bytes) -> None:
        await ws_send(prefix + encode(chunk).decode("ascii") + suffix)
    return direct, True
