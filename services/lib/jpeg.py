"""Read an image's declared size from its header, before anything decodes it.

A 600-byte JPEG can claim 20000x20000 pixels: decoding it costs 1.2 GB and seconds of a core
(a decompression bomb). `check_image` reads the size the header declares (JPEG SOF marker,
PNG IHDR) and refuses what no camera or screen produces, so the decoder never sees it.
"""
from __future__ import annotations

import struct

MAX_SIDE = 8192                 # no camera or screen we capture has a wider side
MAX_PIXELS = 40_000_000         # 40 MP: beyond any webcam, 8K screens included (33 MP)

# Start-of-frame markers carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) are not SOFs.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD9)}     # TEM, RSTn, SOI: no length field


class ImageRejected(ValueError):
    """An image refused from its header alone: the message says why, for a log line."""


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) declared by a JPEG's frame header; ImageRejected if there is none."""
    if data[:2] != b"\xff\xd8":
        raise ImageRejected("not a JPEG (no SOI marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ImageRejected(f"corrupt JPEG: no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:            # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):    # EOI or start of scan before any frame header
            break
        length = struct.unpack_from(">H", data, i + 2)[0]
        if length < 2:
            raise ImageRejected(f"corrupt JPEG: segment length {length}")
        if marker in _SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack_from(">HH", data, i + 5)
            if height == 0 or width == 0:
                raise ImageRejected(f"JPEG declares {width}x{height} pixels (a size set later, DNL: not a camera frame)")
            return width, height
        i += 2 + length
    raise ImageRejected("corrupt JPEG: no frame header (SOF) before the image data")


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        raise ImageRejected("not a PNG (no IHDR header)")
    return struct.unpack_from(">II", data, 16)


def check_image(data: bytes, mime: str = "image/jpeg") -> tuple[int, int]:
    """The declared (width, height) of a JPEG or PNG, or ImageRejected if it is not one or is
    larger than any camera produces (MAX_SIDE a side, MAX_PIXELS in all)."""
    if mime == "image/png" or data[:4] == b"\x89PNG":
        w, h = png_size(data)
    else:
        w, h = jpeg_size(data)
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise ImageRejected(f"image header declares {w}x{h} pixels (more than {MAX_SIDE} a side or "
                            f"{MAX_PIXELS // 1_000_000} MP: no camera sends that; not decoded)")
    return w, h
