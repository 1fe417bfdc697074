"""`livepipe replay FILE [--speed X] [--loop] [--topics ...]`: republish a recording as if it were live.

Timing: each message leaves at its original offset from the first one (divided by --speed),
paced against one absolute clock, so errors never accumulate over a long file.
Headers are rewritten so that downstream processes cannot tell replay from live:
  - `ts` and every other `*_ts` field move by (now - original receipt time), so each message
    has the same age (now - ts) as when it was recorded;
  - each recorded (instance, topic) gets a fresh instance id and continuous sequence numbers
    from 0, also across --loop rounds (no gaps, no clash with a live instance); `src` is kept.
Payloads are sent unchanged. Invalid recorded messages are skipped and counted. `status`
heartbeats are not replayed unless asked for with --topics (they describe processes that are
not running any more). Before the first message, replay waits until every replayed topic has
a subscriber (--wait), so nothing is published into the void.

Into a running pipeline: one source on audio.in at a time. If another process is publishing
audio.in (the live microphone), replay says so in one line, because the bridge would hear both
interleaved; --replace sends `control: mute` first (capture-audio stops publishing), replays,
and sends `control: unmute` at the end, also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.bus.message import decode, encode
from livepipe.services.lib.recording import RecordingReader
from livepipe.services.lib.toolkit import StopFlag, check_topics, wait_for_broker
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb
from livepipe.bus.topics import TOPICS, SchemaError

NOT_REPLAYED_BY_DEFAULT = {"status"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe replay", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a recording made by `livepipe record`")
    p.add_argument("--speed", type=float, default=1.0, metavar="X", help="playback speed factor (default 1)")
    p.add_argument("--loop", action="store_true", help="start over at the end, until stopped")
    p.add_argument("--topics", nargs="+", metavar="TOPIC",
                   help="replay only these topics (default: every recorded topic but status)")
    p.add_argument("--replace", action="store_true",
                   help="mute the live microphone (control: mute) during the replay, unmute at the end")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="wait up to S seconds for subscribers of the replayed topics (0: don't wait; default 10)")
    add_bus_arguments(p)
    return p.parse_args(argv)


class Plan:
    """What a first pass over the file tells: topics present, time span, record count."""

    def __init__(self, path: str, session: str) -> None:
        self.counts: Counter[str] = Counter()
        self.first_ns: int | None = None
        self.last_ns = 0
        self.records = 0
        self.truncated_bytes = 0
        prefix = f"{session}/".encode() if session else b""
        with RecordingReader(path) as reader:
            for recv_ns, frames in reader:
                if not frames:
                    continue
                self.counts[bytes(frames[0]).removeprefix(prefix).decode("utf-8", "replace")] += 1
                self.first_ns = recv_ns if self.first_ns is None else self.first_ns
                self.last_ns = recv_ns
                self.records += 1
            self.truncated_bytes = reader.truncated_bytes

    @property
    def span_ns(self) -> int:
        return 0 if self.first_ns is None else self.last_ns - self.first_ns

    def loop_period_ns(self) -> int:
        """One round's length: the span plus one mean message interval, so the first message of
        the next round follows the last one as the messages followed each other."""
        if self.records < 2:
            return 1_000_000_000
        return self.span_ns + self.span_ns // (self.records - 1)


def wait_subscribers(client: BusClient, topics: list[str], timeout: float, stop: StopFlag) -> list[str]:
    """Wait until each topic has a subscriber; returns the topics still without one."""
    deadline = time.monotonic() + timeout
    missing = [t for t in topics if not client.has_subscriber(t)]
    while missing and not stop and time.monotonic() < deadline:
        client.pub.poll(50)
        missing = [t for t in missing if not client.has_subscriber(t)]
    return missing


def live_audio_source(cfg: BusConfig, listen_s: float = 0.5) -> str | None:
    """`src/inst` of a process publishing audio.in right now (a live microphone sends every 20 ms),
    or None. A separate client: replay's own must not subscribe audio.in (it would count as a
    subscriber of what it replays)."""
    with BusClient("replay-check", cfg, ["audio.in"]) as check:
        check.wait_ready(5.0)
        msg = check.recv(listen_s)
        return None if msg is None else f"{msg['src']}/{msg['inst']}"


def wait_muted(cfg: BusConfig, source: str, quiet_s: float = 0.2, limit_s: float = 2.0) -> None:
    """After `control: mute`, wait until `source` stops publishing audio.in (chunks already in
    flight), so the replay does not start interleaved with them."""
    deadline = time.monotonic() + limit_s
    with BusClient("replay-check", cfg, ["audio.in"]) as check:
        check.wait_ready(5.0)
        while time.monotonic() < deadline:
            if check.recv(quiet_s) is None:   # quiet: what was in flight has passed
                return


def sleep_until(target: float, stop: StopFlag) -> None:
    while not stop:
        left = target - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.1))   # short slices: a signal only sets a flag


@verb("replay")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.speed > 0:
        raise UsageError("--speed must be > 0")
    check_topics(args.topics or [])
    cfg = BusConfig.from_args(args)
    if not Path(args.file).is_file():
        return fail("replay", f"{args.file} does not exist")
    stop = StopFlag()
    try:
        with RecordingReader(args.file) as reader:
            rec_session = reader.session
        plan = Plan(args.file, rec_session)
    except OSError as exc:
        return fail("replay", exc)
    if args.topics:
        topics = [t for t in args.topics if plan.counts[t]]
        absent = [t for t in args.topics if not plan.counts[t]]
        if absent:
            print(f"livepipe replay: {args.file} holds no {', '.join(absent)} messages", file=sys.stderr)
    else:
        topics = [t for t in plan.counts if t in TOPICS and t not in NOT_REPLAYED_BY_DEFAULT]
    if not topics:
        held = ", ".join(f"{t} ({n})" for t, n in plan.counts.items()) or "nothing"
        return fail("replay", f"nothing to replay: {args.file} holds {held}")
    if plan.truncated_bytes:
        print(f"livepipe replay: {args.file} ends with a cut-off record ({plan.truncated_bytes} B, "
              f"the recorder was stopped mid-write): replaying the {plan.records} complete ones", file=sys.stderr)

    client = BusClient("replay", cfg)
    try:
        if not wait_for_broker(client, "replay", 10.0, stop):
            return 0
        if args.wait > 0:
            missing = wait_subscribers(client, topics, args.wait, stop)
            if stop:
                return 0
            if len(missing) == len(topics):
                return fail("replay", f"nobody subscribes to {', '.join(missing)} after {args.wait:g} s: "
                                      f"start the consumers first (or pass --wait 0 to publish anyway)")
            if missing:
                print(f"livepipe replay: no subscriber for {', '.join(missing)} after {args.wait:g} s; "
                      f"replaying anyway", file=sys.stderr)
        muted = False
        if "audio.in" in topics:
            live = live_audio_source(cfg)
            if args.replace:
                client.publish("control", "mute")
                muted = True
                print(f"livepipe replay: --replace: sent control: mute{f' ({live} stops publishing audio.in)' if live else ''}"
                      f"; unmute at the end", file=sys.stderr, flush=True)
                if live:
                    wait_muted(cfg, live)
            elif live:
                print(f"livepipe replay: warning: {live} is publishing audio.in live: the bridge will hear it "
                      f"interleaved with the replay; add --replace to mute it meanwhile", file=sys.stderr, flush=True)
        try:
            return replay(args, cfg, client, plan, set(topics), rec_session, stop)
        finally:
            if muted:
                client.publish("control", "unmute")
                print("livepipe replay: sent control: unmute", file=sys.stderr, flush=True)
    finally:
        client.close()


def replay(args: argparse.Namespace, cfg: BusConfig, client: BusClient, plan: Plan, topics: set[str],
           rec_session: str, stop: StopFlag) -> int:
    print(f"livepipe replay: {', '.join(sorted(topics))} from {args.file} "
          f"({plan.span_ns / 1e9:.1f} s at x{args.speed:g}{', looping' if args.loop else ''})",
          file=sys.stderr, flush=True)
    new_inst: dict[str, str] = {}
    seqs: Counter[tuple[str, str]] = Counter()
    sent = skipped = rounds = 0
    period = plan.loop_period_ns()
    assert plan.first_ns is not None
    t0 = time.monotonic()
    while not stop:
        base = rounds * period
        with RecordingReader(args.file) as reader:
            for recv_ns, frames in reader:
                if stop:
                    break
                try:
                    msg = decode(frames, rec_session)
                except SchemaError:
                    skipped += 1
                    continue
                if msg.topic not in topics:
                    continue
                sleep_until(t0 + (base + recv_ns - plan.first_ns) / 1e9 / args.speed, stop)
                if stop:
                    break
                header = dict(msg.header)
                shift = time.time_ns() - recv_ns
                for key, value in header.items():
                    if (key == "ts" or key.endswith("_ts")) and type(value) is int:
                        header[key] = value + shift
                stream = (msg.header["inst"], msg.topic)
                header["inst"] = new_inst.setdefault(msg.header["inst"], uuid.uuid4().hex[:8])
                header["seq"] = seqs[stream]
                seqs[stream] += 1
                client.send_raw(encode(msg.topic, header, msg.payload, cfg.session))
                sent += 1
        rounds += 1
        if not args.loop:
            break
    skipped_note = f", skipped {skipped // max(1, rounds)} invalid" if skipped else ""
    print(f"livepipe replay: {sent} messages in {rounds} round(s), {time.monotonic() - t0:.1f} s{skipped_note}",
          file=sys.stderr)
    return 0
