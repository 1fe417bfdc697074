"""A configurable bus process for the bus tests: a real `Service` in a real subprocess.

It prints one JSON line per event on stdout: {"event": "ready"} once its mains start, and
{"event": "msg", ...} for every message its handlers get.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from livepipe.bus import BusConfig, Service, setup_logging
from livepipe.bus.topics import TOPICS


def emit(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", default="busnode")
    p.add_argument("--sub", nargs="*", default=[], help="topics to print")
    p.add_argument("--slow-ms", type=float, default=0.0, help="audio handlers take this long per message")
    p.add_argument("--publish-text", default=None, help="publish one text.in at start, then exit")
    p.add_argument("--polled", nargs="*", default=[], help="topics to print only when a text.in 'poll' asks")
    p.add_argument("--heartbeats", action="store_true", help="print the counters of our own heartbeats")
    p.add_argument("--swallow-cancel", action="store_true", help="the main ignores the first cancellation, as "
                   "asyncio.wait_for before Python 3.12 does when its awaitable completes at that moment")
    args = p.parse_args()
    setup_logging(args.name)
    svc = Service(args.name, BusConfig.from_env())

    async def on_msg(msg) -> None:
        emit(event="msg", topic=msg.topic, kind=msg.kind, seq=msg["seq"], src=msg["src"],
             recv_ns=msg.recv_ns, header={k: v for k, v in msg.header.items()},
             payload_len=None if msg.payload is None else len(msg.payload),
             payload_sum=None if msg.payload is None else sum(msg.payload[:4096]))
        if args.slow_ms and TOPICS[msg.topic].lane == "audio":
            await asyncio.sleep(args.slow_ms / 1000)

    for t in args.sub:
        svc.on(t, on_msg)

    def on_polled(msg) -> None:
        emit(event="msg", topic=msg.topic, kind=msg.kind, seq=msg["seq"], src=msg["src"])

    def on_text(msg) -> None:
        if msg["text"] == "poll":
            emit(event="poll_start")
            for t in args.polled:
                svc.poll(t)
            emit(event="polled")

    for t in args.polled:
        svc.on(t, on_polled, polled=True)
    if args.polled:
        svc.on("text.in", on_text)

    async def run(s: Service) -> int | None:
        emit(event="ready", inst=s.inst, t_ns=time.time_ns())
        if args.publish_text is not None:
            s.publish("text.in", "text", text=args.publish_text)
            return 0
        if args.swallow_cancel:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                emit(event="cancel_swallowed")
        while True:
            await asyncio.sleep(0.25)
            if args.heartbeats:
                emit(event="counters", counters=dict(s.counters))

    async def wrapper() -> int:
        # Runs once svc.run() has installed its signal handlers and reached its first await.
        asyncio.get_running_loop().call_soon(lambda: emit(event="starting"))
        return await svc.run(run)

    return asyncio.run(wrapper())


if __name__ == "__main__":
    sys.exit(main())
