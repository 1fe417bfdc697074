"""A synchronous bus client for tools (tap, record, replay) and tests.

Services use the asyncio `Service`; this is the small blocking twin: one XPUB to publish,
one SUB for every topic asked for, the same readiness handshake, the same codec.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any, Iterable

import zmq

from livepipe.bus import sockets
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message, decode, encode, make_header, wire_topic
from livepipe.bus.topics import TOPICS, SchemaError, validate


class BusTimeout(TimeoutError):
    pass


class BusClient:
    def __init__(self, name: str = "client", cfg: BusConfig | None = None, topics: Iterable[str] = (),
                 *, all_topics: bool = False, rcvhwm: int = 100_000) -> None:
        self.name = name
        self.cfg = cfg or BusConfig.from_env()
        self.inst = uuid.uuid4().hex[:8]
        self.ctx = zmq.Context()
        self.pub = sockets.publisher(self.ctx, self.cfg)
        self.sub = sockets.subscriber(self.ctx, self.cfg)
        self.sub.rcvhwm = rcvhwm
        self.counters: Counter[str] = Counter()
        self._seq: Counter[str] = Counter()
        self._probe = wire_topic(f"_ready.{self.inst}", self.cfg.session)
        self._probes = wire_topic("_ready.", self.cfg.session)  # every process's readiness probes
        self.handshake = sockets.HandshakeWatch([self.pub, self.sub], self.cfg)   # a refused CURVE key
        self.sub.subscribe(self._probe)
        if all_topics:
            self.sub.subscribe(wire_topic("", self.cfg.session) if self.cfg.session else b"")
        for t in topics:
            self.subscribe(t)
        self.subscriptions: set[bytes] = set()

    def subscribe(self, topic: str) -> None:
        self.sub.subscribe(wire_topic(topic, self.cfg.session))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until our subscriptions reached the broker and our publisher is connected.

        A refused CURVE key raises at once (the broker is there and will not change its mind until
        its allow folder does and it restarts); no broker at all raises after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            refused = self.handshake.check()
            if refused:
                self.counters["curve_refused"] = self.handshake.refused
                raise BusTimeout(refused)
            if left <= 0:
                raise BusTimeout(f"no broker at {self.cfg.pub_endpoint} / {self.cfg.sub_endpoint} "
                                 f"after {timeout:.0f} s")
            if self.pub.poll(int(min(left, 0.1) * 1000)):
                msg = self.pub.recv()
                if msg[:1] == b"\x01":
                    self.subscriptions.add(msg[1:])
                    if msg[1:] == self._probe:
                        break
        # Drain anything else already forwarded, so `has_subscriber` is complete.
        while self.pub.poll(0):
            msg = self.pub.recv()
            (self.subscriptions.add if msg[:1] == b"\x01" else self.subscriptions.discard)(msg[1:])
        self.sub.unsubscribe(self._probe)

    def has_subscriber(self, topic: str) -> bool:
        while self.pub.poll(0):
            msg = self.pub.recv()
            (self.subscriptions.add if msg[:1] == b"\x01" else self.subscriptions.discard)(msg[1:])
        wt = wire_topic(topic, self.cfg.session)
        return any(wt.startswith(s) for s in self.subscriptions if s != self._probe)

    def wait_subscriber(self, topic: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.has_subscriber(topic):
            if time.monotonic() > deadline:
                raise BusTimeout(f"nobody subscribed to {topic} within {timeout} s")
            self.pub.poll(50)

    def publish(self, topic: str, kind: str, payload: bytes | None = None, **fields: Any) -> None:
        seq = self._seq[topic]
        header = make_header(kind, self.name, self.inst, seq, fields)
        validate(topic, header, payload)
        self.send_raw(encode(topic, header, payload, self.cfg.session))
        self._seq[topic] = seq + 1

    def send_raw(self, frames: list) -> None:
        """Send frames as they are (replay, fuzzing): no validation, no header rewrite."""
        self.pub.send_multipart(frames)
        self.counters["sent"] += 1

    def recv_raw(self, timeout: float | None = None) -> list[bytes] | None:
        """The next multipart message as received, or None on timeout (seconds)."""
        if timeout is not None and not self.sub.poll(int(timeout * 1000)):
            return None
        while True:
            frames = self.sub.recv_multipart()
            if not frames[0].startswith(self._probes):
                return frames
            if not self.sub.poll(int(timeout * 1000) if timeout is not None else -1):
                return None

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next valid message (invalid ones are counted as `rejected`), or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            frames = self.recv_raw(left)
            if frames is None:
                return None
            try:
                msg = decode(frames, self.cfg.session)
            except SchemaError:
                self.counters["rejected"] += 1
                continue
            self.counters["received"] += 1
            return msg

    def wait_for(self, topic: str, kind: str | None = None, timeout: float = 10.0, **fields: Any) -> Message:
        """The next message of `topic` (and `kind`, and header `fields`); others are skipped.

        Raises BusTimeout naming what was awaited."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.recv(left)
            if (msg is not None and msg.topic == topic and (kind is None or msg.kind == kind)
                    and all(msg.get(k) == v for k, v in fields.items())):
                return msg
        what = " ".join([topic, kind or "", *(f"{k}={v}" for k, v in fields.items())]).replace("  ", " ")
        raise BusTimeout(f"no {what} within {timeout:g} s")

    def collect(self, seconds: float, topic: str | None = None, kind: str | None = None,
                count: int | None = None) -> list[Message]:
        """Messages received within `seconds` (optionally of one topic/kind, stopping at `count`)."""
        out: list[Message] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and (count is None or len(out) < count):
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                break
            if (topic is None or msg.topic == topic) and (kind is None or msg.kind == kind):
                out.append(msg)
        return out

    def close(self) -> None:
        self.handshake.close()
        self.pub.close(linger=sockets.LINGER_MS)
        self.sub.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "BusClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BusClient", "BusTimeout", "TOPICS"]
