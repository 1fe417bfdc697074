"""`livepipe capture-audio`: microphone, WAV file, tone or silence -> audio.in (16 kHz mono s16le).

- The microphone is opened before the bus is up so the first words are not missed. A sound
  server's source (PulseAudio/PipeWire: the default, or `--device NAME`) is read with libpulse
  directly, on the event loop (services/lib/pulsein.py, pulseloop.py); any other device, or `--portaudio`, is a
  sounddevice InputStream in callback mode. If the device cannot open 16 kHz it captures at
  its own rate and a streaming soxr resampler converts (no clicks at block edges).
- Chunks are `--chunk-ms` long (default 20 ms: see README) and carry `capture_ts`, the
  wall-clock time their first sample was captured.
- Nothing the user says is thrown away while no process subscribes to audio.in: chunks are
  held in a bounded backlog (`--backlog-s`, default 30 s) and sent in order once a
  subscriber appears; only beyond that bound are the oldest dropped, and counted.
  File, tone and silence sources simply wait for a subscriber before they start.
- `control: mute` / `unmute` stop and resume publishing (audio while muted is discarded on
  purpose and counted as muted_chunks).
- No sound card: one line naming --file, exit 1. sounddevice is imported only for a device
  that is not read through libpulse.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
from collections import deque
from typing import Any, AsyncIterator

import numpy as np

from livepipe.bus import Service, run_event_loop, setup_logging
from livepipe.services.lib.audio import (IN_RATE, AudioFileError, Chunker, DeviceError, SampleClock, StreamResampler, WavReader,
                       mean_square,
                       float_to_int16,
                       import_sounddevice, print_device_list, make_audio_thread_realtime, parse_device,
                       pick_channels, pick_rate,
                       resolve_device, to_mono, tone)
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.devices import device_in_use, select_server_device
from livepipe.services.lib.media import AudioSource
from livepipe.services.lib.pulsein import PulseRecord, PulseUnavailable
from livepipe.services.lib.pulseloop import PulseLoop
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb
from livepipe.services.lib.echo import MODES as ECHO_MODES, EchoLink, aec_available
from livepipe.bus.message import Message

log = logging.getLogger("capture-audio")

DEFAULT_CHUNK_MS = 20
DEFAULT_BLOCK_MS = 10
DEFAULT_BARGE_IN_MS = 260   # measured: README, echo section (livepipe bench barge)


class Publisher:
    """Chunks -> audio.in, holding them in a bounded backlog while nobody subscribes."""

    def __init__(self, svc: Service, backlog_s: float) -> None:
        self.svc = svc
        self.max_backlog_frames = int(backlog_s * IN_RATE)
        # (payload, capture_ts, frames, callback_ts: arrival of the device block that completed it)
        self.backlog: deque[tuple[bytes, int, int, int | None]] = deque()
        self.backlog_frames = 0
        self.muted = False
        self.published = 0
        self.dropped_chunks = 0
        self.muted_chunks = 0
        self._levels: deque[float] = deque(maxlen=50)   # mean square per chunk, last second at 20 ms
        self._holding = False

    def offer(self, chunk: np.ndarray, capture_ts: int, callback_ts: int | None = None) -> None:
        if self.muted:
            self.muted_chunks += 1
            return
        self._levels.append(mean_square(chunk) / 2**30)   # of samples scaled to [-1, 1): exact, as before
        self.backlog.append((chunk.tobytes(), capture_ts, len(chunk), callback_ts))
        self.backlog_frames += len(chunk)
        while self.backlog_frames > self.max_backlog_frames and self.backlog:
            _, _, frames, _ = self.backlog.popleft()
            self.backlog_frames -= frames
            self.dropped_chunks += 1
            self.svc.ratelog.warning("backlog", "nobody has subscribed to audio.in for "
                                     f"{self.max_backlog_frames / IN_RATE:.0f} s: dropping the oldest audio")
        self.drain()

    def drain(self) -> None:
        if not self.backlog:
            return
        if not self.svc.has_subscriber("audio.in"):
            if not self._holding:
                self._holding = True
                log.info("no process subscribes to audio.in yet: holding up to %.0f s of audio until one does",
                         self.max_backlog_frames / IN_RATE)
            return
        if self._holding and len(self.backlog) > 1:
            log.info("audio.in has a subscriber: sending the %.0f ms of audio held meanwhile",
                     self.backlog_frames * 1000 / IN_RATE)
        self._holding = False
        while self.backlog:
            payload, ts, frames, cb_ts = self.backlog[0]
            stamps = {"stamps": {"callback_ts": cb_ts}} if cb_ts else {}   # latency budget (README)
            if not self.svc.publish("audio.in", "audio", payload, rate=IN_RATE, channels=1, sample_width=2,
                                    frames=frames, capture_ts=ts, **stamps):
                break   # send queue full (counted by the runtime): keep it and retry with the next chunk
            self.backlog.popleft()
            self.backlog_frames -= frames
            self.published += 1

    @property
    def level_dbfs(self) -> float:
        if not self._levels:
            return -120.0
        ms = sum(self._levels) / len(self._levels)
        return round(max(-120.0, 10 * np.log10(ms)) if ms > 0 else -120.0, 1)


class DeviceSource:
    """The microphone. A sound server's source is read with libpulse on the event loop itself
    (services/lib/pulsein.py PulseRecord over services/lib/pulseloop.py): each 10 ms fragment is
    taken in the loop iteration its arrival wakes, and a chunk it completes is handed to `run`'s
    `take` right there. Any other device, or `portaudio=True`, is a sounddevice callback
    InputStream, whose blocks go through a thread-safe queue to the event loop."""

    kind = "device"

    def __init__(self, device: str | None, device_rate: int | None, chunk_frames: int,
                 block_ms: float | None = None, portaudio: bool = False) -> None:
        device, server_dev = select_server_device(device, "input")   # a server source name -> pulse
        pulse = None
        if not portaudio and device in (None, "pulse", "default"):
            pulse = self._open_pulse(server_dev, device_rate, block_ms)
        self.pulse = pulse
        if pulse is not None:
            self.sd = None
            self.device_index = -1
            self.device_name = device_in_use("pulse", "input", server_dev)
            self.rate, self.channels = pulse.rate, pulse.channels
        else:
            self.sd = import_sounddevice("input")
            info = resolve_device(self.sd, parse_device(device), "input")
            self.device_index = int(info["index"])
            self.device_name = device_in_use(str(info["name"]), "input", server_dev)
            self.rate = pick_rate(self.sd, self.device_index, "input", IN_RATE, device_rate)
            self.channels = pick_channels(self.sd, self.device_index, "input", self.rate)
        self.api = "pulse" if pulse is not None else "portaudio"
        self.resampler = StreamResampler(self.rate, IN_RATE)
        # libpulse: what the server sent before the loop ran is read in a burst, dated late at
        # first; the chunks follow the clock as soon as it finds the stream earlier (> 2 ms).
        self.chunker = Chunker(chunk_frames, IN_RATE, early_ns=2_000_000 if pulse is not None else None)
        # 10 ms device blocks by default: blocks as long as a 20 ms chunk cost 2.5 % of a core less
        # but delivered the end of speech about 24 ms later (livepipe bench pipeline, README).
        self.block_frames = max(16, int(round(self.rate * (block_ms or DEFAULT_BLOCK_MS) / 1000)))
        # Blocks wait here for the event loop; a minute of them at most (counted beyond that).
        self.queue: deque[tuple[bytes, int, bool]] = deque()   # (samples, arrival ns, input lost before)
        self.max_queue = 6000
        self.overflows = 0
        self.queue_dropped = 0
        self.blocks = 0
        self.realtime: bool | None = None   # decided in the callback thread itself
        self.last_arrival_ns: int | None = None   # callback time of the newest block handled
        # The callback wakes the event loop only with the block that completes a chunk (input
        # frames counted in the audio thread; the threshold set by the loop): a wake costs a
        # loop iteration and a self-pipe write, and half of the 10 ms blocks complete nothing.
        self.in_frames = 0        # frames delivered by the device so far (audio thread)
        self.done_frames = 0      # frames the loop has taken from the queue
        self.wake_at = 0          # ... the count at which the next chunk can be complete
        self.chunk_frames = chunk_frames
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self.out_frames = 0
        if pulse is not None:
            self.latency_s = pulse.latency_s
            self.clock = SampleClock(self.rate, self.latency_s)
            # libpulse: fragments wait in `_frag` until they complete the next chunk (at 16 kHz),
            # chunks in `_held` until run() takes them (read while the bus connects), a minute at most.
            self._frag: list[bytes] = []
            self._frag_frames = 0
            self._held: deque[tuple[np.ndarray, int, int]] = deque()
            self._take: Any = None
            self._ended: asyncio.Future | None = None
            self._error: BaseException | None = None
            self.stream: Any = None
            return
        try:
            self.stream = self.sd.RawInputStream(device=self.device_index, samplerate=self.rate,
                                                 channels=self.channels, dtype="int16",
                                                 blocksize=self.block_frames, latency="low", callback=self._callback)
            self.latency_s = float(self.stream.latency)
            self.clock = SampleClock(self.rate, self.latency_s)
            self.stream.start()
        except Exception as exc:   # PortAudioError: busy, unplugged, unsupported
            raise DeviceError(f"cannot open input device {self.device_name!r} at {self.rate} Hz: {exc}; "
                              "use --file PATH.wav to read audio from a file instead") from None

    @staticmethod
    def _open_pulse(server_dev: Any, device_rate: int | None, block_ms: float | None) -> PulseRecord | None:
        """The sound server's source (the chosen one, else its default) read directly, or None
        (no libpulse, no server: PortAudio is tried, and says what is missing). The server sends
        a fragment every block (10 ms) and holds what arrives until the event loop reads it."""
        rate = device_rate or IN_RATE
        block = max(16, int(round(rate * (block_ms or DEFAULT_BLOCK_MS) / 1000)))
        try:
            return PulseRecord(PulseLoop(), server_dev.name if server_dev else None, rate, 1, block,
                               "livepipe capture-audio")
        except PulseUnavailable as exc:
            log.debug("no direct sound server input (%s): using PortAudio", exc)
            return None

    # ------------------------------------------------------------ libpulse, on the event loop
    def attach(self) -> None:
        """Start reading the sound server's stream on the running loop (once; before the bus is
        up, so what is said meanwhile is held, not left to the server)."""
        if self.pulse is None or self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._ended = self._loop.create_future()
        self.pulse.ml.attach(self._loop)
        self.pulse.start(self._on_fragment, self._on_stopped)

    def _on_fragment(self, data: bytes, lost: bool) -> None:
        """A fragment from the server (event loop, inside libpulse's read callback)."""
        if self._error is not None:
            return
        arrival_ns = time.time_ns()
        if lost:
            self.overflows += 1
        self.blocks += 1
        frames = len(data) // 2
        # Every fragment dates the stream (its arrival bounds when its samples were captured);
        # the ones read late, in a burst, do not move the clock (it keeps the earliest bound).
        self.done_frames += frames
        self.clock.update(arrival_ns, frames, reset=lost)
        if self.resampler.passthrough:
            # At 16 kHz a chunk is cut when the fragment that completes it arrives: the fragments
            # before it are only kept.
            self._frag.append(data)
            self._frag_frames += frames
            if self._frag_frames < self.chunk_frames - self.chunker.pending:
                return
            data = b"".join(self._frag) if len(self._frag) > 1 else data
            self._frag.clear()
            self._frag_frames = 0
        try:
            for chunk, ts in self._cut(np.frombuffer(data, dtype="<i2")):
                if self._take is None:
                    self._hold(chunk, ts, arrival_ns)
                else:
                    self.last_arrival_ns = arrival_ns
                    self._take(chunk, ts)
        except Exception as exc:   # in `take` (the echo stage, the publisher): ends run() with it
            self._end(exc)

    def _hold(self, chunk: np.ndarray, ts: int, arrival_ns: int) -> None:
        self._held.append((chunk, ts, arrival_ns))
        if len(self._held) * self.chunk_frames > 60 * IN_RATE:   # a minute, as the PortAudio queue
            self._held.popleft()
            self.queue_dropped += 1

    def _on_stopped(self, reason: str) -> None:
        self._end(DeviceError(f"input device {self.device_name!r} stopped delivering audio "
                              f"(the sound server: {reason})"))

    def _end(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
            if self._ended is not None and not self._ended.done():
                self._ended.set_exception(exc)
                self._ended.exception()   # raised by run(), if it ever runs: no "never retrieved" noise
            if self._take is None:   # the bus is not up yet: say it now (run() raises it later)
                log.error("%s", exc)

    async def run(self, take: Any) -> None:
        """Hand every chunk to `take(chunk, capture_ts)` (last_arrival_ns set) until the device
        stops: DeviceError (or what `take` raised). With libpulse, `take` runs in the loop
        iteration whose fragment completed the chunk, with no task in between."""
        if self.pulse is None:
            async for chunk, ts in self.chunks():
                take(chunk, ts)
            return
        self.attach()
        while self._held and self._error is None:
            chunk, ts, self.last_arrival_ns = self._held.popleft()
            try:
                take(chunk, ts)
            except Exception as exc:
                self._end(exc)
        if self._error is None:
            self._take = take
        assert self._ended is not None
        try:
            await self._ended
        finally:
            self._take = None

    # ------------------------------------------------------------ PortAudio, through a queue
    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        arrival_ns = time.time_ns()
        if self.realtime is None:
            self.realtime = make_audio_thread_realtime()
        self._deliver(bytes(indata), frames, bool(status.input_overflow), arrival_ns)

    def _deliver(self, data: bytes, frames: int, lost: bool, arrival_ns: int) -> None:
        """A device block (audio thread): queued, and the loop woken if it completes a chunk."""
        if lost:
            self.overflows += 1
        if len(self.queue) >= self.max_queue:
            self.queue_dropped += 1     # the event loop is wedged; never block the audio thread
            return
        self.queue.append((data, arrival_ns, lost))
        self.blocks += 1
        self.in_frames += frames
        if self.in_frames < self.wake_at:
            return   # no chunk yet: the loop sleeps on (the watchdog still looks in every second)
        self._wake_loop()

    def _wake_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:   # loop closed while shutting down
                pass

    async def _watchdog(self) -> None:
        """Wake the reader once a second, so a device that stopped is noticed (not a wait per block)."""
        while True:
            await asyncio.sleep(1.0)
            if self._wake is not None:
                self._wake.set()

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        """PortAudio's chunks (libpulse's go through run())."""
        assert self.pulse is None, "a libpulse source hands its chunks over in run()"
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        # One watchdog task rather than asyncio.wait_for per block: cheaper, and before Python 3.12
        # wait_for swallows a cancel that lands as a block arrives, leaving the process deaf to SIGTERM.
        watchdog = asyncio.create_task(self._watchdog())
        try:
            async for chunk in self._chunks():
                yield chunk
        finally:
            watchdog.cancel()

    async def _chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.queue and not self.stream.active:
                raise DeviceError(f"input device {self.device_name!r} stopped delivering audio")
            while self.queue:
                data, arrival_ns, lost = self.queue.popleft()
                self.last_arrival_ns = arrival_ns
                for chunk in self._block(data, len(data) // (2 * self.channels), arrival_ns, lost):
                    yield chunk
            self._set_wake_at()

    def _block(self, data: bytes, frames: int, arrival_ns: int, lost: bool) -> list[tuple[np.ndarray, int]]:
        """A device block (event loop): dated, mixed to mono, resampled, cut into chunks."""
        block = np.frombuffer(data, dtype="<i2")
        self.done_frames += frames
        self.clock.update(arrival_ns, frames, reset=lost)
        if self.channels > 1:
            block = float_to_int16(to_mono(block.reshape(-1, self.channels).astype(np.float32) / 32768.0))
        return self._cut(block)

    def _cut(self, block: np.ndarray) -> list[tuple[np.ndarray, int]]:
        """Mono samples already dated by the clock -> resampled, cut into chunks."""
        out = self.resampler.process(block)
        if not len(out):
            return []
        # soxr keeps output sample m aligned with input time m / 16 kHz.
        first_ns = self.clock.time_of(self.out_frames * self.rate // IN_RATE)
        self.out_frames += len(out)
        return self.chunker.push(out, first_ns)

    def _set_wake_at(self) -> None:
        """The device frame count whose arrival completes the next chunk. Only at 16 kHz: a
        resampler hands out its output in batches, so which block completes a chunk is not
        known in advance, and every block wakes the loop as before."""
        if not self.resampler.passthrough:
            return
        self.wake_at = self.done_frames + self.chunk_frames - self.chunker.pending

    def close(self) -> None:
        """Stop the device (again: no-op). Call it while the event loop still runs, if it ran."""
        self._loop = None
        if self.pulse is not None:
            self.pulse.close()
            return
        try:
            if not self.stream.closed:
                self.stream.abort()
                self.stream.close()
        except Exception:
            pass

    def metrics(self) -> dict[str, Any]:
        # libpulse has no audio thread to raise: the server holds each fragment until the event
        # loop reads it, so a late loop delays a chunk but loses nothing (README, heartbeat).
        realtime = False if self.pulse is not None else self.realtime
        return {"device": self.device_name, "device_api": self.api, "device_rate": self.rate, "overflows": self.overflows,
                "queue_dropped_blocks": self.queue_dropped, "device_latency_ms": round(self.latency_s * 1000, 1),
                "audio_thread_realtime": int(bool(realtime))}


class PacedSource:
    """File, tone or silence, published in real time on an absolute clock."""

    def __init__(self, kind: str, chunk_frames: int, path: str | None = None, loop: bool = False,
                 hold: bool = False, tone_hz: float = 0.0, tone_dbfs: float = -12.0) -> None:
        self.kind, self.chunk_frames, self.loop, self.hold = kind, chunk_frames, loop, hold
        self.tone_hz, self.tone_dbfs = tone_hz, tone_dbfs
        self.reader = WavReader(path) if path else None
        self.late_chunks = 0
        self.loops = 0
        if self.reader is not None and self.reader.frames == 0:
            raise AudioFileError(f"{path} holds no audio")

    def _generate(self) -> Any:
        """Yields int16 chunks (the last file chunk may be shorter)."""
        n = self.chunk_frames
        if self.kind == "silence":
            while True:
                yield np.zeros(n, dtype=np.int16)
        if self.kind == "tone":
            k = 0
            while True:
                yield tone(self.tone_hz, n / IN_RATE, IN_RATE, self.tone_dbfs, phase_frames=k)
                k += n
        r = self.reader
        rs = StreamResampler(r.rate, IN_RATE)
        chunker = Chunker(n, IN_RATE)
        read_frames = max(1, n * r.rate // IN_RATE)
        while True:
            x = r.read(read_frames)
            if len(x) == 0:
                if self.loop:
                    self.loops += 1
                    r.rewind()   # the resampler keeps streaming across the seam
                    continue
                tail = rs.process(np.empty(0, np.int16), last=True)
                for chunk, _ in chunker.push(tail, 0):
                    yield chunk
                last = chunker.flush()
                if last is not None:
                    yield last[0]
                break
            for chunk, _ in chunker.push(rs.process(float_to_int16(to_mono(x))), 0):
                yield chunk
        while self.hold:   # the file is over; stay like an open microphone in a quiet room
            yield np.zeros(n, dtype=np.int16)

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        t0_mono, t0_wall = time.monotonic(), time.time_ns()
        sent = 0   # frames published so far: the absolute clock position
        for chunk in self._generate():
            due = t0_mono + sent / IN_RATE
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.1:
                self.late_chunks += 1   # the loop was busy; catch up without drifting
            yield chunk, t0_wall + sent * 1_000_000_000 // IN_RATE
            sent += len(chunk)

    def close(self) -> None:
        if self.reader:
            self.reader.close()

    def metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {"late_chunks": self.late_chunks}
        if self.reader:
            m.update(file_rate=self.reader.rate, file_channels=self.reader.channels, loops=self.loops)
        return m


class Capture:
    def __init__(self, svc: Service, source: AudioSource, publisher: Publisher, chunk_ms: int,
                 echo: EchoLink | None = None) -> None:
        self.svc, self.source, self.pub, self.chunk_ms = svc, source, publisher, chunk_ms
        self.echo = echo   # only for a microphone: the model's voice from a local speaker

    def on_control(self, msg: Message) -> None:
        if msg.kind == "mute" and not self.pub.muted:
            self.pub.muted = True
            log.info("muted: audio.in paused")
        elif msg.kind == "unmute" and self.pub.muted:
            self.pub.muted = False
            log.info("unmuted: audio.in resumed")

    async def run(self, svc: Service) -> int:
        if isinstance(self.source, PacedSource):
            # A file or test signal has no speaker to lose: start it once someone listens.
            while not await svc.wait_subscriber("audio.in", 5.0):
                log.info("waiting for a subscriber to audio.in before starting the %s", self.source.kind)
        desc = (f"device {self.source.device_name!r} at {self.source.rate} Hz"
                + ("" if self.source.rate == IN_RATE else f", resampled to {IN_RATE} Hz")
                + (" through libpulse" if self.source.api == "pulse" else " through PortAudio")
                if isinstance(self.source, DeviceSource) else self.source.kind)
        log.info("capturing from %s in %d ms chunks", desc, self.chunk_ms)
        metrics_task = asyncio.create_task(self._metrics_loop())
        try:
            if isinstance(self.source, DeviceSource):
                await self.source.run(self.take)   # until the device stops: DeviceError
            else:
                async for chunk, ts in self.source.chunks():
                    self.take(chunk, ts)
            self._update_metrics()
            log.info("end of %s: %d chunks published", self.source.kind, self.pub.published)
            if self.pub.backlog:
                while self.pub.backlog and not await svc.wait_subscriber("audio.in", 5.0):
                    log.info("holding %.0f ms of audio for a subscriber to audio.in",
                             self.pub.backlog_frames * 1000 / IN_RATE)
                self.pub.drain()
            return 0   # the source ended (a file without --loop/--hold): exit 0
        finally:
            metrics_task.cancel()
            self.source.close()   # stop the device while the loop it wakes still runs

    def take(self, chunk: np.ndarray, ts: int) -> None:
        """One chunk of the source: through the echo stage (if any) to the publisher."""
        arrival = getattr(self.source, "last_arrival_ns", None)
        if self.echo is None:
            self.pub.offer(chunk, ts, arrival)
            return
        self.svc.poll("audio.ref")   # the references that arrived since the last chunk
        for out, out_ts in self.echo.process(chunk, ts):   # none while held, several on release
            self.pub.offer(out, out_ts, arrival)

    async def _metrics_loop(self) -> None:
        while True:
            self.pub.drain()   # also sends the backlog when a subscriber appears during silence/mute
            if self.echo is not None:
                self.svc.poll("audio.ref")   # also while no chunk comes (a stalled device)
            self._update_metrics()
            await asyncio.sleep(0.25)

    def _update_metrics(self) -> None:
        m = self.svc.metrics
        m.update(self.source.metrics())
        if self.echo is not None:
            m.update(self.echo.metrics())
        m.update(source=self.source.kind, chunk_ms=self.chunk_ms, chunks_published=self.pub.published,
                 dropped_chunks=self.pub.dropped_chunks, backlog_ms=round(self.pub.backlog_frames * 1000 / IN_RATE),
                 muted=int(self.pub.muted), muted_chunks=self.pub.muted_chunks, level_dbfs=self.pub.level_dbfs)


def build_parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="livepipe capture-audio", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--device", metavar="NAME|INDEX", help="input device: a sound server source name "
                     "(e.g. virtual_mic) or a PortAudio index/name (default: the system default)")
    src.add_argument("--file", metavar="PATH.wav", help="read a WAV file (any rate and channel count) "
                     "instead of a microphone, paced in real time")
    src.add_argument("--tone", type=float, metavar="HZ", help="publish a sine tone (tests)")
    src.add_argument("--silence", action="store_true", help="publish silence (tests)")
    p.add_argument("--list-devices", action="store_true", help="list audio devices and exit")
    p.add_argument("--loop", action="store_true", help="with --file: start over at the end")
    p.add_argument("--hold", action="store_true", help="with --file: after the end keep publishing "
                   "silence (an open microphone) instead of exiting")
    p.add_argument("--tone-dbfs", type=float, default=-12.0, help="RMS level of --tone (default -12 dBFS)")
    p.add_argument("--chunk-ms", type=int, default=DEFAULT_CHUNK_MS,
                   help=f"length of each audio.in chunk (default {DEFAULT_CHUNK_MS} ms)")
    p.add_argument("--device-rate", type=int, metavar="HZ",
                   help="open the device at this rate and resample (default: 16000 if the device takes it)")
    p.add_argument("--portaudio", action="store_true",
                   help="open the microphone through PortAudio even when it is a sound server's source "
                        "(default: read PulseAudio/PipeWire directly with libpulse, cheaper)")
    p.add_argument("--block-ms", type=float, metavar="MS",
                   help=f"device callback block (default {DEFAULT_BLOCK_MS} ms)")
    p.add_argument("--backlog-s", type=float, default=30.0,
                   help="audio held while nobody subscribes to audio.in (default 30 s)")
    p.add_argument("--echo", choices=("auto", *ECHO_MODES), default=os.environ.get("LIVEPIPE_ECHO") or "auto",
                   help="the model's voice from a local speaker: cancel (WebRTC echo canceller, extra `aec`), "
                        "gate (half duplex: microphone silent while the model is heard), off; auto (default, "
                        "env LIVEPIPE_ECHO) = cancel when playback runs on this machine, else off")
    p.add_argument("--barge-in-ms", type=int, metavar="MS",
                   help="with echo cancellation: while the model is heard, a sound reaches the model only once it "
                        f"has been speech this long, with a vowel in it (then all of it); shorter bursts, and bursts of "
                        f"noise however long (a cough, a click), are sent as silence. 0 = off (env LIVEPIPE_BARGE_IN_MS, default {DEFAULT_BARGE_IN_MS})")
    p.add_argument("--echo-ref-wait-ms", type=int, default=40, metavar="MS",
                   help="with echo cancellation: longest a loud microphone chunk waits for its late echo reference "
                        "(default 40; 0 = never wait)")
    add_bus_arguments(p)
    return p


@verb("capture-audio")
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("capture-audio")
    if args.list_devices:
        return print_device_list(log)
    if not 5 <= args.chunk_ms <= 1000:
        raise UsageError("--chunk-ms must be within 5..1000")
    if args.block_ms is not None and not 2 <= args.block_ms <= 200:
        raise UsageError("--block-ms must be within 2..200")
    if (args.loop or args.hold) and not args.file:
        raise UsageError("--loop and --hold apply to --file")
    if args.tone is not None and not 0 < args.tone < IN_RATE / 2:
        raise UsageError(f"--tone must be between 0 and {IN_RATE // 2} Hz")
    if args.echo not in ("auto", *ECHO_MODES):
        raise UsageError(f"LIVEPIPE_ECHO must be one of auto, {', '.join(ECHO_MODES)}")
    cfg = BusConfig.from_args(args)
    chunk_frames = IN_RATE * args.chunk_ms // 1000
    if args.echo == "cancel" and not aec_available():
        log.warning("--echo cancel needs the echo canceller (pip install 'livepipe[aec]'): using gate instead")
    if args.barge_in_ms is None:
        try:
            args.barge_in_ms = int(os.environ.get("LIVEPIPE_BARGE_IN_MS") or DEFAULT_BARGE_IN_MS)
        except ValueError:
            raise UsageError("LIVEPIPE_BARGE_IN_MS must be a whole number of milliseconds") from None
    if not 0 <= args.barge_in_ms <= 2000:
        raise UsageError("--barge-in-ms (LIVEPIPE_BARGE_IN_MS) must be within 0..2000")
    if args.barge_in_ms and args.echo in ("auto", "cancel"):
        from livepipe.services.lib.vad import vad_available   # the guard's speech detector, in the `aec` extra
        if not vad_available():
            log.warning("--barge-in-ms needs webrtcvad (pip install 'livepipe[aec]'): a cough over the model "
                        "may interrupt it")
            args.barge_in_ms = 0
    if not 0 <= args.echo_ref_wait_ms <= 200:
        raise UsageError("--echo-ref-wait-ms must be within 0..200")
    try:
        if args.file:
            source: AudioSource = PacedSource("file", chunk_frames, path=args.file, loop=args.loop,
                                                             hold=args.hold)
        elif args.tone is not None:
            source = PacedSource("tone", chunk_frames, tone_hz=args.tone, tone_dbfs=args.tone_dbfs)
        elif args.silence:
            source = PacedSource("silence", chunk_frames)
        else:
            # Opened before the bus is up: the first words are captured while we connect. Opened
            # last, just before the event loop starts reading it (what the server sends meanwhile
            # waits there, read at once when the loop starts: dated by its arrival, so late).
            source = DeviceSource(args.device, args.device_rate, chunk_frames, args.block_ms, args.portaudio)
    except (DeviceError, AudioFileError) as exc:
        return fail("capture-audio", exc)
    echo = EchoLink(args.echo, socket.gethostname(), log, barge_in_ms=args.barge_in_ms,
                    ref_wait_ms=args.echo_ref_wait_ms) if isinstance(source, DeviceSource) else None
    if echo is not None and args.chunk_ms % 10:
        log.warning("echo handling works on 10 ms frames: --chunk-ms %d is not a multiple of 10, so it is off",
                    args.chunk_ms)
        echo = None
    svc = Service("capture-audio", cfg)
    capture = Capture(svc, source, Publisher(svc, args.backlog_s), args.chunk_ms, echo)
    svc.on("control", capture.on_control)
    if echo is not None:
        # Polled: a reference is needed only when the next microphone chunk is processed, so it
        # waits in the socket until then instead of waking the loop 50 times a second.
        svc.on("audio.ref", echo.on_ref, polled=True)
        svc.on("status", echo.on_status)
    try:
        return _serve(svc, capture, source)
    finally:
        source.close()


def _serve(svc: Service, capture: Capture, source: AudioSource) -> int:
    """svc.main(capture.run), but a libpulse microphone is read from the event loop's first
    iteration, while the bus connects (the mains start only once it is live)."""
    async def run() -> int:
        try:
            if isinstance(source, DeviceSource):
                source.attach()
            return await svc.run(capture.run)
        finally:
            source.close()   # while the loop that libpulse's events are on still runs

    try:
        return run_event_loop(run())
    except KeyboardInterrupt:
        return 130
