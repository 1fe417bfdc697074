"""`livepipe top`: a live table per process, from the heartbeats every service sends on `status`.

It fits the terminal. At 80 columns: process, STATE (the bridge's session state, capture-audio's
live/muted, capture-video's source state, playback's playing/idle), CPU %, RSS, messages in and
out per second, DROP (send queue full + stale video frames + audio playback
dropped), REJ (rejected messages) and the key
figures (microphone level, playback underruns and buffer, the bridge's backend and turns, the
camera's frame age). From 120 columns also PID, sequence GAPS, handler ERRors and how long ago
the last heartbeat came. A process silent for more than 3 s is SILENT; after 60 s it leaves the
table. On a terminal `q` quits. The broker and the emulator send no heartbeat.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.verb import VerbParser, verb
from livepipe.services.lib.toolkit import StopFlag, connect

SILENT_AFTER_S = 3.0
FORGET_AFTER_S = 60.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe top", description=__doc__,
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


def _num(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def compact(v: float | None, digits: int = 1) -> str:
    """A number in few characters: 7, 12.5, 1.2k, 3.4M; `-` when unknown."""
    if v is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= limit:
            return f"{v / limit:.1f}{suffix}"
    return f"{v:.{digits}f}" if isinstance(v, float) and digits and v != int(v) else f"{v:.0f}"


def state_of(row: dict[str, Any]) -> str:
    """The one word that says whether a process is doing its job."""
    if row["silent"]:
        return "SILENT"
    m, src = row["metrics"], row["src"]
    if isinstance(m.get("state"), str):                     # gemini-bridge: connected, reconnecting...
        return m["state"]
    if src == "capture-audio" or "level_dbfs" in m:
        return "muted" if m.get("muted") else "live"
    if isinstance(m.get("source_state"), str):              # capture-video
        return m["source_state"]
    if src == "playback" or "underruns" in m:
        return "playing" if (_num(m.get("buffered_ms")) or 0) > 0 else "idle"
    return "up"


def key_figures(row: dict[str, Any]) -> list[str]:
    """What matters most per process, most important first (shown as room allows)."""
    m, src = row["metrics"], row["src"]
    out: list[str] = []
    level = _num(m.get("level_dbfs"))
    if level is not None:                                   # capture-audio: the microphone level
        filled = round(6 * min(1.0, max(0.0, (level + 60) / 60)))   # -60..0 dBFS in 6 steps
        out += [f"mic {level:.0f} dBFS", f"[{'#' * filled}{'.' * (6 - filled)}]"]
        if _num(m.get("backlog_ms")):
            out.append(f"backlog {m['backlog_ms']:.0f} ms")
        if _num(m.get("overflows")):
            out.append(f"overflows {m['overflows']}")
    if _num(m.get("underruns")) is not None:                # playback
        out.append(f"underruns {m['underruns']:.0f}")
        if _num(m.get("buffered_ms")) is not None:
            out.append(f"buffered {m['buffered_ms']:.0f} ms")
        if _num(m.get("played_s")) is not None:
            out.append(f"played {m['played_s']:.1f} s")
    if src == "gemini-bridge" or "turns" in m:
        for name in ("backend", "turns", "interrupts", "reconnects"):
            if m.get(name) not in (None, ""):
                out.append(f"{m[name]}" if name == "backend" else f"{name} {m[name]}")
    if _num(m.get("frame_age_ms")) is not None:             # capture-video
        out.append(f"age {m['frame_age_ms']:.0f} ms")
        if _num(m.get("source_fps")) is not None:
            out.append(f"{m['source_fps']:.1f} fps")
        if isinstance(m.get("image"), str):
            out.append(m["image"])
    if not out:                                             # any other service: its own metrics
        out = [f"{k}={v}" for k, v in m.items() if k not in ("state", "source_state")]
    return out


# (title, width, priority): priority 0 always shows; higher ones only when the terminal is wide.
COLUMNS = [("PROCESS", 13, 0), ("STATE", 12, 0), ("PID", 7, 2), ("CPU%", 4, 0), ("RSS", 5, 0),
           ("IN/s", 5, 0), ("OUT/s", 5, 0), ("DROP", 4, 0), ("REJ", 3, 0), ("GAPS", 4, 1), ("ERR", 3, 1),
           ("SEEN", 5, 1)]
MIN_KEY = 20   # the key figures column keeps at least this much room


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(0, width - 1)] + "~"


def render(rows: list[dict[str, Any]], width: int = 120, header: str = "") -> str:
    """The table, no line wider than `width`: the columns that fit, then the key figures."""
    cols: list[tuple[str, int, int]] = []
    used = 0
    for level in (0, 1, 2):
        candidate = [c for c in COLUMNS if c[2] <= level]
        total = sum(c[1] + 1 for c in candidate)
        if level == 0 or total + MIN_KEY <= width:
            cols, used = candidate, total
    key_width = max(0, width - used)

    def cell(name: str, r: dict[str, Any]) -> str:
        if name == "PROCESS":
            return r["name"]
        if name == "STATE":
            return state_of(r)
        if name == "PID":
            return "-" if r["pid"] is None else str(r["pid"])
        if name == "CPU%":
            return compact(r["cpu_percent"])
        if name == "RSS":
            return "-" if r["rss_bytes"] is None else f"{r['rss_bytes'] / 1e6:.0f}M"
        if name == "IN/s":
            return compact(r["in_per_s"])
        if name == "OUT/s":
            return compact(r["out_per_s"])
        if name == "DROP":
            if r["dropped"] is None:
                return compact(None)
            extra = r["metrics"].get("audio_dropped")   # playback: audio it could not play, any reason
            return compact(r["dropped"] + (r["stale_dropped"] or 0) + (extra if isinstance(extra, int) else 0))
        if name == "REJ":
            return compact(r["rejected"])
        if name == "GAPS":
            return compact(r["gaps"])
        if name == "ERR":
            return compact(r["handler_errors"])
        if name == "SEEN":
            return f"{r['last_seen_s']:.0f}s"
        return ""

    def line(values: list[str], key: str) -> str:
        parts = [f"{fit(v, w):<{w}}" if i < 2 else f"{fit(v, w):>{w}}" for i, (v, (_, w, _)) in enumerate(zip(values, cols))]
        text = " ".join(parts)
        return fit((text + " " + key).rstrip(), width)

    lines = [fit(header or f"livepipe top   {time.strftime('%H:%M:%S')}   {len(rows)} process(es)   q quits", width)]
    lines.append(line([c[0] for c in cols], "KEY FIGURES" if key_width >= 12 else ""))
    names = [r["src"] for r in rows]
    for r in rows:
        r = dict(r, name=r["src"] if names.count(r["src"]) == 1 else f"{r['src'][:8]}:{r['inst'][:4]}")
        figures, key = key_figures(r), ""
        for f in figures:       # whole figures only, as many as fit
            if len(key) + len(f) + (1 if key else 0) > key_width:
                break
            key = f"{key} {f}" if key else f
        lines.append(line([cell(c[0], r) for c in cols], key))
    if not rows:
        lines.append(fit("(no heartbeats yet: gemini-bridge, capture-audio, capture-video and playback "
                         "send one a second on `status`)", width))
    return "\n".join(lines)


class Keys:
    """Single keys from a terminal's stdin (cbreak mode, restored at exit); inert when stdin is no TTY."""

    def __init__(self, stream: TextIO) -> None:
        self.fd: int | None = None
        self.saved: Any = None
        try:
            if stream.isatty():
                import termios
                import tty
                self.fd = stream.fileno()
                self.saved = termios.tcgetattr(self.fd)
                tty.setcbreak(self.fd)
        except (OSError, ValueError, ImportError):   # no termios (Windows) or no real stdin
            self.fd = None

    def pressed(self) -> str:
        """The keys typed since the last call ("" if none); never blocks."""
        import select
        if self.fd is None:
            return ""
        keys = ""
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break
            keys += data.decode("utf-8", "replace")
        return keys

    def close(self) -> None:
        if self.fd is not None and self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def run(args: argparse.Namespace, client: BusClient, stop: StopFlag, out: TextIO,
        keys_in: TextIO | None = None) -> int:
    table = Table()
    tty = out.isatty() and not args.json
    keys = Keys(keys_in if keys_in is not None and tty else io.StringIO())
    started = time.monotonic()
    if args.once:
        deadline: float | None = started + args.window
        next_refresh = deadline
    else:
        deadline = None if args.seconds is None else started + args.seconds
        next_refresh = started   # at once: the user sees the table (or why it is empty) right away

    def refresh(now: float) -> int:
        rows = table.rows(now)
        if args.json:
            out.write(json.dumps({"ts_ns": time.time_ns(), "processes": rows}) + "\n")
        else:
            # The terminal's width now (it may have been resized); piped: $COLUMNS or 120.
            width = shutil.get_terminal_size((120, 24)).columns
            header = (f"livepipe top   {time.strftime('%H:%M:%S')}   {len(rows)} process(es) on "
                      f"{client.cfg.sub_endpoint}" + ("   q quits" if keys.fd is not None else ""))
            table_text = render(rows, width, header)
            if tty:   # redraw in place: home, each line then clear to its end, clear below
                out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in table_text.split("\n")) + "\x1b[J")
            else:
                out.write(table_text + "\n\n")
        out.flush()
        return len(rows)

    if tty:
        out.write("\x1b[H\x1b[2J")
    try:
        while not stop:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if "q" in keys.pressed().lower():
                break
            if not args.once and now >= next_refresh:
                refresh(now)
                next_refresh += args.interval * max(1, int((now - next_refresh) / args.interval) + 1)
            msg = client.recv(max(0.0, min(next_refresh, deadline or next_refresh, now + 0.1) - now))
            if msg is not None and msg.topic == "status" and msg.kind == "heartbeat":
                table.add(msg.header, time.monotonic())
        shown = refresh(time.monotonic())
    finally:
        keys.close()
    if args.once and not shown:
        print(f"livepipe top: no heartbeat within {args.window:g} s: is anything running on "
              f"{client.cfg.sub_endpoint}?", file=sys.stderr)
        return 1
    return 0


@verb("top")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = BusConfig.from_args(args)
    stop = StopFlag()
    client = connect("top", cfg, ["status"], args.connect_timeout, stop=stop)
    if client is None:   # a signal while waiting for the broker
        return 0
    try:
        return run(args, client, stop, sys.stdout, sys.stdin)
    except BrokenPipeError:
        return 0
    finally:
        client.close()
