"""The conversation as a user reads it: one line per final transcript, interrupt and session change.

Shared by `livepipe transcript` and `livepipe demo --devices`, so both print the same lines.
Fed with bus messages (transcript, control, status); standard library only. It does not need
audio.in: a subscriber of audio.in would start a file source, or flush capture-audio's backlog,
before the bridge listens. That audio flows is read from the heartbeats.

    turn 1  user:  what do you see
    turn 1  model: a desk and a lamp
    turn 2  interrupted (the user spoke over the model)

Transcripts arrive in pieces: a role's pieces for a turn are joined and printed once that
line is over (a `final` piece, the other role starting, the turn completing or being
interrupted), so each line shows once, whole.
"""
from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livepipe.bus.config import ConfigError
from livepipe.bus.message import Message

READY_LINE = "ready, speak now"
REASONS = {"barge-in": "the user spoke over the model"}   # control: interrupt reasons, in words
METER_WIDTH = 20                   # characters of the level bar
METER_FLOOR_DBFS = -60.0           # an empty bar
HISTORY_TURNS, HISTORY_CHARS = 40, 8000   # what a `control: history` answer carries, at most


def join_pieces(pieces: list[str]) -> str:
    """Transcription pieces joined the way they were spoken: a space where neither side has one."""
    out = ""
    for p in pieces:
        if out and p and not out[-1].isspace() and not p[0].isspace() and p[0] not in ",.;:!?'":
            out += " "
        out += p
    return " ".join(out.split())


def parse_history(data: Any, where: str) -> list[dict[str, Any]]:
    """Turns [{"role": "user"|"model", "text": "..."} or {"role", "parts": [{"text": ...}]}] as Content
    dicts [{"role", "parts": [{"text"}]}]; ConfigError saying what is wrong (from a file or the bus)."""
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: expected a non-empty list of turns like {{\"role\": \"user\", \"text\": \"...\"}}")
    turns = []
    for i, t in enumerate(data):
        role = t.get("role") if isinstance(t, dict) else None
        if role not in ("user", "model"):
            raise ConfigError(f"{where}: turn {i} needs \"role\": \"user\" or \"model\"")
        parts = t.get("parts", [{"text": t.get("text")}])
        if not isinstance(parts, list) or not parts or not all(
                isinstance(q, dict) and isinstance(q.get("text"), str) and q["text"] for q in parts):
            raise ConfigError(f"{where}: turn {i} needs a non-empty \"text\" (or \"parts\": [{{\"text\": ...}}])")
        turns.append({"role": role, "parts": [{"text": q["text"]} for q in parts]})
    return turns


def load_history(path: str, where: str, env: str = "") -> list[dict[str, Any]]:
    """Turns from a JSON file (as parse_history); ConfigError naming `where` (the flag) and, for a
    missing file, the variable `env` it may have come from."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file" + (f" (env {env})" if env else "")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: not readable JSON ({exc})") from None
    return parse_history(data, where)


def turn_line(turn: int, role: str, text: str) -> str:
    """One transcript line: `turn 3  user:  text` (roles aligned)."""
    return f"turn {turn}  {role + ':':<6} {text}"


def meter(level_dbfs: float | None, muted: bool = False, width: int = METER_WIDTH) -> str:
    """A compact microphone meter: `mic  -23 dBFS [#########...........]`."""
    if level_dbfs is None or not math.isfinite(level_dbfs):
        return "mic  (no level yet)"
    filled = round(width * min(1.0, max(0.0, (level_dbfs - METER_FLOOR_DBFS) / -METER_FLOOR_DBFS)))
    return f"mic {level_dbfs:5.0f} dBFS [{'#' * filled}{'.' * (width - filled)}]" + (" muted" if muted else "")


@dataclass
class Conversation:
    """Turns bus messages into the lines a user reads. `feed` returns the lines to print now.

    `turns_only`: only the per-turn lines (transcripts, interrupts), for a caller that reports
    readiness and the session itself (the demo)."""

    turns_only: bool = False
    ready: bool = False
    connected: bool = False
    audio_flowing: bool = False
    backend: str = ""
    session_state: str = ""
    level_dbfs: float | None = None        # capture-audio's last heartbeat level
    muted: bool = False
    _heard_session: bool = False           # session messages seen: heartbeats (a second late) no longer decide
    _pending: dict[tuple[int, str], list[str]] = field(default_factory=dict)   # (turn, role) -> pieces
    said: deque[tuple[str, str]] = field(default_factory=lambda: deque(maxlen=4 * HISTORY_TURNS))   # (role, text)

    def feed(self, msg: Message) -> list[str]:
        topic, kind = msg.topic, msg.kind
        lines: list[str] = []
        if topic == "transcript":
            turn, role = int(msg["turn"]), str(msg["role"])
            if role == "model":   # the model answers: the user's words for this turn are complete
                lines += self._flush(lambda t, r: r == "user" and t <= turn)
            else:                 # the user speaks again: earlier turns of the model are over
                lines += self._flush(lambda t, r: r == "model" and t < turn)
            self._pending.setdefault((turn, role), []).append(str(msg["text"]))
            if msg.get("final"):
                lines += self._flush(lambda t, r: (t, r) == (turn, role))
        elif topic == "control":
            if kind in ("turn_complete", "interrupt"):
                turn = int(msg["turn"])
                lines += self._flush(lambda t, r: t <= turn)
                if kind == "interrupt":
                    reason = str(msg.get("reason") or "")
                    lines.append(f"turn {turn}  interrupted ({REASONS.get(reason, reason or 'no reason given')})")
            elif kind == "session":
                self._heard_session = True
                lines += self._session(str(msg["state"]), str(msg.get("detail") or ""), msg.get("backend"))
            elif kind in ("mute", "unmute"):
                lines.append(f"microphone {kind}d by {msg['src']}")
        elif topic == "status":
            metrics = msg.get("metrics") or {}
            if msg["src"] == "gemini-bridge":
                if isinstance(metrics.get("state"), str) and not self._heard_session:
                    # Started after the bridge connected: its heartbeat says so.
                    lines += self._session(metrics["state"], "", metrics.get("backend"), quiet=True)
                if isinstance(metrics.get("audio_in_chunks"), int) and metrics["audio_in_chunks"] > 0:
                    self.audio_flowing = True     # the bridge receives the microphone
            elif msg["src"] == "capture-audio":
                level = metrics.get("level_dbfs")
                if isinstance(level, (int, float)) and not isinstance(level, bool):
                    self.level_dbfs = float(level)
                self.muted = bool(metrics.get("muted"))
                if isinstance(metrics.get("chunks_published"), int) and metrics["chunks_published"] > 0:
                    self.audio_flowing = True
        elif topic == "text.in":      # typed by the user (say, the console): part of the conversation
            text = " ".join(str(msg["text"]).split())
            if text:   # like speech, it closes the model's earlier turns
                lines += self._flush(lambda t, r: r == "model")
                lines.append(f"typed  {text}")
                self.said.append(("user", text))
        elif topic == "audio.in":     # a caller that watches audio.in anyway (the demo)
            self.audio_flowing = True
        if not self.ready and self.connected and self.audio_flowing:
            self.ready = True
            lines.append(READY_LINE + (f" ({self.backend})" if self.backend else ""))
        if self.turns_only:
            return [line for line in lines if line.startswith("turn ")]
        return lines

    def history(self) -> list[dict[str, str]]:
        """The conversation's finished lines as history turns [{"role", "text"}] (the latest
        HISTORY_TURNS, at most HISTORY_CHARS characters), for a `control: history` answer."""
        turns: list[dict[str, str]] = []
        for role, text in self.said:
            if turns and turns[-1]["role"] == role:
                turns[-1]["text"] += " " + text
            else:
                turns.append({"role": role, "text": text})
        turns = turns[-HISTORY_TURNS:]
        while turns and sum(len(t["text"]) for t in turns) > HISTORY_CHARS:
            del turns[0]
        return turns

    def flush(self) -> list[str]:
        """Every line still pending (at exit)."""
        return self._flush(lambda t, r: True)

    def waiting_for(self) -> str:
        """What the ready line still waits for, in words."""
        missing = []
        if not self.connected:
            missing.append("the model session (gemini-bridge)")
        if not self.audio_flowing:
            missing.append("the microphone (capture-audio)")
        return " and ".join(missing) or "nothing"

    def _session(self, state: str, detail: str, backend: Any, quiet: bool = False) -> list[str]:
        if isinstance(backend, str) and backend:
            self.backend = backend
        if state == self.session_state:
            return []
        self.session_state = state
        was = self.connected
        self.connected = state == "connected"
        if quiet or (state == "connected" and not was and not self.ready):
            return []    # the ready line says it
        return [f"model session {state}" + (f": {detail}" if detail else "")]

    def _flush(self, which: Any) -> list[str]:
        keys = sorted((k for k in self._pending if which(*k)), key=lambda k: (k[0], k[1] != "user"))
        lines = []
        for key in keys:
            text = join_pieces(self._pending.pop(key))
            if text:
                lines.append(turn_line(key[0], key[1], text))
                if key[1] in ("user", "model"):
                    self.said.append((key[1], text))
        return lines


def status_line(conv: Conversation) -> str:
    """The TTY-only line under the conversation: microphone meter and session state."""
    state = conv.session_state or "no bridge yet"
    return f"{meter(conv.level_dbfs, conv.muted)}   model {state}"
