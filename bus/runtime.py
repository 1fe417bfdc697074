"""The service runtime every livepipe process uses.

    svc = Service("playback")
    svc.on("audio.out", handle_audio)          # handler(msg) -> None | awaitable
    svc.on("control", handle_control)
    sys.exit(svc.main(run_device))             # mains are `async def f(svc)`; run after the bus is live

A service runs until SIGINT/SIGTERM, serving its handlers, whatever its mains do: a main that
returns None (or no main at all) leaves the handlers running. A main ends the process by
returning an int, the exit code (`return 0`), or by calling `svc.stop(code)` from anywhere.

What it guarantees:
- one socket pair per lane (control, audio, video, events), so an `interrupt` never waits
  behind queued audio, and each lane's handlers run in their own task;
- mains start only once the bus path is proven live (the slow-joiner problem): every
  subscription of ours has reached the broker and come back to our own publishers;
- a heartbeat on `status` every second with the counters, CPU and RSS;
- a clean exit (code 0) within 1 s on SIGINT/SIGTERM, a non-zero exit code if a main fails.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from typing import Any, Awaitable, Callable, Coroutine, TypeVar, Union

import zmq
import zmq.asyncio

from livepipe.bus import sockets
from livepipe.bus.config import BusConfig, ConfigError
from livepipe.bus.message import MAX_FRAME_BYTES, Message, decode, make_header, pack_header as _pack, wire_topic
from livepipe.bus.topics import LANES, TOPICS, SchemaError, validate

T = TypeVar("T")
Handler = Callable[[Message], Union[None, Awaitable[None]]]
Main = Callable[["Service"], Awaitable[Union[int, None]]]   # an int return ends the service with that code

HEARTBEAT_S = 1.0
COUNTER_NAMES = ("sent", "received", "gaps", "rejected", "dropped", "stale_dropped", "handler_errors")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main); on uvloop with LIVEPIPE_EVENT_LOOP=uvloop where it is installed (opt-in:
    with it as the default, two bridge conversation tests failed once each in fresh-clone CI runs,
    cause not found). A conversation wakes each process's loop hundreds of times a second (a microphone
    fragment every 5-10 ms, each bus message): on the 2-core VM an idle asyncio loop's wakeup cost
    130-140 us of CPU against 40-80 us for uvloop's (README, Performance)."""
    if os.environ.get("LIVEPIPE_EVENT_LOOP", "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:   # not on Windows; a minimal install
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class RateLimitedLog:
    """Log one line per key per `interval` seconds, saying how many were suppressed.

    Keys must come from a small set (never from message content); the table is bounded anyway,
    forgetting the longest-quiet keys, so hostile input cannot grow it."""

    MAX_KEYS = 256

    def __init__(self, log: logging.Logger, interval: float = 5.0) -> None:
        self.log, self.interval = log, interval
        self._last: OrderedDict[str, float] = OrderedDict()
        self._suppressed: Counter[str] = Counter()

    def warning(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            extra = f" ({self._suppressed[key]} more suppressed)" if self._suppressed[key] else ""
            self._suppressed.pop(key, None)
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.MAX_KEYS:
                old, _ = self._last.popitem(last=False)
                self._suppressed.pop(old, None)
            self.log.warning("%s%s", text, extra)
        else:
            self._suppressed[key] += 1


class Service:
    def __init__(self, name: str, cfg: BusConfig | None = None, log: logging.Logger | None = None) -> None:
        self.name = name
        self.cfg = cfg or BusConfig.from_env()
        self.inst = uuid.uuid4().hex[:8]
        self.log = log or logging.getLogger(name)
        self.ratelog = RateLimitedLog(self.log)
        self.counters: Counter[str] = Counter({k: 0 for k in COUNTER_NAMES})
        self.metrics: dict[str, float | int | str] = {}   # service-specific figures for the heartbeat
        self.exit_code = 0
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._seq: Counter[str] = Counter()
        self._last_seq: dict[tuple[str, str], int] = {}   # oldest-heard first (see _check_seq)
        self._subscribed: set[bytes] = set()      # wire topics someone subscribes to, per the broker
        self._sub_events: dict[bytes, asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._sync_pubs: dict[str, zmq.Socket] = {}
        self._wire_topics: dict[str, bytes] = {}
        self._fd_readers: list[int] = []           # socket FDs watched by the lanes
        self._lanes: list[_Lane] = []
        self._polled: set[str] = set()             # topics whose messages wait for poll(topic)
        self._polled_lanes: dict[str, _Lane] = {}  # lanes of polled topics only: not watched by the loop
        self._subs: dict[str, zmq.Socket] = {}     # lane -> its SUB socket, while running
        self._muted: set[str] = set()              # topics with handlers, not subscribed for now (listen)
        self._handshake: sockets.HandshakeWatch | None = None   # tells a refused CURVE key from no broker
        self._probe_prefix = wire_topic("_ready.", self.cfg.session)
        self.started_ns = time.time_ns()

    # ------------------------------------------------------------------ API
    def on(self, topic: str, handler: Handler, polled: bool = False) -> None:
        """Call `handler(msg)` for every valid message on `topic` (register before run).

        polled: the messages wait in the socket until `poll(topic)` dispatches them, at the
        process's own pace, instead of each waking the loop as it arrives (capture-audio takes its
        echo reference at each microphone chunk: a wakeup costs more than the message). A lane
        that also carries topics not polled is served as they arrive; poll() is then a no-op."""
        if topic not in TOPICS:
            raise KeyError(f"unknown topic {topic!r}")
        self._handlers[topic].append(handler)
        if polled:
            self._polled.add(topic)

    def poll(self, topic: str) -> None:
        """Dispatch now the messages of a polled topic (see `on`) that have arrived."""
        lane = self._polled_lanes.get(TOPICS[topic].lane)
        if lane is not None:
            lane.serve_all()

    def listen(self, topic: str, on: bool) -> None:
        """Subscribe to a topic that has handlers (the default), or stop receiving it for now: a
        process that needs a frequent topic only at times need not be woken by every message."""
        if topic not in TOPICS:
            raise KeyError(f"unknown topic {topic!r}")
        if on == (topic not in self._muted):
            return
        (self._muted.discard if on else self._muted.add)(topic)
        sock = self._subs.get(TOPICS[topic].lane)
        if sock is not None and not sock.closed and topic in self._handlers:
            wt = wire_topic(topic, self.cfg.session)
            sock.subscribe(wt) if on else sock.unsubscribe(wt)

    def publish(self, topic: str, kind: str, payload: bytes | memoryview | None = None, **fields: Any) -> bool:
        """Publish one message; returns False (and counts `dropped`) if the queue is full.

        Call from the event loop thread; from other threads use publish_threadsafe."""
        if payload is not None and len(payload) > MAX_FRAME_BYTES:
            # The broker would refuse it and drop our connection: refuse it here, in one line.
            self.counters["dropped"] += 1
            self.ratelog.warning(f"big:{topic}", f"not sent: a {topic} payload of {len(payload)} bytes "
                                                 f"(the bus carries at most {MAX_FRAME_BYTES} per frame)")
            return False
        seq = self._seq[topic]
        header = make_header(kind, self.name, self.inst, seq, fields)
        validate(topic, header, None if payload is None else memoryview(payload))  # never send wrong
        lane = TOPICS[topic].lane
        send = self._sync_pubs["control" if lane == "control" else "data"].send
        wt = self._wire_topics.get(topic)
        if wt is None:
            wt = self._wire_topics[topic] = wire_topic(topic, self.cfg.session)
        # The parts one by one with int flags: send_multipart's checks and enum flags cost more
        # than the sends themselves for a 640-byte chunk.
        try:
            if payload is None:
                send(wt, _NOBLOCK | _SNDMORE)
                send(_pack(header), _NOBLOCK)
            else:
                send(wt, _NOBLOCK | _SNDMORE)
                send(_pack(header), _NOBLOCK | _SNDMORE)
                send(payload, _NOBLOCK, copy=len(payload) < 65536)
        except zmq.Again:
            self.counters["dropped"] += 1
            self.ratelog.warning(f"drop:{topic}", f"send queue full: dropped a {topic} message")
            return False
        self._seq[topic] = seq + 1
        self.counters["sent"] += 1
        return True

    def publish_threadsafe(self, topic: str, kind: str, payload: bytes | None = None, **fields: Any) -> None:
        """Publish from another thread (e.g. an audio device callback)."""
        assert self._loop is not None, "service not running"
        self._loop.call_soon_threadsafe(lambda: self.publish(topic, kind, payload, **fields))

    def publish_interrupt(self, turn: int, reason: str = "", of: str | None = None) -> bool:
        """`control: interrupt` of `turn`: the turn of instance `of` (default: this service's own)."""
        fields: dict[str, Any] = {"reason": reason} if reason else {}
        if of:
            fields["of"] = of
        return self.publish("control", "interrupt", turn=turn, **fields)

    def has_subscriber(self, topic: str) -> bool:
        """True if some process subscribes to `topic` (as the broker reports subscriptions)."""
        wt = wire_topic(topic, self.cfg.session)
        return any(wt.startswith(s) for s in self._subscribed)

    async def wait_subscriber(self, topic: str, timeout: float | None = None) -> bool:
        """Wait until some process subscribes to `topic`; False on timeout."""
        wt = wire_topic(topic, self.cfg.session)
        if self.has_subscriber(topic):
            return True
        return await wait_event(self._sub_events.setdefault(wt, asyncio.Event()), timeout)

    def stop(self, code: int = 0) -> None:
        """Ask the service to exit with `code` (the first non-zero code wins)."""
        if code and not self.exit_code:
            self.exit_code = code
        if self._stop is not None:
            self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def main(self, *mains: Main) -> int:
        """Run until SIGINT/SIGTERM, `stop(code)` or a main returning an int; returns the exit code
        (for sys.exit). A main returning None leaves the service serving its handlers."""
        try:
            return run_event_loop(self.run(*mains))
        except KeyboardInterrupt:
            return 130

    # ------------------------------------------------------------- running
    async def run(self, *mains: Main) -> int:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        stop_signals = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._loop.add_signal_handler(sig, self.stop)
                stop_signals.append(sig)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                pass
        ctx = zmq.asyncio.Context()
        socks: list[zmq.Socket] = []
        tasks: list[asyncio.Task] = []
        try:
            pubs = {name: sockets.publisher(ctx, self.cfg) for name in ("control", "data")}
            socks += pubs.values()
            self._sync_pubs = {name: zmq.Socket.shadow(s.underlying) for name, s in pubs.items()}
            lanes = sorted({TOPICS[t].lane for t in self._handlers} | {"control"}, key=LANES.index)
            subs = {lane: sockets.subscriber(ctx, self.cfg, lane) for lane in lanes}
            socks += subs.values()
            probes = {wire_topic(f"_ready.{self.inst}.{lane}", self.cfg.session) for lane in lanes}
            for lane, s in subs.items():
                s.subscribe(wire_topic(f"_ready.{self.inst}.{lane}", self.cfg.session))
            self._subs = subs
            for topic in self._handlers:
                if topic not in self._muted:
                    subs[TOPICS[topic].lane].subscribe(wire_topic(topic, self.cfg.session))
            pending = {(name, p) for name in pubs for p in probes}
            self._handshake = sockets.HandshakeWatch([*pubs.values(), *subs.values()], self.cfg)
            tasks += [asyncio.create_task(self._watch_subscriptions(name, s, pending)) for name, s in pubs.items()]
            tasks += [t for lane, s in subs.items() if (t := self._start_lane(lane, s)) is not None]
            await self._wait_ready(pending)
            if self._stop.is_set():
                return self.exit_code
            for lane, s in subs.items():
                s.unsubscribe(wire_topic(f"_ready.{self.inst}.{lane}", self.cfg.session))
            tasks.append(asyncio.create_task(self._heartbeat()))
            tasks += [asyncio.create_task(self._run_main(m)) for m in mains]
            await self._stop.wait()
        except ConfigError as exc:
            self.log.error("%s", exc)
            self.exit_code = self.exit_code or 2
        finally:
            for lane_obj in self._lanes:
                lane_obj.closing = True
                if lane_obj.task is not None:
                    tasks.append(lane_obj.task)
            await self._cancel_tasks(tasks)
            for fd in self._fd_readers:
                self._loop.remove_reader(fd)
            self._fd_readers.clear()
            if self._handshake is not None:
                self._handshake.close()
            for s in self._sync_pubs.values():
                s.close(linger=sockets.LINGER_MS)
            for s in socks:
                s.close(linger=sockets.LINGER_MS)
            ctx.term()
            self._lanes.clear()
            self._polled_lanes.clear()
            self._subs = {}
            # Closing the loop would put the default actions back: a second SIGTERM or SIGINT during
            # the rest of the exit (a supervisor or a user repeating themselves) would turn a clean
            # exit into rc -15 or a traceback. The exit is underway and bounded: ignore them.
            for sig in stop_signals:
                self._loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        return self.exit_code

    async def _cancel_tasks(self, tasks: list[asyncio.Task]) -> None:
        """Cancel and await `tasks`, cancelling again any task that swallowed the cancellation.

        asyncio.wait_for before Python 3.12 swallows a cancel that arrives in the loop iteration
        where its awaitable completes (cpython gh-86296); one cancel alone left such a main running
        and the process deaf to SIGTERM until SIGKILL."""
        pending = {t for t in tasks if not t.done()}
        t0, warned = time.monotonic(), False
        while pending:
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.05)
            if pending and not warned and time.monotonic() - t0 > 1.0:
                warned = True
                self.log.warning("still stopping after 1 s: %s ignore cancellation",
                                 ", ".join(sorted(str(t.get_coro()) for t in pending)))
        for t in tasks:   # retrieve outcomes (no "exception was never retrieved" noise)
            if not t.cancelled():
                t.exception()

    async def _wait_ready(self, pending: set) -> None:
        """Wait for the readiness handshake, or a stop; log every 5 s while the broker is missing.

        A refused CURVE key is said within half a second, then at most once per 5 s period: the
        broker is there, so the user need not wait out a 5 s "is the broker running?" period."""
        t0 = time.monotonic()
        next_log = t0 + 5.0
        refused_in_period = said_in_period = False
        waiters = [asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            while pending and not self._stop.is_set():
                done, _ = await asyncio.wait(waiters, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                now = time.monotonic()
                refused = self._handshake.check() if self._handshake is not None and not done else None
                if refused:
                    self.counters["curve_refused"] = self._handshake.refused
                    refused_in_period = True
                    if not said_in_period:
                        self.log.error("%s", refused)
                        said_in_period = True
                if done:
                    if now - t0 > 5.0 and not self._stop.is_set():
                        self.log.info("bus is live")
                elif now >= next_log:
                    if not refused_in_period:
                        self.log.warning("waiting for the broker (publish %s, subscribe %s) for %.0f s: "
                                         "is `livepipe broker` running?", self.cfg.pub_endpoint,
                                         self.cfg.sub_endpoint, now - t0)
                    refused_in_period = said_in_period = False
                    next_log = now + 5.0
        finally:
            for w in waiters:
                w.cancel()

    async def _run_main(self, main: Main) -> None:
        try:
            code = await main(self)
            if isinstance(code, int) and not isinstance(code, bool):
                self.stop(code)
            elif code is not None:
                self.log.warning("%s: a main returned %r; return an int exit code, or None to keep serving",
                                 self.name, code)
        except asyncio.CancelledError:
            raise
        except ConfigError as exc:
            self.log.error("%s", exc)
            self.stop(2)
        except Exception as exc:
            self.log.error("%s failed: %s: %s", self.name, type(exc).__name__, exc,
                           exc_info=self.log.isEnabledFor(logging.DEBUG))
            self.stop(1)

    async def _watch_subscriptions(self, name: str, sock: zmq.asyncio.Socket, pending: set) -> None:
        """Read the subscription messages the broker forwards to our XPUB."""
        while True:
            msg = await sock.recv()
            if not msg:
                continue
            on, topic = msg[0] == 1, bytes(msg[1:])
            if on:
                pending.discard((name, topic))
                if not pending:
                    self._ready.set()
                if name == "data":
                    self._subscribed.add(topic)
                    for wt, ev in self._sub_events.items():
                        if wt.startswith(topic):
                            ev.set()
            elif name == "data":
                self._subscribed.discard(topic)

    def _start_lane(self, lane: str, sock: zmq.asyncio.Socket) -> asyncio.Task | None:
        """Serve one lane: from the socket's FD callback (_Lane), or, where the loop cannot watch
        an FD (Windows' proactor), from a task polling through zmq.asyncio; a lane of polled
        topics only, from poll()."""
        sync = zmq.Socket.shadow(sock.underlying)
        lane_obj = _Lane(self, lane, sync)
        topics = {t for t in self._handlers if TOPICS[t].lane == lane}
        if topics and topics <= self._polled:
            self._polled_lanes[lane] = lane_obj
            self._lanes.append(lane_obj)
            return None
        fd = sync.getsockopt(zmq.FD)
        try:
            self._loop.add_reader(fd, lane_obj.on_fd)
        except NotImplementedError:
            return asyncio.create_task(self._polled_lane(lane_obj, sock))
        self._fd_readers.append(fd)
        self._lanes.append(lane_obj)
        self._loop.call_soon(lane_obj.on_fd)   # anything queued before the reader was added
        return None

    async def _polled_lane(self, lane: "_Lane", sock: zmq.asyncio.Socket) -> None:
        while True:
            await sock.poll(flags=zmq.POLLIN)
            for frames in lane.take():
                pending = self._dispatch_now(frames)
                if pending is not None:
                    await pending
            await asyncio.sleep(0)

    def _dispatch_now(self, frames: list[bytes]) -> Awaitable[None] | None:
        """Decode one message and run its handlers; returns what is left to await when a handler
        returned an awaitable (the handlers after it run once it is done), else None."""
        if frames[0].startswith(self._probe_prefix):
            return None  # a readiness probe: not for handlers
        try:
            msg = decode(frames, self.cfg.session)   # a single frame is rejected there, and counted
        except SchemaError as exc:
            self.counters["rejected"] += 1
            topic = bytes(frames[0][:40]) if frames else b""
            name = topic.decode("utf-8", "replace")
            if self.cfg.session:
                name = name.removeprefix(self.cfg.session + "/")
            # One rate-limit key per declared topic, one for all others: random topic names
            # cannot multiply the lines (or the table).
            key = f"reject:{name}" if name in TOPICS else "reject:?"
            self.ratelog.warning(key, f"rejected a message on {topic.decode('utf-8', 'replace')!r}: {exc}")
            return None
        self.counters["received"] += 1
        self._check_seq(msg)
        handlers = self._handlers.get(msg.topic, ())
        for i, handler in enumerate(handlers):
            try:
                result = handler(msg)
            except Exception as exc:
                self._handler_failed(msg, exc)
                continue
            if result is not None and inspect.isawaitable(result):
                return self._finish_handlers(msg, result, handlers[i + 1:])
        return None

    async def _finish_handlers(self, msg: Message, result: Awaitable[Any], rest: list[Handler]) -> None:
        try:
            await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._handler_failed(msg, exc)
        for handler in rest:
            try:
                result = handler(msg)
                if result is not None and inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._handler_failed(msg, exc)

    def _handler_failed(self, msg: Message, exc: Exception) -> None:
        self.counters["handler_errors"] += 1
        self.ratelog.warning(f"handler:{msg.topic}", f"handler for {msg.topic} failed: {type(exc).__name__}: {exc}")

    async def _dispatch(self, frames: list[bytes]) -> None:
        """Decode one message and run its handlers to the end (awaiting any that are async)."""
        pending = self._dispatch_now(frames)
        if pending is not None:
            await pending

    def _check_seq(self, msg: Message) -> None:
        header = msg.header
        key = (header["inst"], msg.topic)
        seq = header["seq"]
        last_seq = self._last_seq
        last = last_seq.pop(key, None)   # re-inserted last: the dict's order is least recently heard first
        if last is not None and seq > last + 1:
            self.counters["gaps"] += seq - last - 1
        last_seq[key] = seq
        if len(last_seq) > 1024:   # bounded: forget the longest-silent sources
            del last_seq[next(iter(last_seq))]

    async def _heartbeat(self) -> None:
        try:
            import psutil
            proc = psutil.Process()
            proc.cpu_percent(None)
        except Exception:  # psutil missing or unsupported: heartbeat still goes out
            proc = None
        host = socket.gethostname()
        while True:
            counters: dict[str, float | int] = dict(self.counters)
            if proc is not None:
                counters["cpu_percent"] = round(proc.cpu_percent(None), 1)
                counters["rss_bytes"] = proc.memory_info().rss
            counters["uptime_s"] = round((time.time_ns() - self.started_ns) / 1e9, 1)
            self.publish("status", "heartbeat", counters=counters, metrics=dict(self.metrics),
                         pid=os.getpid(), host=host)
            await asyncio.sleep(HEARTBEAT_S)


# Plain ints: the zmq constants are enums, and `int & enum` builds a new enum member each time
# (a Python-level call, several per message).
_EVENTS, _POLLIN, _RCVMORE, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE), int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
BATCH = 256   # messages read per turn of one lane, so a flooded lane cannot starve the loop


class _Lane:
    """One lane's SUB socket, read and dispatched from the event loop's callback on its ZMQ_FD.

    A message costs one loop wakeup: it is read, decoded and handed to the (synchronous) handlers in
    that callback, with no task woken in between (a wakeup of an idle process costs ~100 us of CPU
    on a small VM, more than the decoding). A handler that returns an awaitable is awaited in a task;
    the lane's later messages wait for it, in order, and are then read by that task.

    ZMQ_FD is edge-triggered: reading ZMQ_EVENTS consumes its notification, so it is read on every
    callback (also while a task holds the lane) and the queue is read until ZMQ_EVENTS says it is empty."""

    def __init__(self, svc: Service, name: str, sync: zmq.Socket) -> None:
        self.svc, self.name, self.sync = svc, name, sync
        self.newest_only = name == "video"
        self.task: asyncio.Task | None = None   # running an async handler: the lane is held
        self.closing = False

    def on_fd(self) -> None:
        if self.closing or self.sync.closed:
            return
        if self.task is not None:
            self.sync.get(_EVENTS)   # consume the edge; the task reads the queue when its handler is done
            return
        self._serve()

    def take(self) -> list[list[bytes]]:
        """Up to BATCH queued messages, without blocking (video: only the newest, the rest counted)."""
        batch: list[list[bytes]] = []
        sync = self.sync
        recv, get = sync.recv, sync.get
        while len(batch) < BATCH:
            try:
                frames = [recv(_NOBLOCK)]
            except zmq.Again:
                break
            while get(_RCVMORE):
                frames.append(recv(_NOBLOCK))   # the parts of a message arrive together
            batch.append(frames)
            if not get(_EVENTS) & _POLLIN:
                break
        if self.newest_only and len(batch) > 1:
            self.svc.counters["stale_dropped"] += len(batch) - 1
            batch = batch[-1:]
        return batch

    def serve_all(self) -> None:
        """Dispatch every message queued now (a polled lane), unless a task holds the lane. Asked at
        every microphone chunk, mostly of an empty queue: ZMQ_EVENTS says so without a failed recv."""
        while (self.task is None and not self.closing and not self.sync.closed
               and self.sync.get(_EVENTS) & _POLLIN):
            if self._dispatch(self.take()) < BATCH:
                return

    def _serve(self) -> None:
        if self._dispatch(self.take()) == BATCH:   # more queued: let the other lanes and tasks run first
            asyncio.get_running_loop().call_soon(self.on_fd)

    def _dispatch(self, batch: list[list[bytes]]) -> int:
        """Hand `batch` to the handlers in order; returns its length, or 0 once an async handler
        holds the lane (its task dispatches the rest)."""
        dispatch = self.svc._dispatch_now
        for i, frames in enumerate(batch):
            pending = dispatch(frames)
            if pending is not None:
                self.task = asyncio.get_running_loop().create_task(self._hold(pending, batch[i + 1:]))
                return 0
        return len(batch)

    async def _hold(self, pending: Awaitable[None], rest: list[list[bytes]]) -> None:
        try:
            await pending
            for frames in rest:
                more = self.svc._dispatch_now(frames)
                if more is not None:
                    await more
        finally:
            self.task = None
        self.on_fd()   # what came meanwhile


async def wait_event(ev: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `ev` up to `timeout` s; False on timeout. Unlike asyncio.wait_for before
    Python 3.12, a cancellation is never swallowed when the event is set at the same moment."""
    if ev.is_set():
        return True
    waiter = asyncio.ensure_future(ev.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()
    return bool(done)


def setup_logging(name: str, level: str | None = None) -> logging.Logger:
    """One line per event on stderr: `name: LEVEL message`. honcho adds time and process."""
    level = (level or os.environ.get("LIVEPIPE_LOG", "INFO")).upper()
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level, logging.INFO),
                        format="%(name)s: %(levelname)s %(message)s")
    return logging.getLogger(name)
