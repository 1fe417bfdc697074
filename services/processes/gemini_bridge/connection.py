"""Connections: connect with backoff, the receive loop, a silent-server watchdog, goAway switchover and replay."""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
from pathlib import Path
from typing import Any

from livepipe.services.processes.gemini_bridge.errors import (
    FATAL_CLOSE_CODES,
    FatalBridgeError,
    SilentServer,
    describe_error,
)
from livepipe.services.processes.gemini_bridge.link import Link
from livepipe.services.processes.gemini_bridge.settings import BYTES_PER_SECOND_IN, NAME, live_config
from livepipe.services.processes.gemini_bridge.wire import learn_audio_parse, tap_audio_messages

log = logging.getLogger(NAME)


async def _stale_emulator(info: dict[str, Any]) -> str:
    """Why emulator.json describes no running emulator ("" if it does): its process is gone,
    or nothing accepts connections on its port."""
    pid = info.get("pid")
    if isinstance(pid, int) and pid > 0:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"process {pid} is gone"
        except PermissionError:
            pass   # alive, someone else's
    m = re.match(r"^https?://([^/:]+|\[[^\]]+\]):(\d+)", str(info.get("url", "")))
    if m:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(m[1].strip("[]"), int(m[2])), 2.0)
            writer.close()
        except (OSError, asyncio.TimeoutError):
            return f"nothing listens on port {m[2]}"
    return ""


class ConnectionSide:
    """Connections: connect with backoff, the receive loop, a silent-server watchdog, goAway switchover and replay.

    Mixed into Bridge (bridge.py), whose __init__ holds the state."""

    async def _watch_server(self, link: Link) -> None:
        """Detect a server that stops answering without closing the connection.

        The SDK's websocket pings every 20 s and gives up 20 s later, so a stalled server went
        unnoticed for up to 40 s while the audio written to it was lost. A ping every third of
        --silent-server-s, each awaited for its pong, bounds that: past the bound the connection
        is ended, the supervisor reconnects with the resumption handle and resends the audio the
        handle does not cover."""
        ws = getattr(link.session, "_ws", None)   # the SDK's websocket: it has no public accessor
        if ws is None or not hasattr(ws, "ping"):
            log.info("this google-genai version hides its websocket: a silent server is noticed only by the SDK")
            return
        period = min(2.0, self.s.silent_server / 3)
        while not link.closed.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(link.closed.wait(), period)
                return
            t0 = time.monotonic()
            try:
                # ping() itself can block once a dead peer's socket buffers are full: bound both steps
                async def ping_and_pong() -> None:
                    await (await ws.ping())
                await asyncio.wait_for(ping_and_pong(), self.s.silent_server)
            except asyncio.TimeoutError:
                if link.closed.is_set() or link.retired:
                    return
                self.svc.metrics["silent_server_detected"] += 1
                link.error = SilentServer(f"the server answered no ping for {self.s.silent_server:g} s")
                if link.task is not None:
                    link.task.cancel()   # its finally marks the link closed and wakes the supervisor
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                return   # the connection is closing: the receive loop reports why
            self.svc.metrics["server_ping_ms"] = round((time.monotonic() - t0) * 1000, 1)

    async def _receive_loop(self, link: Link) -> None:
        try:
            # Reply audio without the SDK's per-message model work (wire.py), learned before the first read.
            parse = await learn_audio_parse(link.session)
            direct = parse is not None and tap_audio_messages(
                link.session, parse, lambda data, mime: self.on_audio_message(link, data, mime))
            self.svc.metrics["audio_out_direct"] = int(direct)
            while True:
                # receive() ends at every turnComplete: one loop for the connection's whole life.
                async for msg in link.session.receive():
                    self.on_server_message(link, msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if link.error is None or not isinstance(link.error, type(exc)):
                link.error = exc
        finally:
            link.closed.set()
            if self.link is link:
                self.link_ready.clear()
                self.wake.set()
            if link.retired:
                self.turn_done.set()

    # ------------------------------------------------------------ connections
    def publish_state(self, state: str, detail: str = "") -> None:
        self.svc.metrics["state"] = state
        fields = {"detail": self.scrub(detail)} if detail else {}
        self.svc.publish("control", "session", state=state, backend=self.s.backend, **fields)

    async def _emulator_address(self) -> tuple[str, str]:
        path = self.s.state_dir / "emulator" / "emulator.json"
        t0 = time.monotonic()
        next_log = 0.0
        stale_said = ""
        while True:
            try:
                info = json.loads(path.read_text())
                url, ca = info["url"], info["ca_file"]
                if isinstance(url, str) and isinstance(ca, str) and Path(ca).is_file():
                    why = await _stale_emulator(info)
                    if not why:
                        return url, ca
                    if why != stale_said:   # a killed emulator leaves its file: do not dial a dead port
                        log.warning("%s is stale (%s): waiting for a running emulator", path, why)
                        stale_said = why
            except (OSError, ValueError, KeyError, TypeError):
                pass   # not there yet, or being written
            waited = time.monotonic() - t0
            # Only a first start gives up: once connected, a restarting emulator is waited for.
            if waited >= self.s.emulator_wait and not self.svc.metrics.get("connections"):
                raise FatalBridgeError(f"no emulator: {path} did not appear within {self.s.emulator_wait:g} s "
                                       "(start `livepipe emulator`, or set GEMINI_API_KEY for the real service)")
            if waited >= next_log:
                log.info("waiting for the emulator (%s)", path)
                self.publish_state("connecting", "waiting for the emulator")
                next_log = waited + 5.0
            await asyncio.sleep(0.1)

    async def _client(self) -> Any:
        from google import genai
        from google.genai import types
        if self.s.backend == "emulator":
            url, ca = await self._emulator_address()
        else:
            url, ca = "", ""
        key = (url, ca)
        client = self._clients.get(key)
        if client is None:
            if url:
                ctx = ssl.create_default_context(cafile=ca)
                opts = types.HttpOptions(base_url=url, async_client_args={"ssl": ctx}, **self._api_version())
                client = genai.Client(api_key=self.s.api_key, http_options=opts)
            else:
                client = genai.Client(api_key=self.s.api_key, http_options=types.HttpOptions(**self._api_version()))
            self._clients = {key: client}   # an emulator restart may move it: keep only the current one
        return client

    async def _open_link(self) -> Link:
        client = await self._client()
        stack = contextlib.AsyncExitStack()
        self.setup_tools = list(self.s.tools or [])   # announced functions may change while it connects
        handle = self._resume_handle()
        history = [] if handle else self._history_to_seed()    # a new session: --history / bus, then what was said
        version = self.history_version      # a bus history arriving while this connects: _install sees it
        try:
            cm = client.aio.live.connect(model=self.s.model, config=live_config(self.s, handle, bool(history)))
            session = await asyncio.wait_for(stack.enter_async_context(cm), self.s.connect_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stack.aclose(), 1.0)
            raise
        self.links_opened += 1
        link = Link(self.links_opened, session, stack)
        link.resumed = handle is not None
        link.history_version = version
        self.fresh_next = False
        if not link.resumed:
            self.session_turns_from, self.session_texts_from = self.turn, self.svc.metrics["text_sent"]
            # A handle of the session this one replaces (fresh_next) must not outlive it: a drop
            # before the new session's first handle would resume the old one, without the history.
            self.handle = None
        await self._seed_history(link, history)   # a new session's history goes first (signals.py)
        link.task = asyncio.create_task(self._receive_loop(link))
        link.watchdog = asyncio.create_task(self._watch_server(link))
        self.svc.metrics["connections"] = self.links_opened
        return link

    def _resume_handle(self) -> str | None:
        """The handle the next connection resumes with: none when a new session is wanted (history
        from the bus for a session that has not begun) or none was given."""
        return None if self.fresh_next else self.handle

    async def _connect(self, why: str) -> Link:
        """Open a connection (resuming when we hold a handle), retrying transient failures with backoff."""
        delay = 0.2
        fresh_retry_used = False
        while True:
            resuming = self._resume_handle() is not None
            self.publish_state("resuming" if resuming else "connecting", why)
            try:
                link = await self._open_link()
            except asyncio.CancelledError:
                raise
            except FatalBridgeError:
                raise
            except Exception as exc:
                fatal, line = describe_error(exc, self.scrub)
                refused = getattr(exc, "code", None) in FATAL_CLOSE_CODES   # closed during setup
                if (fatal or refused) and resuming and not fresh_retry_used:
                    # An expired or foreign handle is refused like a bad argument: try once without it.
                    log.warning("resuming was refused (%s): starting a fresh session, the context is lost", line)
                    self.handle, fresh_retry_used = None, True
                    continue
                if fatal:
                    raise FatalBridgeError(line) from None
                log.warning("connection failed (%s): retrying in %.1f s", line, delay)
                self.publish_state("reconnecting", line)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.s.reconnect_max)
                why = f"retry after: {line}"
                continue
            log.info("connected (connection %d, %s, %s%s)", link.number, self.s.backend, self.s.model,
                     ", resumed" if resuming else "")
            self.publish_state("connected", f"connection {link.number}" + (" (resumed)" if resuming else ""))
            return link

    def _install(self, link: Link) -> None:
        self.link = link
        self.link_ready.set()
        self.audio_event.set()     # flush what was held
        self.events_event.set()
        if (self.s.tools or []) != self.setup_tools:   # functions announced or withdrawn meanwhile (tools.py)
            self._push_context(None, list(self.s.tools or []))
        self._apply_history_now()   # a bus history that came while it connected (signals.py)

    def _end_cut_turn(self) -> None:
        """A model turn the old connection will not finish: close it for the bus."""
        if self.turn_open:
            if not self.turn_interrupted and (self.turn_audio or self.turn_text):
                self.cut_audio, self.cut_turn, self.cut_pos = bytes(self.turn_audio), self.turn, 0
                self.cut_text, self.repeat_text = self.turn_text, ""
            self.svc.publish("control", "turn_complete", turn=self.turn)
            self._close_turn()

    async def _finish_turn_on(self, old: Link, budget: float) -> None:
        """goAway while the model speaks: let that turn end (and its handle arrive) on the old
        connection, so the next one resumes after it instead of answering the same words again."""
        if not self.turn_open or old.closed.is_set():
            return
        t0 = time.monotonic()
        self.handle_event.clear()
        closed = asyncio.create_task(old.closed.wait())
        done = asyncio.create_task(self.turn_done.wait())
        try:
            await asyncio.wait({closed, done}, timeout=budget, return_when=asyncio.FIRST_COMPLETED)
            if done.done() and not old.closed.is_set():
                # The handle covering the finished turn follows its turnComplete.
                left = max(0.1, min(0.5, budget - (time.monotonic() - t0)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.handle_event.wait(), left)
        finally:
            closed.cancel()
            done.cancel()

    def _replay_from(self, old: Link, fresh: bool = False) -> None:
        """Queue again, ahead of what was held, the audio the next session has not heard: beyond
        what the handle covers when it resumed; for a fresh session, all that was not answered."""
        items = old.to_send_again(fresh)
        texts = old.texts_to_send_again(fresh)
        old.replay.clear()
        old.texts.clear()
        if texts:   # ahead of what was typed meanwhile, in the order they were typed
            self.events_q.extendleft(reversed([("text", send) for send in texts]))
            self.events_event.set()
            self.svc.metrics["text_resent"] += len(texts)
            log.info("sending again %d typed message(s) the %s session has not heard", len(texts),
                     "fresh" if fresh else "resumed")
        if not items:
            return
        replayed = sum(len(i) for i in items if isinstance(i, bytes))
        self.audio_q.extendleft(reversed(items))
        self.audio_q_bytes += replayed
        self.svc.metrics["audio_in_replayed_ms"] = (self.svc.metrics.get("audio_in_replayed_ms", 0)
                                                    + replayed * 1000 // BYTES_PER_SECOND_IN)
        log.info("sending again %d ms of audio the %s session has not heard%s",
                 replayed * 1000 // BYTES_PER_SECOND_IN, "fresh" if fresh else "resumed",
                 " (nor answered)" if fresh else "")

    async def _replace(self, old: Link, why: str) -> None:
        old.retired = True
        self._end_cut_turn()
        new = await self._connect(why)
        self._replay_from(old, fresh=not new.resumed)
        self._install(new)
        asyncio.create_task(old.close())
        if old.last_audio_sent:
            # Wall time between the last audio written to the old connection and the first to the
            # new one (the new one's first write happens once the sender runs: measured there).
            self._gap_from = old.last_audio_sent

    async def supervise(self) -> None:
        # A restarted bridge remembers nothing: a process that kept the conversation (`livepipe
        # transcript`) answers with control history. Asked before connecting (the SDK import and the
        # handshake take longer than the answer), so the first session usually starts with it; else a
        # session with nothing said yet is replaced by one that does (signals.py).
        self.svc.publish("control", "history_query")
        self._install(await self._connect("starting"))
        while True:
            await self.wake.wait()
            self.wake.clear()
            link = self.link
            assert link is not None
            if link.closed.is_set():
                fatal, line = describe_error(link.error or ConnectionError("closed"), self.scrub)
                if fatal:
                    raise FatalBridgeError(line)
                self.svc.metrics["reconnects"] += 1
                log.warning("connection %d lost (%s): reconnecting%s", link.number, line,
                            " with the resumption handle" if self.handle else "")
                self.publish_state("reconnecting", line)
                await self._replace(link, f"after: {line}")
            elif link.go_away_ms is not None and not link.retired:
                t0 = self.go_away_at
                budget = max(0.5, min(5.0, link.go_away_ms / 1000 - 1.0))
                await self._finish_turn_on(link, budget)
                waited_ms = (time.monotonic() - t0) * 1000
                why = link.replace_why or "the goAway"
                if not self.handle and not self.fresh_next:   # (fresh_next: a new session is wanted)
                    log.warning("%s without a resumption handle: the next connection starts a fresh session", why)
                await self._replace(link, link.replace_why or f"goAway, {link.go_away_ms} ms left")
                self.svc.metrics["switchover_ms"] = round((time.monotonic() - t0) * 1000, 1)
                log.info("switched to connection %d %.0f ms after %s (%.0f ms of it letting the model finish "
                         "its turn)", self.link.number, self.svc.metrics["switchover_ms"], why, waited_ms)

