"""A real livepipe service process for the tool tests: publishes known audio/text through
`Service.publish`, paced on the wall clock, after its subscribers are live.

    python tests/tool_publisher.py --audio 50 --interval-ms 20 --amplitude 0.5 --text hello
    python tests/tool_publisher.py --idle          # only heartbeats, until SIGTERM
"""
from __future__ import annotations

import argparse
import asyncio
import math
import struct
import sys
import time

from livepipe.bus import Service, setup_logging
from livepipe.bus.config import BusConfig

RATE = 16000
FRAMES = 320   # 20 ms at 16 kHz


def sine_chunk(index: int, amplitude: float, freq: float = 440.0) -> bytes:
    """Chunk `index` of a continuous sine at `amplitude` of full scale, s16le."""
    start = index * FRAMES
    return struct.pack(f"<{FRAMES}h", *(int(round(amplitude * 32767 * math.sin(2 * math.pi * freq * (start + i) / RATE)))
                                         for i in range(FRAMES)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="tool-publisher")
    p.add_argument("--audio", type=int, default=0, help="audio.in chunks to publish")
    p.add_argument("--interval-ms", type=float, default=20.0)
    p.add_argument("--amplitude", type=float, default=0.5)
    p.add_argument("--text", action="append", default=[], help="text.in messages, published after the audio")
    p.add_argument("--idle", action="store_true", help="publish nothing; heartbeat until stopped")
    p.add_argument("--linger", type=float, default=0.3, help="seconds to stay after publishing")
    args = p.parse_args(argv)
    setup_logging(args.name)
    svc = Service(args.name, BusConfig.from_env())

    async def run(svc: Service) -> int:
        if args.idle:
            await asyncio.Event().wait()   # until SIGTERM
        topics = (["audio.in"] if args.audio else []) + (["text.in"] if args.text else [])
        for topic in topics:
            if not await svc.wait_subscriber(topic, 10):
                raise RuntimeError(f"nobody subscribed to {topic}")
        t0, t0_ns = time.monotonic(), time.time_ns()
        for i in range(args.audio):
            delay = t0 + i * args.interval_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # capture_ts from the sample count, as a capture device's clock would give it
            svc.publish("audio.in", "audio", sine_chunk(i, args.amplitude), rate=RATE, channels=1,
                        sample_width=2, frames=FRAMES, capture_ts=t0_ns + i * FRAMES * 1_000_000_000 // RATE)
        for text in args.text:
            svc.publish("text.in", "text", text=text)
        await asyncio.sleep(args.linger)   # let the last messages leave before the sockets close
        print(f"published {svc.counters['sent']}", flush=True)
        return 0

    return svc.main(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
