"""The single-process baseline of `livepipe bench pipeline`: a Live API client written the way
Google's Live API example is written, run as its own process by the bench.

This bench module imports google-genai (and sounddevice): that is acceptable for a benchmark
baseline. The only livepipe *process* that imports google-genai is still gemini-bridge.

The shape follows the example ("Get started with the Live API", Python, audio only): one asyncio
process; the microphone read in blocks of CHUNK_SIZE = 1024 frames at 16 kHz by a blocking read in
a thread (`asyncio.to_thread`), put on an out queue, sent with `send_realtime_input`; a receive task
puts each reply chunk on a queue, and empties that queue on `server_content.interrupted`; a writer
task does a blocking `write` to a 24 kHz output stream in a thread. Latency 'low' on both streams
(what PyAudio, used by the example, asks for by default); sounddevice stands in for PyAudio.

It talks to `livepipe emulator` found through `<state>/emulator/emulator.json`, and prints to
stdout one line per event for the bench: `connected NS`, `first_audio NS` (first chunk sent),
and at exit `stats {json}` (underruns: writes that found the device starved mid-reply).

    python -m livepipe.services.bench.v2v_baseline --state-dir DIR
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path

CHUNK_SIZE = 1024          # as in the example: 64 ms at 16 kHz
SEND_SAMPLE_RATE = 16000
RECEIVE_SAMPLE_RATE = 24000
MODEL = "gemini-2.5-flash-native-audio-preview-12-2025"
PLACEHOLDER_KEY = "livepipe-emulator-placeholder-key"


class AudioLoop:
    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self.audio_in_queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.out_queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=5)
        self.session = None
        self.stats = {"underruns": 0, "writes": 0, "interrupts": 0, "chunks_sent": 0}
        self._first_sent = False

    async def listen_audio(self, sd) -> None:
        stream = await asyncio.to_thread(sd.RawInputStream, samplerate=SEND_SAMPLE_RATE, channels=1,
                                         dtype="int16", blocksize=self.chunk_size, latency="low")
        stream.start()
        while True:
            data, _overflowed = await asyncio.to_thread(stream.read, self.chunk_size)
            await self.out_queue.put(bytes(data))

    async def send_realtime(self) -> None:
        from google.genai import types
        while True:
            data = await self.out_queue.get()
            await self.session.send_realtime_input(audio=types.Blob(data=data, mime_type="audio/pcm;rate=16000"))
            self.stats["chunks_sent"] += 1
            if not self._first_sent:
                self._first_sent = True
                print(f"first_audio {time.time_ns()}", flush=True)

    async def receive_audio(self) -> None:
        while True:
            turn = self.session.receive()
            async for response in turn:
                sc = response.server_content
                if sc is not None and sc.interrupted:
                    # The model was interrupted: empty the queue, it may hold much more audio
                    # than has played yet.
                    self.stats["interrupts"] += 1
                    while not self.audio_in_queue.empty():
                        self.audio_in_queue.get_nowait()
                if data := response.data:
                    self.audio_in_queue.put_nowait(data)

    async def play_audio(self, sd) -> None:
        stream = await asyncio.to_thread(sd.RawOutputStream, samplerate=RECEIVE_SAMPLE_RATE, channels=1,
                                         dtype="int16", latency="low")
        stream.start()
        while True:
            was_empty = self.audio_in_queue.empty()
            bytestream = await self.audio_in_queue.get()
            underflowed = await asyncio.to_thread(stream.write, bytestream)
            self.stats["writes"] += 1
            if underflowed and not was_empty:
                self.stats["underruns"] += 1   # the device starved although audio was queued
                print(f"stats {json.dumps(self.stats)}", flush=True)

    async def run(self, state_dir: Path) -> None:
        import sounddevice as sd
        from google import genai
        from google.genai import types
        info = json.loads((state_dir / "emulator" / "emulator.json").read_text())
        ctx = ssl.create_default_context(cafile=info["ca_file"])
        client = genai.Client(api_key=PLACEHOLDER_KEY,
                              http_options=types.HttpOptions(base_url=info["url"], async_client_args={"ssl": ctx}))
        config = {"response_modalities": ["AUDIO"]}
        async with client.aio.live.connect(model=MODEL, config=config) as session:
            self.session = session
            print(f"connected {time.time_ns()}", flush=True)
            # the example uses a TaskGroup (3.11+); gather is the same on 3.10
            await asyncio.gather(self.send_realtime(), self.listen_audio(sd), self.receive_audio(),
                                 self.play_audio(sd))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="v2v_baseline", description=__doc__.split("\n\n")[0])
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, help="microphone read size in frames (1024)")
    args = p.parse_args(argv)
    loop_obj = AudioLoop(args.chunk_size)

    async def runner() -> None:
        task = asyncio.create_task(loop_obj.run(args.state_dir))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
    try:
        asyncio.run(runner())
    except KeyboardInterrupt:
        pass
    print(f"stats {json.dumps(loop_obj.stats)}", flush=True)
    os._exit(0)   # threads blocked in a device read would hold the interpreter's exit


if __name__ == "__main__":
    sys.exit(main())
