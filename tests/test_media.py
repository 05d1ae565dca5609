"""Media bounds: what an image or a PDF can cost is bounded from above, and hostile bytes give
a MediaError or a sound answer, never another exception."""

from __future__ import annotations

import base64
import contextlib
import io
import math
import random
import struct
import zlib
from collections.abc import Callable
from fractions import Fraction

import pypdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from broker.money.media import (
    ANTHROPIC_MAX_IMAGE_TOKENS,
    ANTHROPIC_PIXELS,
    MAX_SIZED_PIXELS,
    NO_IMAGES,
    OPENAI_COSTLIEST,
    OPENAI_MAX_TILES,
    ImageRule,
    MediaError,
    decode_base64,
    image_size,
    image_tokens,
    parse_data_url,
)
from broker.money.pdf import pdf_pages

GPT_4O = ImageRule("openai-tiles", base_tokens=85, tile_tokens=170)
MB = 1024 * 1024

# Every size of a coarse grid up to 10,000 px, plus the sizes where the rules change their mind.
_EDGES = (1, 2, 200, 511, 512, 513, 750, 767, 768, 769, 1023, 1024, 1025, 1092, 1535, 1536, 1537,
          1567, 1568, 1569, 2047, 2048, 2049, 3071, 3072, 4095, 4096, 4097, 8000, 9999, 10_000)
GRID = sorted({*range(1, 10_001, 97), *_EDGES})
SIZES = [(w, h) for w in GRID for h in GRID]


# --- builders -------------------------------------------------------------------------------


def make_image(fmt: str, size: tuple[int, int], **options: object) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, fmt, **options)
    return out.getvalue()


def make_animation(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:])
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and a correct IHDR (8-bit RGB) declaring ``width`` x ``height``."""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def gif(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF with a 2-colour palette and one tiny LZW stream per frame rectangle."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + bytes(6)
    for frame in frames:
        out += b"," + struct.pack("<HHHHB", *frame, 0) + b"\x02\x02\x4c\x01\x00"
    return out + b";"


def riff(*chunks: tuple[bytes, bytes]) -> bytes:
    body = b"WEBP" + b"".join(
        fourcc + struct.pack("<I", len(data)) + data + b"\0" * (len(data) & 1) for fourcc, data in chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def vp8x(width: int, height: int, flags: int = 0) -> tuple[bytes, bytes]:
    canvas = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"VP8X", bytes([flags, 0, 0, 0]) + canvas


def vp8l(width: int, height: int) -> tuple[bytes, bytes]:
    return b"VP8L", b"\x2f" + struct.pack("<I", (width - 1) | (height - 1) << 14) + bytes(8)


def jpeg(*segments: bytes) -> bytes:
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" + b"\x00" * 8
    return b"\xff\xd8" + b"".join(segments) + scan + b"\xff\xd9"


def sof(width: int, height: int) -> bytes:
    return b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"


def blank_pdf(pages: int, *, user_password: str | None = None, owner_password: str | None = None,
              algorithm: str | None = None) -> bytes:
    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=200, height=200)
    if user_password is not None:
        writer.encrypt(user_password, owner_password, algorithm=algorithm)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def pdf_of(objects: dict[int, bytes] | list[tuple[int, bytes]], *, garble: int = 0) -> bytes:
    """A PDF of numbered objects (object 1 is the catalog) with an xref table naming each
    number's first definition; a list may define a number twice. ``garble`` makes that object's
    xref entry unreadable."""
    definitions = sorted(objects.items()) if isinstance(objects, dict) else objects
    out = bytearray(b"%PDF-1.7\n")
    offsets: dict[int, int] = {}
    for number, body in definitions:
        offsets.setdefault(number, len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    size = max(offsets) + 1
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % size
    for number in range(1, size):
        if number == garble:
            out += b"x" * 18 + b"\r\n"
        else:
            out += b"%010d 00000 n \n" % offsets[number] if number in offsets else b"0000000000 65535 f \n"
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (size, xref)
    return bytes(out)


def pdf_in_object_streams(groups: list[dict[int, bytes]], padding: int = 0) -> bytes:
    """A PDF 1.5 whose objects live in object streams (one per group), found through an xref
    stream; each object stream is padded with ``padding`` spaces, which deflate ~1000:1."""
    out = bytearray(b"%PDF-1.7\n")
    entries: dict[int, tuple[int, int, int]] = {0: (0, 0, 65535)}
    number = max(n for group in groups for n in group) + 1
    for group in groups:
        header, body = b"", b""
        for index, (member, obj) in enumerate(group.items()):
            header += b"%d %d " % (member, len(body))
            body += obj + b"\n"
            entries[member] = (2, number, index)
        packed = zlib.compress(header + b" " * padding + body)
        entries[number] = (1, len(out), 0)
        first = len(header) + padding
        out += (b"%d 0 obj\n<< /Type /ObjStm /N %d /First %d /Length %d /Filter /FlateDecode >>\nstream\n"
                % (number, len(group), first, len(packed)) + packed + b"\nendstream\nendobj\n")
        number += 1
    entries[number] = (1, len(out), 0)
    rows = b"".join(struct.pack(">BIH", *entries.get(n, (0, 0, 0))) for n in range(number + 1))
    out += (b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n"
            % (number, number + 1, len(rows)) + rows + b"\nendstream\nendobj\n")
    out += b"startxref\n%d\n%%%%EOF\n" % entries[number][1]
    return bytes(out)


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"


def catalog_and_pages(kids: str, count: object) -> dict[int, bytes]:
    return {
        1: CATALOG,
        2: b"<< /Type /Pages /Kids [%s] /Count %s >>" % (kids.encode(), str(count).encode()),
    }


PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 200] >>"


# --- OpenAI's tile rule ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [
        pytest.param((1024, 1024), "high", 765, id="1024x1024-high-is-4-tiles"),
        pytest.param((2048, 4096), "high", 1105, id="2048x4096-high-is-6-tiles"),
        pytest.param((1024, 1024), "auto", 765, id="auto-is-billed-as-high"),
        pytest.param((1024, 1024), None, 765, id="no-detail-is-billed-as-high"),
        pytest.param((512, 512), "high", 255, id="512x512-is-one-tile"),
        pytest.param((4096, 8192), "low", 85, id="low-is-the-base-for-a-large-image"),
        pytest.param((1, 1), "low", 85, id="low-is-the-base-for-a-tiny-image"),
        pytest.param(None, "low", 85, id="low-is-the-base-for-an-unknown-size"),
    ],
)
def test_openai_tiles_match_the_published_examples(
        size: tuple[int, int] | None, detail: str | None, tokens: int) -> None:
    assert image_tokens(GPT_4O, size, detail=detail) == tokens


@pytest.mark.parametrize("detail", ["HIGH", "Low", "original", "", "medium"])
def test_openai_unknown_details_are_billed_as_high(detail: str) -> None:
    assert image_tokens(GPT_4O, (1024, 1024), detail=detail) == 765
    assert image_tokens(GPT_4O, None, detail=detail) == 85 + 8 * 170


def test_openai_costliest_rule_is_gpt_4o_minis_figures() -> None:
    assert (OPENAI_COSTLIEST.base_tokens, OPENAI_COSTLIEST.tile_tokens) == (2833, 5667)
    assert image_tokens(OPENAI_COSTLIEST, None) == 2833 + 8 * 5667
    assert image_tokens(OPENAI_COSTLIEST, (1024, 1024), detail="low") == 2833


def test_openai_unknown_size_costs_eight_tiles_which_no_size_exceeds_and_some_reach() -> None:
    unknown = image_tokens(GPT_4O, None)
    assert unknown == 85 + OPENAI_MAX_TILES * 170
    costs = [image_tokens(GPT_4O, size) for size in SIZES]
    assert max(costs) == unknown  # reached, e.g. by 768x2048
    assert image_tokens(GPT_4O, (768, 2048)) == unknown


def test_openai_rounding_of_the_2048_box_cannot_lower_the_bound() -> None:
    # 4001x2000 fits the box as 2048x1023.74. Kept exact (or rounded down) the short side then
    # scales to 768 and the long side to 1536.4: 4 x 2 tiles. Rounded up to 1024 first, the long
    # side would become exactly 1536: 3 x 2 tiles, under what an exact implementation bills.
    assert image_tokens(GPT_4O, (4001, 2000)) == 85 + 8 * 170
    assert image_tokens(GPT_4O, (2000, 4001)) == 85 + 8 * 170


def _tiles_exact(width: int, height: int) -> int:
    w, h = Fraction(width), Fraction(height)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return math.ceil(w / 512) * math.ceil(h / 512)


def _tiles_float(rounding: Callable[[float], int]) -> Callable[[int, int], int]:
    def tiles(width: int, height: int) -> int:
        w, h = float(width), float(height)
        if max(w, h) > 2048:
            ratio = min(2048 / w, 2048 / h)
            w, h = rounding(w * ratio), rounding(h * ratio)
        if min(w, h) > 768:
            ratio = 768 / min(w, h)
            w, h = rounding(w * ratio), rounding(h * ratio)
        return math.ceil(max(w, 1) / 512) * math.ceil(max(h, 1) / 512)
    return tiles


@pytest.mark.parametrize(
    "implementation",
    [
        pytest.param(_tiles_exact, id="exact-arithmetic"),
        pytest.param(_tiles_float(int), id="floats-truncated"),
        pytest.param(_tiles_float(round), id="floats-rounded"),
        pytest.param(_tiles_float(math.ceil), id="floats-rounded-up"),
    ],
)
def test_openai_bound_covers_every_plausible_implementation_of_the_rule(
        implementation: Callable[[int, int], int]) -> None:
    for width, height in SIZES:
        bound = image_tokens(GPT_4O, (width, height))
        assert 85 + 170 * implementation(width, height) <= bound, (width, height)


# --- Anthropic's pixel rule -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        pytest.param((1000, 1000), 1334, id="1000x1000-is-ceil-of-1e6-over-750"),
        pytest.param((200, 200), 54, id="200x200"),
        pytest.param((1092, 1092), 1590, id="1092x1092-largest-square"),
        pytest.param((1, 1), 1, id="a-pixel-is-one-token"),
        pytest.param((4000, 3000), ANTHROPIC_MAX_IMAGE_TOKENS, id="4000x3000-scaled-then-capped"),
        pytest.param((10_000, 10), 5, id="thin-image-scaled-to-1568x2"),
    ],
)
def test_anthropic_pixels_follow_the_documented_rule_and_examples(size: tuple[int, int], tokens: int) -> None:
    assert image_tokens(ANTHROPIC_PIXELS, size) == tokens


def test_anthropic_large_image_is_scaled_to_the_long_edge_before_the_cap() -> None:
    # 4000x3000 scales to 1568x1176 = 2459 tokens, above the cap.
    assert math.ceil(1568 * 1176 / 750) > ANTHROPIC_MAX_IMAGE_TOKENS
    raised = ImageRule("anthropic-pixels", long_edge=1568, token_cap=10_000)
    assert image_tokens(raised, (4000, 3000)) == math.ceil(1568 * 1176 / 750)


@pytest.mark.parametrize("size", [(1092, 1092), (951, 1268), (896, 1344), (819, 1456), (784, 1568)])
def test_anthropic_cap_is_above_every_size_of_anthropics_maximum_size_table(size: tuple[int, int]) -> None:
    exact = math.ceil(size[0] * size[1] / 750)
    assert exact < ANTHROPIC_MAX_IMAGE_TOKENS
    assert image_tokens(ANTHROPIC_PIXELS, size) == exact


def test_anthropic_unknown_size_costs_the_cap_which_no_size_exceeds() -> None:
    assert image_tokens(ANTHROPIC_PIXELS, None) == ANTHROPIC_MAX_IMAGE_TOKENS == 1750
    assert max(image_tokens(ANTHROPIC_PIXELS, size) for size in SIZES) <= ANTHROPIC_MAX_IMAGE_TOKENS


# --- every rule -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1024, 1024), None])
def test_a_model_without_images_refuses_every_image(size: tuple[int, int] | None) -> None:
    with pytest.raises(MediaError, match="accepts no images"):
        image_tokens(NO_IMAGES, size)


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((0, 0), id="zero"),
        pytest.param((0, 5000), id="zero-width"),
        pytest.param((-5, -7), id="negative"),
        pytest.param((-(10**30), 10**30), id="absurdly-negative"),
        pytest.param((10**30, 10**30), id="absurdly-large"),
        pytest.param((1, 10**30), id="absurdly-thin"),
    ],
)
def test_degenerate_sizes_cost_at_least_a_tile_or_a_token_and_at_most_the_maximum(
        size: tuple[int, int]) -> None:
    assert 85 + 170 <= image_tokens(GPT_4O, size) <= image_tokens(GPT_4O, None)
    assert 1 <= image_tokens(ANTHROPIC_PIXELS, size) <= image_tokens(ANTHROPIC_PIXELS, None)


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"kind": "dall-e"}, id="unknown-kind"),
        pytest.param({"kind": "openai-tiles", "base_tokens": -1}, id="negative-base"),
        pytest.param({"kind": "anthropic-pixels", "token_cap": 0}, id="zero-cap"),
    ],
)
def test_image_rules_refuse_nonsense_configuration(arguments: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ImageRule(**arguments)  # type: ignore[arg-type]


# --- base64 and data URLs -------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"A", b"AB", b"ABC", b"ABCD", bytes(range(256))])
def test_base64_decodes_with_or_without_padding(payload: bytes) -> None:
    padded = base64.b64encode(payload).decode()
    assert decode_base64(padded, max_bytes=256) == payload
    assert decode_base64(padded.rstrip("="), max_bytes=256) == payload


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("", id="empty"),
        pytest.param("-_-_", id="url-safe-alphabet"),
        pytest.param("QUJD\nRA==", id="line-break"),
        pytest.param(" QUJD", id="leading-space"),
        pytest.param("QUJD RA==", id="inner-space"),
        pytest.param("QUJDRA=", id="partial-padding"),
        pytest.param("QQ==QQ==", id="data-after-padding"),
        pytest.param("=QUJ", id="leading-padding"),
        pytest.param("QUJDR", id="one-character-too-many"),
        pytest.param("QUJDé===", id="non-ascii"),
        pytest.param("<svg/>", id="not-base64-at-all"),
    ],
)
def test_base64_refuses_anything_but_the_standard_alphabet(data: str) -> None:
    with pytest.raises(MediaError):
        decode_base64(data, max_bytes=1000)


def test_base64_refuses_more_than_max_bytes() -> None:
    assert decode_base64(base64.b64encode(bytes(300)).decode(), max_bytes=300) == bytes(300)
    with pytest.raises(MediaError, match="larger than 299 bytes"):
        decode_base64(base64.b64encode(bytes(300)).decode(), max_bytes=299)
    with pytest.raises(MediaError, match="larger than"):
        decode_base64("A" * 10_000_000, max_bytes=MB)  # refused before decoding


def test_data_url_gives_the_media_type_and_the_bytes() -> None:
    png = make_image("PNG", (3, 2))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert parse_data_url(url, max_bytes=MB) == ("image/png", png)


def test_data_url_media_type_is_lower_cased_and_the_scheme_is_case_blind() -> None:
    assert parse_data_url("DATA:Image/PNG;BASE64,QUJD", max_bytes=10) == ("image/png", b"ABC")
    assert parse_data_url("data:application/pdf;base64,QUJD", max_bytes=10) == ("application/pdf", b"ABC")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("https://example.com/cat.png", id="not-a-data-url"),
        pytest.param("dat:image/png;base64,QUJD", id="wrong-prefix"),
        pytest.param(" data:image/png;base64,QUJD", id="leading-space"),
        pytest.param("data:image/png;base64QUJD", id="missing-comma"),
        pytest.param("data:image/png,ABC", id="not-base64-encoded"),
        pytest.param("data:image/png;base64,QUJD*", id="not-base64"),
        pytest.param("data:image/png;charset=utf-8;base64,QUJD", id="media-type-parameters"),
        pytest.param("data:;base64,QUJD", id="no-media-type"),
        pytest.param("data:image;base64,QUJD", id="no-subtype"),
        pytest.param("data:image/png;base64,", id="no-data"),
        pytest.param("data:" + "x" * 400 + "/png;base64,QUJD", id="absurd-media-type"),
        pytest.param("data:image/png;base64," + "A" * 1000, id="too-large"),
    ],
)
def test_data_url_refuses_anything_else(url: str) -> None:
    with pytest.raises(MediaError):
        parse_data_url(url, max_bytes=100)


# --- image sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
@pytest.mark.parametrize("size", [(1, 1), (200, 200), (1024, 768), (3, 4000), (4000, 3)])
def test_image_size_is_what_pillow_reads(fmt: str, size: tuple[int, int]) -> None:
    data = make_image(fmt, size)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == size
    assert image_size(data) == size


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"lossless": True}, id="lossless-VP8L"),
        pytest.param({"quality": 50}, id="lossy-VP8"),
        pytest.param({"exif": b"Exif\0\0MM\0*\0\0\0\x08\0\0"}, id="extended-VP8X"),
    ],
)
def test_webp_size_is_read_from_every_kind_of_webp(options: dict[str, object]) -> None:
    assert image_size(make_image("WEBP", (300, 200), **options)) == (300, 200)


def test_large_noisy_gif_is_measured_to_its_end() -> None:
    noise = Image.frombytes("L", (1500, 1500), random.Random(0).randbytes(1500 * 1500))
    out = io.BytesIO()
    noise.save(out, "GIF")
    assert len(out.getvalue()) > MB  # thousands of sub-blocks
    assert image_size(out.getvalue()) == (1500, 1500)


def test_jpeg_size_ignores_exif_orientation_because_both_rules_are_symmetric() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    data = make_image("JPEG", (300, 100), exif=exif.tobytes())
    assert image_size(data) == (300, 100)
    for rule in (GPT_4O, ANTHROPIC_PIXELS):
        assert image_tokens(rule, (300, 100)) == image_tokens(rule, (100, 300))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_have_an_unknown_size(fmt: str) -> None:
    assert image_size(make_animation(fmt)) is None


def test_animated_png_has_its_canvas_size() -> None:
    assert image_size(make_animation("PNG")) == (40, 30)


def test_decompression_bomb_header_is_read_without_pixels_and_held_at_the_maximum() -> None:
    bomb = png_header(100_000, 100_000) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    size = image_size(bomb)  # returns at all: no 40 GB of pixels were allocated
    assert size is None
    for rule in (OPENAI_COSTLIEST, GPT_4O, ANTHROPIC_PIXELS):
        assert image_tokens(rule, size) == image_tokens(rule, None)


def test_sizes_up_to_the_pixel_limit_are_known_and_above_it_unknown() -> None:
    side = math.isqrt(MAX_SIZED_PIXELS)
    assert image_size(png_header(side, side)) == (side, side)
    assert image_size(png_header(side + 1, side + 1)) is None


_PNG = make_image("PNG", (20, 10))
_JPEG = make_image("JPEG", (20, 10))
_GIF = make_image("GIF", (20, 10))
_WEBP = make_image("WEBP", (20, 10), lossless=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # Not an accepted format.
        pytest.param(b"", MediaError, id="zero-bytes"),
        pytest.param(bytes(range(256)) * 4, MediaError, id="random-bytes"),
        pytest.param(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', MediaError, id="svg"),
        pytest.param(make_image("BMP", (20, 10)), MediaError, id="bmp"),
        pytest.param(make_image("TIFF", (20, 10)), MediaError, id="tiff"),
        pytest.param(b"%PDF-1.4\n", MediaError, id="pdf"),
        # PNG
        pytest.param(_PNG[:20], MediaError, id="png-truncated-header"),
        pytest.param(_PNG[:8] + png_chunk(b"tEXt", b"a\0b") + _PNG[8:], MediaError, id="png-ihdr-not-first"),
        pytest.param(png_header(0, 10), None, id="png-zero-width"),
        pytest.param(png_header(2**32 - 1, 2**32 - 1), None, id="png-absurd-size"),
        pytest.param(png_header(20, 10) + png_header(9000, 9000)[8:], None, id="png-second-ihdr"),
        pytest.param(png_header(20, 10) + struct.pack(">I", 2**32 - 1) + b"tEXt", (20, 10),
                     id="png-absurd-chunk"),
        pytest.param(_PNG[:40], (20, 10), id="png-truncated-after-header"),
        # JPEG
        pytest.param(b"\xff\xd8\xff", MediaError, id="jpeg-signature-only"),
        pytest.param(_JPEG[: _JPEG.index(b"\xff\xda")], MediaError, id="jpeg-without-scan"),
        pytest.param(jpeg(), MediaError, id="jpeg-without-frame"),
        pytest.param(jpeg(sof(20, 10)), (20, 10), id="jpeg-minimal"),
        pytest.param(jpeg(b"\xff\xe0\x00\x04ab", b"junk\xff\x00", sof(20, 10)), (20, 10),
                     id="jpeg-junk-before-a-marker"),
        pytest.param(jpeg(sof(20, 10), sof(9000, 9000)), None, id="jpeg-two-frames"),
        pytest.param(jpeg(sof(20, 0)), None, id="jpeg-height-in-dnl"),
        pytest.param(jpeg(b"\xff\x02\x00\x04ab", sof(20, 10)), MediaError, id="jpeg-reserved-marker"),
        pytest.param(jpeg(b"\xff\xe1\x00\x01", sof(20, 10)), MediaError, id="jpeg-segment-length-1"),
        pytest.param(jpeg(b"\xff\xe1\xff\xff"), MediaError, id="jpeg-segment-past-the-end"),
        pytest.param(jpeg(b"\xff\xc0\x00\x04ab"), MediaError, id="jpeg-truncated-frame"),
        pytest.param(jpeg(b"\xff\xd9", sof(20, 10)), MediaError, id="jpeg-ends-before-frame"),
        # GIF
        pytest.param(_GIF[:10], MediaError, id="gif-truncated-header"),
        pytest.param(gif((20, 10), []), MediaError, id="gif-without-frame"),
        pytest.param(gif((20, 10), [(0, 0, 20, 10)]), (20, 10), id="gif-minimal"),
        pytest.param(gif((20, 10), [(0, 0, 9000, 9000)]), None, id="gif-frame-beyond-the-screen"),
        pytest.param(gif((2000, 2000), [(0, 0, 768, 2000)]), None, id="gif-frame-inside-the-screen"),
        pytest.param(gif((65535, 65535), [(0, 0, 65535, 65535)]), None, id="gif-bomb"),
        pytest.param(gif((20, 10), [(0, 0, 20, 10)])[:-1] + b"?", MediaError, id="gif-unknown-block"),
        pytest.param(gif((20, 10), [(0, 0, 20, 10)])[:-1], (20, 10), id="gif-without-trailer"),
        pytest.param(gif((20, 10), [(0, 0, 20, 10)])[:22], MediaError, id="gif-truncated-descriptor"),
        # WebP
        pytest.param(_WEBP[:16], MediaError, id="webp-truncated-header"),
        pytest.param(riff(), MediaError, id="webp-without-chunks"),
        pytest.param(riff((b"VP8 ", bytes(10))), MediaError, id="webp-broken-vp8"),
        pytest.param(riff((b"VP8L", b"\x00" * 5)), MediaError, id="webp-broken-vp8l"),
        pytest.param(riff((b"ALPH", b"")), MediaError, id="webp-no-image-chunk"),
        pytest.param(riff(vp8x(20, 10), vp8l(20, 10)), (20, 10), id="webp-extended"),
        pytest.param(riff(vp8x(20, 10, flags=0x02)), None, id="webp-animated-flag"),
        pytest.param(riff(vp8x(20, 10), vp8l(9000, 9000)), None, id="webp-canvas-differs-from-image"),
        pytest.param(riff(vp8x(2**24, 2**24), vp8l(16384, 16384)), None, id="webp-bomb"),
        pytest.param(riff(vp8x(20, 10)), MediaError, id="webp-extended-without-image"),
        pytest.param(riff(vp8x(20, 10))[:-4], MediaError, id="webp-truncated-extended-header"),
        # Structures far longer than real images have: given up as unknown, quickly.
        pytest.param(png_header(20, 10) + png_chunk(b"tEXt", b"") * 20_000 + png_chunk(b"IDAT", b""),
                     None, id="png-flood-of-chunks"),
        pytest.param(jpeg(b"\xff\xfe\x00\x02" * 20_000, sof(20, 10)), None, id="jpeg-flood-of-segments"),
        pytest.param(jpeg(b"\xff\x00" * 20_000, sof(20, 10)), None, id="jpeg-flood-of-stuffed-bytes"),
        pytest.param(gif((20, 10), [])[:-1] + b"!\xfe" + b"\x01a" * 200_000 + b"\x00"
                     + gif((20, 10), [(0, 0, 20, 10)])[19:], None, id="gif-flood-of-sub-blocks"),
        pytest.param(riff(vp8x(20, 10), *[(b"JUNK", b"")] * 20_000, vp8l(20, 10)), None,
                     id="webp-flood-of-chunks"),
    ],
)
def test_hostile_images_give_a_media_error_or_a_sound_size(
        data: bytes, expected: type[MediaError] | tuple[int, int] | None) -> None:
    if expected is MediaError:
        with pytest.raises(MediaError):
            image_size(data)
    else:
        assert image_size(data) == expected


_SIGNATURES = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"%PDF-1.7\n", b"data:"]
_SAMPLES = [_PNG, _JPEG, _GIF, _WEBP, make_animation("GIF"), make_animation("WEBP"), blank_pdf(3)]


@st.composite
def _hostile_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, random bytes behind a real signature, or a real file with bytes changed."""
    kind = draw(st.sampled_from(["random", "signed", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "signed":
        return draw(st.sampled_from(_SIGNATURES)) + draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at : at + 1] = draw(st.binary(min_size=0, max_size=4))
        if not data:
            break
    return bytes(data)


_FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(_hostile_bytes())
def test_image_size_lets_only_media_errors_escape(data: bytes) -> None:
    try:
        size = image_size(data)
    except MediaError:
        return
    assert size is None or (size[0] >= 1 and size[1] >= 1 and size[0] * size[1] <= MAX_SIZED_PIXELS)


@_FUZZ
@given(_hostile_bytes())
def test_pdf_pages_lets_only_media_errors_escape(data: bytes) -> None:
    try:
        pages = pdf_pages(data)
    except MediaError:
        return
    assert 0 <= pages <= 1000


@_FUZZ
@given(st.one_of(
    st.text(max_size=300),
    st.text(max_size=300).map(lambda tail: "data:image/png;base64," + tail),
    _hostile_bytes().map(lambda raw: "data:image/png;base64," + base64.b64encode(raw).decode()),
))
def test_data_urls_let_only_media_errors_escape(url: str) -> None:
    try:
        media_type, data = parse_data_url(url, max_bytes=1000)
    except MediaError:
        return
    assert media_type == media_type.lower() and 0 < len(data) <= 1000


# --- PDF pages ------------------------------------------------------------------------------


@pytest.mark.parametrize("pages", [1, 3, 50])
def test_pdf_pages_counts_a_real_pdf(pages: int) -> None:
    assert pdf_pages(blank_pdf(pages)) == pages


def test_pdf_without_pages_has_none() -> None:
    assert pdf_pages(blank_pdf(0)) == 0


def test_pdf_above_max_pages_is_refused() -> None:
    assert pdf_pages(blank_pdf(50), max_pages=50) == 50
    with pytest.raises(MediaError, match="more than 49 pages"):
        pdf_pages(blank_pdf(50), max_pages=49)


@pytest.mark.parametrize("algorithm", ["RC4-128", "AES-128", "AES-256"])
def test_pdf_encrypted_with_an_empty_user_password_is_counted(algorithm: str) -> None:
    # Providers open these too: only the owner password (permissions) is set.
    assert pdf_pages(blank_pdf(3, user_password="", owner_password="owner", algorithm=algorithm)) == 3


def test_pdf_that_needs_a_password_is_refused() -> None:
    with pytest.raises(MediaError, match="needs a password"):
        pdf_pages(blank_pdf(3, user_password="secret", algorithm="AES-256"))


def _garbage_xref(pdf: bytes) -> bytes:
    """``pdf`` with the first two entries of its xref table overwritten."""
    start = pdf.index(b"\nxref\n0 ") + len(b"\nxref\n0 7\n")
    return pdf[:start] + b"x" * 40 + pdf[start + 40:]


_THREE = blank_pdf(3)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="zero-bytes"),
        pytest.param(b"%PDF-1.4", id="header-only"),
        pytest.param(b"%PDF-1.4\n%%EOF\n", id="header-and-eof"),
        pytest.param(_THREE.replace(b"startxref", b"startxref\n999999999\n"), id="startxref-out-of-range"),
        pytest.param(_THREE[: len(_THREE) // 2], id="truncated"),
        pytest.param(b" " + _THREE, id="junk-before-the-header"),
        pytest.param(b"<html><body>%PDF-1.4</body></html>", id="html"),
        pytest.param(make_image("PNG", (20, 10)), id="png"),
        pytest.param(pdf_of({1: b"<< /Type /Catalog >>"}), id="no-page-tree"),
        pytest.param(pdf_of({1: CATALOG, 2: b"42"}), id="page-tree-not-a-dictionary"),
        pytest.param(pdf_of({**catalog_and_pages("3 0 R", 1), 3: b"(a string)"}), id="kid-not-a-dictionary"),
        pytest.param(pdf_of({1: CATALOG, 2: b"<< /Type /Pages /Kids 3 0 R /Count 1 >>", 3: b"42"}),
                     id="kids-not-an-array"),
        pytest.param(pdf_of({**catalog_and_pages("3 0 R", 1), 3: b"<< /Type /Page /Kids [] >>"}),
                     id="page-with-kids"),
        pytest.param(pdf_of({**catalog_and_pages("3 0 R", 1), 3: b"<< /Type /Pages >>"}),
                     id="branch-without-kids"),
        pytest.param(pdf_of({**catalog_and_pages("3 0 R", 1), 3: b"<< /Type /Font >>"}),
                     id="kid-of-another-type"),
        pytest.param(pdf_of(catalog_and_pages("2 0 R", 1)), id="cycle"),
        pytest.param(pdf_of({**catalog_and_pages("3 0 R 3 0 R", 2), 3: b"<< /Type /Pages /Kids [4 0 R] >>",
                             4: PAGE}), id="shared-subtree"),
        pytest.param(pdf_of({
            1: b"<< /Type /Catalog /Pages 2 0 R >>",
            **{n: b"<< /Type /Pages /Kids [%d 0 R] >>" % (n + 1) for n in range(2, 102)},
            102: PAGE,
        }), id="deeper-than-64"),
    ],
)
def test_hostile_pdfs_give_a_media_error(data: bytes) -> None:
    with pytest.raises(MediaError):
        pdf_pages(data)


@pytest.mark.parametrize(
    ("objects", "pages"),
    [
        pytest.param({**catalog_and_pages("3 0 R 4 0 R", 2), 3: PAGE, 4: PAGE}, 2, id="honest"),
        pytest.param({**catalog_and_pages("3 0 R 3 0 R 3 0 R", 1), 3: PAGE}, 3, id="page-listed-thrice"),
        pytest.param({**catalog_and_pages("3 0 R 4 0 R 5 0 R", 1), 3: PAGE, 4: PAGE, 5: PAGE}, 3,
                     id="root-count-lies-low-the-leaves-win"),
        pytest.param({**catalog_and_pages("3 0 R", 500), 3: PAGE}, 500,
                     id="root-count-lies-high-mupdf-reads-it"),
        pytest.param({**catalog_and_pages("3 0 R", 0), 3: b"<< /Kids [4 0 R] /Count 999 >>", 4: PAGE}, 999,
                     id="inner-count-lies-high-pdfium-reads-it"),
        pytest.param({**catalog_and_pages("3 0 R", 1), 3: b"<< /MediaBox [0 0 9 9] >>"}, 1,
                     id="untyped-page"),
        pytest.param({**catalog_and_pages("3 0 R", 1), 3: b"<< /Kids [4 0 R 5 0 R] >>", 4: PAGE, 5: PAGE}, 2,
                     id="untyped-branch"),
        pytest.param({**catalog_and_pages("<< /Type /Page >> << /Type /Page >>", 2)}, 2, id="inline-kids"),
        pytest.param({**catalog_and_pages("3 0 R", 2.5), 3: PAGE}, 3, id="fractional-count-rounds-up"),
        pytest.param({**catalog_and_pages("3 0 R", "/Nonsense"), 3: PAGE}, 1, id="count-not-a-number"),
    ],
)
def test_pdf_page_count_covers_every_readers_reading_of_the_page_tree(
        objects: dict[int, bytes], pages: int) -> None:
    assert pdf_pages(pdf_of(objects)) == pages


@pytest.mark.parametrize(
    "refuse",
    [
        pytest.param(lambda: decode_base64("SECRET*SECRET", max_bytes=100), id="base64"),
        pytest.param(lambda: parse_data_url("data:image/png;base64,SECRET*", max_bytes=100), id="data-url"),
        pytest.param(lambda: image_size(b"\xff\xd8\xff\x02SECRET"), id="image"),
        pytest.param(lambda: pdf_pages(pdf_of({1: CATALOG, 2: b"<< /Kids [/SECRET (SECRET) SECRET] >>"})),
                     id="pdf-parse-error"),
        pytest.param(lambda: pdf_pages(b"%PDF-1.7\nSECRET" * 10), id="pdf-garbage"),
    ],
)
def test_media_errors_never_quote_the_payload(refuse: Callable[[], object]) -> None:
    with pytest.raises(MediaError) as refused:
        refuse()
    assert "SECRET" not in str(refused.value)
    # Nor does a chained library exception, whose message might.
    assert refused.value.__cause__ is None
    assert refused.value.__context__ is None or refused.value.__suppress_context__


def test_pdf_with_a_garbage_xref_is_refused_or_counted_right() -> None:
    # pypdf's strict mode still repairs an unreadable xref entry when the object is in the file.
    with contextlib.suppress(MediaError):
        assert pdf_pages(_garbage_xref(_THREE)) == 3


def test_pdf_updated_by_appending_counts_its_latest_page_tree() -> None:
    writer = pypdf.PdfWriter(pypdf.PdfReader(io.BytesIO(_THREE)), incremental=True)
    writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    updated = out.getvalue()
    assert updated.startswith(_THREE) and updated.count(b"\n2 0 obj") == 2  # the page tree, twice
    assert pdf_pages(updated) == 4


# A page tree of one page at object 2, then a second object 2 of 500 pages: a reader that
# rebuilds the xref takes the last definition.
_TWO_PAGE_TREES = [(1, CATALOG), (2, catalog_and_pages("3 0 R", 1)[2]), (3, PAGE),
                   (2, catalog_and_pages("3 0 R", 500)[2])]
_BIG_TREE = b"2 0 obj\n" + catalog_and_pages("3 0 R", 500)[2] + b"\nendobj\n"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(pdf_of(_TWO_PAGE_TREES, garble=2), id="broken-xref-entry-repaired-to-the-first"),
        pytest.param(pdf_of(_TWO_PAGE_TREES), id="xref-names-the-first-of-two"),
        pytest.param(pdf_in_object_streams([catalog_and_pages("3 0 R", 1), {3: PAGE}])
                     .replace(b"startxref", _BIG_TREE + b"startxref"),
                     id="object-stream-member-also-defined-in-the-file"),
    ],
)
def test_pdf_page_tree_that_readers_could_resolve_differently_is_refused(data: bytes) -> None:
    with pytest.raises(MediaError, match=r"page tree (object twice|names an object its xref does not have)"):
        pdf_pages(data)


def test_pdf_page_count_lie_above_max_pages_is_refused() -> None:
    with pytest.raises(MediaError, match="more than 1000 pages"):
        pdf_pages(pdf_of({**catalog_and_pages("3 0 R", 10**9), 3: PAGE}))


def _page_tree_in_object_streams(pages: int, padding: int) -> bytes:
    """Catalog and page tree in one object stream, each page in an object stream of its own."""
    kids = " ".join(f"{n} 0 R" for n in range(3, 3 + pages))
    return pdf_in_object_streams(
        [catalog_and_pages(kids, pages)] + [{n: PAGE} for n in range(3, 3 + pages)], padding=padding)


def test_pdf_in_object_streams_is_counted() -> None:
    assert pdf_pages(_page_tree_in_object_streams(20, padding=1000)) == 20


def test_pdf_page_tree_spread_over_inflating_object_streams_is_refused() -> None:
    # 20 object streams of 1 MB each once inflated, from a file of a few dozen KB.
    bomb = _page_tree_in_object_streams(20, padding=MB)
    assert len(bomb) < 100_000
    with pytest.raises(MediaError, match="too much decompression"):
        pdf_pages(bomb)


def test_pdf_stream_inflating_beyond_the_stream_limit_is_refused() -> None:
    with pytest.raises(MediaError, match="LimitReachedError"):
        pdf_pages(_page_tree_in_object_streams(1, padding=8 * MB))
