"""Audio devices by the names users see: the sound server's sources and sinks.

PortAudio (Debian's libportaudio2, ALSA host API) shows a PulseAudio or PipeWire server as two
devices, `pulse` and `default`, whatever the server holds. Users know the server's names
(`virtual_mic`, `alsa_input.usb-...`) and descriptions ("Built-in Audio Analog Stereo"). Here:
list those with `pactl` (PipeWire ships a compatible pactl), and open one by pointing the
`pulse` device at it with PULSE_SOURCE / PULSE_SINK, which libpulse reads when a stream opens.

Standard library only; without pactl or a server every function answers "nothing there".
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

# pactl's output is translated: read it in the C locale.
_PACTL_ENV = {"LC_ALL": "C", "LANG": "C"}
_ENV_VAR = {"input": "PULSE_SOURCE", "output": "PULSE_SINK"}
_SERVER_KIND = {"input": "source", "output": "sink"}


@dataclass(frozen=True)
class ServerDevice:
    """A PulseAudio/PipeWire source (kind 'input') or sink (kind 'output')."""

    kind: str
    name: str
    description: str
    default: bool = False

    @property
    def monitor(self) -> bool:
        """A sink's monitor: what that sink plays, as a source."""
        return self.kind == "input" and self.name.endswith(".monitor")


def _pactl(*args: str) -> str | None:
    try:
        res = subprocess.run(["pactl", *args], capture_output=True, text=True, timeout=3.0,
                             env={**os.environ, **_PACTL_ENV})
    except (OSError, subprocess.SubprocessError):   # no pactl, or a wedged server
        return None
    return res.stdout if res.returncode == 0 else None


def _default_name(kind: str) -> str | None:
    info = _pactl("info")
    label = f"Default {_SERVER_KIND[kind].capitalize()}:"
    for line in (info or "").splitlines():
        if line.startswith(label):
            return line[len(label):].strip()
    return None


def server_devices(kind: str) -> list[ServerDevice]:
    """The server's sources (kind 'input') or sinks ('output'); [] without a reachable server."""
    out = _pactl("list", f"{_SERVER_KIND[kind]}s")
    if out is None:
        return []
    default = _default_name(kind)
    found: list[ServerDevice] = []
    name = desc = None

    def flush() -> None:
        if name:
            found.append(ServerDevice(kind, name, desc or name, name == default))

    for line in out.splitlines():
        text = line.strip()
        if line and not line[0].isspace():   # "Source #3": a new block
            flush()
            name = desc = None
        elif text.startswith("Name:") and name is None:
            name = text[5:].strip()
        elif text.startswith("Description:") and desc is None:
            desc = text[12:].strip()
    flush()
    return found


def find_server_device(spec: str, kind: str, devices: list[ServerDevice] | None = None) -> ServerDevice | None:
    """The server device `spec` names: its exact name, else its exact description (any case)."""
    devices = server_devices(kind) if devices is None else devices
    for d in devices:
        if d.name == spec:
            return d
    matches = [d for d in devices if d.description.lower() == spec.lower()]
    return matches[0] if len(matches) == 1 else None


def select_server_device(spec: str | None, kind: str) -> tuple[str | None, ServerDevice | None]:
    """Route `--device spec` to a server source/sink if it names one.

    Returns (the spec to give PortAudio, the server device or None). For a server name the
    PortAudio device is `pulse` and PULSE_SOURCE/PULSE_SINK is set for this process, before
    any stream opens. Numbers and PortAudio names pass through unchanged."""
    if not spec or spec.strip().lstrip("-").isdigit() or spec in ("pulse", "default"):
        return spec, None
    dev = find_server_device(spec, kind)
    if dev is None:
        return spec, None
    os.environ[_ENV_VAR[kind]] = dev.name
    return "pulse", dev


def device_in_use(portaudio_name: str, kind: str, chosen: ServerDevice | None = None) -> str:
    """What `portaudio_name` really is, for the log: for `pulse`/`default` on a sound server,
    the source/sink the server gives us (PULSE_SOURCE/PULSE_SINK, else its default)."""
    if portaudio_name not in ("pulse", "default"):
        return portaudio_name
    if chosen is None:
        name = os.environ.get(_ENV_VAR[kind]) or _default_name(kind)
        if not name:
            return portaudio_name
        chosen = find_server_device(name, kind) or ServerDevice(kind, name, name)
    label = chosen.name if chosen.description == chosen.name else f"{chosen.name} ({chosen.description})"
    return f"{_SERVER_KIND[kind]} {label} via {portaudio_name}"


def server_devices_text() -> str:
    """The --list-devices section for the sound server ('' without one)."""
    lines: list[str] = []
    for kind, flag in (("input", "capture-audio"), ("output", "playback")):
        devices = server_devices(kind)
        if not devices:
            continue
        lines.append(f"sound server {_SERVER_KIND[kind]}s (`livepipe {flag} --device NAME`):")
        width = max(len(d.name) for d in devices)
        for d in devices:
            mark = "*" if d.default else " "
            extra = "  (monitor: what a sink plays)" if d.monitor else ""
            lines.append(f"  {mark} {d.name:<{width}}  {d.description}{extra}")
    if lines:
        lines.append("(* the server's default)")
    return "\n".join(lines)
