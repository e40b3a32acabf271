"""Image sizes from file headers, without decoding: the decompression-bomb check.

Pure Python (no TensorFlow), so the training header check (data.py) and the `predict` client
(serving.py, which must not import TensorFlow for REST) share one parser. The serving graph
does the same reads in-graph (`data.image_info_tensor`); a test checks both agree.

A file is refused when decoding it would take more than `max_pixels` pixels (width x height x
frames: TensorFlow's GIF and WebP decoders decode every frame of an animation even when only the
first is kept) or when an animation has more than MAX_ANIMATION_FRAMES frames.
"""

import dataclasses
import mmap
import os
import struct

# PIL's decompression-bomb threshold: decoding takes width * height * 3 bytes, ~270 MB here.
MAX_IMAGE_PIXELS = 89_478_485
# TensorFlow decodes every frame of an animation even with expand_animations=False (301 frames
# took 1.4 s): more frames than this are refused, whatever their size.
MAX_ANIMATION_FRAMES = 100

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What a header says. Width/height None: the header does not say (decoding decides).

    For a GIF, width and height are the largest of the logical screen and every frame's image
    descriptor (giflib allocates each frame at its descriptor's size).
    """

    format: str
    width: int | None
    height: int | None
    frames: int = 1


def _jpeg_size(buf) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments."""
    pos, n = 2, len(buf)
    while pos < n:
        if buf[pos] != 0xFF:
            return None
        while pos < n and buf[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return None
        marker = buf[pos]
        pos += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            continue
        if pos + 2 > n or marker == 0xDA:  # start of scan: no frame header found
            return None
        (length,) = struct.unpack_from(">H", buf, pos)
        if marker in _JPEG_SOF:
            if pos + 7 > n:
                return None
            height, width = struct.unpack_from(">HH", buf, pos + 3)
            return width, height
        pos += length
    return None


def _skip_sub_blocks(buf, pos: int) -> int:
    n = len(buf)
    while pos < n:
        size = buf[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _gif_info(buf, max_frames: int) -> ImageInfo:
    """Walks the GIF's blocks (no LZW decoding): frames and the largest frame size."""
    width, height = struct.unpack_from("<HH", buf, 6)
    packed = buf[10]
    pos = 13 + (3 * (2 << (packed & 7)) if packed & 0x80 else 0)
    frames, n = 0, len(buf)
    while pos < n and frames <= max_frames:
        block = buf[pos]
        if block == 0x21:  # extension: introducer, label, data sub-blocks
            pos = _skip_sub_blocks(buf, pos + 2)
        elif block == 0x2C and pos + 10 <= n:  # image descriptor
            frame_w, frame_h = struct.unpack_from("<HH", buf, pos + 5)
            width, height = max(width, frame_w), max(height, frame_h)
            frames += 1
            local = buf[pos + 9]
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1  # + LZW code size
            pos = _skip_sub_blocks(buf, pos)
        else:  # trailer (0x3B) or garbage: the decoder decides
            break
    return ImageInfo("GIF", width, height, max(frames, 1))


def _webp_info(buf) -> ImageInfo:
    """Canvas size from the VP8 / VP8L / VP8X chunk; ANMF chunks counted for animations."""
    chunk = bytes(buf[12:16])
    if chunk == b"VP8 " and len(buf) >= 30 and bytes(buf[23:26]) == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", buf, 26)
        return ImageInfo("WEBP", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(buf) >= 25 and buf[20] == 0x2F:
        (bits,) = struct.unpack_from("<I", buf, 21)
        return ImageInfo("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(buf) >= 30:
        width = int.from_bytes(bytes(buf[24:27]), "little") + 1
        height = int.from_bytes(bytes(buf[27:30]), "little") + 1
        frames, pos, n = 0, 12, len(buf)
        while pos + 8 <= n:  # top-level chunks: fourcc, little-endian size, even-padded data
            (size,) = struct.unpack_from("<I", buf, pos + 4)
            frames += bytes(buf[pos : pos + 4]) == b"ANMF"
            pos += 8 + size + (size & 1)
        return ImageInfo("WEBP", width, height, max(frames, 1))
    return ImageInfo("WEBP", None, None)


def parse(buf, max_frames: int = MAX_ANIMATION_FRAMES) -> ImageInfo | None:
    """The ImageInfo of encoded image bytes (bytes, memoryview or mmap), or None if no image.

    GIF frames are counted up to `max_frames` + 1 (the walk stops there).
    """
    head = bytes(buf[:32])
    if head.startswith(b"\xff\xd8\xff"):
        size = _jpeg_size(buf)
        return ImageInfo("JPEG", *size) if size else ImageInfo("JPEG", None, None)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return ImageInfo("PNG", *struct.unpack_from(">II", head, 16))
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 13:
        return _gif_info(buf, max_frames)
    if head.startswith(b"BM") and len(head) >= 26:
        # As TensorFlow's BMP decoder reads it: int32 at 18 and 22, negative height = top-down.
        width, height = struct.unpack_from("<ii", head, 18)
        return ImageInfo("BMP", abs(width), abs(height))
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_info(buf)
    return None


def read(path: str, max_frames: int = MAX_ANIMATION_FRAMES) -> ImageInfo | None:
    """parse() of a file, memory-mapped: only the header pages (and a GIF's blocks) are read."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parse(buf, max_frames)


def problem(
    info: ImageInfo | None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_frames: int = MAX_ANIMATION_FRAMES,
) -> str | None:
    """Why an image must not be decoded (too many pixels or frames), or None."""
    if info is None or info.width is None or info.height is None:
        return None
    if info.frames > max_frames:
        return (
            f"{info.format} animation has more than {max_frames} frames (limit {max_frames}): "
            "not decoded"
        )
    pixels = info.width * info.height * info.frames
    if pixels > max_pixels:
        frames = f" x {info.frames} frames" if info.frames > 1 else ""
        return (
            f"{info.format} too large to decode safely: {info.width}x{info.height} pixels"
            f"{frames} (limit {max_pixels:,} pixels, --max_image_pixels)"
        )
    return None
