"""`livepipe capture-video [SOURCE]`: camera, video file, stream, screen or test pattern -> JPEG on video.in.

The Live API takes discrete JPEG images, about one a second, best at 768x768. This process sends
the *newest* frame at each tick:

- push sources (camera, file, stream URL) are read continuously by a grabber thread, so a
  camera's internal buffer never hands us a frame that is seconds old; only the frame that is
  about to be sent is decoded (`retrieve`), fitted and encoded;
- pull sources (screen, test pattern) have no buffer: they are grabbed at the tick itself;
- a video file is read at its own frame rate (real-time pacing), so it behaves like a camera
  and "newest" means the frame playing now; at its end the process exits 0 (or `--loop`s);
- a camera or stream that disappears is reopened with backoff (0.5 s doubling to 8 s).

Frames are fitted inside SIZE x SIZE keeping the aspect ratio (never upscaled; an area average:
OpenCV's INTER_AREA for OpenCV's sources, Pillow's BOX for the screen, which does not load OpenCV;
the test pattern is drawn at the fitted size), optionally padded to a square, and encoded as JPEG. The heartbeat carries the frame age
(capture -> publish) and the fit+encode cost.

SOURCE (or env LIVEPIPE_VIDEO_SOURCE; default 0):
  0, 1, ...                camera index          /dev/video0      camera device path
  clip.mp4                 video file            rtsp://, http:// ...  live stream (reconnects)
  screen | screen:N        monitor N (mss; 1 = first, 0 = all monitors)
  screen:LEFT,TOP,W,H      a screen region
  test                     synthetic test pattern (frame counter, clock, moving bar)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import re
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from livepipe.bus import Service, setup_logging
from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.media import PullFrameSource, PushFrameSource
from livepipe.services.lib.settings import env, number
from livepipe.services.lib.verb import UsageError, VerbError, VerbParser, verb

NAME = "capture-video"
log = logging.getLogger(NAME)

DEFAULT_SIZE = 768
DEFAULT_QUALITY = 80
DEFAULT_FPS = 1.0
DEFAULT_SKIP_THRESHOLD = 0.1       # percent of the thumbnail that must change for a frame to be sent
THUMB_SIDE = 160                   # long side of the change-detection thumbnail (8x8 px cells at 1280)
THUMB_NOISE_LEVEL = 12             # grey levels: sensor noise and JPEG ringing stay below this
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0
CAMERA_RETRY_S = 5.0     # a missing camera is looked for again this often (plugged in later), quietly
MMAP_THRESHOLD = 256 * 1024       # bytes: frames and their copies get their own mmap (see fix_mmap_threshold)
STREAM_TIMEOUT_MS = 5000           # open/read timeout for network streams (FFmpeg's default is 30 s)
AGE_WINDOW = 30                    # frames in the heartbeat's frame-age statistics
COUNTER_BITS = 16                  # cells of the test pattern's machine-readable frame counter
COUNTERS = ("frames_grabbed", "unchanged_skipped", "reopens", "decode_errors", "source_errors", "loops", "no_frame")
STREAM_SCHEMES = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont


def _pillow() -> None:
    """Pillow, imported only where it is used (test pattern, screen): a camera does without."""
    global Image, ImageDraw, ImageFont
    from PIL import Image, ImageDraw, ImageFont


def _cv2() -> Any:
    """OpenCV, imported only by the sources that read through it (camera, file, stream): its
    import alone is ~18 MB of RSS, which the test pattern and the screen do not need."""
    # OpenCV and its bundled FFmpeg print their own warnings on stderr ("[ WARN:0@0.01] ...",
    # "moov atom not found"); we report every source problem ourselves in one line instead.
    # setdefault: a user debugging a source can still turn them on.
    os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")   # AV_LOG_QUIET
    import cv2
    return cv2


class SourceError(VerbError):
    """A source that cannot be used; the message is one line for the user."""


# ----------------------------------------------------------------------------- source specs
@dataclass(frozen=True)
class SourceSpec:
    kind: str                                   # camera | file | stream | screen | pattern
    target: str | int = ""                      # camera index/path, file path, URL
    monitor: int = 1                            # screen: mss monitor number (0 = all)
    region: tuple[int, int, int, int] | None = None   # screen: left, top, width, height

    def describe(self) -> str:
        if self.kind == "camera":
            return f"camera {self.target}"
        if self.kind == "screen":
            return f"screen region {','.join(map(str, self.region))}" if self.region else f"screen {self.monitor}"
        if self.kind == "pattern":
            return "test pattern"
        if self.kind == "stream":
            return _redact_url(str(self.target))
        return str(self.target)


def parse_source(text: str) -> SourceSpec:
    """Turn a SOURCE argument into a SourceSpec (see the module doc for the forms)."""
    text = text.strip()
    if not text:
        raise UsageError("empty SOURCE")
    low = text.lower()
    if low in ("test", "pattern", "testpattern", "test-pattern"):
        return SourceSpec("pattern")
    if low == "screen" or low.startswith("screen:"):
        rest = text[7:] if ":" in text else ""
        if not rest:
            return SourceSpec("screen")
        if re.fullmatch(r"\d+", rest):
            return SourceSpec("screen", monitor=int(rest))
        m = re.fullmatch(r"(-?\d+),(-?\d+),(\d+),(\d+)", rest)
        if not m or int(m[3]) <= 0 or int(m[4]) <= 0:
            raise UsageError(f"screen source {text!r}: use screen, screen:N or screen:LEFT,TOP,WIDTH,HEIGHT")
        return SourceSpec("screen", region=(int(m[1]), int(m[2]), int(m[3]), int(m[4])))
    if re.fullmatch(r"\d+", text):
        return SourceSpec("camera", int(text))
    if text.startswith("/dev/"):
        return SourceSpec("camera", text)
    if low.startswith("file://"):
        return SourceSpec("file", text[7:])
    if STREAM_SCHEMES.match(text):
        return SourceSpec("stream", text)
    return SourceSpec("file", text)


def parse_wxh(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or not (8 <= int(m[1]) <= 16384 and 8 <= int(m[2]) <= 16384):
        raise UsageError(f"{what} {text!r}: use WIDTHxHEIGHT, e.g. 1280x720")
    return int(m[1]), int(m[2])


# ----------------------------------------------------------------------------- frames
@dataclass(slots=True)
class Frame:
    image: Any             # BGR or BGRA (screen) array, or an RGB Pillow image (pattern); full size
    capture_ns: int        # wall clock when the frame was grabbed from the source
    number: int            # frames grabbed from the source so far (1 = first)


class FrameEncoder:
    """Fit inside size x size (aspect kept, never upscaled), optional square pad, JPEG encode,
    and the unchanged-frame test (on a small grey thumbnail, against the last frame sent).

    Pillow (its bundled libjpeg-turbo) for the test pattern and the screen: ~3 MB of imports
    instead of OpenCV's ~18 MB (CvFrameEncoder below is for OpenCV's own sources). Frames arrive as BGR (or BGRA) numpy arrays, as OpenCV and mss deliver them; they become one
    RGB Pillow image (swapped, alpha dropped, in one copy) that is scaled with the BOX filter (an
    area average, like OpenCV's INTER_AREA), padded and encoded without going back to numpy."""

    uses_pillow = True

    def __init__(self, size: int = DEFAULT_SIZE, quality: int = DEFAULT_QUALITY, pad: bool = False,
                 skip_threshold: float | None = None) -> None:
        self.size, self.quality, self.pad = size, quality, pad
        self.skip_threshold = skip_threshold          # percent; None = send every frame
        self._last_thumb: np.ndarray | None = None
        self._full: Image.Image | None = None     # reused: a fresh 1280x720 image costs ~900 page faults
        if self.uses_pillow:
            _pillow()

    def fitted_size(self, width: int, height: int) -> tuple[int, int]:
        scale = min(self.size / width, self.size / height, 1.0)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def fit(self, image: np.ndarray) -> np.ndarray:
        """What is sent, as a BGR array: scaled, then padded to a square if asked."""
        return np.asarray(self.pad_square(self.scale(image)))[:, :, ::-1]

    def scale(self, image: np.ndarray | Image.Image) -> Image.Image:
        """The frame (a BGR/BGRA array, or an RGB image) as an RGB image fitted inside size x size."""
        if isinstance(image, np.ndarray):
            pil = self._full = _to_pil(image, self._full)
        else:
            pil = image
        fitted = self.fitted_size(*pil.size)
        return pil if fitted == pil.size else pil.resize(fitted, Image.Resampling.BOX)

    def pad_square(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if not self.pad or w == h:
            return image
        side = max(w, h)
        square = Image.new(image.mode, (side, side))           # black
        square.paste(image, ((side - w) // 2, (side - h) // 2))
        return square

    def encode(self, image: Image.Image) -> bytes:
        buf = io.BytesIO()
        try:
            image.save(buf, "JPEG", quality=self.quality)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"JPEG encoding of a {image.size} image failed: {exc}") from None
        return buf.getvalue()

    def fit_encode(self, image: np.ndarray) -> tuple[bytes, tuple[int, int]]:
        """The JPEG that is sent for `image`, and its (width, height)."""
        fitted = self.pad_square(self.scale(image))
        return self.encode(fitted), self.size_of(fitted)

    @staticmethod
    def size_of(image: Any) -> tuple[int, int]:
        return image.size

    def thumbnail(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        scale = THUMB_SIDE / max(w, h)
        grey = image.convert("L")
        if scale < 1:
            grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
        return np.asarray(grey)

    def changed_percent(self, thumb: np.ndarray) -> float:
        """Percent of thumbnail pixels that differ from the last sent frame beyond sensor noise."""
        last = self._last_thumb
        if last is None or last.shape != thumb.shape:
            return 100.0
        diff = np.maximum(thumb, last) - np.minimum(thumb, last)     # |a - b| without uint8 wraparound
        return float(np.count_nonzero(diff > THUMB_NOISE_LEVEL)) * 100.0 / thumb.size

    def remember(self, thumb: np.ndarray | None) -> None:
        """Make `thumb` the reference: call only once its frame was actually published."""
        if thumb is not None:
            self._last_thumb = thumb


class CvFrameEncoder(FrameEncoder):
    """The same with OpenCV (INTER_AREA, cv2.imencode), for the sources that read through OpenCV
    anyway (camera, file, stream): it is loaded already, and its SIMD resize and encode take
    about two thirds of Pillow's time (`livepipe bench video`). Images stay BGR arrays."""

    uses_pillow = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cv2 = _cv2()
        self._params = [self.cv2.IMWRITE_JPEG_QUALITY, self.quality]

    def fit(self, image: np.ndarray) -> np.ndarray:
        return self.pad_square(self.scale(image))

    def scale(self, image: np.ndarray) -> np.ndarray:   # type: ignore[override]
        cv2 = self.cv2
        h, w = image.shape[:2]
        nw, nh = self.fitted_size(w, h)
        if (nw, nh) != (w, h):
            image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        return image

    def pad_square(self, image: np.ndarray) -> np.ndarray:   # type: ignore[override]
        h, w = image.shape[:2]
        if not self.pad or w == h:
            return image
        side = max(w, h)
        top, left = (side - h) // 2, (side - w) // 2
        return self.cv2.copyMakeBorder(image, top, side - h - top, left, side - w - left,
                                       self.cv2.BORDER_CONSTANT, value=(0, 0, 0))

    def encode(self, image: np.ndarray) -> bytes:   # type: ignore[override]
        ok, buf = self.cv2.imencode(".jpg", image, self._params)
        if not ok:
            raise RuntimeError(f"JPEG encoding of a {image.shape} image failed")
        return buf.tobytes()

    @staticmethod
    def size_of(image: Any) -> tuple[int, int]:
        return image.shape[1], image.shape[0]

    def thumbnail(self, image: np.ndarray) -> np.ndarray:   # type: ignore[override]
        cv2 = self.cv2
        h, w = image.shape[:2]
        scale = THUMB_SIDE / max(w, h)
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else image
        return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small


def _to_pil(image: np.ndarray, reuse: Image.Image | None = None) -> Image.Image:
    """A BGR (or BGRA, or grey) array as a Pillow RGB (or L) image: one copy, swapped in C, into
    `reuse` when it has the right mode and size. (Image.fromarray would keep BGRA as RGBA, and
    Pillow weights an RGBA resize by alpha, which is 0 on some X servers.)"""
    image = np.ascontiguousarray(image)
    h, w = image.shape[:2]
    mode, raw = ("L", "L") if image.ndim == 2 else ("RGB", "BGRX" if image.shape[2] == 4 else "BGR")
    if reuse is not None and reuse.mode == mode and reuse.size == (w, h):
        reuse.frombytes(image, "raw", raw)
        return reuse
    return Image.frombuffer(mode, (w, h), image, "raw", raw, 0, 1)


# ----------------------------------------------------------------------------- sources
class VideoSource:
    """cv2.VideoCapture: a camera, a video file or a network stream (a push source)."""

    def __init__(self, spec: SourceSpec, camera_size: tuple[int, int] | None = None) -> None:
        self.spec, self.name = spec, spec.describe()
        self.live = spec.kind != "file"
        self.camera_size = camera_size
        self.cap: Any = None
        self.frame_interval = 0.0          # files: seconds per frame for real-time pacing
        self.frame_count = 0               # files: frames the container claims (0 = unknown)
        self.width = self.height = 0
        self._pregrabbed = False
        self.cv2 = _cv2()          # here, not in open(): a missing OpenCV is named before anything runs

    def open(self) -> None:
        spec, cv2 = self.spec, self.cv2
        if spec.kind == "file":
            path = Path(str(spec.target))
            if not path.exists():
                raise SourceError(f"{path}: no such file")
            if path.is_dir():
                raise SourceError(f"{path}: is a directory, not a video file")
            if not os.access(path, os.R_OK):
                raise SourceError(f"{path}: permission denied")
            # FFmpeg when this OpenCV has it: it reads nearly everything and stays quiet on broken
            # input, where OpenCV's own AVI reader prints stray lines to stderr.
            cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG if _has_ffmpeg(cv2) else cv2.CAP_ANY)
            if not cap.isOpened():
                raise SourceError(f"{path}: not a video OpenCV can read (corrupt or unsupported format)")
            if not cap.grab():     # a header that parses but no frame that decodes
                cap.release()
                raise SourceError(f"{path}: no decodable video frame (corrupt or truncated file)")
            self._pregrabbed = True
            fps = cap.get(cv2.CAP_PROP_FPS)
            if not 0.5 <= fps <= 1000:
                log.warning("%s: frame rate %r unknown; pacing at 30 fps", path, fps)
                fps = 30.0
            self.frame_interval = 1.0 / fps
            self.frame_count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0))
        elif spec.kind == "camera":
            target = spec.target
            if isinstance(target, str) and not Path(target).exists():
                raise SourceError(f"camera {target}: no such device")
            cap = cv2.VideoCapture(target)
            if not cap.isOpened():
                raise SourceError(f"camera {target}: cannot open (no such camera, or in use by another program)")
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)        # best effort; we drain the buffer anyway
            if self.camera_size:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.camera_size[0])
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.camera_size[1])
        else:
            cap = cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG if _has_ffmpeg(cv2) else cv2.CAP_ANY,
                                   [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS,
                                    cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS])
            if not cap.isOpened():
                raise SourceError(f"{self.name}: cannot open stream "
                                  f"(unreachable, refused, or not a video stream)")
        self.cap = cap
        self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)

    def grab(self) -> bool:
        if self._pregrabbed:
            self._pregrabbed = False
            return True
        return bool(self.cap is not None and self.cap.grab())

    def retrieve(self) -> np.ndarray | None:
        ok, image = self.cap.retrieve()
        return image if ok and image is not None and image.size else None

    def rewind(self) -> bool:
        """Back to the first frame (for --loop); reopens when the container cannot seek."""
        if self.cap is not None and self.cap.set(self.cv2.CAP_PROP_POS_FRAMES, 0):
            return True
        self.close()
        try:
            self.open()
            return True
        except SourceError:
            return False

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class ScreenSource:
    """The screen through mss: a monitor or a region (a pull source, grabbed at the tick)."""

    live = True

    def __init__(self, spec: SourceSpec) -> None:
        self.spec, self.name = spec, spec.describe()
        self.sct: Any = None
        self.area: dict[str, int] = {}
        self.width = self.height = 0

    def open(self) -> None:
        display = os.environ.get("DISPLAY", "")
        if sys.platform.startswith("linux") and not display and not os.environ.get("WAYLAND_DISPLAY"):
            raise SourceError("screen: no X display (DISPLAY is not set); run inside an X session or Xvfb, "
                              "e.g. DISPLAY=:99")
        import mss   # only this service needs mss
        try:
            sct = mss.MSS()
            monitors = sct.monitors
        except Exception as exc:   # mss raises its own XError/ScreenShotError types
            raise SourceError(f"screen: cannot open display {display!r}: {_one_line(exc)}") from None
        spec = self.spec
        if spec.region:
            left, top, width, height = spec.region
            whole = monitors[0]
            if (left < whole["left"] or top < whole["top"] or left + width > whole["left"] + whole["width"]
                    or top + height > whole["top"] + whole["height"]):
                sct.close()
                raise SourceError(f"screen region {left},{top},{width},{height} is outside the screen "
                                  f"({whole['width']}x{whole['height']} at {whole['left']},{whole['top']})")
            self.area = {"left": left, "top": top, "width": width, "height": height}
        else:
            if spec.monitor >= len(monitors):
                sct.close()
                raise SourceError(f"screen: no monitor {spec.monitor} (monitors 1..{len(monitors) - 1}; 0 = all)")
            m = monitors[spec.monitor]
            self.area = {k: m[k] for k in ("left", "top", "width", "height")}
        self.sct = sct
        self.width, self.height = self.area["width"], self.area["height"]

    def snap(self) -> np.ndarray:
        return np.asarray(self.sct.grab(self.area))    # BGRA, converted after the resize

    def close(self) -> None:
        if self.sct is not None:
            self.sct.close()
            self.sct = None


class PatternSource:
    """A synthetic test pattern: colour bars, a moving bar, a big frame counter, the wall clock,
    and the counter as COUNTER_BITS black/white cells along the bottom tenth (MSB first,
    white = 1), which survive JPEG and scaling so a subscriber can read the frame number back.

    Drawn with Pillow straight into one RGB image reused at every snap (the encoder takes it as
    it is: no BGR array to convert, no fresh pages), with Pillow's built-in bitmap font: OpenCV's
    putText loads a TrueType font on first use in OpenCV 5 (+8.6 MB of RSS).

    It is drawn at the size it is sent (`render`: WIDTHxHEIGHT fitted inside --size): shapes and
    a bitmap font need no area average, and scaling a drawn 1280x720 frame down cost four times
    its drawing and encoding together. Only what changes is redrawn: the moving bar (its last
    place restored from the still background), the black box with the counter and the clock, and
    the counter cells."""

    live = True

    def __init__(self, width: int = 1280, height: int = 720, render: tuple[int, int] | None = None) -> None:
        _pillow()
        self.name = "test pattern"
        self.width, self.height = width, height          # the pattern's own size (as a camera's)
        w, h = self.size = render or (width, height)      # what is drawn: the picture that is sent
        self.count = 0
        self._box = (int(w * 0.1), int(h * 0.25), int(w * 0.9), int(h * 0.72))
        self._background = self._bars(w, h)
        ImageDraw.Draw(self._background).rectangle(self._box, fill=(0, 0, 0))
        self._image = self._background.copy()
        self._draw = ImageDraw.Draw(self._image)
        self._bar: tuple[int, int, int, int] | None = None     # where the moving bar was drawn last
        self._font = ImageFont.load_default_imagefont()

    @staticmethod
    def fits(width: int, height: int) -> bool:
        """Whether the counter cells fit (a pixel each at least); a smaller picture is drawn larger
        and scaled down, so the counter can still be read as well as such a size allows."""
        return width >= COUNTER_BITS and height >= 10

    @staticmethod
    def _bars(width: int, height: int) -> Image.Image:
        colours = [(192, 192, 192), (192, 192, 0), (0, 192, 192), (0, 192, 0),
                   (192, 0, 192), (192, 0, 0), (0, 0, 192), (32, 32, 32)]      # RGB
        img = Image.new("RGB", (width, height))
        draw = ImageDraw.Draw(img)
        for i, c in enumerate(colours):
            draw.rectangle((i * width // len(colours), 0, (i + 1) * width // len(colours) - 1, height - 1), fill=c)
        return img

    def open(self) -> None:
        pass

    def snap(self) -> Image.Image:
        n = self.count
        self.count += 1
        w, h = self.size
        img, draw = self._image, self._draw   # reused: a pull source's frame is encoded before the next snap
        now = time.time()
        if self._bar is not None:            # the bar's last place back to the background
            x0, y0, x1, y1 = self._bar
            img.paste(self._background.crop((x0, y0, x1 + 1, y1 + 1)), (x0, y0))
        # a bar sweeping once every 4 s, so motion is visible whatever the frame rate
        x = int((now % 4.0) / 4.0 * w)
        self._bar = (x, 0, min(w - 1, x + max(2, w // 80)), h * 9 // 10 - 1)
        draw.rectangle(self._bar, fill=(255, 255, 255))
        draw.rectangle(self._box, fill=(0, 0, 0))           # under the text, over the bar
        scale = h / 240
        clock = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        for text, y, size in ((f"frame {n}", 0.45, 1.6), (clock, 0.65, 1.0)):
            self._text(img, text, int(h * y), max(1, round(size * scale * 1.5)))
        top = h - h // 10
        for i in range(COUNTER_BITS if self.fits(w, h) else 0):        # the counter cells
            bit = (n >> (COUNTER_BITS - 1 - i)) & 1
            draw.rectangle((i * w // COUNTER_BITS, top, (i + 1) * w // COUNTER_BITS - 1, h - 1),
                           fill=(255, 255, 255) if bit else (0, 0, 0))
        return img

    def _text(self, img: Image.Image, text: str, baseline: int, zoom: int) -> None:
        """White `text` centred, its baseline at row `baseline`: the 11 px bitmap font zoomed by an
        integer factor (a legible pattern needs nothing more)."""
        _, _, right, bottom = self._font.getbbox(text)
        glyphs = Image.new("L", (right, bottom))
        ImageDraw.Draw(glyphs).text((0, 0), text, fill=255, font=self._font)
        glyphs = glyphs.resize((right * zoom, bottom * zoom), Image.Resampling.NEAREST)
        img.paste((255, 255, 255), ((img.width - glyphs.width) // 2, baseline - glyphs.height), glyphs)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- grabber thread
END = object()     # the source has ended (file without --loop, or a fatal error)


class Grabber:
    """Reads a push source continuously in its own thread; hands the next grabbed frame,
    decoded, to whoever asks (`request`). Files are paced at their frame rate; a live source
    that fails is reopened with backoff; a file that ends loops or ends."""

    def __init__(self, source: PushFrameSource, svc: Service, loop_file: bool) -> None:
        self.source, self.svc, self.loop_file = source, svc, loop_file
        self.counters = svc.counters
        self.state = "live"
        self.error: str | None = None       # set when the source ended by failure
        self.grabbed = 0                    # frames grabbed since start (all opens, all loops)
        self._cond = threading.Condition()
        self._want = False
        self._frame: Frame | None = None
        self._ended = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grabber", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def ended(self) -> bool:
        return self._ended

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(1.0)
        if not self._thread.is_alive():     # never release a capture a blocked grab() still uses
            self.source.close()

    def request(self, timeout: float) -> Frame | object | None:
        """The next frame grabbed after this call (decoded), END, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._frame = None
            self._want = True
            while self._frame is None and not self._ended and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    self._want = False
                    return None
                self._cond.wait(min(left, 0.1))
            frame, self._frame, self._want = self._frame, None, False
        return frame if frame is not None else (END if self._ended else None)

    # -- thread side
    def _finish(self, error: str | None = None) -> None:
        with self._cond:
            self.error = error
            self._ended = True
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:   # a crash here must end the process with one line, not hang it
            self._finish(f"{self.source.name}: capture failed: {type(exc).__name__}: {_one_line(exc)}")

    def _loop(self) -> None:
        src = self.source
        pace_t0, paced = time.monotonic(), 0
        since_open = 0
        while not self._stop.is_set():
            if src.frame_interval:
                due = pace_t0 + paced * src.frame_interval
                delay = due - time.monotonic()
                if delay > 0:
                    if self._stop.wait(delay):
                        return
                elif delay < -1.0:   # decoding fell behind real time (slow machine, suspend): rebase
                    pace_t0 = time.monotonic() - paced * src.frame_interval
            if not src.grab():
                if not src.live:
                    if since_open == 0 and paced == 0 and self.grabbed == 0:
                        return self._finish(f"{src.name}: no decodable video frame")
                    if self.loop_file:
                        if not src.rewind():
                            return self._finish(f"{src.name}: cannot rewind for --loop")
                        self.counters["loops"] += 1
                        pace_t0, paced, since_open = time.monotonic(), 0, 0
                        continue
                    expected = src.frame_count
                    short = f" of {expected}" if expected and since_open < expected - 1 else ""
                    log.info("%s: end of file after %d frames%s", src.name, since_open, short)
                    return self._finish()
                if not self._reopen():
                    return
                pace_t0, paced, since_open = time.monotonic(), 0, 0
                continue
            capture_ns = time.time_ns()
            paced += 1
            since_open += 1
            self.grabbed += 1
            self.counters["frames_grabbed"] += 1
            with self._cond:
                want = self._want
            if want:
                image = src.retrieve()    # decode only the frame that will be sent
                if image is None:
                    self.counters["decode_errors"] += 1
                    self.svc.ratelog.warning("decode", f"{src.name}: a frame did not decode; skipped")
                    continue
                with self._cond:
                    if self._want:
                        self._frame = Frame(image, capture_ns, self.grabbed)
                        self._want = False
                        self._cond.notify_all()

    def _reopen(self) -> bool:
        """Reopen a lost live source with backoff; False if asked to stop first."""
        src = self.source
        src.close()
        self.state = "reopening"
        lost_at = time.monotonic()
        log.warning("%s: lost (no frame); reopening with backoff", src.name)
        delay = BACKOFF_FIRST_S
        while not self._stop.wait(delay):
            self.counters["reopens"] += 1
            try:
                src.open()
            except SourceError as exc:
                self.svc.ratelog.warning("reopen", f"{exc}; still retrying after "
                                                   f"{time.monotonic() - lost_at:.0f} s")
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            log.info("%s: reopened after %.1f s", src.name, time.monotonic() - lost_at)
            self.state = "live"
            return True
        return False


class PullGrabber:
    """Screen and test pattern: grab at the tick (no buffer to drain, the freshest possible);
    a failing screen (X server gone) is reopened with backoff at later ticks."""

    def __init__(self, source: PullFrameSource, svc: Service) -> None:
        self.source, self.svc = source, svc
        self.state = "live"
        self.error: str | None = None
        self.grabbed = 0
        self.ended = False
        self._retry_at = 0.0
        self._delay = BACKOFF_FIRST_S
        self._lock = threading.Lock()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        with self._lock:
            self.source.close()

    def request(self, timeout: float) -> Frame | None:
        with self._lock:
            src = self.source
            if self.state != "live":
                if time.monotonic() < self._retry_at:
                    return None
                self.svc.counters["reopens"] += 1
                try:
                    src.open()
                except SourceError as exc:
                    self._retry_at = time.monotonic() + self._delay
                    self._delay = min(self._delay * 2, BACKOFF_MAX_S)
                    self.svc.ratelog.warning("reopen", f"{exc}; still retrying")
                    return None
                log.info("%s: reopened", src.name)
                self.state, self._delay = "live", BACKOFF_FIRST_S
            capture_ns = time.time_ns()
            try:
                image = src.snap()
            except Exception as exc:    # mss raises its own error types when the display goes away
                self.svc.counters["source_errors"] += 1
                log.warning("%s: grab failed (%s); reopening with backoff", src.name, _one_line(exc))
                try:
                    src.close()
                except Exception:  # closing a dead X connection can raise too; nothing left to free
                    pass
                self.state = "reopening"
                self._retry_at = time.monotonic() + self._delay
                return None
            self.grabbed += 1
            self.svc.counters["frames_grabbed"] += 1
            return Frame(image, capture_ns, self.grabbed)


# ----------------------------------------------------------------------------- the service
@dataclass(slots=True)
class Encoded:
    jpeg: bytes
    width: int
    height: int
    capture_ns: int
    cost_ms: float          # fit + encode
    thumb: np.ndarray | None


SKIPPED = object()


def _has_ffmpeg(cv2: Any) -> bool:
    return bool(cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _redact_url(url: str) -> str:
    """Hide user:password in a stream URL before it goes into a log line."""
    return re.sub(r"(://)[^/@]*@", r"\1***@", url)


class CaptureVideo:
    def __init__(self, args: argparse.Namespace, spec: SourceSpec) -> None:
        self.args, self.spec = args, spec
        # OpenCV's encoder only where OpenCV is loaded for the source anyway
        encoder = FrameEncoder if spec.kind in ("screen", "pattern") else CvFrameEncoder
        self.encoder = encoder(args.size, args.quality, args.pad, args.skip_threshold if args.skip_unchanged else None)
        if spec.kind == "screen":
            self.source: PullFrameSource | PushFrameSource = ScreenSource(spec)
        elif spec.kind == "pattern":   # drawn at the size it is sent: nothing to scale
            fitted = self.encoder.fitted_size(*args.pattern_size)
            self.source = PatternSource(*args.pattern_size, render=fitted if PatternSource.fits(*fitted) else None)
        else:
            self.source = VideoSource(spec, args.camera_size)
        self.grabber: Grabber | PullGrabber | None = None
        self.ages: deque[float] = deque(maxlen=AGE_WINDOW)
        self.costs: deque[float] = deque(maxlen=AGE_WINDOW)

    def open(self) -> None:
        self.source.open()
        src = self.source
        w, h = src.width, src.height
        out = f"{self.encoder.fitted_size(w, h)[0]}x{self.encoder.fitted_size(w, h)[1]}" if w and h else "?"
        if self.args.pad and w and h:
            out = "x".join([str(max(self.encoder.fitted_size(w, h)))] * 2)
        rate = f" @ {1 / src.frame_interval:.3g} fps" if getattr(src, "frame_interval", 0) else ""
        skip = f", skipping unchanged (<{self.args.skip_threshold}% changed)" if self.args.skip_unchanged else ""
        log.info("%s %sx%s%s -> video.in %s JPEG q%d at %g fps%s", src.name, w or "?", h or "?", rate, out,
                 self.args.quality, self.args.fps, skip)

    def produce(self, grabber: Grabber | PullGrabber, timeout: float) -> Encoded | object | None:
        """Worker thread: get the newest frame, fit, test for change, encode."""
        frame = grabber.request(timeout)
        if frame is None or frame is END:
            return frame
        t0 = time.perf_counter()
        scaled = self.encoder.scale(frame.image)
        thumb = None
        if self.encoder.skip_threshold is not None:
            thumb = self.encoder.thumbnail(scaled)     # before padding: bands would dilute a change
            if self.encoder.changed_percent(thumb) < self.encoder.skip_threshold:
                return SKIPPED
        fitted = self.encoder.pad_square(scaled)
        jpeg = self.encoder.encode(fitted)
        cost = (time.perf_counter() - t0) * 1000
        width, height = self.encoder.size_of(fitted)
        return Encoded(jpeg, width, height, frame.capture_ns, cost, thumb)

    async def run(self, svc: Service) -> None:
        src = self.source
        grabber: Grabber | PullGrabber = (PullGrabber(src, svc) if isinstance(src, PullFrameSource)
                                          else Grabber(src, svc, self.args.loop))
        self.grabber = grabber
        grabber.start()
        period = 1.0 / self.args.fps
        # Wait for a push frame a little longer than a tick, so a slow camera is not "no frame".
        timeout = max(1.0, period * 1.5)
        next_tick = time.monotonic()
        rate_mark = (time.monotonic(), 0)
        waiting_logged = False
        last_frame_ns = time.monotonic_ns()
        try:
            while True:
                delay = next_tick - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_tick += period
                if next_tick < time.monotonic() - period:     # fell behind: no burst of catch-up frames
                    next_tick = time.monotonic() + period
                now = time.monotonic()
                if now - rate_mark[0] >= 2.0:
                    svc.metrics["source_fps"] = round((grabber.grabbed - rate_mark[1]) / (now - rate_mark[0]), 2)
                    rate_mark = (now, grabber.grabbed)
                svc.metrics["source_state"] = grabber.state
                if grabber.ended:
                    break
                if not svc.has_subscriber("video.in"):
                    # Nobody listens: encode nothing (push sources keep draining in their thread).
                    if not waiting_logged:
                        log.info("waiting for a subscriber to video.in")
                        waiting_logged = True
                    svc.metrics["source_state"] = "no subscriber"
                    continue
                waiting_logged = False
                result = await asyncio.to_thread(self.produce, grabber, timeout)
                if result is END:
                    break
                if result is None:
                    svc.counters["no_frame"] += 1
                    silent_s = (time.monotonic_ns() - last_frame_ns) / 1e9
                    if grabber.state == "live" and silent_s > 3:
                        svc.ratelog.warning("no_frame", f"{src.name}: no new frame for {silent_s:.0f} s")
                    continue
                last_frame_ns = time.monotonic_ns()
                if result is SKIPPED:
                    svc.counters["unchanged_skipped"] += 1
                    continue
                assert isinstance(result, Encoded)
                if svc.publish("video.in", "image", result.jpeg, image_width=result.width,
                               image_height=result.height, mime="image/jpeg", capture_ts=result.capture_ns):
                    self.encoder.remember(result.thumb)
                    self._account(svc, result)
        finally:
            grabber.stop()
        if grabber.error:
            raise SourceError(grabber.error)

    def _account(self, svc: Service, result: Encoded) -> None:
        age_ms = (time.time_ns() - result.capture_ns) / 1e6
        self.ages.append(age_ms)
        self.costs.append(result.cost_ms)
        ages = sorted(self.ages)
        svc.metrics.update(
            frame_age_ms=round(age_ms, 2),
            frame_age_p50_ms=round(statistics.median(ages), 2),
            frame_age_max_ms=round(ages[-1], 2),
            encode_ms=round(result.cost_ms, 2),
            encode_p50_ms=round(statistics.median(self.costs), 2),
            jpeg_bytes=len(result.jpeg),
            image=f"{result.width}x{result.height}",
        )


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> None:
    """glibc: serve every allocation of `size` bytes or more with its own mmap, returned to the
    system when freed. By default glibc raises that threshold to the size of each large block
    freed (up to 32 MB), so after the first frame every 1-3 MB frame buffer lands in the worker
    thread's malloc arena and stays resident there: +10 MB RSS for one frame a second. An mmap
    per frame costs a few hundred page faults, nothing at these rates."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, size)     # M_MMAP_THRESHOLD; fixing it disables the dynamic rule
    except (OSError, AttributeError):           # not glibc (musl has no mallopt): nothing to tune
        pass


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = VerbParser(prog=f"livepipe {NAME}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", default=None, metavar="SOURCE",
                   help="camera index/path, video file, stream URL, screen[:N|:L,T,W,H] or test "
                        "(env LIVEPIPE_VIDEO_SOURCE, default 0)")
    p.add_argument("--fps", default=None, help="frames sent per second (env LIVEPIPE_VIDEO_FPS, default 1)")
    p.add_argument("--size", default=None, help="fit frames inside SIZE x SIZE, aspect kept, never upscaled "
                                                "(env LIVEPIPE_VIDEO_SIZE, default 768)")
    p.add_argument("--quality", default=None, help="JPEG quality 1-100 (env LIVEPIPE_VIDEO_QUALITY, default 80)")
    p.add_argument("--pad", action="store_true", help="pad the fitted frame with black to a square")
    p.add_argument("--skip-unchanged", action="store_true",
                   help="do not send a frame nearly identical to the last one sent")
    p.add_argument("--skip-threshold", type=float, default=DEFAULT_SKIP_THRESHOLD, metavar="PERCENT",
                   help="with --skip-unchanged: send only if more than PERCENT of the picture changed "
                        "(default %(default)s)")
    p.add_argument("--loop", action="store_true", help="video file: start again at the end instead of exiting")
    p.add_argument("--pattern-size", default="1280x720", metavar="WxH", help="test pattern size (default %(default)s)")
    p.add_argument("--camera-size", default=None, metavar="WxH",
                   help="ask the camera for this resolution (default: the camera's own)")
    add_bus_arguments(p)
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, SourceSpec]:
    args = build_parser().parse_args(argv)
    fps = number("--fps", "LIVEPIPE_VIDEO_FPS", args.fps, float, 0, 60, default=DEFAULT_FPS)
    size = number("--size", "LIVEPIPE_VIDEO_SIZE", args.size, int, 16, 4096, default=DEFAULT_SIZE)
    quality = number("--quality", "LIVEPIPE_VIDEO_QUALITY", args.quality, int, 1, 100, default=DEFAULT_QUALITY)
    if not fps > 0:
        raise UsageError(f"--fps {fps:g}: use a rate above 0 and at most 60")
    if not 0 <= args.skip_threshold <= 100:
        raise UsageError(f"--skip-threshold {args.skip_threshold:g}: use a percentage 0..100")
    args.fps, args.size, args.quality = fps, size, quality
    args.pattern_size = parse_wxh(args.pattern_size, "--pattern-size")
    args.camera_size = parse_wxh(args.camera_size, "--camera-size") if args.camera_size else None
    spec = parse_source(args.source or env("LIVEPIPE_VIDEO_SOURCE", "0"))
    if args.loop and spec.kind != "file":
        raise UsageError("--loop applies to video files only")
    return args, spec


@verb(NAME)
def main(argv: list[str]) -> int:
    setup_logging(NAME)
    args, spec = parse_args(argv)     # UsageError, ConfigError: one line, exit 2 (@verb)
    fix_mmap_threshold()
    cfg = BusConfig.from_args(args)
    capture = CaptureVideo(args, spec)
    # Open before joining the bus: a missing file or camera is reported at once, broker or not.
    no_camera = False
    try:
        capture.open()                # SourceError: one line, exit 1 (@verb)
    except SourceError as exc:
        if spec.kind != "camera":
            raise
        # No camera means a conversation without video, not no conversation: say it once, stay up
        # (so a supervisor or honcho keeps the other processes) and look for it again slowly.
        log.warning("%s: continuing without video (set LIVEPIPE_VIDEO_SOURCE=test or screen)", exc)
        no_camera = True
    svc = Service(NAME, cfg, log)
    for key in COUNTERS:
        svc.counters[key] = 0     # every heartbeat has them; created before the grabber thread runs
    svc.metrics.update(source=spec.describe())

    async def run(svc: Service) -> int:
        nonlocal no_camera
        while no_camera:
            svc.metrics["source_state"] = "no_camera"
            await asyncio.sleep(CAMERA_RETRY_S)
            svc.counters["reopens"] += 1
            try:
                await asyncio.to_thread(capture.open)   # opening a camera can block
                no_camera = False
            except SourceError:
                continue
        try:
            await capture.run(svc)
        except SourceError as exc:
            log.error("%s", exc)
            return 1
        return 0   # a file ended (no --loop): exit 0

    try:
        return svc.main(run)
    finally:
        if capture.grabber is None:      # never started (stopped before the bus was live)
            capture.source.close()
