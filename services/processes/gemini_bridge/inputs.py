"""The input side: bus messages queued per kind, and one sender task per queue (audio, video, events)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from livepipe.bus.message import Message
from livepipe.services.lib.jpeg import ImageRejected
from livepipe.services.processes.gemini_bridge.errors import describe_error
from livepipe.services.processes.gemini_bridge.link import Link
from livepipe.services.processes.gemini_bridge.live_options import STREAM_END_MARK
from livepipe.services.processes.gemini_bridge.media import prepare_frame
from livepipe.services.processes.gemini_bridge.settings import (
    ACTIVITY_END,
    ACTIVITY_START,
    BYTES_PER_SECOND_IN,
    NAME,
)
from livepipe.services.processes.gemini_bridge.wire import audio_sender_for

log = logging.getLogger(NAME)
INTERLEAVE_WINDOW_S = 1.0   # chunks of two audio.in sources this close together are interleaving


class InputSide:
    """The input side: bus messages queued per kind, and one sender task per queue (audio, video, events).

    Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    # ------------------------------------------------------------ bus inputs
    def on_audio(self, msg: Message) -> None:
        now = time.monotonic()
        last = self.audio_source
        if last is not None and last[1] != msg["inst"] and now - last[2] < INTERLEAVE_WINDOW_S:
            self.svc.metrics["audio_in_interleaved"] += 1
            self.svc.ratelog.warning("audio-sources", f"two sources publish audio.in ({last[0]}/{last[1]} and "
                                     f"{msg['src']}/{msg['inst']}): the model hears them interleaved; stop or "
                                     f"mute one (`livepipe replay --replace` mutes capture-audio while it replays)")
        self.audio_source = (msg["src"], msg["inst"], now)
        try:
            pcm = self.normalizer.convert(msg)
        except Exception as exc:
            self.svc.metrics["audio_in_rejected"] += 1
            self.svc.ratelog.warning("audio-reject", f"rejected an audio.in chunk ({msg['rate']} Hz, "
                                     f"{msg['channels']} ch, {msg['sample_width']} B): {exc}")
            return
        if pcm is not msg.payload:
            self.svc.metrics["audio_in_converted"] += 1
            self.svc.ratelog.warning("audio-convert", f"converting audio.in from {msg['rate']} Hz, "
                                     f"{msg['channels']} ch, {msg['sample_width']} B to 16 kHz mono s16")
        if not pcm:
            return
        # Latency budget (README): the input path of the newest chunk, put on the next reply once that
        # chunk is on the socket (so a reply never carries a half-stamped chunk).
        stamps = msg.get("stamps") or {}
        self.in_stamps_received = {"in_capture_ts": msg.get("capture_ts"), "in_callback_ts": stamps.get("callback_ts"),
                          "in_pub_ts": msg["ts"], "in_recv_ts": time.time_ns()}
        starts = ends = False
        if self.speech is not None:
            events = self.speech.feed(pcm)
            starts, ends = "start" in events, events[-1:] == ["end"]
        if starts:
            self._enqueue_audio(ACTIVITY_START)   # markers keep their place between the chunks
        if not self._write_audio_now(pcm):
            self._enqueue_audio(pcm)
        if ends:
            self._enqueue_audio(ACTIVITY_END)

    def _write_audio_now(self, pcm: bytes) -> bool:
        """Write the chunk to the connection from here, when nothing is queued before it and the
        socket takes it at once (wire.py write_now); else False: the sender task sends it."""
        link = self.link
        if self.audio_q or link is None or not self.link_ready.is_set() or link.closed.is_set():
            return False
        write = getattr(link.send_audio, "write_now", None)
        if write is None:
            return False
        try:
            if not write(pcm):
                return False
        except Exception as exc:  # the chunk is queued for the next connection
            self._send_failed(link, exc)
            return False
        self.in_stamps = {**self.in_stamps_received, "in_sent_ts": time.time_ns()}   # the newest chunk
        self._audio_sent(link, link.next_index(), pcm)
        return True

    def _audio_sent(self, link: Link, index: int, chunk: bytes | str) -> None:
        """Bookkeeping once `chunk` (client message `index`) is on `link`'s socket."""
        link.sent_audio(index, chunk, int(self.s.buffer_seconds * BYTES_PER_SECOND_IN))
        if self._gap_from and isinstance(chunk, bytes):
            gap = round((time.monotonic() - self._gap_from) * 1000, 1)
            self._gap_from = 0.0
            self.svc.metrics["switch_audio_gap_ms"] = gap
            self.svc.metrics["switch_audio_gap_ms_max"] = max(gap, self.svc.metrics.get("switch_audio_gap_ms_max", 0))
            log.info("audio to the model resumed on connection %d: %.1f ms after the last write "
                     "to the previous one", link.number, gap)
        if isinstance(chunk, bytes):
            self.svc.metrics["audio_in_chunks"] += 1
            self.svc.metrics["audio_in_sent_ms"] += len(chunk) * 1000 // BYTES_PER_SECOND_IN

    def _enqueue_audio(self, pcm: bytes | str) -> None:
        self.audio_q.append(pcm)
        self.audio_q_bytes += len(pcm) if isinstance(pcm, bytes) else 0
        limit = int(self.s.buffer_seconds * BYTES_PER_SECOND_IN)
        while self.audio_q_bytes > limit and len(self.audio_q) > 1:
            old = self.audio_q.popleft()
            if isinstance(old, bytes):
                self.audio_q_bytes -= len(old)
                self.svc.metrics["audio_in_dropped_ms"] += len(old) * 1000 // BYTES_PER_SECOND_IN
            self.svc.ratelog.warning("audio-drop", f"audio.in buffer over {self.s.buffer_seconds:g} s while "
                                     "the model is unreachable: dropping the oldest audio")
        self.svc.metrics["audio_buffered_ms"] = self.audio_q_bytes * 1000 // BYTES_PER_SECOND_IN
        self.audio_event.set()

    def on_video(self, msg: Message) -> None:
        if self.frame is not None:
            self.svc.metrics["video_frames_skipped"] += 1   # replaced before it could be sent
        self.frame = msg
        self.frame_event.set()

    def on_text(self, msg: Message) -> None:
        text = msg["text"]
        if not text.strip():
            return
        self._remember("user", text, self._next_turn())
        if self.s.text_mode == "content":
            from google.genai import types
            content = types.Content(role="user", parts=[types.Part(text=text)])
            self._enqueue_event("text", lambda ses: ses.send_client_content(turns=content, turn_complete=True))
        else:
            self._enqueue_event("text", lambda ses: ses.send_realtime_input(text=text))

    def _enqueue_event(self, what: str, send: Callable[[Any], Awaitable[None]]) -> None:
        self.events_q.append((what, send))
        self.events_event.set()

    # ------------------------------------------------------------ senders
    async def _usable_link(self) -> Link:
        while True:
            await self.link_ready.wait()
            link = self.link
            if link is not None and not link.closed.is_set():
                return link
            self.link_ready.clear()

    def _send_failed(self, link: Link, exc: BaseException) -> None:
        """A send hit a closed connection: stop sending until the supervisor replaces the link."""
        if self.link is link:
            self.link_ready.clear()
        if link.error is None:
            link.error = exc
        self.svc.ratelog.warning("send-fail", f"send failed on connection {link.number}: "
                                 f"{describe_error(exc, self.scrub)[1]}")

    async def audio_sender(self) -> None:
        from google.genai import types
        while True:
            await self.audio_event.wait()
            link = await self._usable_link()
            if link.send_audio is None:   # once per connection (wire.py); nothing is written meanwhile
                link.send_audio, direct = await audio_sender_for(link.session)
                self.svc.metrics["audio_in_direct"] = int(direct)
                log.debug("connection %d: audio chunks %s", link.number,
                          "built directly as the SDK writes them" if direct else "sent through the SDK")
                continue   # the link may have changed meanwhile: check it again
            while self.audio_q and self.link is link and self.link_ready.is_set():
                chunk = self.audio_q[0]
                index = link.next_index()   # no await before the SDK writes the frame: order is exact
                try:
                    if chunk == ACTIVITY_START:
                        await link.session.send_realtime_input(activity_start=types.ActivityStart())
                    elif chunk == ACTIVITY_END:
                        await link.session.send_realtime_input(activity_end=types.ActivityEnd())
                    elif chunk == STREAM_END_MARK:
                        await link.session.send_realtime_input(audio_stream_end=True)
                    else:
                        await link.send_audio(chunk)   # what send_realtime_input(audio=Blob) writes
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the chunk stays queued for the next connection
                    self._send_failed(link, exc)
                    break
                if self.audio_q and self.audio_q[0] is chunk:
                    self.audio_q.popleft()
                    if isinstance(chunk, bytes):
                        self.audio_q_bytes -= len(chunk)
                        if not self.audio_q:   # the newest chunk is on the socket
                            self.in_stamps = {**self.in_stamps_received, "in_sent_ts": time.time_ns()}
                self._audio_sent(link, index, chunk)
            self.svc.metrics["audio_buffered_ms"] = self.audio_q_bytes * 1000 // BYTES_PER_SECOND_IN
            if not self.audio_q:
                self.audio_event.clear()

    async def video_sender(self) -> None:
        from google.genai import types
        interval = 1.0 / self.s.video_fps
        while True:
            await self.frame_event.wait()
            wait = self.last_frame_sent + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)   # newer frames replace this one meanwhile
            link = await self._usable_link()
            msg, self.frame = self.frame, None
            self.frame_event.clear()
            if msg is None:
                continue
            try:
                # Decoding proves the JPEG is whole; off the loop so audio never waits for it.
                data, w, h = await asyncio.to_thread(prepare_frame, msg.payload or b"", msg["mime"],
                                                     self.s.video_max_side)
            except Exception as exc:
                self.svc.metrics["video_frames_rejected"] += 1
                if isinstance(exc, ImageRejected):
                    self.svc.metrics["video_frames_too_large"] += 1
                self.svc.ratelog.warning("video-reject", f"rejected a video.in frame from {msg['src']}: {exc}")
                continue
            try:
                link.next_index()
                await link.session.send_realtime_input(video=types.Blob(data=data, mime_type="image/jpeg"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._send_failed(link, exc)
                if self.frame is None:    # keep it for the next connection unless a newer one came
                    self.frame = msg
                    self.frame_event.set()
                continue
            self.last_frame_sent = time.monotonic()
            self.svc.metrics["video_frames_sent"] += 1
            self.svc.metrics["video_last_size"] = f"{w}x{h}"

    async def events_sender(self) -> None:
        while True:
            await self.events_event.wait()
            if not self.events_q:
                self.events_event.clear()
                continue
            what, send = self.events_q[0]
            link = self.link
            if what != "tool" or link is None or link.closed.is_set() or link.retired:
                # Text is user input: it waits for the next connection like audio. A tool response
                # goes on the open connection even during a goAway hold: that connection's model is
                # waiting for it to finish the turn we are letting it finish.
                link = await self._usable_link()
            try:
                index = link.next_index()
                await send(link.session)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._send_failed(link, exc)
                await asyncio.sleep(0.05)   # until the receive loop sees the close
                continue
            self.events_q.popleft()
            if what == "text":
                link.texts.append((index, send))   # until answered: a next connection may need it again
                self.svc.metrics["text_sent"] += 1

