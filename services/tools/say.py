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
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.toolkit import wait_for_broker
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe say", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="+", help="the text (several words are joined by spaces); - reads lines from stdin")
    p.add_argument("--wait", type=float, default=5.0, metavar="S",
                   help="wait up to S seconds for a text.in subscriber (default 5)")
    add_bus_arguments(p)
    return p.parse_args(argv)


@verb("say")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = BusConfig.from_args(args)
    if args.text == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    else:
        texts = [" ".join(args.text)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError("nothing to say")
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
        return fail("say", f"{exc}{hint}; nothing sent")
    finally:
        client.close()   # linger flushes what is queued
    return 0
