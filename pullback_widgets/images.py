"""Every way a picture gets in: :func:`load_image`, :func:`sample_image`.

All roads end in the standard ImageNet evaluation transform on a float RGB image in [0, 1]:
resize so the shorter side is ``round(size / 0.875)`` pixels (bicubic, antialiased), then
centre-crop to ``size`` x ``size``. The result is a float32 tensor (1, 3, size, size) in
pixel space [0, 1], ready for a model from :func:`pullback_widgets.load_model`.

Colour handling: grayscale is repeated to RGB; transparency (RGBA, LA, palette with a
transparent index, or a 4-channel array) is composited onto a white background; CMYK and
other modes go through Pillow's conversion (no ICC colour management); 16-bit grayscale
keeps its 16 bits. EXIF orientation is applied to files and PIL images. Files and bytes in
a format Pillow decodes by running another program (EPS, through Ghostscript) are refused.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .validation import PullbackWidgetsError, PullbackWidgetsTypeError, check_choice, check_index

__all__ = ["CROP_FRACTION", "MAX_SIZE", "SAMPLE_IMAGES", "load_image", "sample_image",
           "sample_image_array"]

# Fraction of the resized shorter side kept by the centre crop (timm's crop_pct for Lite0;
# torchvision's 224/256 for the V1 weights).
CROP_FRACTION = 0.875
DEFAULT_MAX_PIXELS = 50_000_000
# Past this long/short side ratio the long side is trimmed before resizing, so that a
# 1 x 10^7 strip does not become a multi-gigabyte tensor; the centre crop lies inside anyway.
_MAX_ASPECT = 4.0
# The largest output side: past it the resized image alone takes gigabytes (size=10**5 asks
# for 157 GB), so torch fails deep inside, or the machine starts swapping.
MAX_SIZE = 4096

SAMPLE_IMAGES = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")

ImageSource = (
    str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray | Tensor
)


# --------------------------------------------------------------------------- argument checks


def _check_pixel_count(width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise PullbackWidgetsError(f"image is empty: {width} x {height} pixels")
    if width * height > max_pixels:
        raise PullbackWidgetsError(
            f"image is {width} x {height} = {width * height} pixels, more than "
            f"max_pixels={max_pixels} (a guard against decompression bombs; in Python, pass a "
            "larger max_pixels to load it)"
        )


# --------------------------------------------------------------------------- decoding


def _open_pil(opener: object, what: str, max_pixels: int) -> Tensor:
    """Decode the image ``Image.open(opener)`` gives into a (3, H, W) float tensor.

    The size is checked before any pixel is decoded (``Image.open`` only reads the header).
    """
    # Our max_pixels is the policy, so Pillow's own (global) warning is noise here; its hard
    # error (over 2 * Image.MAX_IMAGE_PIXELS) still comes and is converted. catch_warnings
    # swaps the process-wide filters: two threads inside it at once can leave our "ignore"
    # filter behind for good, so the package's blocks take turns.
    with _PIL_LOAD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(opener, formats=_decodable_formats())
        except Image.DecompressionBombError as err:
            raise PullbackWidgetsError(
                f"{what} is too large to decode: {err} (Pillow's global limit, "
                f"independent of max_pixels={max_pixels})"
            ) from None
        except Exception as err:
            if _is_postscript(opener):
                raise PullbackWidgetsError(
                    f"could not read {what} as an image: it is PostScript (EPS), which Pillow "
                    "decodes by running Ghostscript on it; refused, convert it to PNG "
                    "first") from None
            raise _unreadable(what, err) from None
        with img:
            _check_pixel_count(img.width, img.height, max_pixels)
            if img.format == "PNG":
                _check_png_data(img.fp, what, img.width, img.height)
            elif img.format in ("JPEG", "MPO"):
                _check_jpeg_data(img.fp, what, img.width, img.height)
            try:
                img.load()
            except Exception as err:
                raise _unreadable(what, err) from None
            return _pil_to_tensor(img, max_pixels)


# Formats whose decoding runs another program: Pillow renders EPS by starting Ghostscript,
# whose -dSAFER sandbox has been escaped more than once (CVE-2023-36664, CVE-2024-29510), and
# the classroom app decodes strangers' uploads whatever their name says.
_EXTERNAL_DECODERS = frozenset({"EPS"})


def _decodable_formats() -> list[str]:
    """Pillow's registered formats, less :data:`_EXTERNAL_DECODERS`."""
    Image.init()  # registers every plugin; idempotent
    return [name for name in Image.ID if name not in _EXTERNAL_DECODERS]


def _is_postscript(stream: object) -> bool:
    """Whether ``stream`` starts as an EPS file does (text, or DOS EPS binary)."""
    try:
        stream.seek(0)
        return stream.read(4) in (b"%!PS", b"\xc5\xd0\xd3\xc6")
    except Exception:  # not seekable: nothing to say
        return False


# PNG colour type -> samples per pixel; Adam7 passes as (x0, y0, dx, dy).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))
_CHUNK_OUT = 1 << 20  # decompress in slices of this many bytes, so nothing large is held


def _png_raw_size(header: bytes) -> int:
    """Bytes of filtered pixel data that an IHDR chunk's image needs (one filter byte a row)."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header[:13])
    bits = _PNG_SAMPLES.get(colour, 4) * depth

    def size(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w and h else 0

    if not interlace:
        return size(width, height)
    return sum(size(max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy)))
               for x0, y0, dx, dy in _ADAM7)


def _check_png_data(stream: io.IOBase, what: str, width: int, height: int) -> None:
    """Refuse a PNG whose compressed data ends before the pixels its header declares.

    Pillow fills the missing rows with black when the zlib stream is complete but short (a
    148-byte file can declare 7000 x 7000). This reads the chunks and decompresses the pixel
    data in slices, counting bytes and keeping none, before Pillow allocates the image.
    Damage of any other kind is left to Pillow's decoder, which reports it.
    """
    position = stream.tell()
    try:
        stream.seek(8)  # the signature, which Image.open has checked
        needed = got = 0
        inflater = zlib.decompressobj()
        while got < needed or not needed:
            head = stream.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            body = stream.read(length)
            stream.seek(4, io.SEEK_CUR)  # the CRC
            if kind == b"IHDR" and len(body) >= 13:
                needed = _png_raw_size(body)
            elif kind == b"IDAT":
                try:
                    got += len(inflater.decompress(body, _CHUNK_OUT))
                    while inflater.unconsumed_tail and got < needed:
                        got += len(inflater.decompress(inflater.unconsumed_tail, _CHUNK_OUT))
                except zlib.error:
                    return  # Pillow's decoder reports corrupt data in its own words
            elif kind == b"IEND" or inflater.eof:
                break
    finally:
        stream.seek(position)
    if needed and got < needed and inflater.eof:
        raise PullbackWidgetsError(
            f"could not read {what} as an image: it declares {width} x {height} pixels but "
            f"its pixel data holds only {got} of the {needed} bytes they need (a truncated or "
            "corrupt PNG)")


# Frame headers of Huffman-coded JPEGs (baseline, extended, progressive, lossless): every
# block then takes at least one bit of coded data. Arithmetic-coded ones can take less.
_JPEG_HUFFMAN_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7}
# Markers without a length: the start of the image, TEM and restarts (D0-D7).
_JPEG_BARE_MARKERS = {0xD8, 0x01, *range(0xD0, 0xD8)}


def _jpeg_blocks(frame: bytes, width: int, height: int) -> int:
    """8 x 8 blocks a JPEG frame header's components code, over whole MCUs."""
    count = frame[5]
    sampling = [(frame[7 + 3 * i] >> 4, frame[7 + 3 * i] & 15) for i in range(count)
                if len(frame) >= 9 + 3 * i]
    if not sampling or any(h == 0 or v == 0 for h, v in sampling):
        return 0
    wide, tall = max(h for h, _ in sampling), max(v for _, v in sampling)
    mcus = -(-width // (8 * wide)) * -(-height // (8 * tall))
    return mcus * sum(h * v for h, v in sampling)


def _jpeg_coded_bytes(data: bytes, start: int) -> tuple[int, int]:
    """(coded bytes, offset of the marker that ends them) of a scan whose coded data begins at
    ``start``: it runs to the first marker other than a restart (0xFF00 is a stuffed 0xFF)."""
    coded, offset = 0, start
    while True:
        end = data.find(b"\xff", offset)
        if end < 0 or end + 1 >= len(data):
            return coded + len(data) - offset, len(data)
        follower = data[end + 1]
        coded += end - offset
        if follower == 0x00:
            coded, offset = coded + 1, end + 2
        elif 0xD0 <= follower <= 0xD7:
            offset = end + 2
        else:
            return coded, end


def _check_jpeg_data(stream: io.IOBase, what: str, width: int, height: int) -> None:
    """Refuse a Huffman-coded JPEG whose coded data is too short for the pixels its header
    declares: every 8 x 8 block takes at least one bit. libjpeg fills the blocks after a
    premature end with grey, and a 3 kB file with an end marker can declare 7000 x 7000
    (seconds of decoding into a flat grey picture). This reads the markers and counts the
    coded bytes; damage of any other kind is left to Pillow's decoder. A JPEG cut short less
    severely still loads, grey where its data is missing, as Pillow loads it."""
    position = stream.tell()
    try:
        stream.seek(0)
        data = stream.read()
    finally:
        stream.seek(position)
    blocks = coded = 0
    offset = 2  # past the start-of-image marker, which Image.open has checked
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        if marker == 0xD9:  # the end of the image
            break
        if marker == 0xFF or marker in _JPEG_BARE_MARKERS:  # fill, or no length
            offset += 1 if marker == 0xFF else 2
            continue
        length = int.from_bytes(data[offset + 2:offset + 4], "big")
        segment, offset = data[offset + 4:offset + 2 + length], offset + 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and not blocks:
            if marker not in _JPEG_HUFFMAN_FRAMES:
                return  # arithmetic coding: no bound per block
            blocks = _jpeg_blocks(segment, width, height)
        elif marker == 0xDA:  # a scan's header, then its coded data
            scan, offset = _jpeg_coded_bytes(data, offset)
            coded += scan
    if blocks and coded * 8 < blocks:
        raise PullbackWidgetsError(
            f"could not read {what} as an image: it declares {width} x {height} pixels "
            f"({blocks} blocks of 8 x 8) but holds only {coded} bytes of coded data, less "
            "than one bit a block (a truncated or corrupt JPEG)")


def _unreadable(what: str, err: Exception) -> PullbackWidgetsError:
    # Pillow reports bad files through many types (UnidentifiedImageError, OSError for
    # truncation, SyntaxError, struct.error, ...); callers get one line.
    if isinstance(err, UnidentifiedImageError):
        detail = "not a format Pillow recognises"  # its own message just prints a repr
    else:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
    return PullbackWidgetsError(f"could not read {what} as an image: {detail}")


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _load_path(src: str | os.PathLike, max_pixels: int) -> Tensor:
    if not os.fspath(src):  # Path("") is the working directory
        raise PullbackWidgetsError("image path is empty")
    path = Path(os.fsdecode(src))  # fsdecode: a PathLike may give bytes, which Path refuses
    name = repr(str(path))
    try:
        kind = path.stat().st_mode  # follows symlinks: a link to a regular file is fine
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        raise PullbackWidgetsError(f"image file not found: {name}") from None
    except OSError as err:
        raise _unreadable(f"file {name}", err) from None
    if not stat.S_ISREG(kind):
        # Opening a FIFO blocks until a writer comes and a device never ends, so refuse first.
        label = next((label for test, label in _FILE_KINDS if test(kind)), "a special file")
        raise PullbackWidgetsError(f"image path is {label}, not a regular file: {name}")
    try:
        stream = open(path, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as err:
        raise _unreadable(f"file {name}", err) from None
    # Not Image.open(path): Pillow memory-maps an uncompressed one-strip file it opens by name,
    # and Pillow 13 maps a TIFF with orientation 5-8 at its rotated size, scrambling the pixels
    # (modes L, P, I;16, I;16B, RGBA, CMYK). From an open file object it decodes them right.
    with stream:
        return _open_pil(stream, f"file {name}", max_pixels)


# Held around load() of a PIL image (see _load_pil) and around every catch_warnings block.
_PIL_LOAD_LOCK = threading.RLock()


def _load_pil(img: Image.Image, max_pixels: int) -> Tensor:
    # Check the size first: an image from Image.open() decodes lazily, on load().
    _check_pixel_count(img.width, img.height, max_pixels)
    if img.format == "PNG" and getattr(img, "fp", None) is not None:  # not decoded yet
        _check_png_data(img.fp, "the PIL image", img.width, img.height)
    # Pillow memory-maps only a file it opened by name, which scrambles some rotated TIFFs (see
    # _load_path); without the name, load() reads them from the open file, correctly. One
    # thread at a time: another's load() of the same image must not see the name hidden.
    with _PIL_LOAD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        name = img.filename if isinstance(img, TiffImagePlugin.TiffImageFile) else ""
        try:
            if name:
                img.filename = ""
            img.load()
        except Exception as err:
            raise _unreadable("the PIL image", err) from None
        finally:
            if name:
                img.filename = name
        return _pil_to_tensor(img, max_pixels)


def _pil_to_tensor(img: Image.Image, max_pixels: int) -> Tensor:
    """A PIL image of any mode -> (3, H, W) float32 in [0, 1]."""
    _check_pixel_count(img.width, img.height, max_pixels)
    img = _apply_exif_orientation(img)
    if img.mode.startswith("I;16"):
        return _sixteen_bit(img, np.asarray(img), max_pixels)  # full precision
    if img.mode == "I":
        # 32-bit integer images come from 16-bit PNG/TIFF decoders; read them as 16-bit.
        values = np.asarray(img)
        if values.min() < 0 or values.max() > 65535:
            raise PullbackWidgetsError(
                f"32-bit integer image has values in [{values.min()}, {values.max()}]; "
                "expected 16-bit data in [0, 65535]"
            )
        if 0 < values.max() <= 255:
            warnings.warn(f"a 32-bit integer image with values only up to {values.max()} is "
                          "read as 16-bit data, so nearly black; if it holds 8-bit data, save "
                          "it as 8-bit (Pillow mode 'L' or 'RGB')", stacklevel=3)
        return _sixteen_bit(img, values.astype(np.uint16), max_pixels)
    if img.mode == "F":
        return _array_to_tensor(np.asarray(img), max_pixels)  # float, must lie in [0, 1]
    has_alpha = "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info
    try:
        rgb = img.convert("RGBA" if has_alpha else "RGB")
    except Exception as err:
        raise PullbackWidgetsError(
            f"cannot convert image mode {img.mode!r} to RGB: {err}") from None
    return _array_to_tensor(np.asarray(rgb), max_pixels)


def _sixteen_bit(img: Image.Image, values: np.ndarray, max_pixels: int) -> Tensor:
    """16-bit grey ``values`` (H, W) of ``img`` -> (3, H, W); a grey level the file marks
    transparent (PNG's tRNS) goes onto white, as 8-bit images' transparency does."""
    transparent = img.info.get("transparency")
    if not isinstance(transparent, int):
        return _array_to_tensor(values, max_pixels)
    grey = values.astype(np.float32) / 65535
    alpha = (values != transparent).astype(np.float32)
    return _array_to_tensor(np.stack([grey, grey, grey, alpha], axis=-1), max_pixels)


_EXIF_ORIENTATION = 0x0112


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip as the EXIF orientation tag says (phone photos), else return ``img`` as is."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
            return img  # the common case: no copy
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block should not cost the picture
        return img


def _array_to_tensor(array: np.ndarray, max_pixels: int) -> Tensor:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> (3, H, W) float32 in [0, 1]."""
    if isinstance(array, np.ma.MaskedArray):  # its masked pixels would be read as they are
        raise PullbackWidgetsTypeError(
            "image array is a masked array; fill the masked pixels first, e.g. "
            "array.filled(1.0) for white")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise PullbackWidgetsError(
            "image array must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
            f"got {array.shape}"
        )
    _check_pixel_count(array.shape[1], array.shape[0], max_pixels)
    # Compare kind and size, not dtypes: big-endian data (Pillow's "I;16B") is still uint16.
    kind, bits = array.dtype.kind, array.dtype.itemsize * 8
    if kind == "u" and bits in (8, 16):
        # float32 holds every 16-bit level exactly; no detour through 8 bits.
        values = torch.from_numpy(array.astype(np.float32)) / (2**bits - 1)
    elif kind == "b":
        values = torch.from_numpy(array.astype(np.float32))
    elif kind == "f":
        # Checked before the cast: a float64 beyond float32's range would become infinity.
        _check_float_range(array, "image array")
        values = torch.from_numpy(array.astype(np.float32))
    else:
        raise PullbackWidgetsTypeError(
            f"image array dtype must be uint8, uint16, bool or float in [0, 1]; got {array.dtype}"
            " (for 8-bit data in an int array use array.astype(np.uint8))"
        )
    if values.ndim == 2:
        values = values[:, :, None]
    return _to_rgb(values.permute(2, 0, 1))


def _warn_eight_bit_in_sixteen(array: np.ndarray) -> None:
    """A uint16 array is read as 16-bit levels; one whose values all lie in (0, 255] is most
    likely 8-bit data widened by an ``astype`` or by arithmetic, and would load nearly black
    without a word (as 32-bit integer images from files already warn)."""
    if array.dtype.kind != "u" or array.dtype.itemsize != 2 or array.size == 0:
        return
    high = int(array.max())
    if 0 < high <= 255:
        warnings.warn(f"a uint16 image array with values only up to {high} is read as 16-bit "
                      "data (65535 is white), so nearly black; if it holds 8-bit data, pass "
                      "array.astype(np.uint8)", stacklevel=3)


def _check_float_range(values: Tensor | np.ndarray, what: str) -> None:
    finite = np.isfinite(values).all() if isinstance(values, np.ndarray) \
        else torch.isfinite(values).all()
    if not finite:
        raise PullbackWidgetsError(f"{what} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise PullbackWidgetsError(
            f"float {what} values must lie in [0, 1]; got [{low:.4g}, {high:.4g}] "
            "(divide 8-bit data by 255)"
        )


def _to_rgb(chw: Tensor) -> Tensor:
    """(1, H, W) gray, (3, H, W) RGB or (4, H, W) RGBA in [0, 1] -> (3, H, W) RGB."""
    if chw.shape[0] == 1:
        return chw.expand(3, -1, -1).contiguous()
    if chw.shape[0] == 4:
        rgb, alpha = chw[:3], chw[3:]
        return rgb * alpha + (1 - alpha)  # composite onto white
    return chw


def _tensor_to_chw(tensor: Tensor, max_pixels: int) -> Tensor:
    """(H, W), (1, H, W), (3, H, W) or (1, 3, H, W) tensor -> (3, H, W) float32 in [0, 1]."""
    if tensor.is_nested:
        raise PullbackWidgetsTypeError("image tensor must be a dense tensor, got a nested one "
                                       "(pass one of its images, from .unbind())")
    if tensor.layout != torch.strided:
        raise PullbackWidgetsTypeError(
            f"image tensor must be a dense tensor, got layout {tensor.layout} (use .to_dense())")
    shape = tuple(tensor.shape)
    if tensor.ndim == 4 and shape[0] == 1 and shape[1] == 3:
        chw = tensor[0]
    elif tensor.ndim == 3 and shape[0] in (1, 3):
        chw = tensor
    elif tensor.ndim == 2:
        chw = tensor[None]
    else:
        raise PullbackWidgetsError(
            "image tensor must be one channels-first image of shape (H, W), (1, H, W), "
            f"(3, H, W) or (1, 3, H, W); got {shape} (for (H, W, 3) use .permute(2, 0, 1))"
        )
    _check_pixel_count(chw.shape[2], chw.shape[1], max_pixels)
    if chw.is_meta:
        raise PullbackWidgetsError("image tensor is on the meta device, which holds no values")
    chw = chw.detach()
    if chw.dtype == torch.uint8:
        chw = chw.float() / 255
    elif chw.dtype == torch.bool:
        chw = chw.float()
    elif chw.is_floating_point() and chw.itemsize >= 2:
        _check_float_range(chw, "image tensor")  # before the cast, as for arrays
        chw = chw.float()
    else:
        # float8 and float4 too: torch has no isfinite() or min() for them, to check the values.
        raise PullbackWidgetsTypeError(
            f"image tensor dtype must be uint8, bool or float in [0, 1]; got {chw.dtype}"
            + (" (convert it with .float())" if str(chw.dtype).startswith("torch.float8") else "")
        )
    return _to_rgb(chw)


# --------------------------------------------------------------------------- the transform


def _resize_and_crop(chw: Tensor, size: int) -> Tensor:
    """(3, H, W) in [0, 1] -> (1, 3, size, size): shorter side to round(size / 0.875) pixels,
    then the centre size x size crop."""
    height, width = chw.shape[-2:]
    short, long = min(height, width), max(height, width)
    if long > _MAX_ASPECT * short:
        keep = math.ceil(_MAX_ASPECT * short)
        chw = TF.center_crop(chw, [keep, width] if height > width else [height, keep])
    resized = TF.resize(
        chw,
        round(size / CROP_FRACTION),
        interpolation=InterpolationMode.BICUBIC,
        antialias=True,
    )
    # Bicubic overshoots at sharp edges; the model expects pixel values in [0, 1]. Not in
    # place: where the resize and crop change nothing, this is the caller's own tensor.
    cropped = TF.center_crop(resized, [size, size]).clamp(0, 1)
    return cropped.unsqueeze(0).contiguous()


def load_image(
    src: ImageSource,
    *,
    size: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Tensor:
    """Load a picture and apply the ImageNet evaluation transform.

    Args:
        src: any of
            - a file path (str or PathLike) or the encoded file's bytes (PNG, JPEG, ...);
            - a PIL image of any mode;
            - a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), dtype uint8, uint16,
              bool or float in [0, 1];
            - a dense torch tensor (H, W), (1, H, W), (3, H, W) or (1, 3, H, W), dtype uint8,
              bool or float in [0, 1] (channels first); it is never written to.
        size: output side in pixels, at most :data:`MAX_SIZE`.
        max_pixels: refuse images with more than this many pixels (width * height), checked
            from the header before any pixel is decoded.

    Returns:
        float32 tensor (1, 3, size, size), RGB in [0, 1]; on the input tensor's device for a
        tensor, else on the CPU.

    Raises:
        PullbackWidgetsError (a ValueError): missing or unreadable file, a path that is not a
            regular file (a directory, FIFO or device, refused before opening), a format decoded
            by another program (EPS: Ghostscript), corrupt or truncated
            data (also a PNG whose pixel data is shorter than its header declares, refused
            before decoding), too many pixels, NaN/inf or out-of-range values, bad shape,
            ``size`` over :data:`MAX_SIZE`.
        PullbackWidgetsTypeError (a TypeError): unsupported ``src`` type or dtype (a masked
            array, a sparse or nested tensor), non-int ``size``/``max_pixels``.
    """
    size = check_index(size, "size", minimum=1)
    if size > MAX_SIZE:
        raise PullbackWidgetsError(
            f"size must be <= {MAX_SIZE} pixels (the output is size x size), got {size}")
    max_pixels = check_index(max_pixels, "max_pixels", minimum=1)
    if isinstance(src, (str, os.PathLike)):
        chw = _load_path(src, max_pixels)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise PullbackWidgetsError("src is empty bytes, not an encoded image")
        chw = _open_pil(io.BytesIO(bytes(src)), "bytes", max_pixels)
    elif isinstance(src, Image.Image):
        chw = _load_pil(src, max_pixels)
    elif isinstance(src, np.ndarray):
        chw = _array_to_tensor(src, max_pixels)
        _warn_eight_bit_in_sixteen(src)
    elif isinstance(src, Tensor):
        chw = _tensor_to_chw(src, max_pixels)
    else:
        raise PullbackWidgetsTypeError(
            "src must be a path, bytes, PIL image, numpy array or torch tensor; "
            f"got {type(src).__name__}"
        )
    return _resize_and_crop(chw, size)


# --------------------------------------------------------------------------- samples


def sample_image_array(name: str) -> np.ndarray:
    """A bundled scikit-image sample picture as uint8 RGB, shape (H, W, 3). No download."""
    import skimage.data  # imported here: it is slow to import and only the samples need it

    name = check_choice(name, SAMPLE_IMAGES, "sample image name")
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]  # the left view of the stereo pair
    return getattr(skimage.data, name)()


def sample_image(name: str, *, size: int = 224) -> Tensor:
    """A sample picture (one of :data:`SAMPLE_IMAGES`) through :func:`load_image`:
    float32 (1, 3, size, size), RGB in [0, 1]."""
    return load_image(sample_image_array(name), size=size)
