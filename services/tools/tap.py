"""`livepipe tap [TOPIC...]`: print what flows on the bus, one line per message, or measure it (--stats).

A line: receipt time, topic, source (process/instance), sequence number, kind, size of all
frames, age (receipt time - header ts) in ms, then the kind's own fields; audio adds its RMS
level in dBFS. Invalid messages are printed as REJECTED lines with the reason, never a crash.
`--stats` prints a table per topic every second instead: rate, bandwidth, sequence gaps,
rejected messages and latency (age) p50/p99 over that second.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, TextIO

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.bus.message import Message, decode
from livepipe.services.lib.verb import VerbParser, verb
from livepipe.services.lib.toolkit import StopFlag, check_topics, clock, connect, dbfs, finite_or_none, human_bytes
from livepipe.services.lib.stats import percentile
from livepipe.bus.topics import AUDIO_FIELDS, COMMON_FIELDS, TOPICS, SchemaError

_SHOWN_ELSEWHERE = set(COMMON_FIELDS) | set(AUDIO_FIELDS)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe tap", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topics", nargs="*", metavar="TOPIC", help=f"topics to show (default: all): {', '.join(TOPICS)}")
    p.add_argument("--stats", action="store_true", help="a table per topic, refreshed every second")
    p.add_argument("--json", action="store_true", help="JSON lines (with --stats: one JSON object per refresh)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="--stats refresh period (default 1 s)")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="give up if the broker does not answer within S seconds (default: say so after "
                        "1 s and keep waiting)")
    add_bus_arguments(p)
    return p.parse_args(argv)


def frames_size(frames: list[bytes]) -> int:
    return sum(len(f) for f in frames)


def audio_level(msg: Message) -> float | None:
    if msg.payload is None or "sample_width" not in msg.header:
        return None
    try:
        return dbfs(msg.payload, msg.header["sample_width"], msg.header["channels"])
    except ValueError:
        return None


def short(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def message_line(msg: Message, size: int) -> str:
    h = msg.header
    extras = [f"{k}={short(v)}" for k, v in h.items() if k not in _SHOWN_ELSEWHERE]
    level = audio_level(msg)
    if "rate" in h and msg.payload is not None:
        extras.insert(0, f"{h['rate']} Hz x{h['channels']} {h['frames']} fr")
    if level is not None:
        extras.append("-inf dBFS" if level == float("-inf") else f"{level:.1f} dBFS")
    return (f"{clock(msg.recv_ns)} {msg.topic:<11} {h['src']}/{h['inst']} #{h['seq']:<5} {h['kind']:<12} "
            f"{size:>7} B {msg.age_ms:>8.1f} ms  {' '.join(extras)}").rstrip()


def message_json(msg: Message, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {"recv_ns": msg.recv_ns, "topic": msg.topic, **msg.header, "bytes": size,
                           "payload_bytes": 0 if msg.payload is None else len(msg.payload),
                           "age_ms": round(msg.age_ms, 3)}
    level = audio_level(msg)
    if level is not None:
        out["dbfs"] = finite_or_none(level)
    return out


def raw_topic(frames: list[bytes]) -> str:
    return bytes(frames[0][:80]).decode("utf-8", "replace") if frames else ""


def rejected_line(frames: list[bytes], error: str, recv_ns: int) -> str:
    return (f"{clock(recv_ns)} REJECTED {raw_topic(frames)!r}: {error} "
            f"({len(frames)} frames, {frames_size(frames)} B)")


def rejected_json(frames: list[bytes], error: str, recv_ns: int) -> dict[str, Any]:
    return {"recv_ns": recv_ns, "rejected": True, "topic": raw_topic(frames), "error": error,
            "frames": len(frames), "bytes": frames_size(frames)}


# ------------------------------------------------------------------- stats
UNKNOWN_TOPICS = "(undeclared topics)"

@dataclass
class TopicStats:
    count: int = 0            # since tap started
    bytes: int = 0
    gaps: int = 0             # messages missing, from per-(source, topic) sequence numbers
    rejected: int = 0
    win_count: int = 0        # in the current refresh window
    win_bytes: int = 0
    win_ages_ms: list[float] = field(default_factory=list)

    def roll(self) -> tuple[int, int, list[float]]:
        out = (self.win_count, self.win_bytes, sorted(self.win_ages_ms))
        self.win_count, self.win_bytes, self.win_ages_ms = 0, 0, []
        return out


class StatsTable:
    def __init__(self) -> None:
        self.topics: dict[str, TopicStats] = {}
        self.last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()

    def add(self, msg: Message, size: int) -> None:
        st = self.topics.setdefault(msg.topic, TopicStats())
        st.count += 1
        st.bytes += size
        st.win_count += 1
        st.win_bytes += size
        st.win_ages_ms.append(msg.age_ms)
        key = (msg.header["inst"], msg.topic)
        seq = msg.header["seq"]
        last = self.last_seq.get(key)
        if last is not None and seq > last + 1:
            st.gaps += seq - last - 1
        self.last_seq[key] = seq
        self.last_seq.move_to_end(key)
        if len(self.last_seq) > 1024:   # bounded: forget the longest-silent sources
            self.last_seq.popitem(last=False)

    def reject(self, topic: str) -> None:
        # Rows only for declared topics: random topic names share one row, so the table is bounded.
        self.topics.setdefault(topic if topic in TOPICS else UNKNOWN_TOPICS, TopicStats()).rejected += 1

    def snapshot(self, window_s: float) -> dict[str, dict[str, Any]]:
        out = {}
        for name in sorted(self.topics):
            st = self.topics[name]
            n, nbytes, ages = st.roll()
            out[name] = {
                "rate_hz": round(n / window_s, 2) if window_s > 0 else None,
                "bytes_per_s": round(nbytes / window_s) if window_s > 0 else None,
                "window_count": n,
                "count": st.count, "bytes": st.bytes, "gaps": st.gaps, "rejected": st.rejected,
                "latency_p50_ms": finite_or_none(percentile(ages, 50), 3),
                "latency_p99_ms": finite_or_none(percentile(ages, 99), 3),
            }
        return out


def render_table(snapshot: dict[str, dict[str, Any]], window_s: float, elapsed_s: float) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [f"livepipe tap --stats   {time.strftime('%H:%M:%S')}   window {window_s:.1f} s   "
             f"running {elapsed_s:.0f} s",
             f"{'TOPIC':<12} {'RATE Hz':>8} {'BANDWIDTH':>11} {'MSGS':>8} {'GAPS':>6} {'REJ':>5} "
             f"{'P50 ms':>8} {'P99 ms':>8}"]
    for name, s in snapshot.items():
        bw = "-" if s["bytes_per_s"] is None else human_bytes(s["bytes_per_s"]) + "/s"
        rate = "-" if s["rate_hz"] is None else f"{s['rate_hz']:.1f}"
        lines.append(f"{name:<12} {rate:>8} {bw:>11} {s['count']:>8} {s['gaps']:>6} {s['rejected']:>5} "
                     f"{ms(s['latency_p50_ms']):>8} {ms(s['latency_p99_ms']):>8}")
    if not snapshot:
        lines.append("(no messages yet)")
    return "\n".join(lines)


# -------------------------------------------------------------------- main
def run(args: argparse.Namespace, client: BusClient, stop: StopFlag, out: TextIO) -> None:
    session = client.cfg.session
    wanted = set(args.topics)
    stats = StatsTable() if args.stats else None
    tty = out.isatty()
    started = time.monotonic()
    deadline = None if args.seconds is None else started + args.seconds
    next_refresh = started + args.interval
    window_start = started
    seen = 0
    if stats is None and (not wanted or any(TOPICS[t].lane == "audio" for t in wanted)):
        dbfs(b"", 2)   # import numpy now, not on the first audio message (its age would show the import)

    def refresh(now: float) -> None:
        nonlocal window_start
        window = now - window_start
        window_start = now
        snap = stats.snapshot(window)
        if args.json:
            out.write(json.dumps({"ts_ns": time.time_ns(), "window_s": round(window, 3), "topics": snap}) + "\n")
        else:
            out.write(("\x1b[H\x1b[2J" if tty else "") + render_table(snap, window, now - started) + "\n\n")
        out.flush()

    while not stop and (args.count is None or seen < args.count):
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if stats is not None and now >= next_refresh:
            refresh(now)
            next_refresh += args.interval * max(1, int((now - next_refresh) / args.interval) + 1)
        wake = min(t for t in (deadline, next_refresh if stats else None, now + 0.2) if t is not None)
        frames = client.recv_raw(max(0.0, wake - now))
        if frames is None:
            continue
        recv_ns = time.time_ns()
        try:
            msg = decode(frames, session)
            msg.recv_ns = recv_ns
        except SchemaError as exc:
            seen += 1
            if stats is not None:
                stats.reject(raw_topic(frames).removeprefix(f"{session}/" if session else ""))
            elif args.json:
                out.write(json.dumps(rejected_json(frames, str(exc), recv_ns)) + "\n")
            else:
                out.write(rejected_line(frames, str(exc), recv_ns) + "\n")
            out.flush()
            continue
        if wanted and msg.topic not in wanted:
            continue   # SUB filters by prefix: "audio.in" would also match "audio.in.x"
        seen += 1
        size = frames_size(frames)
        if stats is not None:
            stats.add(msg, size)
            continue
        out.write((json.dumps(message_json(msg, size)) if args.json else message_line(msg, size)) + "\n")
        out.flush()
    if stats is not None:
        refresh(time.monotonic())


@verb("tap")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_topics(args.topics)
    cfg = BusConfig.from_args(args)
    stop = StopFlag()
    client = connect("tap", cfg, args.topics, args.connect_timeout, stop=stop)
    if client is None:   # a signal while waiting for the broker
        return 0
    try:
        print(f"livepipe tap: listening to {', '.join(args.topics) or 'all topics'} on {cfg.sub_endpoint}"
              f"{' (session ' + cfg.session + ')' if cfg.session else ''}", file=sys.stderr, flush=True)
        run(args, client, stop, sys.stdout)
    except BrokenPipeError:
        # `livepipe tap | head`: the reader left; exit quietly.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        client.close()
    return 0
