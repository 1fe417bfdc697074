"""`livepipe broker`: the XSUB/XPUB rendezvous every process connects to.

Publishers connect to the XSUB endpoint, subscribers to the XPUB endpoint. On loopback it
runs open; bound to any other address it requires CURVE (a server key pair and an
allow-list directory of client public keys) unless --insecure is given.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from livepipe.bus.config import ConfigError, broker_address
from livepipe.bus.message import MAX_FRAME_BYTES
from livepipe.bus.runtime import setup_logging
from livepipe.services.lib.verb import UsageError, VerbParser, fail, verb

BROKER_HWM = 50_000   # per peer; at 20 ms chunks that is 16 minutes of audio for a stalled reader

log = logging.getLogger("broker")


class LoggingAuthenticator(ThreadAuthenticator):
    """The CURVE authenticator, saying once per key which client it refused (pyzmq logs at debug only)."""

    MAX_KEYS = 1000   # bounded memory under a flood of random keys

    def __init__(self, *args, **kwargs) -> None:   # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.refused: dict[bytes, int] = {}

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        allowed, reason = await super()._authenticate_curve(domain, client_key)
        if not allowed:
            key = z85.encode(client_key)
            count = self.refused.get(key, 0)
            if count == 0 and len(self.refused) < self.MAX_KEYS:
                log.warning("refused a client whose CURVE public key %s is not in the allow folder "
                            "(%s): copy its .key file there and restart the broker to admit it",
                            key.decode(), self.allow_dir)
            if count or len(self.refused) < self.MAX_KEYS:
                self.refused[key] = count + 1
        return allowed, reason


def is_loopback(endpoint: str) -> bool:
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = re.match(r"^tcp://(\[[^\]]*\]|[^:]*):", endpoint)
    host = m.group(1).strip("[]") if m else ""
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe broker", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    try:   # the ports of LIVEPIPE_PORT_BASE / LIVEPIPE_BROKER=HOST:PORT, on loopback unless told otherwise
        _, pub_port, sub_port = broker_address()
    except ConfigError as exc:
        p.error(str(exc))
    p.add_argument("--pub-bind", default=os.environ.get("LIVEPIPE_PUB_BIND", f"tcp://127.0.0.1:{pub_port}"),
                   help="endpoint publishers connect to (env LIVEPIPE_PUB_BIND, default %(default)s)")
    p.add_argument("--sub-bind", default=os.environ.get("LIVEPIPE_SUB_BIND", f"tcp://127.0.0.1:{sub_port}"),
                   help="endpoint subscribers connect to (env LIVEPIPE_SUB_BIND, default %(default)s)")
    p.add_argument("--server-key", default=os.environ.get("LIVEPIPE_CURVE_SERVER_SECRET"),
                   help="the broker's secret key file, NAME.key_secret from `livepipe keys` "
                        "(env LIVEPIPE_CURVE_SERVER_SECRET); enables CURVE")
    p.add_argument("--allow", default=os.environ.get("LIVEPIPE_CURVE_ALLOW"),
                   help="directory of client public keys (*.key) allowed to connect (env LIVEPIPE_CURVE_ALLOW)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without CURVE (anyone who can reach it can publish)")
    return p.parse_args(argv)


@verb("broker")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging("broker")
    public = [ep for ep in (args.pub_bind, args.sub_bind) if not is_loopback(ep)]
    if bool(args.server_key) != bool(args.allow):
        raise UsageError("CURVE needs both --server-key and --allow")
    if public and not args.server_key and not args.insecure:
        raise UsageError(f"refusing to bind {', '.join(public)} without CURVE: give --server-key and --allow "
                         "(see `livepipe keys`), or --insecure")
    ctx = zmq.Context()
    auth = None
    try:
        xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
        for s in (xsub, xpub):
            s.linger = 0
            s.sndhwm = s.rcvhwm = BROKER_HWM
        # A 50 MB message would reach (and be buffered by) every subscriber of its topic: refuse
        # oversized frames here. (Not on subscribers: ZeroMQ never reconnects a socket after such a refusal.)
        xsub.maxmsgsize = MAX_FRAME_BYTES
        if args.server_key:
            try:
                server_public, server_secret = zmq.auth.load_certificate(args.server_key)
            except Exception as exc:
                raise UsageError(f"cannot read the server key {args.server_key}: {exc}") from None
            if server_secret is None:
                raise UsageError(f"{args.server_key} holds no secret key: give the .key_secret file")
            if not Path(args.allow).is_dir():
                raise UsageError(f"allow-list directory {args.allow} does not exist")
            auth = LoggingAuthenticator(ctx, log=logging.getLogger("broker.auth"))
            auth.allow_dir = args.allow
            auth.start()
            auth.configure_curve(domain="*", location=str(args.allow))
            for s in (xsub, xpub):
                s.curve_server = True
                s.curve_publickey, s.curve_secretkey = server_public, server_secret
        try:
            xsub.bind(args.pub_bind)
            xpub.bind(args.sub_bind)
        except zmq.ZMQError as exc:
            return fail("broker", f"cannot bind {args.pub_bind} / {args.sub_bind}: {exc}")
        log.info("publishers -> %s, subscribers -> %s%s", args.pub_bind, args.sub_bind,
                 " (CURVE)" if args.server_key else "")
        return run_proxy(ctx, xsub, xpub)
    finally:
        # Teardown joins the proxy and authenticator threads; the guard armed by the stop signal
        # (or here) bounds it, so a wedged thread never keeps a stopping broker alive.
        _arm_exit_guard()
        if auth is not None:
            auth.stop()
        ctx.destroy(linger=0)


_guard: threading.Timer | None = None


def _arm_exit_guard() -> None:
    """Exit 3 s from now whatever a ZeroMQ thread does: honcho and supervise SIGKILL after 5 s,
    which a user reads as a crash. Armed once, at the stop signal, and never cancelled."""
    global _guard
    if _guard is None:
        _guard = threading.Timer(3.0, _exit_now)
        _guard.daemon = True
        _guard.start()


def _exit_now() -> None:
    log.warning("shutdown took over 3 s (a ZeroMQ thread did not stop): exiting anyway")
    logging.shutdown()
    os._exit(0)


def run_proxy(ctx: zmq.Context, xsub: zmq.Socket, xpub: zmq.Socket) -> int:
    """zmq.proxy in a thread; the main thread waits for a signal and terminates it."""
    ctrl_addr = f"inproc://broker-ctrl-{id(ctx)}"
    ctrl = ctx.socket(zmq.PAIR)
    ctrl.bind(ctrl_addr)
    done = threading.Event()

    def proxy() -> None:
        # Stop signals go to the main thread: one landing here would end zmq_proxy with EINTR.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        peer = ctx.socket(zmq.PAIR)
        peer.connect(ctrl_addr)
        try:
            zmq.proxy_steerable(xsub, xpub, None, peer)
        except zmq.ZMQError:
            pass
        finally:
            peer.close(linger=0)
            done.set()

    stop = threading.Event()

    def on_signal(*_: object) -> None:
        _arm_exit_guard()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=proxy, name="proxy", daemon=True)
    thread.start()
    while not stop.wait(0.5) and not done.is_set():
        pass
    if done.is_set() and not stop.is_set():
        log.error("the proxy stopped on its own: exiting so a supervisor restarts the broker")
        ctrl.close(linger=0)
        return 1
    else:
        try:   # never block: a proxy that is gone takes no TERMINATE
            ctrl.send(b"TERMINATE", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        done.wait(1.0)
    ctrl.close(linger=0)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
