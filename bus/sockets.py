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
