"""The wire format: `[topic, msgpack(header), payload?]` as a ZeroMQ multipart message.

PCM and JPEG bytes travel as their own frame, never inside msgpack, so any language
with ZeroMQ and msgpack can read the bus, and no payload is copied to build a header.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack

from livepipe.bus.topics import SCHEMA_VERSION, SchemaError, Topic, validate

MAX_HEADER_BYTES = 64 * 1024
# Largest frame on the bus. The broker refuses a bigger one from its size field, before reading it,
# and drops that publisher's connection (it reconnects at once), so no subscriber ever receives it.
MAX_FRAME_BYTES = 32 * 1024 * 1024

_packer = msgpack.Packer(use_bin_type=True)


@dataclass(slots=True)
class Message:
    topic: str                   # bare topic name, without the session prefix
    header: dict[str, Any]
    payload: bytes | None = None
    recv_ns: int = 0             # when this process received it (0 if not received)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def age_ms(self) -> float:
        """Milliseconds between publishing and receipt (or now)."""
        now = self.recv_ns or time.time_ns()
        return (now - self.header["ts"]) / 1e6

    def __getitem__(self, key: str) -> Any:
        return self.header[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def wire_topic(topic: str, session: str = "") -> bytes:
    """The first frame: `session/topic` when a session name is set, else `topic`."""
    return f"{session}/{topic}".encode() if session else topic.encode()


def pack_header(header: dict[str, Any]) -> bytes:
    """The second frame: the header as msgpack."""
    return _packer.pack(header)


def encode(topic: str, header: dict[str, Any], payload: bytes | memoryview | None = None,
           session: str = "") -> list[bytes | memoryview]:
    frames: list[bytes | memoryview] = [wire_topic(topic, session), _packer.pack(header)]
    if payload is not None:
        frames.append(payload)
    return frames


def make_header(kind: str, src: str, inst: str, seq: int, fields: dict[str, Any]) -> dict[str, Any]:
    header = {"v": SCHEMA_VERSION, "kind": kind, "src": src, "inst": inst, "seq": seq, "ts": time.time_ns()}
    header.update(fields)
    return header


def decode(frames: Sequence[bytes | Any], session: str = "") -> Message:
    """Parse and validate one received multipart message; raise SchemaError on anything wrong.

    Never raises anything else, whatever the frames hold (the receive path is fuzzed).
    """
    try:
        n = len(frames)
        if n not in (2, 3):
            raise SchemaError(f"{n} frames (expected 2 or 3)")
        raw_topic, raw_header = bytes(frames[0]), bytes(frames[1])
        payload = bytes(frames[2]) if n == 3 else None
        try:
            full = raw_topic.decode()
        except UnicodeDecodeError:
            raise SchemaError("topic is not UTF-8") from None
        if session:
            prefix = session + "/"
            if not full.startswith(prefix):
                raise SchemaError(f"topic {full[:60]!r} is not in session {session!r}")
            topic = full[len(prefix):]
        else:
            topic = full
        if len(raw_header) > MAX_HEADER_BYTES:
            raise SchemaError(f"header of {len(raw_header)} bytes")
        try:
            header = msgpack.unpackb(raw_header, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types on garbage
            raise SchemaError(f"header is not msgpack ({type(exc).__name__})") from None
        validate(topic, header, payload)
        return Message(topic, header, payload, time.time_ns())
    except SchemaError:
        raise
    except Exception as exc:  # defensive: the fuzz test holds us to "SchemaError or a Message"
        raise SchemaError(f"undecodable message ({type(exc).__name__})") from None


def topic_of(topic: str) -> Topic:
    from livepipe.bus.topics import TOPICS
    return TOPICS[topic]
