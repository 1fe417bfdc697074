"""`livepipe top`: a live table per process, from the heartbeats every service sends on `status`.

Columns: process name and instance, pid, CPU %, RSS, messages in and out (totals and per
second), drops (send queue full + stale video frames), rejected messages, sequence gaps,
handler errors and how long ago the last heartbeat came. A process silent for more than
3 s is marked SILENT; after 60 s it leaves the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.services.lib.toolkit import StopFlag, connect

SILENT_AFTER_S = 3.0
FORGET_AFTER_S = 60.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="livepipe top", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--once", action="store_true",
                   help="listen for one heartbeat period (--window), print one table and exit "
                        "(exit 1 if no process was heard)")
    p.add_argument("--window", type=float, default=1.5, metavar="S", help="how long --once listens (default 1.5 s)")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--json", action="store_true", help="one JSON object per refresh instead of a table")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period (default 1 s)")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="give up if the broker does not answer within S seconds (default: say so after "
                        "1 s and keep waiting)")
    add_bus_arguments(p)
    return p.parse_args(argv)


@dataclass
class Proc:
    src: str
    inst: str
    header: dict[str, Any]
    seen: float                      # monotonic time of the last heartbeat
    prev: dict[str, Any] | None = None
    prev_seen: float = 0.0

    def rate(self, name: str) -> float | None:
        if self.prev is None or self.seen <= self.prev_seen:
            return None
        now_v, prev_v = self.header["counters"].get(name), self.prev["counters"].get(name)
        if not isinstance(now_v, (int, float)) or not isinstance(prev_v, (int, float)):
            return None
        return (now_v - prev_v) / (self.seen - self.prev_seen)

    def row(self, now: float) -> dict[str, Any]:
        c = self.header["counters"]

        def num(name: str) -> Any:
            v = c.get(name)
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        in_rate, out_rate = self.rate("received"), self.rate("sent")
        return {
            "src": self.src, "inst": self.inst, "pid": self.header.get("pid"), "host": self.header.get("host"),
            "cpu_percent": num("cpu_percent"), "rss_bytes": num("rss_bytes"),
            "received": num("received"), "sent": num("sent"),
            "in_per_s": None if in_rate is None else round(in_rate, 1),
            "out_per_s": None if out_rate is None else round(out_rate, 1),
            "dropped": num("dropped"), "stale_dropped": num("stale_dropped"), "rejected": num("rejected"),
            "gaps": num("gaps"), "handler_errors": num("handler_errors"), "uptime_s": num("uptime_s"),
            "last_seen_s": round(now - self.seen, 1), "silent": now - self.seen > SILENT_AFTER_S,
            "metrics": self.header.get("metrics") or {},
        }


class Table:
    def __init__(self) -> None:
        self.procs: dict[tuple[str, str], Proc] = {}

    def add(self, header: dict[str, Any], now: float) -> None:
        key = (header["src"], header["inst"])
        proc = self.procs.get(key)
        if proc is None:
            self.procs[key] = Proc(header["src"], header["inst"], header, now)
        else:
            proc.prev, proc.prev_seen = proc.header, proc.seen
            proc.header, proc.seen = header, now

    def rows(self, now: float) -> list[dict[str, Any]]:
        for key in [k for k, p in self.procs.items() if now - p.seen > FORGET_AFTER_S]:
            del self.procs[key]
        return [p.row(now) for _, p in sorted(self.procs.items())]


def render(rows: list[dict[str, Any]]) -> str:
    def n(v: Any, fmt: str = "{:d}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [f"livepipe top   {time.strftime('%H:%M:%S')}   {len(rows)} process(es)",
             f"{'PROCESS':<16} {'INST':<8} {'PID':>7} {'CPU%':>6} {'RSS MB':>7} {'IN':>8} {'OUT':>8} "
             f"{'IN/s':>7} {'OUT/s':>7} {'DROPS':>6} {'REJ':>5} {'GAPS':>5} {'ERR':>4} {'SEEN':>6}  METRICS"]
    for r in rows:
        drops = None if r["dropped"] is None else r["dropped"] + (r["stale_dropped"] or 0)
        rss = None if r["rss_bytes"] is None else r["rss_bytes"] / 1e6
        seen = "SILENT" if r["silent"] else f"{r['last_seen_s']:.1f}s"
        metrics = " ".join(f"{k}={v}" for k, v in r["metrics"].items())
        lines.append(f"{r['src'][:16]:<16} {r['inst'][:8]:<8} {n(r['pid']):>7} {n(r['cpu_percent'], '{:.1f}'):>6} "
                     f"{n(rss, '{:.1f}'):>7} {n(r['received']):>8} {n(r['sent']):>8} "
                     f"{n(r['in_per_s'], '{:.1f}'):>7} {n(r['out_per_s'], '{:.1f}'):>7} {n(drops):>6} "
                     f"{n(r['rejected']):>5} {n(r['gaps']):>5} {n(r['handler_errors']):>4} {seen:>6}  "
                     f"{metrics[:60]}".rstrip())
    if not rows:
        lines.append("(no heartbeats yet: livepipe services send one a second on `status`)")
    return "\n".join(lines)


def run(args: argparse.Namespace, client: BusClient, stop: StopFlag, out: TextIO) -> int:
    table = Table()
    tty = out.isatty() and not args.json
    started = time.monotonic()
    if args.once:
        deadline: float | None = started + args.window
        next_refresh = deadline
    else:
        deadline = None if args.seconds is None else started + args.seconds
        next_refresh = started + args.interval

    def refresh(now: float) -> int:
        rows = table.rows(now)
        if args.json:
            out.write(json.dumps({"ts_ns": time.time_ns(), "processes": rows}) + "\n")
        else:
            out.write(("\x1b[H\x1b[2J" if tty else "") + render(rows) + "\n\n")
        out.flush()
        return len(rows)

    while not stop:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            break
        if not args.once and now >= next_refresh:
            refresh(now)
            next_refresh += args.interval * max(1, int((now - next_refresh) / args.interval) + 1)
        msg = client.recv(max(0.0, min(next_refresh, deadline or next_refresh, now + 0.2) - now))
        if msg is not None and msg.topic == "status" and msg.kind == "heartbeat":
            table.add(msg.header, time.monotonic())
    shown = refresh(time.monotonic())
    if args.once and not shown:
        print(f"livepipe top: no heartbeat within {args.window:g} s: is anything running on "
              f"{client.cfg.sub_endpoint}?", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = BusConfig.from_args(args)
    except ConfigError as exc:
        print(f"livepipe top: {exc}", file=sys.stderr)
        return 2
    stop = StopFlag()
    try:
        client = connect("top", cfg, ["status"], args.connect_timeout, stop=stop)
    except (BusTimeout, ConfigError) as exc:
        print(f"livepipe top: {exc}", file=sys.stderr)
        return 1
    if client is None:   # a signal while waiting for the broker
        return 0
    try:
        return run(args, client, stop, sys.stdout)
    except BrokenPipeError:
        return 0
    finally:
        client.close()
