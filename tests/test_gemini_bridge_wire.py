"""The bridge builds each audio chunk's realtime_input message itself (wire.py, to save the SDK's
per-call model work): what goes on the socket must be the very text google-genai writes for that
chunk, under the newest SDK (installed here) and the oldest supported one. Likewise it reads reply
audio without the SDK: what it takes must be what the SDK reads, and all else is left to the SDK."""
from __future__ import annotations

import subprocess

from tests.conftest import ROOT
from tests.test_emulator_sdk_compat import old_sdk_python  # noqa: F401  (fixture: the floor's venv)

CHECK = r'''
import asyncio, random
from google import genai
from google.genai import types
from google.genai.live import AsyncSession
from livepipe.services.processes.gemini_bridge.wire import audio_sender_for, learn_audio_parse
import base64, json

class Socket:   # what a websocket connection is asked to write
    def __init__(self): self.sent = []
    async def send(self, message): self.sent.append(message)

async def main():
    client = genai.Client(api_key="not-a-key")
    direct_ws, sdk_ws = Socket(), Socket()
    direct = AsyncSession(api_client=client._api_client, websocket=direct_ws)
    through = AsyncSession(api_client=client._api_client, websocket=sdk_ws)
    send, is_direct = await audio_sender_for(direct)
    assert is_direct and direct_ws.sent == [], direct_ws.sent   # learning writes nothing on the socket
    rng = random.Random(7)
    chunks = [bytes(rng.randrange(256) for _ in range(n)) for n in (640, 641, 642, 1, 2, 3, 0, 1280, 32000)]
    for chunk in chunks:
        await send(chunk)
        await through.send_realtime_input(audio=types.Blob(data=chunk, mime_type="audio/pcm;rate=16000"))
    assert direct_ws.sent == sdk_ws.sent, (direct_ws.sent[0][:200], sdk_ws.sent[0][:200])
    print("same", len(sdk_ws.sent))

    class Replay:   # a websocket that received one server message
        def __init__(self, raw): self.raw = raw
        async def recv(self, *a, **k): return self.raw
    parse = await learn_audio_parse(direct)
    assert parse is not None
    def audio(data, enc=base64.b64encode, **extra):
        turn = {"role": "model", "parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": enc(data).decode()}}]}
        return json.dumps({"serverContent": {**{"modelTurn": turn}, **extra}}).encode()
    taken = 0
    for raw in [audio(c) for c in chunks if c] + [audio(chunks[0], base64.urlsafe_b64encode), audio(b"\xfb\xff" * 9),
                audio(chunks[1], outputTranscription={"text": "hi"}), b'{"serverContent": {"turnComplete": true}}',
                audio(chunks[2]).replace(b'"data": "', b'"data": "!'), audio(b""), b'{"setupComplete": {}}']:
        got = parse(raw)
        sdk = (await AsyncSession(api_client=client._api_client, websocket=Replay(raw))._receive()) if b"!" not in raw else None
        if got is None:
            continue
        taken += 1
        part = sdk.server_content.model_turn.parts[0].inline_data
        assert (part.data, part.mime_type) == got, raw[:120]
        assert sdk.model_dump(exclude_none=True) == {"server_content": {"model_turn": {"role": "model", "parts": [
            {"inline_data": {"data": got[0], "mime_type": got[1]}}]}}}, raw[:120]
    assert taken == 10, taken   # the 8 chunks, the urlsafe one and the one with '-' and '_'; none of the others

asyncio.run(main())
'''


def _check(python: str, tmp_path) -> None:
    shim = tmp_path / "shim"     # this checkout first, whatever livepipe the interpreter sees
    (shim / "livepipe").mkdir(parents=True)
    for folder in ("bus", "services", "launch"):
        (shim / "livepipe" / folder).symlink_to(ROOT / folder)
    r = subprocess.run([python, "-c", CHECK], env={"PYTHONPATH": str(shim), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "same 9", r.stderr[-2000:]   # and the reads agree


def test_audio_messages_are_the_sdks_own_text(tmp_path):
    import sys
    _check(sys.executable, tmp_path)


def test_audio_messages_are_the_sdks_own_text_under_the_oldest_sdk(old_sdk_python, tmp_path):
    _check(str(old_sdk_python), tmp_path)
