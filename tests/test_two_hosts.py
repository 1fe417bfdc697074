"""Two hosts on one machine: an edge host (microphone and speaker) in its own network namespace,
joined by a veth pair to the hub (broker, gemini-bridge, emulator), with CURVE on, as the README's
"Two machines" section sets it up. A conversation works across the link; the link cut for 5 s and
restored recovers by itself; a restarted hub is heard at the edge from its first reply.

Creating namespaces needs root (CI runs as root); elsewhere the test skips and says why."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.dev.harness import stop_process, stop_processes
from livepipe.services.lib.audio import write_wav_int16
from tests.conftest import free_port
from tests.demo_audio import USER_SCRIPT, USER_WAV, read_wav

pytestmark = pytest.mark.timeout(150)


def _netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"lpprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Link:
    """The edge namespace and the veth pair between it and the hub (this test's own namespace)."""

    def __init__(self) -> None:
        n = os.getpid() % 60000
        self.ns = f"lpedge{n}"
        self.hub_if, self.edge_if = f"lph{n}", f"lpe{n}"
        subnet = 16 + n % 200
        self.hub_ip, self.edge_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def up(self) -> "Link":
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.hub_if, "type", "veth", "peer", "name", self.edge_if],
                    ["ip", "link", "set", self.edge_if, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.hub_ip}/30", "dev", self.hub_if],
                    ["ip", "link", "set", self.hub_if, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "addr", "add", f"{self.edge_ip}/30", "dev", self.edge_if],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", self.edge_if, "up"],
                    ["ip", "netns", "exec", self.ns, "ip", "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True)
        return self

    def set_edge_link(self, up: bool) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "ip", "link", "set", self.edge_if, "up" if up else "down"],
                       check=True, capture_output=True)

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.hub_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


@pytest.fixture
def link() -> Iterator[Link]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"two-host test skipped: {reason}")
    lk = Link().up()
    try:
        yield lk
    finally:
        lk.down()


def _livepipe(args: list[str], env: dict[str, str], log: Path, netns: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "livepipe.services", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=f)


def test_edge_and_hub_in_two_network_namespaces(tmp_path: Path, link: Link) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API"))}
    base["PYTHONUNBUFFERED"] = "1"
    keys, allow = tmp_path / "keys", tmp_path / "keys" / "allowed"
    res = subprocess.run([sys.executable, "-m", "livepipe.services", "keys", str(keys), "server", "hub", "edge",
                          "watcher"], env=base, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    allow.mkdir()
    for name in ("hub", "edge", "watcher"):
        shutil.copy(keys / f"{name}.key", allow)
    pub, sub = free_port(), free_port()
    bus = {"LIVEPIPE_PUB_ENDPOINT": f"tcp://{link.hub_ip}:{pub}", "LIVEPIPE_SUB_ENDPOINT": f"tcp://{link.hub_ip}:{sub}",
           "LIVEPIPE_CURVE_SERVER_KEY": str(keys / "server.key")}
    hub_env = {**base, **bus, "LIVEPIPE_PUB_BIND": f"tcp://{link.hub_ip}:{pub}",
               "LIVEPIPE_SUB_BIND": f"tcp://{link.hub_ip}:{sub}",
               "LIVEPIPE_CURVE_SERVER_SECRET": str(keys / "server.key_secret"), "LIVEPIPE_CURVE_ALLOW": str(allow),
               "LIVEPIPE_CURVE_CLIENT_KEY": str(keys / "hub.key_secret"), "LIVEPIPE_STATE_DIR": str(tmp_path / "hub")}
    edge_env = {**base, **bus, "LIVEPIPE_CURVE_CLIENT_KEY": str(keys / "edge.key_secret")}

    # The user repeats one question with pauses long enough for each answer to play out.
    x, rate = read_wav(USER_WAV)
    u = USER_SCRIPT["utterances"][1]
    question = tmp_path / "question.wav"
    write_wav_int16(question, np.concatenate([x[int((u["start_s"] - 0.3) * rate):int(u["end_s"] * rate)],
                                              np.zeros(int(4.5 * rate), np.int16)]), rate)

    hub: dict[str, subprocess.Popen] = {}

    def start_hub() -> None:
        hub["broker"] = _livepipe(["broker"], hub_env, tmp_path / "broker.log")
        hub["emulator"] = _livepipe(["emulator", "--port", "0"], hub_env, tmp_path / "emulator.log")
        hub["bridge"] = _livepipe(["gemini-bridge"], hub_env, tmp_path / "bridge.log")

    def stop_hub() -> None:
        stop_processes([hub.pop("bridge"), hub.pop("emulator")])   # side by side, then their broker
        stop_process(hub.pop("broker"))

    edge: list[subprocess.Popen] = []
    start_hub()
    edge.append(_livepipe(["playback", "--file", str(tmp_path / "heard.wav")], edge_env, tmp_path / "playback.log",
                          link.ns))
    edge.append(_livepipe(["capture-audio", "--file", str(question), "--loop"], edge_env,
                          tmp_path / "capture.log", link.ns))
    watcher_cfg = BusConfig.from_env({**bus, "LIVEPIPE_CURVE_CLIENT_KEY": str(keys / "watcher.key_secret")})

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))

    def next_reply(watcher: BusClient, within_s: float) -> tuple[float, dict]:
        """Wait for the edge's playback to start playing a reply; returns (wait in s, the event's src)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < within_s:
            msg = watcher.recv(0.2)
            if msg is not None and msg.topic == "playback" and msg.kind == "turn_started":
                return time.monotonic() - t0, msg.header
        raise AssertionError(f"no reply was played at the edge within {within_s} s\n{logs()}")

    try:
        with BusClient("watcher", watcher_cfg, ["playback"]) as watcher:
            watcher.wait_ready(30)
            # 1. A conversation works across the link (startup included).
            first_s, first = next_reply(watcher, 40)
            assert first["src"] == "playback"
            # 2. The link is cut for 5 s, then restored: the pipeline recovers by itself.
            link.set_edge_link(False)
            time.sleep(5.0)   # the outage itself is what is being tested
            link.set_edge_link(True)
            after_cut_s, _ = next_reply(watcher, 25)
        # 3. The hub restarts (as after adding a key): the edge plays the new bridge's very first reply,
        #    not only replies whose turn number passes the old bridge's count.
        stop_hub()
        start_hub()
        with BusClient("watcher", watcher_cfg, ["playback", "audio.out"]) as watcher:
            watcher.wait_ready(30)
            t0 = time.monotonic()
            first_audio = None
            while first_audio is None:
                assert time.monotonic() - t0 < 40, f"the restarted hub sent no reply\n{logs()}"
                msg = watcher.recv(0.2)
                if msg is not None and msg.topic == "audio.out":
                    first_audio = time.monotonic()
            after_restart_s, _ = next_reply(watcher, 40)
            played_after_s = time.monotonic() - first_audio
            assert played_after_s < 3.0, (f"the restarted bridge's first reply was not played "
                                          f"(playback started {played_after_s:.1f} s after it arrived)")
    finally:
        broker = hub.pop("broker", None)
        stop_processes([*edge, *hub.values()])   # side by side, then their broker
        hub.clear()
        if broker is not None:
            stop_process(broker)
    print(f"two hosts: first reply {first_s:.1f} s, after a 5 s cut {after_cut_s:.1f} s, "
          f"a restarted hub's first reply played {played_after_s * 1000:.0f} ms after it arrived")
