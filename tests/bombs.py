"""Decompression bombs for tests: tiny files whose headers declare huge images.

Each is a real small image (written by PIL) with its size fields patched, so every byte but the
size is what a real encoder writes; none is ever decoded by the code under test.
"""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _image(size=(8, 6), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def _save(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose IHDR (with a valid CRC) declares width x height."""
    blob = bytearray(_save(_image(), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(blob[24:29])
    blob[16:29] = ihdr
    blob[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(blob)


def jpeg(width: int = 60000, height: int = 60000) -> bytes:
    """A JPEG whose SOF0 frame header declares width x height."""
    blob = bytearray(_save(_image(), "JPEG"))
    sof = blob.index(b"\xff\xc0")
    blob[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(blob)


def gif_screen(width: int = 60000, height: int = 60000) -> bytes:
    """A GIF whose logical screen declares width x height."""
    blob = bytearray(_save(_image(), "GIF"))
    blob[6:10] = struct.pack("<HH", width, height)
    return bytes(blob)


def gif_descriptor(width: int = 60000, height: int = 60000) -> bytes:
    """A GIF with a small logical screen and an image descriptor of width x height."""
    blob = bytearray(_save(_image(), "GIF"))
    desc = blob.index(b"\x2c", 13)
    blob[desc + 5 : desc + 9] = struct.pack("<HH", width, height)
    return bytes(blob)


def animation(fmt: str = "GIF", frames: int = 150, size=(4, 4)) -> bytes:
    """A tiny animated GIF or WebP of `frames` distinct frames."""
    images = [Image.new("RGB", size, (i % 256, (7 * i) % 256, 40)) for i in range(frames)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return _save(images[0], fmt, save_all=True, append_images=images[1:], duration=10, **kw)


def bmp(width: int = 60000, height: int = -60000) -> bytes:
    """A BMP whose info header declares width x height (negative: top-down)."""
    blob = bytearray(_save(_image(), "BMP"))
    blob[18:26] = struct.pack("<ii", width, height)
    return bytes(blob)


def webp_vp8(width: int = 16383, height: int = 16383) -> bytes:
    """A lossy WebP whose VP8 frame header declares width x height (14 bits each)."""
    blob = bytearray(_save(_image(), "WEBP", quality=80))
    assert blob[12:16] == b"VP8 "
    blob[26:30] = struct.pack("<HH", width, height)
    return bytes(blob)


def webp_vp8l(width: int = 16384, height: int = 16384) -> bytes:
    """A lossless WebP whose VP8L header declares width x height."""
    blob = bytearray(_save(_image(), "WEBP", lossless=True))
    assert blob[12:16] == b"VP8L"
    (bits,) = struct.unpack("<I", blob[21:25])
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    blob[21:25] = struct.pack("<I", bits)
    return bytes(blob)


def webp_vp8x(width: int = 100000, height: int = 100000) -> bytes:
    """An extended WebP (a VP8X chunk, then PIL's VP8 chunk) whose canvas is width x height."""
    simple = _save(_image(), "WEBP", quality=80)
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + simple[12:]
    return b"RIFF" + struct.pack("<I", len(body)) + body


# name -> (bytes, (format, width, height, frames) the header parsers must read)
def all_bombs() -> dict:
    return {
        "png": (png(), ("PNG", 20000, 20000, 1)),
        "jpeg": (jpeg(), ("JPEG", 60000, 60000, 1)),
        "gif_screen": (gif_screen(), ("GIF", 60000, 60000, 1)),
        "gif_descriptor": (gif_descriptor(), ("GIF", 60000, 60000, 1)),
        "gif_frames": (animation("GIF", 150), ("GIF", 4, 4, 101)),
        "bmp": (bmp(), ("BMP", 60000, 60000, 1)),
        "webp_vp8": (webp_vp8(), ("WEBP", 16383, 16383, 1)),
        "webp_vp8l": (webp_vp8l(), ("WEBP", 16384, 16384, 1)),
        "webp_vp8x": (webp_vp8x(), ("WEBP", 100000, 100000, 1)),
        "webp_frames": (animation("WEBP", 150), ("WEBP", 4, 4, 150)),
    }


def real_png_bomb(side: int = 20000) -> bytes:
    """A real side x side RGB PNG of zeros (~1.2 MB at 20000): decodes in full, for timing."""
    raw_row = b"\x00" * (1 + 3 * side)
    comp = zlib.compressobj(9)
    chunks = [comp.compress(raw_row) for _ in range(side)] + [comp.flush()]
    idat = b"".join(chunks)

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
