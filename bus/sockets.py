"""Socket construction shared by the service runtime and the tools: HWM per lane, CURVE, linger."""
from __future__ import annotations

from typing import TypeVar

import zmq
import zmq.auth

from livepipe.bus.config import BusConfig, ConfigError

# Receive queue depth per lane, in messages. Audio holds minutes (a slow consumer must
# not lose what the user said); video needs only the newest frame.
LANE_RCVHWM = {"control": 100_000, "audio": 50_000, "video": 4, "events": 20_000}
PUB_SNDHWM = 50_000
LINGER_MS = 200   # long enough to flush a last message, short enough to exit within 1 s

S = TypeVar("S", bound=zmq.Socket)


def apply_curve(sock: zmq.Socket, cfg: BusConfig) -> None:
    """Make `sock` a CURVE client of the broker when keys are configured."""
    if not cfg.curve_server_key:
        return
    try:
        server_public, _ = zmq.auth.load_certificate(cfg.curve_server_key)
        client_public, client_secret = zmq.auth.load_certificate(cfg.curve_client_key)
    except Exception as exc:
        raise ConfigError(f"cannot read CURVE keys: {exc}") from None
    if client_secret is None:
        raise ConfigError(f"{cfg.curve_client_key} holds no secret key (use the .key_secret file)")
    sock.curve_serverkey = server_public
    sock.curve_publickey = client_public
    sock.curve_secretkey = client_secret


def _common(sock: S, cfg: BusConfig) -> S:
    sock.linger = LINGER_MS
    # Reconnect quickly after a broker restart, backing off to 1 s.
    sock.reconnect_ivl = 100
    sock.reconnect_ivl_max = 1000
    apply_curve(sock, cfg)
    return sock


def publisher(ctx: zmq.Context, cfg: BusConfig) -> zmq.Socket:
    """An XPUB connected to the broker's XSUB: it sends like a PUB, and also reports the
    subscriptions the broker forwards, which tells us when our path is live and who listens."""
    sock = _common(ctx.socket(zmq.XPUB), cfg)
    sock.sndhwm = PUB_SNDHWM
    sock.setsockopt(zmq.XPUB_NODROP, 1)   # a full queue raises Again (counted) instead of dropping silently
    sock.connect(cfg.pub_endpoint)
    return sock


def subscriber(ctx: zmq.Context, cfg: BusConfig, lane: str = "events") -> zmq.Socket:
    sock = _common(ctx.socket(zmq.SUB), cfg)
    sock.rcvhwm = LANE_RCVHWM[lane]
    sock.connect(cfg.sub_endpoint)
    return sock


REFUSED_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL


class HandshakeWatch:
    """Socket monitors that tell a refused CURVE handshake from a broker that is not there
    (both look like silence to the sockets themselves)."""

    def __init__(self, socks: list[zmq.Socket], cfg: BusConfig) -> None:
        self.cfg = cfg
        self.refused = 0   # handshakes the broker refused, counted
        # (socket, its monitor, a blocking-API view of the monitor: asyncio sockets give asyncio monitors)
        self._mons: list[tuple[zmq.Socket, zmq.Socket, zmq.Socket]] = []
        if cfg.curve_server_key:   # without CURVE there is no key to refuse
            for s in socks:
                mon = s.get_monitor_socket(REFUSED_EVENTS)
                view = mon if type(mon) is zmq.Socket else zmq.Socket.shadow(mon.underlying)
                self._mons.append((s, mon, view))

    def check(self) -> str | None:
        """One line if the broker refused us since the last check, else None (non-blocking)."""
        from zmq.utils.monitor import recv_monitor_message
        seen = 0
        for _, _, view in self._mons:
            while True:
                try:
                    recv_monitor_message(view, zmq.NOBLOCK)
                except zmq.Again:
                    break
                seen += 1
        self.refused += seen
        if not seen:
            return None
        secret = str(self.cfg.curve_client_key)
        public_file = secret[:-len("_secret")] if secret.endswith(".key_secret") else secret
        try:
            z85_key = zmq.auth.load_certificate(secret)[0].decode()
        except Exception:
            z85_key = "?"
        return (f"the broker refused this client's CURVE key {z85_key} ({self.refused} handshakes refused): "
                f"add its public key ({public_file}) to the broker's allow folder and restart the broker")

    def close(self) -> None:
        for s, mon, _ in self._mons:
            try:
                s.disable_monitor()
            except zmq.ZMQError:
                pass
            mon.close(linger=0)
        self._mons = []
