"""`livepipe say "text"`: publish one text.in message (what a user would type) and exit.

`livepipe say -` publishes each line of stdin as its own message. The message is sent only
once something subscribes to text.in (normally gemini-bridge), so it is never lost to the
slow-joiner problem; with nobody listening after --wait seconds, say fails with exit 1.
"""
from __future__ import annotations

import argparse
import sys
import time

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.services.lib.toolkit import wait_for_broker


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="livepipe say", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="+", help="the text (several words are joined by spaces); - reads lines from stdin")
    p.add_argument("--wait", type=float, default=5.0, metavar="S",
                   help="wait up to S seconds for a text.in subscriber (default 5)")
    add_bus_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = BusConfig.from_args(args)
    except ConfigError as exc:
        print(f"livepipe say: {exc}", file=sys.stderr)
        return 2
    if args.text == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    else:
        texts = [" ".join(args.text)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        print("livepipe say: nothing to say", file=sys.stderr)
        return 2
    client = BusClient("say", cfg)
    try:
        started = time.monotonic()
        wait_for_broker(client, "say", args.wait)
        client.wait_subscriber("text.in", max(0.0, args.wait - (time.monotonic() - started)))
        for text in texts:
            client.publish("text.in", "text", text=text)
            print(f"livepipe say: sent {text!r} on text.in", flush=True)
    except BusTimeout as exc:
        hint = "" if "broker" in str(exc) else " (is gemini-bridge running?)"
        print(f"livepipe say: {exc}{hint}; nothing sent", file=sys.stderr)
        return 1
    finally:
        client.close()   # linger flushes what is queued
    return 0
