"""The emulator's TLS WebSocket server: path check, sessions, the discovery file, clean shutdown."""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import signal
import ssl
import sys
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from livepipe.services.processes.emulator.certs import CertPaths
from livepipe.services.processes.emulator.session import LiveSession, Options, Registry
from livepipe.services.processes.emulator.timeline import Timeline
from livepipe.services.lib.verb import VerbError

log = logging.getLogger("emulator")

# The SDK builds f"{base_url}/ws/..." so a base_url ending in "/" gives "//ws/...": match loosely.
PATH_RE = re.compile(r"^/+ws/google\.ai\.generativelanguage\.v\w+\.GenerativeService\."
                     r"BidiGenerateContent(Constrained)?$")
MAX_FRAME = 16 * 2**20          # generous: a 768x768 JPEG in base64 is well under 1 MiB
SHUTDOWN_S = 0.7                # SIGTERM -> exit well within 1 s


class AddressInUse(VerbError):
    """The port is taken; the message is one line for the user."""


@dataclass
class ServerConfig:
    host: str
    port: int
    state_dir: Path             # <state>/emulator
    certs: CertPaths
    timeline: Path | None
    opts: Options


def write_state(path: Path, data: dict) -> None:
    """Atomic: readers see the old file or the whole new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def remove_state(path: Path) -> None:
    """Remove the discovery file only if it is still ours (another emulator may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def public_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)


class EmulatorServer:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.registry = Registry()
        self.counters: Counter[str] = Counter()
        self.timeline = Timeline(cfg.timeline)
        self._next_conn = 0
        self.sessions: set[asyncio.Task] = set()

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if not PATH_RE.match(request.path.split("?", 1)[0]):   # not urlsplit: '//ws/...' would parse as a host
            self.counters["not_found"] += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "Not Found: the Live API path is "
                                      "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        self._next_conn += 1
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        try:
            await LiveSession(ws, self._next_conn, self.cfg.opts, self.registry, self.timeline, self.counters).run()
        finally:
            self.sessions.discard(task)

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cfg.certs.cert_file, self.cfg.certs.key_file)
        return ctx

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        try:
            server: Server = await serve(
                self._handle, cfg.host, cfg.port, ssl=self.ssl_context(), process_request=self._process_request,
                compression=None, max_size=MAX_FRAME, close_timeout=1.0, ping_interval=20, ping_timeout=20,
                server_header="livepipe-emulator")
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise AddressInUse(str(e)) from None
            raise
        port = server.sockets[0].getsockname()[1]
        url = f"https://{public_host(cfg.host)}:{port}"
        state_file = cfg.state_dir / "emulator.json"
        write_state(state_file, {"url": url, "ca_file": str(cfg.certs.ca_file.resolve()), "pid": os.getpid(),
                                 "api_key_required": cfg.opts.api_key is not None})
        print(f"emulator: listening on {url} (CA {cfg.certs.ca_file.resolve()})", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            remove_state(state_file)
            server.close(close_connections=True)        # 1001 going away to every client
            try:
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_S)
            except asyncio.TimeoutError:
                for t in list(self.sessions):
                    t.cancel()
            self.timeline.close()
            c = self.counters
            closes = ", ".join(f"{k[6:]}: {v}" for k, v in sorted(c.items()) if k.startswith("close_")) or "none"
            log.info("stopped: %d sessions, %d turns, %d interrupted, %d tool calls, %d frames; "
                     "closes by code {%s}; rejected %d, bad key %d, internal errors %d, "
                     "audio outside manual activity %.1f s",
                     c["sessions"], c["turns"], c["interrupted"], c["tool_calls"], c["frames"], closes,
                     c["rejected"], c["bad_key"], c["internal_errors"], c["audio_outside_activity_s"])


def run_server(cfg: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean exit, 1 if the port is taken."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await EmulatorServer(cfg).run(stop)

    try:
        asyncio.run(main())
    except AddressInUse:
        raise AddressInUse(f"port {cfg.port} on {cfg.host} is in use (another emulator? see "
                           f"{cfg.state_dir / 'emulator.json'}); pick another with --port, or --port 0") from None
    return 0


__all__ = ["EmulatorServer", "ServerConfig", "run_server"]
