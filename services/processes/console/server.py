"""`livepipe console`: the server side. A bus `Service` plus an aiohttp web server in one event loop.

What it does with the bus (all decimation happens here, so the page stays light at full bus rate):
- audio.in / audio.out: one RMS level per chunk, reduced to the peak per 50 ms tick (20 Hz).
  Never a sample of PCM goes to the browser. The output meter follows what is *heard*: audio.out
  levels are kept per turn and read at playback's clock (turn_started first_sample_ts), since the
  model's audio arrives in bursts faster than real time.
- user speech: webrtcvad (when installed, as with the gemini/emulator extras) on 20 ms frames above
  -50 dBFS, else the level alone; the end of the last voiced frame before a reply starts is the
  start of voice-to-voice, as `livepipe demo` measures it.
- transcript, control, playback, tool.call, tool.result, text.in: turns, interrupts, latencies.
- status: one row per process; video.in: the newest JPEG only, fetched by the page as an image.

Controls arrive as `POST /api/control` JSON and are turned into the same bus messages the CLI
verbs publish (control mute/unmute, text.in, control interrupt), or run `livepipe record`.

Security: loopback only unless a token is set (--token / LIVEPIPE_CONSOLE_TOKEN); with a token
every request needs it (403 otherwise). Without a token, requests must name a loopback Host and
come from the page's own origin (no DNS rebinding, no cross-site control or WebSocket reading).
Known secrets (API keys, the token) are redacted from everything sent to the page.
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
from aiohttp import WSCloseCode, web

from livepipe.bus import Service, run_event_loop, setup_logging
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.bus.message import Message
from livepipe.services.lib.verb import VerbParser

log = logging.getLogger("console")

STATIC = Path(__file__).resolve().parent / "static"
TICK_S = 0.05                   # levels and timeline: 20 Hz
HISTORY_TICKS = int(30 / TICK_S)  # the page's 30 s timeline, sent whole to a page that connects
KEEP_TURNS = 50
SPEECH_FLOOR_DBFS = -50.0       # quieter 20 ms frames never count as speech
VAD_FRAME = 320                 # 20 ms at 16 kHz
SILENCE_DBFS = -120.0
CLIENT_QUEUE = 400              # messages queued for one page; a page that falls this far behind is closed
MAX_TEXT = 4000
SECRET_NAME = re.compile(r"key|token|secret|passw|auth|credential", re.I)
API_KEY_SHAPE = re.compile(r"AIza[0-9A-Za-z_\-]{30,}")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def now_ns() -> int:
    return time.time_ns()


def level_dbfs(payload: bytes | memoryview, sample_width: int) -> float:
    """RMS level of little-endian PCM (all channels together) in dBFS, -120 for silence."""
    if sample_width == 2:
        x = np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
    elif sample_width == 4:
        x = np.frombuffer(payload, dtype="<i4").astype(np.float32) / 2147483648.0
    elif sample_width == 1:
        x = (np.frombuffer(payload, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:   # 24-bit: rare on the bus; the top two bytes of each sample are enough for a meter
        raw = np.frombuffer(payload, dtype=np.uint8)[: len(payload) // 3 * 3].reshape(-1, 3)
        x = raw[:, 1:].copy().view("<i2").ravel().astype(np.float32) / 32768.0
    if x.size == 0:
        return SILENCE_DBFS
    ms = float(np.mean(x * x))
    return max(SILENCE_DBFS, 10.0 * float(np.log10(ms))) if ms > 0 else SILENCE_DBFS


class SpeechDetector:
    """Where the user's voiced 20 ms frames end (capture clock, ns): the start of voice-to-voice."""

    def __init__(self) -> None:
        try:
            import webrtcvad
            self.vad: Any = webrtcvad.Vad(2)
        except ImportError:   # the console's own extra does not need it; the level alone is close enough
            self.vad = None
        self.voiced_ends: deque[int] = deque(maxlen=3000)   # 60 s of 20 ms frames
        self._pending = np.zeros(0, np.int16)
        self._pending_ts = 0
        self.voiced_in_tick = False

    def feed(self, msg: Message) -> None:
        if msg["rate"] != 16000 or msg["channels"] != 1 or msg["sample_width"] != 2:
            return   # off-contract audio: the meter still moves, but no speech timing
        pcm = np.frombuffer(msg.payload, dtype="<i2")
        ts = msg.get("capture_ts") or msg["ts"]
        if self._pending.size:
            expected = self._pending_ts + self._pending.size * 1_000_000_000 // 16000
            if abs(ts - expected) > 50_000_000:   # a gap or a new source: start over at this chunk
                self._pending = np.zeros(0, np.int16)
        if not self._pending.size:
            self._pending_ts = ts
        buf = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        n = len(buf) // VAD_FRAME
        for i in range(n):
            frame = buf[i * VAD_FRAME:(i + 1) * VAD_FRAME]
            f = frame.astype(np.float32) / 32768.0
            ms = float(np.mean(f * f))
            if ms <= 0 or 10 * np.log10(ms) <= SPEECH_FLOOR_DBFS:
                continue
            if self.vad is None or self.vad.is_speech(frame.tobytes(), 16000):
                self.voiced_ends.append(self._pending_ts + (i + 1) * VAD_FRAME * 1_000_000_000 // 16000)
                self.voiced_in_tick = True
        self._pending_ts += n * VAD_FRAME * 1_000_000_000 // 16000
        self._pending = buf[n * VAD_FRAME:].copy()

    def end_before(self, ts: int) -> int | None:
        for end in reversed(self.voiced_ends):
            if end <= ts:
                return end
        return None


class TurnAudio:
    """A turn's audio.out levels by sample position, to read the output meter at playback's clock."""

    __slots__ = ("starts", "levels", "frames", "rate")

    def __init__(self, rate: int) -> None:
        self.starts: list[int] = []
        self.levels: list[float] = []
        self.frames = 0
        self.rate = rate

    def add(self, frames: int, db: float) -> None:
        self.starts.append(self.frames)
        self.levels.append(db)
        self.frames += frames

    def level_at(self, frame: int) -> float | None:
        if frame < 0 or frame >= self.frames:
            return None
        return self.levels[bisect.bisect_right(self.starts, frame) - 1]


def _num(v: Any) -> float | int | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class ConsoleState:
    """The conversation as the page shows it, built from bus messages only. `emit(dict)` sends
    one JSON event to every page; `snapshot()` is what a page gets when it connects."""

    def __init__(self, emit: Callable[[dict[str, Any]], None]) -> None:
        self.emit = emit
        self.turns: OrderedDict[int, dict[str, Any]] = OrderedDict()
        self.turn_audio: dict[int, TurnAudio] = {}
        self.dirty: set[int] = set()
        self.typed: list[tuple[int, str]] = []          # text.in not yet attached to a turn: (ts, text)
        self.last_text_ts = 0
        self.speech = SpeechDetector()
        self.in_peak = SILENCE_DBFS
        self.out_recv_peak = SILENCE_DBFS               # audio.out as received (no playback running)
        self.out_recv_at = 0
        self.interrupt_in_tick = False
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_TICKS)
        self.procs: dict[str, dict[str, Any]] = {}      # "src/inst" -> row
        self.proc_seen: dict[str, tuple[int, dict[str, Any]]] = {}   # key -> (monotonic ns, counters)
        self.session: dict[str, Any] = {}
        self.muted: bool | None = None
        self.video: dict[str, Any] | None = None
        self.frame: bytes | None = None
        self.video_frames = 0
        self.counts = {"audio_in": 0, "audio_out": 0}

    # ---------------------------------------------------------------- turns
    def turn(self, n: int) -> dict[str, Any]:
        t = self.turns.get(n)
        if t is None:
            t = {"turn": n, "user": "", "model": "", "typed": [], "audio_ms": 0.0, "first_audio_ts": None,
                 "first_sample_ts": None, "played_ms": None, "finished": False, "interrupted": False,
                 "interrupt_reason": None, "interrupt_ts": None, "silent_ts": None, "complete": False,
                 "tools": [], "v2v_ms": None, "v2v_from": None, "budget": None, "i2s_ms": None,
                 "created_ts": now_ns()}
            if self.typed and n > max((k for k in self.turns), default=-1):
                t["typed"] = [text for _, text in self.typed]
                self.typed.clear()
            self.turns[n] = t
            while len(self.turns) > KEEP_TURNS:
                old, _ = self.turns.popitem(last=False)
                self.turn_audio.pop(old, None)
        self.dirty.add(n)
        return t

    def playing_turn(self) -> int | None:
        """The turn the user is hearing now (or about to hear): started or streaming, not finished."""
        for n in reversed(self.turns):
            t = self.turns[n]
            if not t["finished"] and not t["interrupted"] and (t["first_sample_ts"] is not None or t["audio_ms"] > 0):
                return n
        return None

    # ---------------------------------------------------------------- bus handlers
    def on_audio_in(self, msg: Message) -> None:
        self.counts["audio_in"] += 1
        self.in_peak = max(self.in_peak, level_dbfs(msg.payload, msg["sample_width"]))
        self.speech.feed(msg)

    def on_audio_out(self, msg: Message) -> None:
        self.counts["audio_out"] += 1
        n = msg["turn"]
        db = level_dbfs(msg.payload, msg["sample_width"])
        t = self.turn(n)
        t["publisher"] = msg["inst"]   # whose turn it is: the console's interrupt names it
        if t["first_audio_ts"] is None:
            t["first_audio_ts"] = msg["ts"]
        ta = self.turn_audio.get(n)
        if ta is None:
            ta = self.turn_audio[n] = TurnAudio(msg["rate"])
        ta.add(msg["frames"], db)
        t["audio_ms"] = round(ta.frames * 1000 / ta.rate, 1)
        self.out_recv_peak = max(self.out_recv_peak, db)
        self.out_recv_at = now_ns()

    def on_transcript(self, msg: Message) -> None:
        t = self.turn(msg["turn"])
        role = "user" if msg["role"] == "user" else "model"
        t[role] = (t[role] + msg["text"])[-4000:]

    def on_text_in(self, msg: Message) -> None:
        self.typed.append((msg["ts"], msg["text"][:MAX_TEXT]))
        self.last_text_ts = msg["ts"]
        self.emit({"t": "typed", "text": msg["text"][:MAX_TEXT], "src": msg["src"]})

    def on_control(self, msg: Message) -> None:
        kind = msg.kind
        if kind == "interrupt":
            t = self.turn(msg["turn"])
            if not t["interrupted"]:
                t["interrupted"], t["interrupt_ts"] = True, msg["ts"]
                t["interrupt_reason"] = msg.get("reason") or msg["src"]
            self.interrupt_in_tick = True
        elif kind == "turn_complete":
            self.turn(msg["turn"])["complete"] = True
        elif kind == "session":
            self.session = {"state": msg["state"], "detail": msg.get("detail") or "",
                            "backend": msg.get("backend") or self.session.get("backend", ""), "src": msg["src"]}
            self.emit({"t": "session", **self.session})
        elif kind in ("mute", "unmute"):
            self.muted = kind == "mute"
            self.emit({"t": "mute", "muted": self.muted})
        elif kind == "go_away":
            self.emit({"t": "note", "text": f"goAway: {msg['time_left_ms']} ms left on this connection"})

    def on_playback(self, msg: Message) -> None:
        t = self.turn(msg["turn"])
        if msg.kind == "turn_started":
            t["first_sample_ts"] = msg["first_sample_ts"]
            self._latency(t)
        elif msg.kind == "turn_finished":
            t["finished"], t["played_ms"] = True, round(float(msg["played_ms"]), 1)
            t["interrupted"] = t["interrupted"] or bool(msg["interrupted"])
            t["silent_ts"] = msg.get("silent_ts")
            if t["interrupted"] and t["interrupt_ts"] is not None and t["silent_ts"] is not None:
                # An output already silent when the interrupt came counts 0, as in `livepipe demo`.
                t["i2s_ms"] = round(max(0, t["silent_ts"] - t["interrupt_ts"]) / 1e6, 1)

    def _latency(self, t: dict[str, Any]) -> None:
        first = t["first_sample_ts"]
        end = self.speech.end_before(first)
        start, source = end, "speech"
        typed = self.last_text_ts if 0 < self.last_text_ts <= first else 0
        if typed and (end is None or typed > end):
            start, source = typed, "text"
        if start is None or first - start > 60_000_000_000:
            return   # nothing said or typed in the last minute: not a reply to anything we saw
        t["v2v_ms"], t["v2v_from"] = round((first - start) / 1e6, 1), source
        fa = t["first_audio_ts"]
        if fa is not None and start <= fa <= first:
            t["budget"] = {"model_ms": round((fa - start) / 1e6, 1), "playback_ms": round((first - fa) / 1e6, 1)}

    def on_tool_call(self, msg: Message) -> None:
        n = next(reversed(self.turns), None)
        if n is None:
            return
        t = self.turn(n)
        if msg.kind == "call":
            t["tools"].append({"id": msg["id"], "name": msg["name"],
                               "args": json.dumps(msg["args"], default=str)[:500], "result": None})
        else:
            for tool in t["tools"]:
                if tool["id"] in msg["ids"]:
                    tool["result"] = "(cancelled)"

    def on_tool_result(self, msg: Message) -> None:
        for n in reversed(self.turns):
            for tool in self.turns[n]["tools"]:
                if tool["id"] == msg["id"]:
                    tool["result"] = json.dumps(msg["response"], default=str)[:500]
                    self.dirty.add(n)
                    return

    def on_video(self, msg: Message) -> None:
        self.video_frames += 1
        self.frame = bytes(msg.payload)
        self.video = {"seq": self.video_frames, "w": msg["image_width"], "h": msg["image_height"],
                      "bytes": len(self.frame), "capture_ts": msg.get("capture_ts") or msg["ts"],
                      "ts": msg["ts"], "src": msg["src"]}
        self.emit({"t": "video", **self.video})

    def on_status(self, msg: Message) -> None:
        key = f"{msg['src']}/{msg['inst']}"
        c = msg["counters"]
        mono = time.monotonic_ns()
        rates: dict[str, float | None] = {"in_per_s": None, "out_per_s": None}
        prev = self.proc_seen.get(key)
        if prev is not None and mono > prev[0]:
            dt = (mono - prev[0]) / 1e9
            for name, field in (("received", "in_per_s"), ("sent", "out_per_s")):
                a, b = _num(c.get(name)), _num(prev[1].get(name))
                if a is not None and b is not None:
                    rates[field] = round((a - b) / dt, 1)
        self.proc_seen[key] = (mono, dict(c))
        metrics = {k: v for k, v in (msg.get("metrics") or {}).items()
                   if not SECRET_NAME.search(str(k)) and isinstance(v, (int, float, str, bool))}
        row = {"key": key, "src": msg["src"], "inst": msg["inst"], "pid": msg.get("pid"), "host": msg.get("host"),
               "cpu": _num(c.get("cpu_percent")), "rss": _num(c.get("rss_bytes")), **rates,
               "dropped": _num(c.get("dropped")), "stale_dropped": _num(c.get("stale_dropped")),
               "rejected": _num(c.get("rejected")), "gaps": _num(c.get("gaps")),
               "handler_errors": _num(c.get("handler_errors")), "uptime_s": _num(c.get("uptime_s")),
               "metrics": dict(list(metrics.items())[:24]), "ts": msg["ts"]}
        self.procs[key] = row
        if msg["src"] == "capture-audio" and isinstance(metrics.get("muted"), (bool, int)):
            muted = bool(metrics["muted"])
            if muted != self.muted:
                self.muted = muted
                self.emit({"t": "mute", "muted": muted})
        self.emit({"t": "proc", "p": row})

    # ---------------------------------------------------------------- the 20 Hz tick
    def out_level(self, now: int) -> tuple[float, bool]:
        """What the user hears now: the playing turn's level at playback's clock."""
        n = self.playing_turn()
        if n is not None:
            t, ta = self.turns[n], self.turn_audio.get(n)
            if t["first_sample_ts"] is not None and ta is not None:
                pos = (now - t["first_sample_ts"]) * ta.rate // 1_000_000_000
                db = ta.level_at(int(pos))
                return (db if db is not None else SILENCE_DBFS), db is not None or pos < 0
        # No playback process reporting: the audio as it arrives.
        if now - self.out_recv_at < 200_000_000:
            return self.out_recv_peak, True
        return SILENCE_DBFS, False

    def tick(self) -> None:
        now = now_ns()
        out_db, model = self.out_level(now)
        sample = {"t": "lv", "ts": now // 1_000_000, "in": round(self.in_peak, 1), "out": round(out_db, 1),
                  "u": self.speech.voiced_in_tick, "m": model, "i": self.interrupt_in_tick}
        self.history.append(sample)
        self.in_peak = self.out_recv_peak = SILENCE_DBFS
        self.speech.voiced_in_tick = self.interrupt_in_tick = False
        self.emit(sample)
        for n in sorted(self.dirty):
            t = self.turns.get(n)
            if t is not None:
                self.emit({"t": "turn", "turn": t})
        self.dirty.clear()

    def snapshot(self) -> dict[str, Any]:
        mono = time.monotonic_ns()
        procs = [{**row, "age_ms": round((mono - self.proc_seen[k][0]) / 1e6)}
                 for k, row in self.procs.items() if k in self.proc_seen]
        return {"t": "snap", "now": now_ns() // 1_000_000, "turns": list(self.turns.values()),
                "procs": procs, "levels": list(self.history), "video": self.video, "session": self.session,
                "muted": self.muted}

    def forget_silent(self, after_s: float = 60.0) -> None:
        mono = time.monotonic_ns()
        for k in [k for k, (seen, _) in self.proc_seen.items() if mono - seen > after_s * 1e9]:
            self.proc_seen.pop(k, None)
            self.procs.pop(k, None)


# ----------------------------------------------------------------------------- recording
class Recorder:
    """`livepipe record FILE` as a child of the console: the same file format as the CLI verb."""

    def __init__(self, cfg: BusConfig, directory: Path) -> None:
        self.cfg, self.directory = cfg, directory
        self.proc: subprocess.Popen | None = None
        self.path: Path | None = None
        self.started = 0.0

    @property
    def active(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        size = None
        if self.path is not None:
            try:
                size = self.path.stat().st_size
            except OSError:
                pass
        return {"t": "rec", "active": self.active, "path": str(self.path) if self.path else None, "bytes": size,
                "seconds": round(time.monotonic() - self.started, 1) if self.active else None,
                "exit": None if self.proc is None else self.proc.poll()}

    def start(self) -> dict[str, Any]:
        if self.active:
            return self.status()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"console-{time.strftime('%Y%m%d-%H%M%S')}.lprec"
        cmd = [sys.executable, "-m", "livepipe.services", "record", str(self.path),
               "--pub", self.cfg.pub_endpoint, "--sub", self.cfg.sub_endpoint]
        if self.cfg.session:
            cmd += ["--session", self.cfg.session]
        with open(self.path.with_suffix(".log"), "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        self.started = time.monotonic()
        log.info("recording to %s (pid %d)", self.path, self.proc.pid)
        return self.status()

    async def stop(self) -> dict[str, Any]:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)   # record closes its file cleanly on SIGINT
            try:
                await asyncio.to_thread(proc.wait, 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            log.info("recording stopped: %s", self.path)
        return self.status()


# ----------------------------------------------------------------------------- web
def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8080' -> '127.0.0.1', '[::1]:80' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Console:
    def __init__(self, args: argparse.Namespace, cfg: BusConfig, token: str | None) -> None:
        self.args, self.cfg, self.token = args, cfg, token
        self.clients: dict[web.WebSocketResponse, asyncio.Queue[str | None]] = {}
        self.state = ConsoleState(self.broadcast)
        self.recorder = Recorder(cfg, Path(args.record_dir).expanduser())
        secrets = [os.environ.get(k, "") for k in ("GEMINI_API_KEY", "GOOGLE_API_KEY")]
        self.secrets = [s for s in secrets if len(s) >= 8]
        self.svc: Service | None = None
        self.url = ""
        self.stats = {"ws_messages": 0, "clients_dropped": 0, "controls": 0, "refused": 0}

    # ---------------------------------------------------------------- pushing
    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return API_KEY_SHAPE.sub("***", text) if "AIza" in text else text

    def broadcast(self, event: dict[str, Any]) -> None:
        if not self.clients:
            return
        text = self.redact(json.dumps(event, separators=(",", ":"), default=str))
        for ws, q in list(self.clients.items()):
            try:
                q.put_nowait(text)
            except asyncio.QueueFull:
                # A page that cannot keep up is closed; it reconnects and gets a fresh snapshot.
                self.stats["clients_dropped"] += 1
                self.clients.pop(ws, None)
                q.get_nowait()
                q.put_nowait(None)

    async def _writer(self, ws: web.WebSocketResponse, q: asyncio.Queue[str | None]) -> None:
        while True:
            text = await q.get()
            if text is None:
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
                return
            await ws.send_str(text)
            self.stats["ws_messages"] += 1

    # ---------------------------------------------------------------- access
    def check(self, request: web.Request) -> str | None:
        """Why this request is refused, or None."""
        if self.token:
            if request.path.startswith("/static/") or request.path == "/favicon.ico":
                return None   # the page's code and style: public, and loaded by tags that cannot carry a token
            given = request.query.get("token") or request.headers.get("X-Livepipe-Token", "")
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return "a token is required: open the URL with ?token=YOUR_TOKEN"
            return None
        host = _host_name(request.headers.get("Host", ""))
        if not is_loopback(host):
            return f"Host {host!r} is not loopback (set a token to serve other addresses)"
        origin = request.headers.get("Origin")
        if origin is not None:   # "null" too: a sandboxed frame of any site sends it
            m = re.match(r"^https?://(\[[^\]]+\]|[^:/]+)", origin)
            if not m or not is_loopback(m.group(1).strip("[]")):
                return f"cross-site request from {origin!r} refused"
        return None

    @web.middleware
    async def guard(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        why = self.check(request)
        if why is not None:
            self.stats["refused"] += 1
            return web.Response(status=403, text=f"livepipe console: {why}\n")
        resp = await handler(request)
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Content-Security-Policy",
                                "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' ws: wss:; "
                                "style-src 'self'; script-src 'self'")
        return resp

    # ---------------------------------------------------------------- routes
    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def frame(self, request: web.Request) -> web.StreamResponse:
        if self.state.frame is None:
            return web.Response(status=404, text="no video frame yet\n")
        return web.Response(body=self.state.frame, content_type="image/jpeg")

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
        await ws.prepare(request)
        q: asyncio.Queue[str | None] = asyncio.Queue(CLIENT_QUEUE)
        q.put_nowait(self.redact(json.dumps(self.state.snapshot(), separators=(",", ":"), default=str)))
        q.put_nowait(json.dumps(self.recorder.status()))
        self.clients[ws] = q
        writer = asyncio.create_task(self._writer(ws, q))
        try:
            async for _ in ws:   # the page sends nothing but pings; controls go through POST
                pass
        finally:
            self.clients.pop(ws, None)
            writer.cancel()
        return ws

    async def control(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return web.json_response({"ok": False, "error": "send JSON (Content-Type: application/json)"}, status=415)
        try:
            body = await request.json()
            op = body["op"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"ok": False, "error": 'expected {"op": "mute|unmute|interrupt|text|'
                                      'record_start|record_stop", ...}'}, status=400)
        svc = self.svc
        assert svc is not None
        self.stats["controls"] += 1
        if op in ("mute", "unmute"):
            ok = svc.publish("control", op)
            return web.json_response({"ok": ok})
        if op == "interrupt":
            turn = self.state.playing_turn()
            if turn is None:
                return web.json_response({"ok": False, "error": "nothing is playing"}, status=409)
            ok = svc.publish_interrupt(turn, "console", of=self.state.turns[turn].get("publisher"))
            return web.json_response({"ok": ok, "turn": turn})
        if op == "text":
            text = body.get("text")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
                return web.json_response({"ok": False, "error": f"text: 1 to {MAX_TEXT} characters"}, status=400)
            ok = svc.publish("text.in", "text", text=text.strip())
            return web.json_response({"ok": ok})
        if op == "record_start":
            try:
                status = self.recorder.start()
            except OSError as exc:
                return web.json_response({"ok": False, "error": f"cannot record: {exc}"}, status=500)
            self.broadcast(status)
            return web.json_response({"ok": True, **status})
        if op == "record_stop":
            status = await self.recorder.stop()
            self.broadcast(status)
            return web.json_response({"ok": True, **status})
        return web.json_response({"ok": False, "error": f"unknown op {op!r}"}, status=400)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.guard], client_max_size=64 * 1024)
        app.router.add_get("/", self.index)
        app.router.add_get("/ws", self.websocket)
        app.router.add_get("/frame.jpg", self.frame)
        app.router.add_get("/favicon.ico", lambda request: web.Response(status=204))
        app.router.add_post("/api/control", self.control)
        app.router.add_static("/static/", STATIC, show_index=False)
        return app

    # ---------------------------------------------------------------- running
    def attach(self, svc: Service) -> None:
        self.svc = svc
        s = self.state
        svc.on("audio.in", s.on_audio_in)
        svc.on("audio.out", s.on_audio_out)
        svc.on("transcript", s.on_transcript)
        svc.on("text.in", s.on_text_in)
        svc.on("control", s.on_control)
        svc.on("playback", s.on_playback)
        svc.on("tool.call", s.on_tool_call)
        svc.on("tool.result", s.on_tool_result)
        svc.on("status", s.on_status)
        svc.on("video.in", s.on_video)

    async def serve(self, svc: Service) -> int:
        """Serve the page at once (it says which processes are missing), then run the bus service."""
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.args.host, self.args.port)
            try:
                await site.start()
            except OSError as exc:
                log.error("cannot listen on %s:%s: %s", self.args.host, self.args.port, exc.strerror)
                return 2
            host, port = runner.addresses[0][:2]
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{port}/"
            print(f"livepipe console: {self.url}" + ("  (add ?token=YOUR_TOKEN)" if self.token else ""), flush=True)
            return await svc.run(self._tick_loop)
        finally:
            await self.recorder.stop()
            for q in self.clients.values():
                if not q.full():
                    q.put_nowait(None)
            await runner.cleanup()

    async def _tick_loop(self, svc: Service) -> None:
        loop = asyncio.get_running_loop()
        next_t = loop.time()
        second = 0
        while not svc.stopping:
            self.state.tick()
            second += 1
            if second % 20 == 0:   # once a second: recording status, forget long-gone processes, metrics
                if self.recorder.proc is not None:
                    self.broadcast(self.recorder.status())
                self.state.forget_silent()
                svc.metrics.update(clients=len(self.clients), recording=int(self.recorder.active),
                                   video_frames=self.state.video_frames, **self.stats)
            next_t += TICK_S
            delay = next_t - loop.time()
            if delay < -1.0:    # fell far behind (suspended?): do not burst to catch up
                next_t, delay = loop.time(), 0.0
            await asyncio.sleep(max(0.0, delay))


def state_dir() -> Path:
    return Path(os.environ.get("LIVEPIPE_STATE_DIR") or Path.home() / ".local" / "state" / "livepipe").expanduser()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe console", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=os.environ.get("LIVEPIPE_CONSOLE_HOST", "127.0.0.1"),
                   help="address to serve on (env LIVEPIPE_CONSOLE_HOST, default 127.0.0.1); "
                        "anything but loopback needs --token")
    p.add_argument("--port", type=int, default=int(os.environ.get("LIVEPIPE_CONSOLE_PORT") or 8710),
                   help="TCP port (env LIVEPIPE_CONSOLE_PORT, default 8710; 0 picks a free one)")
    p.add_argument("--token", default=None,
                   help="access token required by every request (?token=...); prefer the environment "
                        "variable LIVEPIPE_CONSOLE_TOKEN, which does not show in `ps`")
    p.add_argument("--record-dir", default=str(state_dir() / "recordings"), metavar="DIR",
                   help="where the record button writes .lprec files (default <state>/recordings)")
    add_bus_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("console")
    token = args.token or os.environ.get("LIVEPIPE_CONSOLE_TOKEN") or None
    if not is_loopback(args.host) and not token:
        log.error("refusing to serve on %s without a token: set LIVEPIPE_CONSOLE_TOKEN (or --token), "
                  "or use --host 127.0.0.1", args.host)
        return 2
    if token is not None and len(token) < 16:
        log.error("the token is too short: use 16 characters or more (e.g. `python3 -c "
                  "\"import secrets; print(secrets.token_urlsafe(24))\"`)")
        return 2
    try:
        cfg = BusConfig.from_args(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    console = Console(args, cfg, token)
    svc = Service("console", cfg, log)
    console.attach(svc)
    try:
        return run_event_loop(console.serve(svc))
    except KeyboardInterrupt:
        return 130
