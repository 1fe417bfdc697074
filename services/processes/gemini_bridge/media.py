"""Input media made ready for the model: audio to 16 kHz mono s16, frames checked and fitted, client-side VAD."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from livepipe.bus.message import Message
from livepipe.services.lib.audio import decode_pcm, float_to_int16, to_mono
from livepipe.services.lib.vad import VoiceFramer
from livepipe.services.lib.jpeg import check_image
from livepipe.services.processes.gemini_bridge.settings import MODEL_RATE, NAME

log = logging.getLogger(NAME)


class AudioNormalizer:
    """Make any audio.in chunk 16 kHz mono s16le, with one streaming resampler per source."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, int], Any] = {}

    def convert(self, msg: Message) -> bytes:
        rate, ch, width = msg["rate"], msg["channels"], msg["sample_width"]
        data = msg.payload or b""
        if (rate, ch, width) == (MODEL_RATE, 1, 2):
            return data
        # 8/16/24/32-bit, any channel count -> mono int16 (rounded; ValueError for another width)
        mono = float_to_int16(to_mono(decode_pcm(data, width, ch)))
        if rate != MODEL_RATE:
            import soxr
            key = (msg["inst"], rate)
            stream = self._streams.get(key)
            if stream is None:
                if len(self._streams) > 32:   # bounded: sources come and go
                    self._streams.pop(next(iter(self._streams)))
                stream = self._streams[key] = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="int16")
            mono = stream.resample_chunk(mono)
        return mono.astype("<i2").tobytes()


def prepare_frame(data: bytes, mime: str, max_side: int) -> tuple[bytes, int, int]:
    """Decode (which proves the frame is an image) and fit inside max_side x max_side as JPEG.
    The header's declared size is checked first: a decompression bomb is never decoded."""
    declared = check_image(data, mime)   # raises ImageRejected
    if mime == "image/jpeg" and max(declared) <= max_side:
        fits = _pillow_decodes(data)     # the usual frame: sent as it came, only decoded
        if fits is not None:
            return data, fits[0], fits[1]
    import cv2
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"undecodable {mime} frame of {len(data)} bytes")
    h, w = img.shape[:2]
    if max(h, w) <= max_side and mime == "image/jpeg":
        return data, w, h
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes(), w, h


def _pillow_decodes(data: bytes) -> tuple[int, int] | None:
    """(width, height) once Pillow has decoded the whole JPEG, ValueError if it cannot, None without
    Pillow. google-genai imports Pillow when it is installed, so this costs no memory, where
    OpenCV's import is 16 MB of the bridge's RSS; both decode with libjpeg(-turbo) and refuse
    truncated or broken frames alike."""
    try:
        from PIL import Image
    except ImportError:
        return None
    import io
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            img.load()
            return img.size
    except Exception as exc:   # Pillow raises OSError, SyntaxError, ValueError... on a bad frame
        raise ValueError(f"undecodable image/jpeg frame of {len(data)} bytes ({type(exc).__name__})") from None


class SpeechMarker:
    """Client-side activity detection for --vad off: sends activityStart/End around speech (webrtcvad)."""

    def __init__(self, silence_ms: int) -> None:
        self.vad = VoiceFramer(MODEL_RATE, 30, 2)   # 30 ms frames, no level floor
        self.silence_frames = max(1, silence_ms // 30)
        self.active = False
        self.quiet = 0

    def feed(self, pcm: bytes) -> list[str]:
        """Events ('start' / 'end') the chunk causes, in order."""
        events: list[str] = []
        for _frame, _ts, speech in self.vad.feed(np.frombuffer(pcm, "<i2")):
            if speech:
                self.quiet = 0
                if not self.active:
                    self.active = True
                    events.append("start")
            elif self.active:
                self.quiet += 1
                if self.quiet >= self.silence_frames:
                    self.active = False
                    events.append("end")
        return events

