"""`livepipe console` driven in headless Chromium (Debian's `chromium`, through Playwright with its
executable path: no browser download) against real pipelines: the processes started one by one
(to kill one and to press the buttons at chosen moments). `livepipe demo --console` is watched in
tests/test_packaging.py (test_wheel_installed_elsewhere_runs_the_demo), on the one demo run the suite
makes from a wheel.

Screenshots go to each test's tmp dir.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
import wave
from pathlib import Path
from typing import Iterator

import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.lib.recording import RecordingReader
from tests.bridge_support import Emulator
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import ROOT, spawn, stop, stop_all

pytestmark = pytest.mark.timeout(120)

SENTINEL_KEY = "AIzaSyTHIS-IS-A-FAKE-KEY-THAT-MUST-NOT-SHOW-0001"

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
if not Path(CHROMIUM).is_file():
    pytest.skip("no /usr/bin/chromium: launch/install.sh --test installs it", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One headless Chromium for the module (a launch costs a second or two); every test's
    browser.new_page() opens its page in a fresh context of its own (no cookies, storage or cache
    shared between tests)."""
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def first_utterance(path: Path) -> Path:
    """The demo user's first line only (a long question: the reply lasts ~4 s, time to interrupt it)."""
    with wave.open(str(ROOT / "launch" / "assets" / "user.wav")) as w:
        rate = w.getframerate()
        pcm = w.readframes(int(5.0 * rate))
        params = w.getparams()
    with wave.open(str(path), "wb") as out:
        out.setparams(params)
        out.writeframes(pcm)
    return path


def read_url(proc: subprocess.Popen) -> str:
    """The console prints its URL once it serves (after the bus is live)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+/)", line)
    assert m, (line, proc.poll())
    return m.group(1)


def test_console_watches_and_steers_a_live_pipeline(bus_env: dict, tmp_path: Path, browser) -> None:
    cfg = BusConfig.from_env(bus_env)
    procs: dict[str, subprocess.Popen] = {}
    emu = Emulator(bus_env, wait=False)   # the bridge waits for it by itself; all start side by side
    reply_wav = tmp_path / "reply.wav"
    try:
        procs["gemini-bridge"] = spawn(["gemini-bridge"], bus_env)
        procs["playback"] = spawn(["playback", "--file", str(reply_wav)], bus_env)
        procs["capture-video"] = spawn(["capture-video", "test"], bus_env)
        # A key in the console's environment must never reach the page.
        procs["console"] = spawn(["console", "--port", "0", "--record-dir", str(tmp_path / "rec")],
                                 {**bus_env, "GEMINI_API_KEY": SENTINEL_KEY})
        emu.wait_ready()
        url = read_url(procs["console"])
        page = browser.new_page(viewport={"width": 1280, "height": 860}, bypass_csp=True)
        frames: list[str] = []
        page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(str(f))))
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        page.wait_for_selector("#link.ok")
        page.wait_for_selector("#session.ok", timeout=30000)          # model session connected
        for src in ("gemini-bridge", "playback", "capture-video", "console"):
            page.wait_for_selector(f'#procs tr[data-src="{src}"]:not(.silent)', timeout=10000)
        # A heartbeat carrying a secret-looking metric: the console drops it.
        with BusClient("leaky", cfg) as leaky:
            leaky.wait_ready()
            leaky.publish("status", "heartbeat", counters={"sent": 1},
                          metrics={"api_key": SENTINEL_KEY, "note": "ok"})
            page.wait_for_selector('#procs tr[data-src="leaky"]')

        # The user speaks: the input meter moves, the user's words appear under turn 1.
        procs["capture-audio"] = spawn(["capture-audio", "--file", str(first_utterance(tmp_path / "q.wav")),
                                        "--hold"], bus_env)
        page.wait_for_function("Number(document.querySelector('#meter-in').dataset.db) > -40", timeout=10000)
        page.wait_for_selector(".turn .user:text-matches('utterance 1')", timeout=20000)
        # The reply plays: the output meter moves; then the Interrupt button cuts it.
        page.wait_for_function("Number(document.querySelector('#meter-out').dataset.db) > -40", timeout=15000)
        page.screenshot(path=str(tmp_path / "console-speaking.png"))
        with BusClient("watch", cfg, topics=["playback"]) as watch:
            watch.wait_ready()
            page.click("#interrupt")
            finished = watch.wait_for("playback", "turn_finished", 10)
        assert finished["interrupted"] is True
        assert finished["played_ms"] < 3500, finished.header   # the reply is ~4.2 s long: it was cut
        card = page.wait_for_selector(".turn.interrupted[data-finished='1']", timeout=5000)
        header = card.inner_text()
        assert "INTERRUPTED (console)" in header and "heard" in header and "silent after" in header, header
        assert "voice-to-voice" in header, header

        # Typed text gets a reply (the emulator answers text with a tone and a transcript).
        page.fill("#text", "hello from the console")
        page.click("#send")
        page.wait_for_selector(".turn .typed:text-matches('hello from the console')", timeout=5000)
        reply = page.wait_for_selector(".turn:has(.typed:text-matches('hello from the console'))"
                                       "[data-finished='1'] .model:text-matches('.+')", timeout=20000)
        assert reply.inner_text()
        # Tool calls and their results show under the turn they belong to.
        with BusClient("tools", cfg) as tools:
            tools.wait_ready()
            tools.publish("tool.call", "call", id="c1", name="get_weather", args={"city": "Paris"})
            tools.publish("tool.result", "result", id="c1", name="get_weather", response={"sky": "clear"})
            page.wait_for_selector(".turn .tool:text-matches('get_weather.*Paris.*clear')", timeout=5000)

        # Mute reaches capture-audio (its heartbeat says muted=1), unmute undoes it.
        page.click("#mute")
        page.wait_for_selector('#procs tr[data-src="capture-audio"]:has-text("muted=1")', timeout=5000)
        page.wait_for_selector("#mic:text-is('mic: muted')")
        page.click("#unmute")
        page.wait_for_selector('#procs tr[data-src="capture-audio"]:has-text("muted=0")', timeout=5000)

        # Record: `livepipe record` as the console's child, the same file format.
        page.click("#record")
        page.wait_for_selector("#record[data-active='1']")
        page.wait_for_function("document.querySelector('#rec').textContent.includes(' KB')", timeout=5000)
        # The recorder is receiving: let one video frame (1 FPS) pass before stopping it.
        with BusClient("watch-video", cfg, topics=["video.in"]) as video:
            video.wait_ready()
            video.wait_for("video.in", "image", 5)
        page.click("#record")
        page.wait_for_selector("#rec:text-matches('saved')", timeout=10000)
        recordings = list((tmp_path / "rec").glob("console-*.lprec"))
        assert len(recordings) == 1
        with RecordingReader(recordings[0]) as r:
            topics = {bytes(frames_[0]).decode() for _, frames_ in r}
        assert "status" in topics and "video.in" in topics, topics

        # The last video frame, with its size.
        page.wait_for_function("document.querySelector('#frame').naturalWidth === 768")
        assert "768×432" in page.inner_text("#frame-info")

        # A killed process turns red within 3 s.
        page.screenshot(path=str(tmp_path / "console-before-kill.png"))
        procs["capture-video"].kill()
        page.wait_for_selector('#procs tr[data-src="capture-video"].silent', timeout=3000)
        assert page.inner_text('#procs tr[data-src="capture-video"] td:nth-child(2)') == "SILENT"
        assert not page.query_selector('#procs tr[data-src="playback"].silent')
        page.screenshot(path=str(tmp_path / "console-killed.png"))

        assert errors == []
        everything = page.content() + "".join(frames)
        assert SENTINEL_KEY not in everything and "api_key" not in everything
    finally:
        outs = dict(zip(procs, stop_all([*procs.values(), emu.proc])))
    assert procs["console"].returncode == 0, outs["console"]
    assert "Traceback" not in outs["console"][1]


def http(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, method=method, headers={**(headers or {})},
                                 data=None if body is None else json.dumps(body).encode())
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def ws_first_event(url: str) -> int | str:
    """The HTTP status refusing the WebSocket, or the type of the first event it sends."""
    import aiohttp

    async def go() -> int | str:
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(url) as ws:
                    return json.loads((await ws.receive(timeout=5)).data)["t"]
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def test_console_access_rules(bus_env: dict, browser) -> None:
    """Loopback only without a token; with one, every request needs it (pages, controls, WebSocket)."""
    refused = subprocess.run([sys.executable, "-m", "livepipe.services", "console", "--host", "0.0.0.0"],
                             env=bus_env, capture_output=True, text=True, timeout=20)
    assert refused.returncode == 2
    assert "without a token" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1

    token = "t0ken-" + "x" * 20
    proc = spawn(["console", "--port", "0"], {**bus_env, "LIVEPIPE_CONSOLE_TOKEN": token})
    try:
        url = read_url(proc)
        assert token not in url
        assert http(url) == 403
        assert http(url + "?token=wrong-" + "x" * 20) == 403
        assert http(url + f"?token={token}") == 200
        assert http(url + "api/control", "POST", {"op": "mute"}) == 403
        assert http(url + "api/control", "POST", {"op": "mute"}, {"X-Livepipe-Token": token}) == 200
        assert ws_first_event(url + "ws") == 403
        assert ws_first_event(url + f"ws?token={token}") == "snap"
        page = browser.new_page()                 # with the console's Content-Security-Policy enforced
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url + f"?token={token}")        # the page passes the token on to its WebSocket and controls
        page.wait_for_selector("#link.ok")
        page.wait_for_selector('#procs tr[data-src="console"]')
        page.click("#mute")
        page.wait_for_selector("#mic:text-is('mic: muted')")
        assert problems == []
    finally:
        stop(proc)
    # Without a token: another site's page may neither control nor read (Origin), nor a rebinding DNS name (Host).
    proc = spawn(["console", "--port", "0"], bus_env)
    try:
        url = read_url(proc)
        assert http(url + "api/control", "POST", {"op": "mute"}, {"Origin": "http://evil.example"}) == 403
        assert http(url + "api/control", "POST", {"op": "mute"}, {"Origin": "null"}) == 403
        assert http(url, headers={"Host": "evil.example"}) == 403
        assert http(url + "api/control", "POST", {"op": "unmute"}) == 200
    finally:
        stop(proc)
