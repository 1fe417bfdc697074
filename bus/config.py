"""Where the broker is, which session we are in, and the CURVE keys: from flags or environment.

Environment variables (flags override them):
  LIVEPIPE_BROKER        HOST or HOST:PORT of the broker: sets both endpoints, publish PORT and
                         subscribe PORT+1 (default ports 7710/7711)
  LIVEPIPE_PORT_BASE     the bus ports in one variable: publish PORT_BASE, subscribe PORT_BASE+1, for
                         every process and the broker's default binds
  LIVEPIPE_PUB_ENDPOINT  where publishers connect (broker's XSUB), default tcp://127.0.0.1:7710
  LIVEPIPE_SUB_ENDPOINT  where subscribers connect (broker's XPUB), default tcp://127.0.0.1:7711
  LIVEPIPE_SESSION       session name prefixed to every topic ("" = none)
  LIVEPIPE_CURVE_SERVER_KEY  broker's public key file (client side)
  LIVEPIPE_CURVE_CLIENT_KEY  this client's secret key file (client side)
"""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PUB_PORT = 7710
DEFAULT_SUB_PORT = 7711
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")


class ConfigError(ValueError):
    """A bad setting; its message is one line meant for the user."""


_BROKER_RE = re.compile(r"^(?P<host>\[[^\]]+\]|[^:\[\]]+)(?::(?P<port>\d+))?$")


def _port_pair(text: str, name: str) -> tuple[int, int]:
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65534:
        raise ConfigError(f"{name} {text!r}: a port number 1..65534 (publish PORT, subscribe PORT+1)")
    return port, port + 1


def broker_address(env: dict[str, str] | None = None) -> tuple[str, int, int]:
    """(host, publish port, subscribe port) from LIVEPIPE_BROKER (HOST or HOST:PORT) and
    LIVEPIPE_PORT_BASE; 127.0.0.1 and 7710/7711 by default."""
    env = dict(os.environ if env is None else env)
    host, ports = "127.0.0.1", (DEFAULT_PUB_PORT, DEFAULT_SUB_PORT)
    if env.get("LIVEPIPE_PORT_BASE"):
        ports = _port_pair(env["LIVEPIPE_PORT_BASE"].strip(), "LIVEPIPE_PORT_BASE")
    broker = (env.get("LIVEPIPE_BROKER") or "").strip()
    if broker:
        m = _BROKER_RE.match(broker.removeprefix("tcp://"))
        if not m:
            raise ConfigError(f"LIVEPIPE_BROKER {broker!r}: give HOST or HOST:PORT, like 192.168.1.10:7710")
        host = m.group("host")
        if m.group("port"):
            ports = _port_pair(m.group("port"), "LIVEPIPE_BROKER's port")
    return host, ports[0], ports[1]


@dataclass(frozen=True)
class BusConfig:
    pub_endpoint: str = f"tcp://127.0.0.1:{DEFAULT_PUB_PORT}"
    sub_endpoint: str = f"tcp://127.0.0.1:{DEFAULT_SUB_PORT}"
    session: str = ""
    curve_server_key: str | None = None   # path to the broker's public key file
    curve_client_key: str | None = None   # path to this client's secret key file

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: str | None) -> "BusConfig":
        env = dict(os.environ if env is None else env)
        host, pub_port, sub_port = broker_address(env)
        pub = env.get("LIVEPIPE_PUB_ENDPOINT") or f"tcp://{host}:{pub_port}"
        sub = env.get("LIVEPIPE_SUB_ENDPOINT") or f"tcp://{host}:{sub_port}"
        values = dict(
            pub_endpoint=pub, sub_endpoint=sub, session=env.get("LIVEPIPE_SESSION", ""),
            curve_server_key=env.get("LIVEPIPE_CURVE_SERVER_KEY") or None,
            curve_client_key=env.get("LIVEPIPE_CURVE_CLIENT_KEY") or None,
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**values)
        cfg.check()
        return cfg

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BusConfig":
        return cls.from_env(pub_endpoint=getattr(args, "pub", None), sub_endpoint=getattr(args, "sub", None),
                            session=getattr(args, "session", None))

    def check(self) -> None:
        if not _SESSION_RE.match(self.session):
            raise ConfigError(f"LIVEPIPE_SESSION {self.session!r}: use letters, digits, '_', '.', '-' (64 at most)")
        for name, ep in (("publish", self.pub_endpoint), ("subscribe", self.sub_endpoint)):
            if not re.match(r"^(tcp|ipc|inproc)://.+", ep):
                raise ConfigError(f"{name} endpoint {ep!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:7710")
        if bool(self.curve_server_key) != bool(self.curve_client_key):
            raise ConfigError("CURVE needs both LIVEPIPE_CURVE_SERVER_KEY and LIVEPIPE_CURVE_CLIENT_KEY")
        for path in (self.curve_server_key, self.curve_client_key):
            if path and not Path(path).is_file():
                raise ConfigError(f"CURVE key file {path} does not exist")


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every process shares: where the broker is and which session."""
    g = parser.add_argument_group("bus")
    g.add_argument("--pub", metavar="ENDPOINT", help="broker endpoint publishers connect to "
                   "(env LIVEPIPE_PUB_ENDPOINT, default tcp://127.0.0.1:7710)")
    g.add_argument("--sub", metavar="ENDPOINT", help="broker endpoint subscribers connect to "
                   "(env LIVEPIPE_SUB_ENDPOINT, default tcp://127.0.0.1:7711)")
    g.add_argument("--session", metavar="NAME", help="session name prefixed to every topic (env LIVEPIPE_SESSION)")
