"""capture-video as a user runs it: real subprocesses on a real broker, frames read back from the bus.

Generated video files carry their frame number as 16 black/white cells along the bottom tenth
(the same layout as the test pattern's), which survive scaling and JPEG: decoding a published
frame tells exactly which source frame was sent, so "the newest frame" is checked, not assumed.
"""
from __future__ import annotations

import ctypes
import http.server
import os
import socketserver
import statistics
import subprocess
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import pytest

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.bus.message import Message
from tests.conftest import free_port, spawn, stop

# solo (tests/conftest.py): frames are dated against the clock and paced in real time; another
# worker's test beside them made frames late (the file's frame lag, the pattern's moving bar).
pytestmark = pytest.mark.solo

BITS = 16


# ----------------------------------------------------------------------------- helpers
def draw_counter(img: np.ndarray, value: int) -> np.ndarray:
    h, w = img.shape[:2]
    top = h - h // 10
    for i in range(BITS):
        bit = (value >> (BITS - 1 - i)) & 1
        img[top:, i * w // BITS:(i + 1) * w // BITS] = 255 if bit else 0
    cv2.putText(img, str(value), (w // 10, h // 2), cv2.FONT_HERSHEY_SIMPLEX, h / 150, (255, 255, 255), 3)
    return img


def read_counter(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    y = h - h // 20
    grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    value = 0
    for i in range(BITS):
        x = int((i + 0.5) * w / BITS)
        value = (value << 1) | int(grey[y - 2:y + 3, x - 2:x + 3].mean() > 128)
    return value


def decode(msg: Message) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(msg.payload, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "payload is not a JPEG"
    assert (img.shape[1], img.shape[0]) == (msg["image_width"], msg["image_height"])
    return img


def write_video(path: Path, frames: int, fps: float, size: tuple[int, int],
                draw: Callable[[int], np.ndarray] | None = None) -> Path:
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    rng = np.random.default_rng(7)
    texture = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
    for i in range(frames):
        writer.write(draw(i) if draw else draw_counter(texture.copy(), i))
    writer.release()
    return path


class Capture:
    """One capture-video process in its own bus session, with a subscriber on video.in + status."""

    def __init__(self, bus_env: dict[str, str], args: list[str], session: str = "", extra_env: dict | None = None):
        self.env = dict(bus_env, **(extra_env or {}))
        if session:
            self.env["LIVEPIPE_SESSION"] = session
        self.client = BusClient("test", BusConfig.from_env(self.env), ["video.in", "status"])
        self.client.wait_ready()
        self.frames: list[Message] = []
        self.heartbeats: list[Message] = []
        self.proc = spawn(["capture-video", *args], self.env)
        self.stderr = ""

    def _take(self, msg: Message | None) -> Message | None:
        if msg is None:
            return None
        if msg.topic == "video.in":
            self.frames.append(msg)
            return msg
        if msg["src"] == "capture-video":
            self.heartbeats.append(msg)
        return None

    def next_frame(self, timeout: float = 5.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self._take(self.client.recv(min(0.2, max(0.0, deadline - time.monotonic()))))
            if frame is not None:
                return frame
            assert self.proc.poll() is None, f"capture-video exited: {self.finish()[1]}"
        raise AssertionError(f"no frame within {timeout} s; stderr: {self.finish()[1]}")

    def drain(self, timeout: float = 0.1) -> None:
        """Take whatever has arrived (waiting at most `timeout` for the next message)."""
        while (msg := self.client.recv(timeout)) is not None:
            self._take(msg)

    def frames_until(self, pred: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out; stderr: {self.finish()[1]}"
            self._take(self.client.recv(0.2))

    def run_to_exit(self, timeout: float) -> int:
        """Collect everything until the process exits by itself; its exit code."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, f"capture-video still running after {timeout} s"
            self._take(self.client.recv(0.2))
        self.drain(0.3)     # frames published just before exit may still be in flight
        self.finish()
        return self.proc.returncode

    def finish(self) -> tuple[int, str]:
        if not self.stderr:
            _, self.stderr = stop(self.proc)
        return self.proc.returncode, self.stderr

    def close(self) -> None:
        self.finish()
        self.client.close()


@contextmanager
def captures(bus_env: dict[str, str], *runs: tuple[str, list[str]], **kw) -> Iterator[list[Capture]]:
    """Several capture-video processes at once (one bus session each), stopped at the end."""
    with ExitStack() as stack:
        out = []
        for session, args in runs:
            cap = Capture(bus_env, args, session, **kw)
            stack.callback(cap.close)
            out.append(cap)
        yield out


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {stderr!r}"
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------- files
def test_file_sends_the_newest_frame_fitted_and_ends(bus_env, tmp_path):
    fps = 30
    video = write_video(tmp_path / "counter.avi", 120, fps, (1280, 720))     # 4 s
    with captures(bus_env, ("", [str(video), "--fps", "4"])) as (cap,):
        assert cap.run_to_exit(15) == 0
    assert "end of file after 120 frames" in cap.stderr
    frames = cap.frames
    assert len(frames) >= 12
    assert {(m["image_width"], m["image_height"]) for m in frames} == {(768, 432)}   # 16:9 kept
    assert {m["mime"] for m in frames} == {"image/jpeg"}
    counters = [read_counter(decode(m)) for m in frames]
    assert counters == sorted(counters) and len(set(counters)) == len(counters), counters
    # Newest, not next: at 4 sends a second from a 30 fps file, 7.5 source frames pass between
    # sends. A reader that takes the next buffered frame would advance by 1.
    assert 6 <= statistics.median(np.diff(counters)) <= 9, counters
    # Each frame sent is the one playing when it was captured (real-time pacing).
    t0, c0 = frames[0]["capture_ts"], counters[0]
    lag = [(m["capture_ts"] - t0) / 1e9 * fps - (c - c0) for m, c in zip(frames, counters)]
    assert max(map(abs, lag)) <= 6, lag
    assert counters[-1] >= 105       # played to the end before exiting
    ages_ms = [(m["ts"] - m["capture_ts"]) / 1e6 for m in frames]
    assert 0 <= statistics.median(ages_ms) < 150, ages_ms
    metrics = [hb["metrics"] for hb in cap.heartbeats if "frame_age_ms" in hb["metrics"]]
    assert metrics and all(0 <= m["frame_age_ms"] < 1000 for m in metrics), metrics
    assert metrics[-1]["image"] == "768x432" and metrics[-1]["encode_ms"] > 0


def test_file_loops_small_frames_not_upscaled(bus_env, tmp_path):
    video = write_video(tmp_path / "short.avi", 10, 10, (320, 240))         # 1 s
    with captures(bus_env, ("", [str(video), "--fps", "4", "--loop"])) as (cap,):
        counters: list[int] = []

        def wrapped() -> bool:
            counters[:] = [read_counter(decode(m)) for m in cap.frames]
            return (len(counters) >= 10 and any(b < a for a, b in zip(counters, counters[1:]))
                    and any(hb["counters"]["loops"] >= 1 for hb in cap.heartbeats))

        cap.frames_until(wrapped, 10)
        code, stderr = cap.finish()
    assert code == 0, stderr                             # SIGTERM: clean exit
    assert {(m["image_width"], m["image_height"]) for m in cap.frames} == {(320, 240)}
    assert set(counters) <= set(range(10))


def test_skip_unchanged_sends_only_changes(bus_env, tmp_path):
    rng = np.random.default_rng(1)
    base = np.full((360, 640, 3), 110, np.uint8)
    cv2.rectangle(base, (100, 80), (300, 250), (200, 40, 40), -1)

    def frame(i: int) -> np.ndarray:
        img = base.copy()
        if i >= 20:   # a small change (0.5 % of the picture) after 2 s: must not be lost
            cv2.rectangle(img, (500, 40), (548, 64), (255, 255, 255), -1)
        noise = rng.normal(0, 4, img.shape)           # sensor noise must not count as change
        return np.clip(img + noise, 0, 255).astype(np.uint8)

    video = write_video(tmp_path / "static.avi", 30, 10, (640, 360), frame)
    with captures(bus_env, ("skip", [str(video), "--fps", "4", "--skip-unchanged"]),
                  ("all", [str(video), "--fps", "4"])) as (skip, every):
        assert skip.run_to_exit(10) == 0 and every.run_to_exit(10) == 0
    assert len(every.frames) >= 9
    assert len(skip.frames) == 2, [m["capture_ts"] for m in skip.frames]
    first, second = (decode(m) for m in skip.frames)
    assert first[52, 524].mean() < 160 < second[52, 524].mean()      # the change is what was sent
    skipped = max(hb["counters"]["unchanged_skipped"] for hb in skip.heartbeats)
    assert skipped >= 4


# ----------------------------------------------------------------------------- test pattern
def test_pattern_sizes_pad_and_quality(bus_env):
    runs = [("default", ["test", "--fps", "4"]),
            ("small30", ["test", "--fps", "4", "--pattern-size", "640x480", "--size", "320", "--quality", "30"]),
            ("small95", ["test", "--fps", "4", "--pattern-size", "640x480", "--size", "320", "--quality", "95"]),
            ("pad", ["test", "--fps", "4", "--pad"]),
            ("tiny", ["test", "--fps", "4", "--pattern-size", "400x300"])]
    with captures(bus_env, *runs) as caps:
        for cap in caps:
            cap.frames_until(lambda: len(cap.frames) >= 3, 10)
    default, small30, small95, pad, tiny = caps
    sizes = {name: {(m["image_width"], m["image_height"]) for m in cap.frames} for (name, _), cap in zip(runs, caps)}
    assert sizes == {"default": {(768, 432)}, "small30": {(320, 240)}, "small95": {(320, 240)},
                     "pad": {(768, 768)}, "tiny": {(400, 300)}}
    # the pattern's counter advances by exactly one per frame sent (grabbed at the tick)
    counters = [read_counter(decode(m)) for m in default.frames]
    assert counters == list(range(counters[0], counters[0] + len(counters))), counters
    # the picture is live: the white bar sweeps the top band (above the counter's box) between frames
    # grabbed at least 100 ms apart (w/40 px: more than the bar's width; a late tick under load is
    # caught up at once, and two frames grabbed milliseconds apart may show the bar in one place).
    # The bar is found as the band's brightest column: a pixel difference would miss it when both
    # places are on the light grey colour bar (255 against 192).
    def bar_x(m: Message) -> int:
        return int(np.argmax(decode(m)[:100].astype(np.int32).sum(axis=(0, 2))))
    tops = [(m["capture_ts"], bar_x(m)) for m in default.frames]
    apart = [(a, b) for (ta, a), (tb, b) in zip(tops, tops[1:]) if tb - ta >= 100_000_000]
    assert apart and all(abs(a - b) >= 768 // 80 for a, b in apart), tops
    assert [read_counter(decode(m)) for m in small30.frames][:2] == [0, 1]
    # padding: black bands above and below the 768x432 picture, centred
    img = decode(pad.frames[0])
    assert img[:160].max() < 40 and img[-160:].max() < 40 and img[200:560].max() > 200
    padded = [read_counter(decode(m)[168:600]) for m in pad.frames]
    assert padded == list(range(padded[0], padded[0] + len(padded))), padded
    q30 = statistics.median(len(m.payload) for m in small30.frames)
    q95 = statistics.median(len(m.payload) for m in small95.frames)
    assert q95 > 1.5 * q30, (q30, q95)


def test_default_rate_is_one_frame_per_second(bus_env):
    with captures(bus_env, ("", ["test"])) as (cap,):
        cap.frames_until(lambda: len(cap.frames) >= 4, 8)
    sent = np.diff([m["ts"] for m in cap.frames]) / 1e9
    captured = np.diff([m["capture_ts"] for m in cap.frames]) / 1e9
    assert all(0.85 <= s <= 1.15 for s in sent), sent
    assert all(0.85 <= s <= 1.15 for s in captured), captured


def test_nothing_is_grabbed_or_encoded_until_someone_subscribes(bus_env):
    env = dict(bus_env, LIVEPIPE_SESSION="idle")
    with BusClient("watcher", BusConfig.from_env(env), ["status"]) as watcher:
        watcher.wait_ready()
        proc = spawn(["capture-video", "test", "--fps", "4"], env)
        try:
            idle = []
            while len(idle) < 2:      # two heartbeats (about 1 s of ticks) with nobody on video.in
                hb = watcher.recv(10)
                assert hb is not None, stop(proc)
                if hb["metrics"].get("source_state") == "no subscriber":
                    idle.append(hb)
            assert idle[-1]["counters"]["frames_grabbed"] == 0 and "frame_age_ms" not in idle[-1]["metrics"]
            watcher.subscribe("video.in")
            frame = watcher.recv(10)
            while frame is not None and frame.topic != "video.in":
                frame = watcher.recv(10)
            assert frame is not None and read_counter(decode(frame)) == 0    # the first frame it made
        finally:
            stop(proc)
        assert proc.returncode == 0


# ----------------------------------------------------------------------------- screen (Xvfb)
class XDisplay:
    """A private Xvfb server and an Xlib connection to paint its root window a solid colour."""

    def __init__(self, number: int | None = None) -> None:
        taken = set(os.listdir("/tmp/.X11-unix")) if os.path.isdir("/tmp/.X11-unix") else set()
        self.number = number or next(n for n in range(140, 400)
                                     if f"X{n}" not in taken and not os.path.exists(f"/tmp/.X{n}-lock"))
        self.name = f":{self.number}"
        # -displayfd: Xvfb writes the display number to this pipe once it accepts clients,
        # so readiness is an event, not a guess.
        ready_r, ready_w = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", self.name, "-screen", "0", "1280x720x24", "-nolisten", "tcp",
                                      "-noreset", "-displayfd", str(ready_w)], pass_fds=(ready_w,),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(ready_w)
        with os.fdopen(ready_r) as ready:
            announced = ready.readline().strip()      # EOF ("") if Xvfb died first
        assert announced == str(self.number), f"Xvfb did not start: {self.proc.stderr.read()!r}"
        assert os.path.exists(f"/tmp/.X11-unix/X{self.number}")
        x = self.xlib = ctypes.CDLL("libX11.so.6")
        x.XOpenDisplay.restype, x.XOpenDisplay.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        x.XDefaultRootWindow.restype, x.XDefaultRootWindow.argtypes = ctypes.c_ulong, [ctypes.c_void_p]
        x.XSetWindowBackground.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        x.XClearWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
        x.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.dpy = x.XOpenDisplay(self.name.encode())
        assert self.dpy, f"cannot connect to Xvfb {self.name}"
        self.root = x.XDefaultRootWindow(self.dpy)

    def paint(self, bgr: tuple[int, int, int]) -> None:
        b, g, r = bgr
        self.xlib.XSetWindowBackground(self.dpy, self.root, (r << 16) | (g << 8) | b)
        self.xlib.XClearWindow(self.dpy, self.root)
        self.xlib.XSync(self.dpy, 0)

    def close(self) -> None:
        if self.dpy:                       # idempotent: a test may close it before the fixture does
            self.xlib.XCloseDisplay(self.dpy)
            self.dpy = None
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture
def xvfb() -> Iterator[XDisplay]:
    display = XDisplay()
    yield display
    display.close()


def colour_of(msg: Message) -> np.ndarray:
    return decode(msg)[10:-10, 10:-10].reshape(-1, 3).mean(axis=0)


def test_screen_monitor_region_and_skip(bus_env, xvfb):
    blue, orange = (200, 60, 20), (30, 140, 250)        # BGR
    xvfb.paint(blue)
    runs = [("mon", ["screen", "--fps", "4"]),
            ("region", ["screen:100,50,1000,500", "--fps", "4"]),
            ("skip", ["screen:1", "--fps", "4", "--skip-unchanged"])]
    with captures(bus_env, *runs, extra_env={"DISPLAY": xvfb.name}) as (mon, region, skip):
        for cap in (mon, region, skip):
            first = cap.next_frame(8)
            assert np.allclose(colour_of(first), blue, atol=12), colour_of(first)
        assert (mon.frames[0]["image_width"], mon.frames[0]["image_height"]) == (768, 432)
        assert (region.frames[0]["image_width"], region.frames[0]["image_height"]) == (768, 384)
        # while the screen is still, the skipping capture sends nothing more...
        mon.frames_until(lambda: len(mon.frames) >= 4, 5)
        skip.drain()
        assert len(skip.frames) == 1
        # ...and the change is the next frame it sends
        xvfb.paint(orange)
        changed = skip.next_frame(5)
        assert np.allclose(colour_of(changed), orange, atol=12), colour_of(changed)
        mon.frames_until(lambda: np.allclose(colour_of(mon.frames[-1]), orange, atol=12), 5)
        skip.drain()
        assert len(skip.frames) == 2


def test_screen_that_disappears_is_reopened(bus_env, xvfb):
    red, green = (20, 20, 220), (40, 200, 40)
    xvfb.paint(red)
    with captures(bus_env, ("", ["screen", "--fps", "4"]), extra_env={"DISPLAY": xvfb.name}) as (cap,):
        assert np.allclose(colour_of(cap.next_frame(8)), red, atol=12)
        xvfb.close()                                    # the X server goes away
        cap.frames_until(lambda: any(hb["metrics"].get("source_state") == "reopening"
                                     for hb in cap.heartbeats), 10)
        assert cap.proc.poll() is None
        xvfb.__init__(xvfb.number)                      # and comes back on the same display
        xvfb.paint(green)
        cap.frames_until(lambda: np.allclose(colour_of(cap.frames[-1]), green, atol=12), 15)
        code, stderr = cap.finish()
    assert code == 0
    assert "grab failed" in stderr and "reopened" in stderr and "Traceback" not in stderr


def test_screen_errors_are_one_line(bus_env, xvfb):
    no_display = {k: v for k, v in bus_env.items() if k != "DISPLAY"}
    procs = {
        "unset": spawn(["capture-video", "screen"], no_display),
        "absent": spawn(["capture-video", "screen"], dict(bus_env, DISPLAY=":1999")),
        "outside": spawn(["capture-video", "screen:1000,600,640,480"], dict(bus_env, DISPLAY=xvfb.name)),
        "monitor": spawn(["capture-video", "screen:7"], dict(bus_env, DISPLAY=xvfb.name)),
    }
    results = {name: p.communicate(timeout=20) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 1, (name, results[name])
    assert "DISPLAY is not set" in one_line_error(results["unset"][1])
    assert "cannot open display ':1999'" in one_line_error(results["absent"][1])
    assert "outside the screen (1280x720" in one_line_error(results["outside"][1])
    assert "no monitor 7" in one_line_error(results["monitor"][1])


# ----------------------------------------------------------------------------- bad sources
def test_missing_and_corrupt_sources_fail_in_one_line(bus_env, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(20_000))
    good = write_video(tmp_path / "good.avi", 30, 30, (320, 240))
    headless = tmp_path / "headless.avi"
    headless.write_bytes(good.read_bytes()[:2000])       # the header survives, no frame does
    cases = {
        "missing": (["/nonexistent/clip.mp4"], 1, "/nonexistent/clip.mp4: no such file"),
        "garbage": ([str(garbage)], 1, "not a video OpenCV can read"),
        "headless": ([str(headless)], 1, "headless.avi"),
        "directory": ([str(tmp_path)], 1, "is a directory"),
        "stream": ([f"http://127.0.0.1:{free_port()}/live.mjpg"], 1, "cannot open stream"),
        "fps": (["test", "--fps", "0"], 2, "--fps 0"),
        "quality": (["test", "--quality", "101"], 2, "--quality '101': must be between 1 and 100"),
        "region": (["screen:1,2,3"], 2, "screen:LEFT,TOP,WIDTH,HEIGHT"),
        "loop": (["test", "--loop"], 2, "--loop applies to video files only"),
    }
    # (A missing camera is not a failure: tests/test_faults.py, a conversation without video.)
    procs = {name: spawn(["capture-video", *args], bus_env) for name, (args, _, _) in cases.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=30)
        _, code, text = cases[name]
        assert proc.returncode == code, (name, err)
        assert text in one_line_error(err), (name, err)


def test_truncated_file_plays_what_it_has_then_ends(bus_env, tmp_path):
    good = write_video(tmp_path / "good.avi", 40, 20, (640, 360))
    cut = tmp_path / "cut.avi"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with captures(bus_env, ("", [str(cut), "--fps", "4"])) as (cap,):
        assert cap.run_to_exit(10) == 0
    assert cap.frames, cap.stderr
    assert max(read_counter(decode(m)) for m in cap.frames) < 30
    assert "end of file after" in cap.stderr and "Traceback" not in cap.stderr


# ----------------------------------------------------------------------------- live stream reconnect
class MJPEGServer:
    """An HTTP multipart MJPEG stream (what many IP cameras serve), frames numbered from `first`."""

    def __init__(self, port: int, first: int) -> None:
        self.first, self.stopping = first, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                n = server.first
                img = np.full((240, 320, 3), 90, np.uint8)
                try:
                    while not server.stopping.wait(0.05):
                        jpg = cv2.imencode(".jpg", draw_counter(img.copy(), n))[1].tobytes()
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n"
                                         % (len(jpg), jpg))
                        n += 1
                except OSError:
                    pass

            def log_message(self, *args: object) -> None:
                pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_stream_that_disappears_is_reopened(bus_env):
    port = free_port()
    server = MJPEGServer(port, first=0)
    try:
        with captures(bus_env, ("", [f"http://127.0.0.1:{port}/cam.mjpg", "--fps", "4"])) as (cap,):
            cap.frames_until(lambda: len(cap.frames) >= 2, 10)
            assert read_counter(decode(cap.frames[-1])) < 1000
            server.close()
            cap.frames_until(lambda: any(hb["counters"]["reopens"] >= 1 for hb in cap.heartbeats), 10)
            server = MJPEGServer(port, first=1000)
            cap.frames_until(lambda: read_counter(decode(cap.frames[-1])) >= 1000, 15)
            code, stderr = cap.finish()
    finally:
        server.close()
    assert code == 0
    assert "lost (no frame); reopening with backoff" in stderr and "reopened after" in stderr
    assert "Traceback" not in stderr


# ----------------------------------------------------------------------------- pure functions
def test_fit_keeps_aspect_and_never_upscales():
    from livepipe.services.processes.capture_video import CvFrameEncoder, FrameEncoder

    enc = FrameEncoder(768)
    assert enc.fitted_size(1280, 720) == (768, 432)
    assert enc.fitted_size(1920, 1080) == (768, 432)
    assert enc.fitted_size(720, 1280) == (432, 768)        # portrait phone video
    assert enc.fitted_size(4000, 3000) == (768, 576)
    assert enc.fitted_size(640, 480) == (640, 480)
    assert enc.fitted_size(5000, 10) == (768, 2)
    for encoder in (FrameEncoder, CvFrameEncoder):      # Pillow (pattern, screen), OpenCV (camera, file)
        padded = encoder(768, pad=True).fit(np.full((1280, 720, 3), 255, np.uint8))
        assert padded.shape == (768, 768, 3) and padded[:, :160].max() == 0 and padded[:, 170:590].min() == 255


def test_source_forms():
    from livepipe.services.processes.capture_video import SourceSpec, UsageError, parse_source

    assert parse_source("0") == SourceSpec("camera", 0)
    assert parse_source("/dev/video2") == SourceSpec("camera", "/dev/video2")
    assert parse_source("clip.mp4") == SourceSpec("file", "clip.mp4")
    assert parse_source("file:///tmp/a b.avi") == SourceSpec("file", "/tmp/a b.avi")
    assert parse_source("rtsp://cam.local/live") == SourceSpec("stream", "rtsp://cam.local/live")
    assert parse_source("screen") == SourceSpec("screen", monitor=1)
    assert parse_source("screen:0") == SourceSpec("screen", monitor=0)
    assert parse_source("screen:10,20,640,480") == SourceSpec("screen", region=(10, 20, 640, 480))
    assert parse_source("test") == SourceSpec("pattern")
    assert parse_source("rtsp://user:secret@cam/live").describe() == "rtsp://***@cam/live"
    for bad in ("", "screen:0,0,0,10", "screen:a"):
        with pytest.raises(UsageError):
            parse_source(bad)
