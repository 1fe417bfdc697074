"""`livepipe transcript`: the conversation, readable, in the terminal.

Prints "ready, speak now" once the model session is connected and the microphone's audio flows,
then one line per finished user or model transcript with its turn, and a line per interrupt and
model-session change. On a terminal a last line, rewritten in place, shows the microphone level
(from capture-audio's heartbeat) and the session state; piped or under honcho, plain lines only.

    livepipe transcript
    turn 1  user:  what do you see
    turn 1  model: a desk, a lamp and a cup

It also keeps the conversation for a restarted gemini-bridge: asked on `control: history_query`,
it answers with `control: history` (the latest finished lines), which the new session starts with.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import TextIO

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.services.lib.conversation import Conversation, status_line
from livepipe.services.lib.toolkit import StopFlag, connect
from livepipe.services.lib.verb import VerbParser

# Not audio.in: subscribing to it would count as a listener for capture-audio (which holds its
# backlog, and starts a file, until someone listens) before the bridge is up.
TOPICS = ["transcript", "text.in", "control", "status"]
CLEAR_LINE = "\r\x1b[K"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe transcript", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--no-meter", action="store_true", help="no microphone meter line, even on a terminal")
    p.add_argument("--serve-history", default="on", choices=("on", "off"),
                   help="on: answer a restarted gemini-bridge's control history_query with the conversation "
                        "so far, so its new session starts with it (default on)")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="give up if the broker does not answer within S seconds (default: say so after "
                        "1 s and keep waiting)")
    add_bus_arguments(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace, client: BusClient, stop: StopFlag, out: TextIO) -> int:
    conv = Conversation()
    tty = out.isatty() and not args.no_meter
    deadline = None if args.seconds is None else time.monotonic() + args.seconds
    shown_status = ""

    def emit(lines: list[str]) -> None:
        nonlocal shown_status
        if not lines and not tty:
            return
        text = "".join(line + "\n" for line in lines)
        if tty:   # rewritten in place with \r: it must never wrap
            status = status_line(conv)[:shutil.get_terminal_size().columns - 1]
            if not lines and status == shown_status:
                return
            text = CLEAR_LINE + text + status
            shown_status = status
        out.write(text)
        out.flush()

    emit([f"waiting for {conv.waiting_for()}"])
    while not stop and (deadline is None or time.monotonic() < deadline):
        msg = client.recv(0.25)
        if msg is not None:
            emit(conv.feed(msg))
            if msg.topic == "control" and msg.kind == "history_query" and args.serve_history == "on":
                turns = conv.history()
                if turns:   # a restarted bridge: the conversation goes on where it was
                    client.publish("control", "history", turns=turns)
    emit(conv.flush())
    if tty:
        out.write(CLEAR_LINE)
        out.flush()
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = BusConfig.from_args(args)
    except ConfigError as exc:
        print(f"livepipe transcript: {exc}", file=sys.stderr)
        return 2
    stop = StopFlag()
    try:
        client = connect("transcript", cfg, TOPICS, args.connect_timeout, stop=stop)
    except (BusTimeout, ConfigError) as exc:
        print(f"livepipe transcript: {exc}", file=sys.stderr)
        return 1
    if client is None:   # stopped while waiting for the broker
        return 0
    try:
        return run(args, client, stop, sys.stdout)
    except BrokenPipeError:
        return 0
    finally:
        client.close()
