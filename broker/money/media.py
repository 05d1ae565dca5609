"""Proven upper bounds on what a request's images can cost (PDFs: :mod:`broker.money.pdf`).

The gateway holds a worst case before it forwards a call, so every function here errs on one
side only: a bound may exceed what the provider bills, never fall short of it. Where the bytes
leave a size open (an image by URL, an animated image, a header that decoders read differently,
a declared size beyond every provider's limits) the answer is "size unknown" and the caller
holds the rule's maximum.

Everything here reads headers and structure only, never pixel data, and is written for hostile
input: on arbitrary bytes the functions return or raise :class:`MediaError`, nothing else, and
their work is bounded by the input's size and the limits below.

Images are measured by small parsers of our own rather than by ``PIL.Image.open``: Pillow's open
is not header-only for every format (a GIF whose first frame is disposed to background gets a
frame-sized buffer allocated and filled at open; a WebP gets libwebp's animation decoder, which
reserves two canvas-sized buffers), it warns through the process-global ``warnings`` machinery
and a mutable global limit, and it takes the last of several JPEG frame headers where libjpeg
refuses the file. Pillow remains the reference the tests check these parsers against.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal


class MediaError(ValueError):
    """A media part whose cost cannot be bounded; the message says why (no payload bytes in it)."""


# --------------------------------------------------------------------------------------------
# Image rules

ImageRuleKind = Literal["openai-tiles", "anthropic-pixels", "none"]

# OpenAI's tile rule: fit in OPENAI_BOX x OPENAI_BOX, shortest side down to OPENAI_SHORT_SIDE,
# then count OPENAI_TILE x OPENAI_TILE tiles.
OPENAI_BOX: Final = 2048
OPENAI_SHORT_SIDE: Final = 768
OPENAI_TILE: Final = 512
# No size yields more tiles; the proof is in _openai_tiles.
OPENAI_MAX_TILES: Final = 8

# Anthropic's rule: tokens = width * height / 750 after the long edge is brought to 1568 px.
# Models documented to read larger images need an ImageRule with long_edge and token_cap raised.
ANTHROPIC_PIXELS_PER_TOKEN: Final = 750
ANTHROPIC_LONG_EDGE: Final = 1568
# Anthropic scales an image down until it is "within the size limits" (long edge 1568, about
# 1,600 tokens); the largest size of its own table of maximum sizes (1092x1092, 951x1268,
# 896x1344, 819x1456, 784x1568) is 784x1568 = 1639 tokens. 1750 is above every one of them, with
# room for the "about".
ANTHROPIC_MAX_IMAGE_TOKENS: Final = 1750

# Above this many pixels a declared size is treated as unknown. It is Pillow's default
# decompression-bomb threshold (about 9459 x 9459); every provider refuses images this large
# (Anthropic at 8000 x 8000), so no documented rule says how one would be billed.
MAX_SIZED_PIXELS: Final = 89_478_485


@dataclass(frozen=True)
class ImageRule:
    """How a model bills an image.

    ``openai-tiles`` uses ``base_tokens`` and ``tile_tokens``; ``anthropic-pixels`` uses
    ``long_edge`` and ``token_cap`` (Anthropic's documented figures by default; a model that
    reads larger images needs both raised); ``none`` refuses every image.
    """

    kind: ImageRuleKind
    base_tokens: int = 0
    tile_tokens: int = 0
    long_edge: int = ANTHROPIC_LONG_EDGE
    token_cap: int = ANTHROPIC_MAX_IMAGE_TOKENS

    def __post_init__(self) -> None:
        if self.kind not in ("openai-tiles", "anthropic-pixels", "none"):
            raise ValueError(f"unknown image rule {self.kind!r}")
        if self.base_tokens < 0 or self.tile_tokens < 0:
            raise ValueError("image token counts cannot be negative")
        if self.long_edge < 1 or self.token_cap < 1:
            raise ValueError("long_edge and token_cap must be positive")


# gpt-4o-mini's figures: the costliest tile rule OpenAI publishes.
OPENAI_COSTLIEST: Final = ImageRule("openai-tiles", base_tokens=2833, tile_tokens=5667)
ANTHROPIC_PIXELS: Final = ImageRule("anthropic-pixels")
NO_IMAGES: Final = ImageRule("none")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def image_tokens(rule: ImageRule, size: tuple[int, int] | None, *, detail: str | None = None) -> int:
    """An upper bound on the tokens the provider bills for one image of ``size`` under ``rule``.

    ``size`` is (width, height), or ``None`` when unknown: the answer is then the rule's maximum,
    which no known size exceeds, so an unknown size can over-hold but never under-hold.
    ``detail`` is OpenAI's field: only ``"low"`` lowers the cost; any other value, and none, is
    billed as high. Dimensions below 1 count as 1 (a provider bills no image smaller than a
    pixel); integers of any size are safe. Raises :class:`MediaError` for the ``none`` rule.
    """
    if rule.kind == "none":
        raise MediaError("this model accepts no images")
    if rule.kind == "openai-tiles":
        if detail == "low":
            return rule.base_tokens
        tiles = OPENAI_MAX_TILES if size is None else _openai_tiles(*size)
        return rule.base_tokens + rule.tile_tokens * tiles
    if size is None:
        return rule.token_cap
    return _anthropic_tokens(rule, *size)


def _openai_tiles(width: int, height: int) -> int:
    """Tiles of OpenAI's high-detail rule, for any way the provider rounds the 2048 box.

    The rule is symmetric in width and height, so only the long side L and the short side S
    matter. When L > 2048 the box brings L to exactly 2048 and S to q = S * 2048 / L, which an
    implementation may round down or up; both are tried and the larger count kept (the second
    step's scale depends on it: rounding q up can drop a tile that rounding down, or no rounding,
    keeps). Sizes after the second step are rounded up, which only adds tiles.

    Both steps only ever shrink an image, as in every example OpenAI publishes.

    At most 8 tiles: after the box the long side is at most 2048. If the short side is then at
    most 768 the image is at most 2048 x 768: 4 x 2 tiles. Otherwise it is at least 769 and is
    brought to exactly 768, the long side to at most ceil(2048 * 768 / 769) = 2046: 4 x 2 again.
    """
    long_side, short_side = max(width, height, 1), max(min(width, height), 1)
    if long_side <= OPENAI_BOX:
        return _tiles_after_short_side(long_side, short_side)
    exact = short_side * OPENAI_BOX
    candidates = {max(exact // long_side, 1), max(_ceil_div(exact, long_side), 1)}
    return max(_tiles_after_short_side(OPENAI_BOX, short) for short in candidates)


def _tiles_after_short_side(long_side: int, short_side: int) -> int:
    if short_side > OPENAI_SHORT_SIDE:
        long_side = _ceil_div(long_side * OPENAI_SHORT_SIDE, short_side)
        short_side = OPENAI_SHORT_SIDE
    return _ceil_div(long_side, OPENAI_TILE) * _ceil_div(short_side, OPENAI_TILE)


def _anthropic_tokens(rule: ImageRule, width: int, height: int) -> int:
    width, height = max(width, 1), max(height, 1)
    long_side = max(width, height)
    if long_side > rule.long_edge:
        # Rounded up: a scaled size a pixel larger than the provider's costs more, never less.
        width = _ceil_div(width * rule.long_edge, long_side)
        height = _ceil_div(height * rule.long_edge, long_side)
    return max(1, min(_ceil_div(width * height, ANTHROPIC_PIXELS_PER_TOKEN), rule.token_cap))


# --------------------------------------------------------------------------------------------
# base64 and data URLs

_DATA_URL_HEAD = re.compile(
    r"data:([a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126});base64",
    re.IGNORECASE,
)
# The head is "data:" + type/subtype (RFC 6838: at most 127 characters each) + ";base64".
_DATA_URL_HEAD_MAX = 5 + 127 + 1 + 127 + 7


def decode_base64(data: str, *, max_bytes: int) -> bytes:
    """The bytes of ``data``, standard base64 (RFC 4648 section 4), padding optional.

    Only the standard alphabet is accepted: no URL-safe characters, whitespace or line breaks.
    The bytes measured must be the bytes the provider decodes, and a lenient decoder (Python's
    own non-strict ``b64decode`` among them) silently drops characters outside its alphabet: a
    URL-safe string could be one image to us and another to the provider. Missing padding is
    restored; it cannot change the bytes. Raises :class:`MediaError` when ``data`` is
    empty, not base64, or decodes to more than ``max_bytes`` bytes (checked before decoding, so
    an oversized string allocates nothing).
    """
    if not isinstance(data, str) or not data.isascii():
        raise MediaError("media data is not base64")
    if not data:
        raise MediaError("media data is empty")
    if len(data) > 4 * _ceil_div(max_bytes, 3):
        raise MediaError(f"media data is larger than {max_bytes} bytes")
    if "=" not in data:
        if len(data) % 4 == 1:
            raise MediaError("media data is not base64 (truncated)")
        data += "=" * (-len(data) % 4)
    try:
        decoded = binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise MediaError("media data is not base64") from None
    if len(decoded) > max_bytes:
        raise MediaError(f"media data is larger than {max_bytes} bytes")
    return decoded


def parse_data_url(url: str, *, max_bytes: int) -> tuple[str, bytes]:
    """``data:<type>/<subtype>;base64,<data>`` as (the media type lower-cased, the bytes).

    The scheme and ``base64`` are matched case-insensitively (RFC 2397); media type parameters
    (``;charset=...``), non-base64 data URLs and anything else raise :class:`MediaError`, as
    does data that :func:`decode_base64` refuses.
    """
    if not isinstance(url, str):
        raise MediaError("not a data URL")
    comma = url.find(",", 0, _DATA_URL_HEAD_MAX + 1)
    head = _DATA_URL_HEAD.fullmatch(url, 0, comma) if comma >= 0 else None
    if head is None:
        raise MediaError("not a base64 data URL (data:<type>/<subtype>;base64,<data>)")
    return head.group(1).lower(), decode_base64(url[comma + 1 :], max_bytes=max_bytes)


# --------------------------------------------------------------------------------------------
# Image sizes

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks, segments or markers walked before the size is given up as unknown: real images have a
# few dozen before their image data, and a hostile one made of nothing else would cost about a
# second of CPU per 5 MB. A GIF is walked to its end (a second frame makes it animated) and its
# image data comes in sub-blocks of at most 255 bytes: 100,000 blocks is 25 MB of real GIF.
_MAX_STEPS = 10_000
_MAX_GIF_BLOCKS = 100_000
_NOT_FF = re.compile(b"[^\xff]")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, GIF or WebP image, read from its header.

    ``None`` means "size unknown" (callers hold the rule's maximum): an animated GIF or WebP
    (providers do not say which frame or canvas they bill, and the token rules are not monotone
    in the size, so no frame's size bounds another's), a header that decoders read differently
    (two PNG IHDR or JPEG frame headers, a GIF frame that does not exactly cover its screen, a
    WebP canvas that differs from its bitstream), a zero dimension (a JPEG may defer its height
    to a DNL marker), more than :data:`MAX_SIZED_PIXELS` pixels (decompression bombs among
    them), or a structure far longer than real images have (thousands of chunks before the image
    data). Orientation metadata is ignored: both rules are symmetric in width and height.

    Raises :class:`MediaError` for any other format or a header too broken to name a size.
    Reads no pixel data and allocates nothing in proportion to the declared size.
    """
    if not isinstance(data, bytes | bytearray):
        raise MediaError("image data is not bytes")
    data = bytes(data)
    parse: Callable[[bytes], tuple[int, int] | None]
    if data.startswith(_PNG_SIGNATURE):
        parse = _png_size
    elif data.startswith(b"\xff\xd8\xff"):
        parse = _jpeg_size
    elif data.startswith((b"GIF87a", b"GIF89a")):
        parse = _gif_size
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        parse = _webp_size
    else:
        raise MediaError("not a PNG, JPEG, GIF or WebP image")
    size = parse(data)
    if size is None:
        return None
    width, height = size
    if width <= 0 or height <= 0 or width * height > MAX_SIZED_PIXELS:
        return None
    return width, height


def _u16be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u16le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "little")


def _u24le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "little")


def _u32be(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _u32le(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "little")


def _png_size(data: bytes) -> tuple[int, int] | None:
    # The IHDR chunk must come first (signature, length 13, "IHDR", width, height, ...).
    if len(data) < 33:
        raise MediaError("PNG image is truncated")
    if _u32be(data, 8) != 13 or data[12:16] != b"IHDR":
        raise MediaError("PNG image does not start with its IHDR header")
    width, height = _u32be(data, 16), _u32be(data, 20)
    # libpng refuses a second IHDR, Pillow takes the last one before the image data: which
    # size a provider sees is open.
    at = 33
    for _ in range(_MAX_STEPS):
        if at + 8 > len(data):
            break
        chunk = data[at + 4 : at + 8]
        if chunk in (b"IDAT", b"IEND"):
            break
        if chunk == b"IHDR":
            return None
        at += 12 + _u32be(data, at)
    else:
        return None
    return width, height


# JPEG markers: frame headers (SOF0-15 without DHT C4, JPG C8, DAC CC) and DHP, which gives a
# hierarchical image's size; markers without a length; and every other known marker.
_JPEG_FRAMES = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xDE})
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SEGMENTS = frozenset({0xC4, 0xC8, 0xCC, *range(0xDB, 0xFF)} - {0xDE})


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    frames: list[tuple[int, int]] = []
    end = len(data)
    at = 2
    for _ in range(_MAX_STEPS):
        # Markers are found the way libjpeg finds them: stray bytes are skipped up to the next
        # 0xFF, fill bytes (more 0xFF) are skipped, and 0xFF 0x00 is not a marker.
        at = data.find(b"\xff", at)
        after_fill = _NOT_FF.search(data, at) if at >= 0 else None
        if after_fill is None:
            raise MediaError("JPEG image ends before its image data")
        at = after_fill.start()
        marker = data[at]
        at += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise MediaError("JPEG image ends before its image data")
        if marker == 0xDA:
            break
        if marker not in _JPEG_FRAMES and marker not in _JPEG_SEGMENTS:
            raise MediaError("JPEG image has an unknown marker")
        if at + 2 > end:
            raise MediaError("JPEG image ends before its image data")
        length = _u16be(data, at)
        if length < 2 or at + length > end:
            raise MediaError("JPEG image has a segment of impossible length")
        if marker in _JPEG_FRAMES:
            if length < 7:
                raise MediaError("JPEG image has a truncated frame header")
            # Precision (1 byte), then height and width.
            frames.append((_u16be(data, at + 5), _u16be(data, at + 3)))
        at += length
    else:
        return None
    if not frames:
        raise MediaError("JPEG image has no frame header")
    # libjpeg refuses a second frame header, Pillow takes the last: open.
    return frames[0] if len(frames) == 1 else None


def _gif_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 13:
        raise MediaError("GIF image is truncated")
    width, height, flags = _u16le(data, 6), _u16le(data, 8), data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    first_frame: tuple[int, int, int, int] | None = None
    budget = _MAX_GIF_BLOCKS
    while at < len(data):
        if budget <= 0:
            return None
        block = data[at]
        at += 1
        budget -= 1
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: a label, then sub-blocks
            at, budget = _skip_gif_sub_blocks(data, at + 1, budget)
        elif block == 0x2C:  # image descriptor
            if first_frame is not None:
                return None  # animated
            if at + 9 > len(data):
                raise MediaError("GIF image is truncated")
            first_frame = (_u16le(data, at), _u16le(data, at + 2), _u16le(data, at + 4), _u16le(data, at + 6))
            frame_flags = data[at + 8]
            at += 9 + (3 << ((frame_flags & 7) + 1) if frame_flags & 0x80 else 0)
            at, budget = _skip_gif_sub_blocks(data, at + 1, budget)  # after the LZW code size
        else:
            # giflib refuses an unknown block, Pillow skips it byte by byte and may find a frame
            # in it: refused here, so no frame can hide.
            raise MediaError("GIF image has an unknown block")
    if first_frame is None:
        raise MediaError("GIF image has no frame")
    # A frame that does not exactly cover the logical screen is sized differently by different
    # decoders (the screen, the frame, or both together).
    return (width, height) if first_frame == (0, 0, width, height) else None


def _skip_gif_sub_blocks(data: bytes, at: int, budget: int) -> tuple[int, int]:
    """The position after a run of sub-blocks and the budget left (0 when it ran out first)."""
    while at < len(data) and budget > 0:
        size = data[at]
        at += 1 + size
        budget -= 1
        if size == 0:
            break
    return at, budget


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunks = _riff_chunks(data)
    fourcc, payload = next(chunks, (b"", b""))
    if fourcc != b"VP8X":
        return _webp_bitstream_size(fourcc, payload)
    if len(payload) < 10:
        raise MediaError("WebP image has a truncated header")
    if payload[0] & 0x02:
        return None  # animated
    canvas = (_u24le(payload, 4) + 1, _u24le(payload, 7) + 1)
    for _, (fourcc, payload) in zip(range(_MAX_STEPS), chunks, strict=False):
        if fourcc in (b"VP8 ", b"VP8L"):
            # libwebp refuses a still image whose bitstream and canvas sizes differ.
            return canvas if _webp_bitstream_size(fourcc, payload) == canvas else None
        if not fourcc:
            raise MediaError("WebP image has no image chunk")
    return None


def _riff_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    at = 12
    while at + 8 <= len(data):
        size = _u32le(data, at + 4)
        yield data[at : at + 4], data[at + 8 : at + 8 + size]
        at += 8 + size + (size & 1)
    yield b"", b""  # the end


def _webp_bitstream_size(fourcc: bytes, payload: bytes) -> tuple[int, int]:
    if fourcc == b"VP8 ":
        # A key frame (bit 0 of the frame tag clear), its start code, then 14-bit sizes whose top
        # two bits are a scaling hint that decoders ignore.
        if len(payload) < 10 or payload[0] & 1 or payload[3:6] != b"\x9d\x01\x2a":
            raise MediaError("WebP image has a broken VP8 header")
        return _u16le(payload, 6) & 0x3FFF, _u16le(payload, 8) & 0x3FFF
    if fourcc == b"VP8L":
        if len(payload) < 5 or payload[0] != 0x2F:
            raise MediaError("WebP image has a broken VP8L header")
        bits = _u32le(payload, 1)
        if bits >> 29:
            raise MediaError("WebP image has an unknown VP8L version")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    raise MediaError("WebP image has no image chunk")
