"""Read image files of every supported format as 8-bit RGB frames, the one input the detector takes.

Industrial data sets are 8-bit PNG/JPEG; medical ones are 16-bit PNG/TIFF, DICOM and NIfTI with values
far beyond 0..255. Every reader here ends in ``(H, W, 3) uint8`` at native resolution, so the rest of the
code never sees a file format. Conversion rules:

* **8-bit raster** (PNG, JPEG, BMP, TIFF in any 8-bit PIL mode: grey, RGB, RGBA, palette, ...): exactly
  ``PIL.Image.open(p).convert("RGB")``, so 8-bit data sets load bit-identically to before (alpha is
  dropped, no EXIF rotation, the first page of a multi-page TIFF).
* **16-bit / 32-bit / float raster** (PIL modes ``I;16*``, ``I``, ``F``): the raw values, mapped to
  0..255 by ``window`` if given, else by the full range of the integer type (0..65535 for 16-bit; PNG
  ``I`` is 16-bit) or, for float data, the image's own min..max. Grey is replicated to three channels.
* **DICOM** (pydicom): pixel values, then the Modality LUT (rescale slope/intercept), then the VOI:
  ``window`` if given, else the file's VOI LUT table, else its first Window Center/Width (applied with
  the same linear formula as ``window``; VOI LUT Function SIGMOID is honoured), else the file's min..max
  over all its frames (so frames stay comparable); then MONOCHROME1 is inverted. Colour DICOM (RGB, YBR, which pydicom
  decodes to RGB, PALETTE COLOR) is converted to 8-bit RGB. A multi-frame file gives one frame per
  frame (index 0..n-1); enhanced multi-frame per-frame functional groups are not read.
* **NIfTI** (nibabel, ``.nii`` / ``.nii.gz``): ``get_fdata`` (scl_slope/inter applied); a 2-D image is one
  frame, a 3-D volume one frame per slice along ``axis`` (array order, no reorientation); ``window`` if
  given, else the whole volume's min..max, one mapping for all slices so they stay comparable.

The linear window ``(center, width)`` maps ``center - width/2`` to 0 and ``center + width/2`` to 255
(values outside are clipped); a constant image (min == max) maps to 0. Results are rounded to nearest.
``window`` applies to high-depth raster and to grey DICOM and NIfTI; 8-bit raster and colour images are
taken as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["SUPPORTED_SUFFIXES", "Frame", "UnreadableImage", "find_inputs", "image_stem", "read_frames",
           "supported_suffix", "to_model_input"]

RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
SUPPORTED_SUFFIXES: frozenset[str] = RASTER_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES
NIFTI_GZ = ".nii.gz"

# A DICOM Part 10 file: 128-byte preamble, then the magic "DICM".
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128

U8_MAX = 255
RGB = 3
# PIL modes holding more than 8 bits per sample; every other mode goes through convert("RGB").
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F"})
PNG_MAX_VALUE = 2**16 - 1  # PNG samples have at most 16 bits (older Pillow opens them as mode "I")
SIGMOID_SLOPE = 4.0  # DICOM PS3.3 C.11.2.1.3.1: y = 1 / (1 + exp(-4 (x - c) / w))
VOLUME_AXES = (0, 1, 2)
MAX_REASON_CHARS = 500  # one readable line, even for pydicom's list of missing decoder plugins


class UnreadableImage(Exception):
    """A file that cannot be read as an image: ``.path`` and ``.reason`` (one line, no traceback)."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        self.reason = " ".join(str(reason).split())[:MAX_REASON_CHARS] or "unreadable"
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class Frame:
    """One 2-D image of a file; ``index`` is the frame (DICOM) or slice (NIfTI) number, None if 2-D."""

    path: Path
    index: int | None
    image: np.ndarray  # (H, W, 3) uint8, C-contiguous, writeable, native resolution


def supported_suffix(path: Path) -> str | None:
    """The supported suffix of ``path`` (lower case; ``.nii.gz`` matched on the whole name), or None."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_GZ):
        return NIFTI_GZ
    suffix = Path(name).suffix
    return suffix if suffix in SUPPORTED_SUFFIXES else None


def image_stem(path: Path) -> str:
    """The file name without its supported suffix (``x.nii.gz`` -> ``x``), to name companion files."""
    path = Path(path)
    suffix = supported_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(DICOM_MAGIC_OFFSET + len(DICOM_MAGIC))
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_window(window: tuple[float, float] | None) -> None:
    if window is None:
        return
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        center = width = math.nan
    if not (math.isfinite(center) and math.isfinite(width) and width > 0):
        raise ValueError(f"window must be (center, width) with a finite center and width > 0, got {window!r}")


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map ``lo -> 0``, ``hi -> 255``, clipped and rounded; a constant range maps to 0, NaN to 0."""
    if not hi > lo:
        return np.zeros(np.shape(values), np.uint8)
    x = (np.asarray(values, np.float64) - lo) / (hi - lo) * U8_MAX
    return np.nan_to_num(np.clip(np.rint(x), 0, U8_MAX), nan=0.0).astype(np.uint8)


def _windowed(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    center, width = (float(v) for v in window)
    return _scale(values, center - width / 2, center + width / 2)


def _finite_range(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def _min_max(values: np.ndarray) -> np.ndarray:
    return _scale(values, *_finite_range(values))


def _rgb(grey_or_rgb: np.ndarray) -> np.ndarray:
    """Grey (H, W) replicated to (H, W, 3); any result C-contiguous uint8."""
    a = grey_or_rgb
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], RGB, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


# --------------------------------------------------------------------------- raster (PIL)


def _read_raster(path: Path, window: tuple[float, float] | None) -> list[Frame]:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in HIGH_DEPTH_MODES:
                return [Frame(path, None, _rgb(np.array(im.convert("RGB"))))]  # a copy: writeable like the rest
            raw, fmt = np.asarray(im), im.format
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, bombs)
        raise UnreadableImage(path, f"not a readable image ({_one_line(exc)})") from None
    if raw.ndim != 2:
        raise UnreadableImage(path, f"unexpected {raw.ndim}-D pixel array of shape {raw.shape}")
    if window is not None:
        grey = _windowed(raw, window)
    elif raw.dtype.kind == "f":
        grey = _min_max(raw)
    else:
        info = np.iinfo(raw.dtype)
        lo, hi = (0, PNG_MAX_VALUE) if fmt == "PNG" else (info.min, info.max)
        grey = _scale(raw, lo, hi)
    return [Frame(path, None, _rgb(grey))]


# --------------------------------------------------------------------------- DICOM (pydicom)


def _dicom_frames_array(path: Path, ds) -> np.ndarray:
    """Pixel array shaped (frames, rows, cols[, samples])."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableImage(path, "no pixel data")
    try:
        arr = ds.pixel_array  # pydicom 3 decodes YBR_FULL / YBR_FULL_422 to RGB
    except Exception as exc:  # decoders raise ValueError, NotImplementedError, RuntimeError, ...
        raise UnreadableImage(path, f"cannot decode the pixel data ({_one_line(exc)})") from None
    n_frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if n_frames == 1:
        arr = arr[None]
    expected = 3 if samples == 1 else 4
    if arr.ndim != expected or arr.shape[0] != n_frames or (samples > 1 and arr.shape[-1] != samples):
        raise UnreadableImage(path, f"pixel array of shape {arr.shape} does not match {n_frames} frame(s) "
                                    f"of {samples} sample(s)")
    if arr.shape[0] == 0 or arr.size == 0:
        raise UnreadableImage(path, "0 frames")
    return arr


def _dicom_colour(path: Path, ds, arr: np.ndarray) -> np.ndarray:
    """Colour frames (RGB, YBR decoded by pydicom, PALETTE COLOR) to 8-bit RGB."""
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as exc:
            raise UnreadableImage(path, f"cannot apply the palette ({_one_line(exc)})") from None
        if arr.dtype == np.uint8:
            return arr
        return _scale(arr, 0, np.iinfo(arr.dtype).max)
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    return _scale(arr, 0, 2**bits - 1)


def _dicom_grey(path: Path, ds, arr: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Modality LUT, VOI (window / file window / VOI LUT / min..max), MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(arr, ds)
    except Exception as exc:
        raise UnreadableImage(path, f"cannot apply the modality LUT ({_one_line(exc)})") from None
    if window is not None:
        out = _windowed(values, window)
    elif ds.get("VOILUTSequence"):
        try:
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            out = _scale(apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0), 0, 2**lut_bits - 1)
        except Exception as exc:
            raise UnreadableImage(path, f"cannot apply the VOI LUT ({_one_line(exc)})") from None
    elif (file_window := _file_window(ds)) is not None:
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
            center, width = file_window
            with np.errstate(over="ignore"):  # exp overflow -> inf -> 0, the correct limit
                y = U8_MAX / (1 + np.exp(-SIGMOID_SLOPE * (np.asarray(values, np.float64) - center) / width))
            out = np.clip(np.rint(y), 0, U8_MAX).astype(np.uint8)
        else:
            out = _windowed(values, file_window)
    else:
        out = _min_max(np.asarray(values, np.float64))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = U8_MAX - out
    return out


def _file_window(ds) -> tuple[float, float] | None:
    """The first (Window Center, Window Width) of the file, or None if absent or invalid."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
        w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    except (TypeError, ValueError, IndexError):
        return None
    return (c, w) if math.isfinite(c) and math.isfinite(w) and w > 0 else None


def _read_dicom(path: Path, window: tuple[float, float] | None, force: bool) -> list[Frame]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ...
        raise UnreadableImage(path, f"not a readable DICOM file ({_one_line(exc)})") from None
    arr = _dicom_frames_array(path, ds)
    samples = int(ds.get("SamplesPerPixel") or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples == 1 and photometric in ("MONOCHROME1", "MONOCHROME2", ""):
        images = _dicom_grey(path, ds, arr, window)
    elif samples == RGB or photometric == "PALETTE COLOR":
        images = _dicom_colour(path, ds, arr)
    else:
        raise UnreadableImage(path, f"unsupported photometric interpretation {photometric!r} "
                                    f"with {samples} sample(s) per pixel")
    if len(images) == 1:
        return [Frame(path, None, _rgb(images[0]))]
    return [Frame(path, i, _rgb(img)) for i, img in enumerate(images)]


# --------------------------------------------------------------------------- NIfTI (nibabel)


def _read_nifti(path: Path, window: tuple[float, float] | None, axis: int) -> list[Frame]:
    import nibabel as nib

    try:
        volume = nib.load(path, mmap=False).get_fdata(dtype=np.float32)
    except Exception as exc:  # ImageFileError, EOFError, zlib.error, ValueError on short data, ...
        raise UnreadableImage(path, f"not a readable NIfTI file ({_one_line(exc)})") from None
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim not in (2, 3):
        raise UnreadableImage(path, f"{volume.ndim}-D image of shape {volume.shape}; expected 2-D or 3-D")
    if volume.size == 0:
        raise UnreadableImage(path, f"no voxels (shape {volume.shape})")
    grey = _windowed(volume, window) if window is not None else _min_max(volume)
    if grey.ndim == 2:
        return [Frame(path, None, _rgb(grey))]
    return [Frame(path, i, _rgb(np.take(grey, i, axis=axis))) for i in range(grey.shape[axis])]


# --------------------------------------------------------------------------- public


def read_frames(path: Path, window: tuple[float, float] | None = None, axis: int = 2) -> list[Frame]:
    """All 2-D images of one file as (H, W, 3) uint8 frames (see the module docstring for the rules).

    ``window`` = (center, width) overrides any automatic intensity mapping of high-depth grey data;
    ``axis`` is the NIfTI slicing axis. Raises ``UnreadableImage`` for any file that cannot be read and
    ``ValueError`` for a bad ``window`` or ``axis`` (an argument error, not a file error).
    """
    if axis not in VOLUME_AXES:
        raise ValueError(f"axis must be one of {VOLUME_AXES}, got {axis!r}")
    _check_window(window)
    path = Path(path)
    if not path.exists():
        raise UnreadableImage(path, "no such file")
    if not path.is_file():
        raise UnreadableImage(path, "not a file")
    if path.stat().st_size == 0:
        raise UnreadableImage(path, "empty file")
    suffix = supported_suffix(path)
    if suffix in RASTER_SUFFIXES:
        frames = _read_raster(path, window)
    elif suffix in DICOM_SUFFIXES:
        frames = _read_dicom(path, window, force=False)
    elif suffix in NIFTI_SUFFIXES:
        frames = _read_nifti(path, window, axis)
    elif _has_dicom_magic(path):
        frames = _read_dicom(path, window, force=True)
    else:
        raise UnreadableImage(path, f"unsupported file type {path.suffix or '(no suffix)'!r}; supported: "
                                    f"{', '.join(sorted(SUPPORTED_SUFFIXES))} or DICOM files without suffix")
    if not frames:
        raise UnreadableImage(path, "0 frames")
    return frames


def _walk(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and supported_suffix(Path(f))]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def find_inputs(paths: Sequence[Path]) -> tuple[list[Path], list[UnreadableImage]]:
    """The image files named by ``paths``, and the paths that are not (reported, not raised).

    A file is taken as given if it has a supported suffix or is DICOM by its preamble; a folder is walked
    recursively (sorted, supported suffixes only, hidden files and folders skipped). A file reached twice
    is listed once.
    """
    files: list[Path] = []
    problems: list[UnreadableImage] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            candidates = _walk(p)
        elif p.is_file():
            if not (supported_suffix(p) or _has_dicom_magic(p)):
                problems.append(UnreadableImage(p, f"unsupported file type {p.suffix or '(no suffix)'!r}"))
                continue
            candidates = [p]
        else:
            problems.append(UnreadableImage(p, "no such file or folder" if not p.exists() else
                                            "not a file or folder"))
            continue
        for c in candidates:
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                files.append(c)
    return files, problems


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8 by PIL bilinear resize (as the loaders always did)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
