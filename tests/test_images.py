"""load_image and the sample pictures: a catalog of formats, inputs and broken files."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pullback_widgets as pw
from pullback_widgets import SAMPLE_IMAGES, load_image, sample_image
from pullback_widgets.images import _open_pil, _png_raw_size, sample_image_array
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError

RED = (1.0, 0.0, 0.0)
WHITE = (1.0, 1.0, 1.0)


def check_output(x: torch.Tensor, size: int = 224) -> None:
    assert x.shape == (1, 3, size, size)
    assert x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1


def colour_of(x: torch.Tensor) -> tuple[float, ...]:
    """The colour of a uniform output image (asserts it is uniform), as an approx for ==."""
    flat = x[0].reshape(3, -1)
    assert torch.allclose(flat, flat[:, :1], atol=1e-6)
    return pytest.approx(tuple(flat[:, 0].tolist()), abs=1e-6)


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG file claiming ``width`` x ``height`` 1-bit pixels: a decompression bomb's
    header without the bomb (the pixel data is empty, so decoding it would fail anyway)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def saved(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.fixture
def picture() -> np.ndarray:
    """A small non-square uint8 RGB picture with structure (gradients and a block)."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    array[5:15, 10:30] = (255, 0, 0)
    return array


# --------------------------------------------------------------------------- input kinds


def test_every_input_kind_gives_the_same_tensor(picture: np.ndarray, tmp_path: Path) -> None:
    pil = Image.fromarray(picture)
    path = saved(pil, tmp_path / "picture.png")
    encoded = path.read_bytes()
    chw = torch.from_numpy(picture).permute(2, 0, 1)
    reference = load_image(picture)
    check_output(reference)
    sources = {
        "str path": str(path),
        "Path": path,
        "bytes": encoded,
        "bytearray": bytearray(encoded),
        "memoryview": memoryview(encoded),
        "PIL": pil,
        "float array": picture.astype(np.float64) / 255,
        "uint8 tensor (3,H,W)": chw,
        "uint8 tensor (1,3,H,W)": chw[None],
        "float tensor": chw.float() / 255,
        "tensor needing grad": (chw.float() / 255).requires_grad_(),
    }
    for what, src in sources.items():
        out = load_image(src)
        check_output(out)
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-6, msg=what)
        assert not out.requires_grad


GRAY = 128 / 255


@pytest.mark.parametrize(
    ("array", "level"),
    [
        (np.full((9, 7), 128, np.uint8), GRAY),
        (np.full((9, 7, 1), 128, np.uint8), GRAY),
        (np.full((9, 7), 128 * 257, np.uint16), GRAY),
        (np.full((9, 7), GRAY, np.float32), GRAY),
        (np.full((9, 7, 3), 0.5, np.float16), 0.5),
    ],
    ids=["HxW uint8", "HxWx1", "uint16", "float32", "float16 RGB"],
)
def test_gray_array_shapes_and_dtypes(array: np.ndarray, level: float) -> None:
    out = load_image(array)
    check_output(out)
    assert colour_of(out) == (level,) * 3


def test_bool_inputs() -> None:
    mask = np.zeros((8, 8), bool)
    assert colour_of(load_image(mask)) == (0.0, 0.0, 0.0)
    assert colour_of(load_image(torch.ones(8, 8, dtype=torch.bool))) == WHITE


@pytest.mark.parametrize("shape", [(6, 5), (1, 6, 5), (3, 6, 5), (1, 3, 6, 5)])
def test_tensor_shapes(shape: tuple[int, ...]) -> None:
    out = load_image(torch.full(shape, 0.25))
    check_output(out)
    assert colour_of(out) == (0.25,) * 3


def test_rgba_array_is_composited_on_white() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    assert colour_of(load_image(rgba)) == WHITE
    rgba[..., 3] = 255  # red, opaque
    assert colour_of(load_image(rgba)) == RED


@pytest.mark.parametrize("size", [1, 32, 299])
def test_output_size(picture: np.ndarray, size: int) -> None:
    check_output(load_image(picture, size=size), size)


# --------------------------------------------------------------------------- the transform


def test_resize_shorter_side_then_centre_crop() -> None:
    # A 400 x 200 (W x H) picture: left quarter black, the rest white. The shorter side goes
    # to 256, the width to 512, and the centre 224 crop starts at x = 144, past the black.
    array = np.full((200, 400), 255, np.uint8)
    array[:, :100] = 0
    assert colour_of(load_image(array)) == WHITE
    # Conversely the crop must not start at the left edge.
    array[:, :] = 255
    array[:, 190:210] = 0
    out = load_image(array)
    assert out[0, :, :, 112].max() < 0.01  # the black stripe lands in the middle


def test_bicubic_overshoot_is_clamped() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    check_output(load_image(checker, size=40), 40)


def test_one_pixel_image_is_upsampled() -> None:
    out = load_image(np.array([[[255, 0, 0]]], np.uint8))
    check_output(out)
    assert colour_of(out) == RED


def test_extreme_aspect_ratio_stays_small_and_fast() -> None:
    strip = np.zeros((2, 2_000_000), np.uint8)
    strip[:, 1_000_000:] = 255
    out = load_image(strip)
    check_output(out)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, -1] == 1  # centred on the edge


# --------------------------------------------------------------------------- file formats


def test_grayscale_png(tmp_path: Path) -> None:
    path = saved(Image.new("L", (20, 10), 64), tmp_path / "gray.png")
    assert colour_of(load_image(path)) == (64 / 255,) * 3


def test_one_bit_png(tmp_path: Path) -> None:
    path = saved(Image.new("1", (20, 10), 1), tmp_path / "bits.png")
    assert colour_of(load_image(path)) == WHITE


def test_rgba_png(tmp_path: Path) -> None:
    clear = saved(Image.new("RGBA", (16, 16), (255, 0, 0, 0)), tmp_path / "clear.png")
    opaque = saved(Image.new("RGBA", (16, 16), (255, 0, 0, 255)), tmp_path / "opaque.png")
    assert colour_of(load_image(clear)) == WHITE
    assert colour_of(load_image(opaque)) == RED


def test_la_png(tmp_path: Path) -> None:
    path = saved(Image.new("LA", (16, 16), (0, 0)), tmp_path / "la.png")
    assert colour_of(load_image(path)) == WHITE


def test_palette_png(tmp_path: Path) -> None:
    img = Image.new("P", (16, 16), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    assert colour_of(load_image(saved(img, tmp_path / "palette.png"))) == RED
    # with index 1 transparent
    see_through = saved(img, tmp_path / "palette_clear.png", transparency=1)
    assert colour_of(load_image(see_through)) == WHITE


def test_cmyk_tiff(tmp_path: Path) -> None:
    path = saved(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.tiff")
    assert colour_of(load_image(path)) == RED


def test_16_bit_png_keeps_its_precision(tmp_path: Path) -> None:
    value = 1000  # 8 bits would give 4 / 255 = 0.0157 instead of 0.0153
    img = Image.fromarray(np.full((12, 10), value, np.uint16))
    path = saved(img, tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    out = load_image(path)
    torch.testing.assert_close(out, torch.full_like(out, value / 65535), rtol=0, atol=1e-7)


def test_big_endian_16_bit_array() -> None:
    out = load_image(np.full((5, 5), 1000, ">u2"))
    torch.testing.assert_close(out, torch.full_like(out, 1000 / 65535), rtol=0, atol=1e-7)


def test_32_bit_integer_and_float_pil_images() -> None:
    out = load_image(Image.fromarray(np.full((4, 4), 1000, np.int32)))
    torch.testing.assert_close(out, torch.full_like(out, 1000 / 65535), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="65535"):
        load_image(Image.fromarray(np.full((4, 4), 70000, np.int32)))
    assert colour_of(load_image(Image.fromarray(np.full((4, 4), 0.5, np.float32)))) == (0.5,) * 3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(Image.fromarray(np.full((4, 4), 2.0, np.float32)))


def test_jpeg_and_exif_orientation(tmp_path: Path) -> None:
    # Stored 80 wide x 40 high, top half red, bottom half blue; orientation 6 means "rotate
    # 90 degrees clockwise to display", which puts red on the right and blue on the left.
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:20, :, 0] = 255
    stored[20:, :, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(Image.fromarray(stored), tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_image(path)
    check_output(out)
    left, right = out[0, :, 112, 5], out[0, :, 112, -5]
    assert left[2] > 0.9 and left[0] < 0.1
    assert right[0] > 0.9 and right[2] < 0.1


# --------------------------------------------------------------------------- size guards


def test_bomb_header_over_max_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(8000, 8000))  # 64 Mpx > 50 Mpx default, a 60-byte file
    with pytest.raises(ValueError, match="max_pixels=50000000"):
        load_image(path)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(path.read_bytes())
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(Image.open(path))  # lazily opened: refused before load()


def test_bomb_in_pillows_warning_zone_raises_without_warnings(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(10_000, 10_000))  # over Pillow's 89 Mpx warning threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="max_pixels"):
            load_image(path)


def test_bomb_past_pillows_own_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(20_000, 20_000))  # Pillow itself refuses this one
    with pytest.raises(ValueError, match="max_pixels") as info:
        load_image(path, max_pixels=10**9)
    assert "\n" not in str(info.value)


def test_small_max_pixels(picture: np.ndarray, tmp_path: Path) -> None:
    path = saved(Image.fromarray(picture), tmp_path / "picture.png")
    chw = torch.from_numpy(picture).permute(2, 0, 1)
    for src in (path, Image.fromarray(picture), picture, chw):
        with pytest.raises(ValueError, match="max_pixels=100"):
            load_image(src, max_pixels=100)
    check_output(load_image(picture, max_pixels=30 * 40))


# --------------------------------------------------------------------------- broken input


def test_truncated_jpeg(picture: np.ndarray, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(picture).resize((200, 150)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="could not read") as info:
        load_image(path)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture\n")
    with pytest.raises(ValueError, match="could not read"):
        load_image(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="not found"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("data", [b"", b"\x89PNG garbage", b"\xff\xd8\xff" + b"\0" * 50])
def test_bad_bytes(data: bytes) -> None:
    with pytest.raises(ValueError):
        load_image(data)


@pytest.mark.parametrize(
    "src",
    [
        np.full((4, 4, 3), np.nan, np.float32),
        torch.tensor([[0.5, float("inf")], [0.0, 1.0]]),
        np.array([[0.0, 1.5]]),
        torch.full((3, 4, 4), -0.1),
    ],
    ids=["nan array", "inf tensor", "array > 1", "tensor < 0"],
)
def test_bad_float_values(src) -> None:
    with pytest.raises(ValueError, match=r"NaN|\[0, 1\]"):
        load_image(src)


@pytest.mark.parametrize(
    "src",
    [
        np.zeros(10, np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((0, 4, 3), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        torch.zeros(4, 4, 3),
        torch.zeros(2, 3, 4, 4),
        torch.zeros(5),
    ],
    ids=["1-D", "2 channels", "empty", "4-D array", "HxWx3 tensor", "batch of 2", "1-D tensor"],
)
def test_bad_shapes(src) -> None:
    with pytest.raises(ValueError):
        load_image(src)


@pytest.mark.parametrize(
    "src",
    [
        np.zeros((4, 4), np.int64),
        np.zeros((4, 4), np.complex64),
        torch.zeros(4, 4, dtype=torch.int32),
        None,
        [[0.0, 1.0]],
        42,
    ],
    ids=["int64 array", "complex array", "int32 tensor", "None", "list", "int"],
)
def test_bad_types(src) -> None:
    with pytest.raises(TypeError):
        load_image(src)


def test_bad_size_arguments(picture: np.ndarray) -> None:
    for size in (2.5, "224", True):
        with pytest.raises(TypeError, match="size"):
            load_image(picture, size=size)
    with pytest.raises(ValueError, match="size"):
        load_image(picture, size=0)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(picture, max_pixels=0)
    with pytest.raises(TypeError, match="max_pixels"):
        load_image(picture, max_pixels=1e9)


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("name", SAMPLE_IMAGES)
def test_sample_images(name: str) -> None:
    array = sample_image_array(name)
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    check_output(sample_image(name))
    check_output(sample_image(name, size=64), 64)


def test_unknown_sample_name() -> None:
    with pytest.raises(ValueError, match="did you mean 'chelsea'"):
        sample_image("chelsee")
    with pytest.raises(PullbackWidgetsError, match=r"must be one of .*chelsea.*lena"):
        sample_image_array("lena")
    with pytest.raises(TypeError, match="name"):
        sample_image(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PNG data check

LIBPNG_INTERLACED_EXAMPLE = Path("/usr/share/doc/libpng-dev/examples/pngtest.png")


def _png_pixel_bytes(data: bytes) -> tuple[bytes, int]:
    """(IHDR body, length of the decompressed IDAT stream) of a PNG, read the slow way."""
    position, header, idat = 8, b"", b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        position += 12 + length
    return header, len(zlib.decompress(idat))


@pytest.mark.parametrize(("mode", "bits"), [("1", None), ("L", None), ("LA", None),
                                            ("RGB", None), ("RGBA", None), ("P", None),
                                            ("P", 1), ("P", 2), ("P", 4), ("I;16", None)])
def test_png_size_check_is_exact_for_every_layout(mode: str, bits: int | None) -> None:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (37, 53), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({} if bits is None else {"bits": bits}))
    header, decompressed = _png_pixel_bytes(buffer.getvalue())
    assert _png_raw_size(header) == decompressed  # not one byte more than the file holds
    check_output(load_image(buffer.getvalue()))


@pytest.mark.skipif(not LIBPNG_INTERLACED_EXAMPLE.is_file(), reason="libpng's example PNG")
def test_png_size_check_is_exact_for_an_interlaced_png() -> None:
    data = LIBPNG_INTERLACED_EXAMPLE.read_bytes()
    header, decompressed = _png_pixel_bytes(data)
    assert header[12] == 1  # Adam7
    assert _png_raw_size(header) == decompressed
    check_output(load_image(data))


def test_user_errors_are_the_package_classes(tmp_path: Path) -> None:
    with pytest.raises(PullbackWidgetsError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(PullbackWidgetsError):
        load_image(b"not an image")
    with pytest.raises(PullbackWidgetsTypeError):
        load_image(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(PullbackWidgetsTypeError):
        load_image(np.zeros((4, 4)), size=2.5)  # type: ignore[arg-type]
    with pytest.raises(PullbackWidgetsError):
        sample_image("lena")


def test_a_transparent_grey_level_in_a_16_bit_png_goes_onto_white_like_8_bit():
    levels = np.array([[0, 40000], [65535, 0]], dtype=np.uint16)
    for values, bits in ((levels, 16), ((levels // 257).astype(np.uint8), 8)):
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG", transparency=0)
        buffer.seek(0)
        image = load_image(Image.open(buffer), size=2)[0]
        assert torch.equal(image[:, 0, 0], torch.ones(3)), bits  # transparent: white
        assert torch.equal(image[:, 1, 1], torch.ones(3)), bits
        assert abs(float(image[0, 0, 1]) - 40000 / 65535) < 0.005, bits


def test_a_32_bit_image_holding_8_bit_data_is_read_as_16_bit_with_a_warning():
    values = np.arange(256, dtype=np.int32).reshape(16, 16)
    with pytest.warns(UserWarning, match="only up to 255 is read as 16-bit data"):
        image = load_image(Image.fromarray(values), size=16)
    assert float(image.max()) <= 255 / 65535 + 1e-6


# --------------------------------------------------------------------------- special files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            load_image(fifo)
        except BaseException as err:
            errors.append(err)

    # In a thread, so that a loader which opens the pipe fails this test instead of hanging it.
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=120)  # long: a loaded machine is slow to load the first image
    if thread.is_alive():
        # A writer that comes and goes unblocks the reader's open(), so the thread ends.
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load_image blocked opening a named pipe")
    assert len(errors) == 1 and isinstance(errors[0], PullbackWidgetsError), errors
    assert str(errors[0]) == f"image path is a named pipe (FIFO), not a regular file: {str(fifo)!r}"


def test_a_device_is_refused_and_a_link_to_a_file_is_followed(tmp_path: Path) -> None:
    if Path("/dev/zero").exists():
        with pytest.raises(PullbackWidgetsError, match="is a character device, not a regular"):
            load_image("/dev/zero")
    link = tmp_path / "link.png"
    link.symlink_to(saved(Image.new("L", (20, 10), 64), tmp_path / "gray.png"))
    assert colour_of(load_image(link)) == (64 / 255,) * 3


# --------------------------------------------------------------------------- TIFF orientation

# What a viewer shows for each orientation tag, as numpy operations on the stored rows.
DISPLAYED = {
    2: lambda s: s[:, ::-1],
    3: lambda s: s[::-1, ::-1],
    4: lambda s: s[::-1],
    5: lambda s: s.swapaxes(0, 1),
    6: lambda s: np.rot90(s, -1),
    7: lambda s: s.swapaxes(0, 1)[::-1, ::-1],
    8: lambda s: np.rot90(s, 1),
}
# Pillow 13 scrambled L, P, I;16, I;16B, RGBA and CMYK (the modes it memory-maps); RGB did not.
TIFF_BYTES_PER_PIXEL = {"L": 1, "P": 1, "I;16": 2, "I;16B": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


def tiff(mode: str, pixels: np.ndarray, path: Path, orientation: int = 1, **kwargs) -> Path:
    """``pixels`` (H, W, bytes per pixel) as an uncompressed one-strip TIFF of ``mode``: each
    pixel's bytes stay together, so numpy can rotate the picture whatever the mode."""
    img = Image.frombytes(mode, (pixels.shape[1], pixels.shape[0]), pixels.tobytes())
    if mode == "P":
        img.putpalette([level for level in range(256) for _ in "RGB"])  # index i: grey i
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    return saved(img, path, exif=exif, **kwargs)


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
@pytest.mark.parametrize("mode", TIFF_BYTES_PER_PIXEL)
def test_a_tiff_with_an_orientation_tag_loads_as_rotated_by_hand(
    tmp_path: Path, mode: str, orientation: int
) -> None:
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (9, 14, TIFF_BYTES_PER_PIXEL[mode]), dtype=np.uint8)
    tagged = tiff(mode, stored, tmp_path / "tagged.tif", orientation)
    by_hand = tiff(mode, DISPLAYED[orientation](stored).copy(), tmp_path / "by_hand.tif")
    want = load_image(by_hand, size=8)  # 9 pixels to 9: a crop, no resampling
    assert torch.equal(load_image(tagged, size=8), want)
    assert torch.equal(load_image(tagged.read_bytes(), size=8), want)
    with Image.open(tagged) as lazy:
        assert torch.equal(load_image(lazy, size=8), want)


def test_a_rotated_compressed_tiff_and_a_pil_tiff_left_as_it_was(tmp_path: Path) -> None:
    stored = np.random.default_rng(0).integers(0, 256, (9, 14, 1), dtype=np.uint8)
    want = load_image(tiff("L", DISPLAYED[6](stored).copy(), tmp_path / "by_hand.tif"))
    packed = tiff("L", stored, tmp_path / "packed.tif", 6, compression="tiff_lzw")
    assert torch.equal(load_image(packed), want)
    with Image.open(tiff("L", stored, tmp_path / "tagged.tif", 6)) as lazy:
        assert torch.equal(load_image(lazy), want)
        assert lazy.filename == str(tmp_path / "tagged.tif")  # hidden only while it loads


def test_one_pil_tiff_loaded_from_two_threads_at_once_gives_its_pixels_twice(tmp_path):
    pixels = np.random.default_rng(2).integers(0, 256, (120, 180), dtype=np.uint8)
    path = tmp_path / "big.tif"
    Image.fromarray(pixels).save(path)
    expected = load_image(Image.fromarray(pixels))
    for _ in range(10):
        image, results = Image.open(path), [None, None]
        start = threading.Barrier(2)

        def load(i, image=image, results=results, start=start):
            start.wait()
            try:
                results[i] = load_image(image)
            except Exception as error:  # reported below
                results[i] = error
        threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for result in results:
            assert isinstance(result, torch.Tensor), result
            assert torch.equal(result, expected)


@pytest.mark.parametrize("image", [np.full((5, 5, 3), 1e300), np.full((5, 5, 3), 2.0, dtype=">f8"),
                                   torch.full((3, 5, 5), 1e39, dtype=torch.float64)])
def test_floats_beyond_float32_are_out_of_range_not_infinite(image):
    # The range was checked after the cast to float32, where 1e300 is infinity: the error
    # said "NaN or infinite values", which the input has not (a hostile review).
    with pytest.raises(pw.PullbackWidgetsError, match=r"must lie in \[0, 1\]"):
        pw.load_image(image, size=4)


def test_a_meta_tensor_image_is_a_clear_error():
    with pytest.raises(pw.PullbackWidgetsError, match="meta device"):
        pw.load_image(torch.empty(3, 5, 5, device="meta"), size=4)


def test_an_empty_path_is_a_clear_error():
    with pytest.raises(pw.PullbackWidgetsError, match="image path is empty"):
        pw.load_image("")


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_a_jpeg_declaring_7000x7000_in_3_kb_is_refused_before_decoding(monkeypatch):
    # Cut short, then given an end marker: libjpeg filled the rest with grey and Pillow
    # returned a flat picture after seconds of decoding (a review).
    noise = (np.random.default_rng(0).random((7000, 7000, 3)) * 255).astype(np.uint8)
    data = _jpeg(noise, quality=50)[:3000] + b"\xff\xd9"

    def refuse(self):
        raise AssertionError("Pillow was asked to decode a lying JPEG")

    monkeypatch.setattr(Image.Image, "load", refuse)
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    with pytest.raises(PullbackWidgetsError, match=r"7000 x 7000 .* truncated or corrupt JPEG"):
        load_image(data)


@pytest.mark.parametrize("options", [
    {"quality": 1}, {"quality": 95}, {"quality": 1, "progressive": True},
    {"quality": 1, "subsampling": 0}, {"quality": 1, "optimize": True},
    {"quality": 1, "restart_marker_blocks": 1},
], ids=["q1", "q95", "progressive", "4:4:4", "optimised", "restart markers"])
def test_honest_jpegs_at_their_smallest_still_load_as_pillow_decodes_them(options):
    # A flat picture at quality 1 takes about 2 bits a block, the fewest an honest JPEG
    # takes: the check's bound is 1 bit.
    for array in (np.full((1024, 768, 3), 77, np.uint8), np.zeros((1, 1, 3), np.uint8),
                  (np.random.default_rng(1).random((65, 33, 3)) * 255).astype(np.uint8)):
        data = _jpeg(array, **options)
        expected = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        decoded = _open_pil(io.BytesIO(data), "a JPEG", 10 ** 7)  # load_image's decoding step
        assert torch.equal((decoded.permute(1, 2, 0) * 255).round().to(torch.uint8), expected)
        check_output(load_image(data))
