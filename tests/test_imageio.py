"""Image formats (fedsecmem.data.imageio): 8-bit raster, 16-bit PNG/TIFF, DICOM, NIfTI; the MVTec loader on them."""

import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fedsecmem.data.imageio import (SUPPORTED_SUFFIXES, Frame, UnreadableImage, find_inputs, image_stem,
                                    read_frames, supported_suffix, to_model_input)
from fedsecmem.data.mvtec import make_mvtec
from fedsecmem.errors import UserError

RNG_SEED = 7
NIFTI_SCL_SLOPE_OFFSET = 112  # float32 scl_slope, then float32 scl_inter, in the 348-byte NIfTI-1 header


# --------------------------------------------------------------------------- references (independent of the module)


def _ref_window(values, center, width):
    lo, hi = center - width / 2, center + width / 2
    return np.rint(np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _ref_range(values, lo, hi):
    return np.rint(np.clip((np.asarray(values, np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _grey3(a):
    return np.stack([a, a, a], axis=-1)


def _check_frame(f, path, index, shape):
    assert isinstance(f, Frame) and f.path == Path(path) and f.index == index
    assert f.image.shape == (*shape, 3) and f.image.dtype == np.uint8
    assert f.image.flags.c_contiguous and f.image.flags.writeable


def _random(shape, dtype=np.uint8, high=256, seed=RNG_SEED):
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


# --------------------------------------------------------------------------- writers


def _write_dicom(path, pixels, *, photometric="MONOCHROME2", slope=None, intercept=None, window=None,
                 with_pixels=True, bits_stored=None):
    """A minimal CT-like Part 10 file; ``pixels`` (H, W), (F, H, W) or (H, W, 3) for RGB."""
    pixels = np.asarray(pixels)
    rgb = photometric == "RGB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    frames = pixels.shape[0] if (pixels.ndim == 3 and not rgb) else 1
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits_stored or bits, (bits_stored or bits) - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_nifti(path, volume, slope=None, inter=None):
    """nibabel's writer, then scl_slope/scl_inter patched in (nibabel resets them from the data it saves)."""
    plain = Path(str(path).removesuffix(".gz"))
    nib.save(nib.Nifti1Image(volume, np.eye(4)), plain)
    if slope is not None:
        raw = bytearray(plain.read_bytes())
        raw[NIFTI_SCL_SLOPE_OFFSET:NIFTI_SCL_SLOPE_OFFSET + 8] = struct.pack("<ff", slope, inter)
        plain.write_bytes(bytes(raw))
    if str(path).endswith(".gz"):
        Path(path).write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    return Path(path)


def _bundled(name):
    """A pydicom test file only if it ships with pydicom (never downloaded)."""
    return get_testdata_file(name, download=False)


# --------------------------------------------------------------------------- 8-bit raster


EIGHT_BIT = [("L", "png"), ("RGB", "png"), ("RGBA", "png"), ("P", "png"), ("LA", "png"), ("1", "png"),
             ("RGB", "jpg"), ("L", "jpeg"), ("RGB", "bmp"), ("P", "bmp"), ("RGB", "tif"), ("L", "tiff"),
             ("RGBA", "tif"), ("CMYK", "jpg")]


def _eight_bit_file(tmp_path, mode, ext, size=(23, 17)):
    rgba = Image.fromarray(_random((size[1], size[0], 4)), "RGBA")
    im = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else rgba.convert(mode)
    path = tmp_path / f"img_{mode}.{ext}"
    im.save(path)
    return path


@pytest.mark.parametrize("mode,ext", EIGHT_BIT)
def test_8bit_raster_equals_pil_convert_rgb(tmp_path, mode, ext):
    path = _eight_bit_file(tmp_path, mode, ext)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    [f] = read_frames(path)
    _check_frame(f, path, None, (17, 23))
    assert np.array_equal(f.image, expected)


@pytest.mark.parametrize("mode,ext", [("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "jpg")])
def test_8bit_model_input_is_bit_identical_to_the_old_loader(tmp_path, mode, ext):
    path = _eight_bit_file(tmp_path, mode, ext)
    with Image.open(path) as im:  # what mvtec._load_rgb did before
        old = np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR))
    new = to_model_input(read_frames(path)[0].image, 16)
    assert new.shape == (16, 16, 3) and new.dtype == np.uint8
    assert np.array_equal(new, old)


def test_to_model_input_keeps_an_image_of_the_right_size():
    img = _random((16, 16, 3))
    assert np.array_equal(to_model_input(img, 16), img)
    small = to_model_input(_random((40, 30, 3)), 8)
    assert small.shape == (8, 8, 3) and small.dtype == np.uint8


# --------------------------------------------------------------------------- 16-bit / float raster


def _ramp16():
    a = np.linspace(0, 65535, 12 * 10).reshape(12, 10).astype(np.uint16)
    a[0, 0], a[-1, -1] = 0, 65535
    return a


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_full_range_by_default(tmp_path, ext):
    a = _ramp16()
    path = tmp_path / f"x16.{ext}"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # really a 16-bit file
    [f] = read_frames(path)
    _check_frame(f, path, None, a.shape)
    assert np.array_equal(f.image, _grey3(_ref_range(a, 0, 65535)))
    assert f.image[0, 0, 0] == 0 and f.image[-1, -1, 0] == 255
    # not what convert("RGB") gives (it saturates everything above 255)
    with Image.open(path) as im:
        assert not np.array_equal(f.image, np.asarray(im.convert("RGB")))


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_window(tmp_path, ext):
    a = _ramp16()
    path = tmp_path / f"x16.{ext}"
    Image.fromarray(a).save(path)
    center, width = 20000.0, 10000.0
    [f] = read_frames(path, window=(center, width))
    assert np.array_equal(f.image, _grey3(_ref_window(a, center, width)))
    assert (f.image[a < 15000] == 0).all() and (f.image[a > 25000] == 255).all()
    inside = (a > 15000) & (a < 25000)
    assert inside.any() and ((f.image[inside] > 0) & (f.image[inside] < 255)).all()


def test_float_tiff_uses_its_own_min_max(tmp_path):
    a = np.linspace(-3.5, 12.25, 8 * 9).reshape(8, 9).astype(np.float32)
    path = tmp_path / "f.tif"
    Image.fromarray(a).save(path)
    [f] = read_frames(path)
    assert np.array_equal(f.image, _grey3(_ref_range(a, a.min(), a.max())))
    assert f.image.min() == 0 and f.image.max() == 255


def test_bad_window_or_axis_is_a_value_error(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(_ramp16()).save(path)
    for window in [(0, 0), (0, -5), (float("nan"), 10)]:
        with pytest.raises(ValueError, match="window"):
            read_frames(path, window=window)
    with pytest.raises(ValueError, match="axis"):
        read_frames(path, axis=3)


# --------------------------------------------------------------------------- DICOM


def test_dicom_rescale_then_file_window(tmp_path):
    raw = np.arange(0, 2000, 5, dtype=np.uint16).reshape(20, 20)
    path = _write_dicom(tmp_path / "ct.dcm", raw, slope=2, intercept=-1024, window=(40, 400))
    [f] = read_frames(path)
    _check_frame(f, path, None, (20, 20))
    hu = 2.0 * raw - 1024
    assert np.array_equal(f.image, _grey3(_ref_window(hu, 40, 400)))
    # the same file without the rescale would map very differently: the rescale was applied
    assert not np.array_equal(f.image, _grey3(_ref_window(raw, 40, 400)))


def test_dicom_window_argument_overrides_the_files(tmp_path):
    raw = np.arange(0, 2000, 5, dtype=np.uint16).reshape(20, 20)
    path = _write_dicom(tmp_path / "ct.dcm", raw, slope=2, intercept=-1024, window=(40, 400))
    [f] = read_frames(path, window=(-600, 1500))
    assert np.array_equal(f.image, _grey3(_ref_window(2.0 * raw - 1024, -600, 1500)))
    # passing the file's own window changes nothing (one formula for both)
    assert np.array_equal(read_frames(path, window=(40, 400))[0].image, read_frames(path)[0].image)


def test_dicom_without_window_uses_min_max_of_the_whole_file(tmp_path):
    raw = np.stack([np.full((6, 5), 100, np.int16), np.full((6, 5), 300, np.int16)])
    raw[1, 0, 0] = 500
    path = _write_dicom(tmp_path / "mf.dcm", raw, slope=1, intercept=-50)
    frames = read_frames(path)
    assert [f.index for f in frames] == [0, 1]
    expected = _ref_range(raw - 50.0, 50, 450)
    for f, e in zip(frames, expected):
        assert np.array_equal(f.image, _grey3(e))
    assert frames[0].image.max() == 0  # the darker frame stays darker: one mapping for the file


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = _random((9, 11), np.uint16, high=4096)
    m2 = read_frames(_write_dicom(tmp_path / "m2.dcm", raw, window=(2048, 4096)))[0].image
    m1 = read_frames(_write_dicom(tmp_path / "m1.dcm", raw, window=(2048, 4096), photometric="MONOCHROME1"))[0].image
    assert np.array_equal(m1, 255 - m2)
    assert not np.array_equal(m1, m2)


def test_dicom_multi_frame_gives_one_frame_each(tmp_path):
    raw = np.stack([np.full((7, 8), 10 * (k + 1), np.uint16) for k in range(4)])
    raw[:, 0, 0] = 0
    path = _write_dicom(tmp_path / "mf.dcm", raw, window=(20, 40))
    frames = read_frames(path)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    for k, f in enumerate(frames):
        _check_frame(f, path, k, (7, 8))
        assert np.array_equal(f.image, _grey3(_ref_window(raw[k], 20, 40)))


def test_dicom_signed_pixels(tmp_path):
    raw = np.arange(-1000, 1000, 10, dtype=np.int16).reshape(10, 20)
    [f] = read_frames(_write_dicom(tmp_path / "s.dcm", raw, slope=1, intercept=0, window=(0, 1000)))
    assert np.array_equal(f.image, _grey3(_ref_window(raw, 0, 1000)))


def test_dicom_rgb_is_taken_as_8bit_rgb(tmp_path):
    rgb = _random((6, 9, 3))
    [f] = read_frames(_write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB"), window=(0, 1))
    _check_frame(f, tmp_path / "c.dcm", None, (6, 9))
    assert np.array_equal(f.image, rgb)  # window ignored for colour


def test_dicom_without_pixel_data_is_unreadable(tmp_path):
    path = _write_dicom(tmp_path / "np.dcm", np.zeros((4, 4), np.uint16), with_pixels=False)
    with pytest.raises(UnreadableImage) as exc:
        read_frames(path)
    assert exc.value.reason == "no pixel data" and exc.value.path == path
    assert str(exc.value) == f"{path}: no pixel data"


@pytest.mark.parametrize("keep", [0.9, 0.2])
def test_truncated_dicom_is_unreadable_with_a_one_line_reason(tmp_path, keep):
    path = _write_dicom(tmp_path / "t.dcm", _random((32, 32), np.uint16, high=4096), window=(2048, 4096))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UnreadableImage) as exc:
        read_frames(path)
    assert exc.value.reason and "\n" not in str(exc.value) and "Traceback" not in exc.value.reason
    assert str(exc.value) == f"{path}: {exc.value.reason}"


def test_not_a_dicom_with_a_dcm_suffix_is_unreadable(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(_random(500).tobytes())
    with pytest.raises(UnreadableImage, match="DICOM"):
        read_frames(path)


def test_suffixless_dicom_is_recognised_by_its_preamble(tmp_path):
    raw = _random((5, 6), np.uint16, high=1000)
    path = _write_dicom(tmp_path / "IM000001", raw, window=(500, 1000))
    [f] = read_frames(path)
    assert np.array_equal(f.image, _grey3(_ref_window(raw, 500, 1000)))
    other = tmp_path / "notes"
    other.write_bytes(b"x" * 300)
    with pytest.raises(UnreadableImage, match="unsupported"):
        read_frames(other)
    files, problems = find_inputs([path, other])
    assert files == [path] and [p.path for p in problems] == [other]
    # but a folder walk takes supported suffixes only
    assert find_inputs([tmp_path])[0] == []


def _bundled_or_own(tmp_path, name, **own):
    """The bundled pydicom file when it ships, else one written here with the same kind of content."""
    path = _bundled(name)
    if path is not None:
        return Path(path)
    return _write_dicom(tmp_path / name, _random((64, 64), np.int16, high=2000), **own)


def _reference_from_header(path):
    """The rules re-derived from the header alone: rescale, then the first window or the min..max."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)  # noqa: E731
        return _ref_window(values, first(ds.WindowCenter), first(ds.WindowWidth))
    return _ref_range(values, values.min(), values.max())


@pytest.mark.parametrize("name,own", [("CT_small.dcm", {"slope": 1, "intercept": -1024}),
                                      ("MR_small.dcm", {"window": (600, 1600)})])
def test_pydicom_sample_files(tmp_path, name, own):
    path = _bundled_or_own(tmp_path, name, **own)
    [f] = read_frames(path)
    expected = _reference_from_header(path)
    assert f.image.shape == (*expected.shape, 3)
    assert np.array_equal(f.image, _grey3(expected))


def test_pydicom_multi_frame_and_truncated_samples(tmp_path):
    path = _bundled("rtdose.dcm") or _write_dicom(tmp_path / "rtdose.dcm", _random((15, 10, 10), np.uint16))
    frames = read_frames(path)
    n = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
    assert n > 1 and [f.index for f in frames] == list(range(n))
    truncated = _bundled("MR_truncated.dcm")
    if truncated is None:
        full = _write_dicom(tmp_path / "mr.dcm", _random((64, 64), np.uint16))
        truncated = tmp_path / "MR_truncated.dcm"
        truncated.write_bytes(full.read_bytes()[:-62])
    with pytest.raises(UnreadableImage) as exc:
        read_frames(truncated)
    assert "\n" not in exc.value.reason


def test_ybr_dicom_comes_out_as_rgb(tmp_path):
    ybr, rgb = _bundled("SC_ybr_full_422_uncompressed.dcm"), _bundled("SC_rgb_rle.dcm")
    if ybr is None or rgb is None:  # same check on a file written here: RGB converted by pydicom to YBR_FULL
        from pydicom.pixels import convert_color_space

        colours = _random((8, 10, 3))
        rgb = _write_dicom(tmp_path / "rgb.dcm", colours, photometric="RGB")
        ybr = _write_dicom(tmp_path / "ybr.dcm", convert_color_space(colours, "RGB", "YBR_FULL"), photometric="RGB")
        ds = pydicom.dcmread(ybr)
        ds.PhotometricInterpretation = "YBR_FULL"
        ds.save_as(ybr)
    a, b = read_frames(ybr)[0].image.astype(int), read_frames(rgb)[0].image.astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 2  # chroma subsampling / rounding only


# --------------------------------------------------------------------------- NIfTI


def _volume():
    return np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) * 1.5 - 40


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nifti_slices_along_each_axis(tmp_path, suffix, axis):
    vol = _volume()
    path = _write_nifti(tmp_path / f"v{suffix}", vol)
    frames = read_frames(path, axis=axis)
    mapped = _ref_range(vol, vol.min(), vol.max())
    assert len(frames) == vol.shape[axis]
    shape = tuple(s for i, s in enumerate(vol.shape) if i != axis)
    for k, f in enumerate(frames):
        _check_frame(f, path, k, shape)
        assert np.array_equal(f.image, _grey3(np.take(mapped, k, axis=axis)))


def test_nifti_scl_slope_is_applied(tmp_path):
    raw = np.arange(3 * 4 * 2, dtype=np.int16).reshape(3, 4, 2) * 40
    path = _write_nifti(tmp_path / "s.nii.gz", raw, slope=2.0, inter=-100.0)
    assert nib.load(path).dataobj.slope == 2.0  # the file really carries the scaling
    frames = read_frames(path, window=(300, 1000))
    for k, f in enumerate(frames):
        assert np.array_equal(f.image, _grey3(_ref_window(2.0 * raw[:, :, k] - 100, 300, 1000)))
    assert not np.array_equal(frames[1].image, _grey3(_ref_window(raw[:, :, 1], 300, 1000)))


def test_nifti_one_mapping_for_the_whole_volume(tmp_path):
    vol = np.zeros((4, 4, 2), np.float32)
    vol[:, :, 0] = np.arange(16).reshape(4, 4)  # 0..15
    vol[:, :, 1] = 100 + np.arange(16).reshape(4, 4)  # 100..115
    f0, f1 = read_frames(_write_nifti(tmp_path / "v.nii", vol))
    assert f0.image.max() <= _ref_range(15, 0, 115) and f1.image.min() >= _ref_range(100, 0, 115)
    assert f0.image.min() == 0 and f1.image.max() == 255


def test_nifti_2d_4d_and_bad_shapes(tmp_path):
    img2d = np.arange(12, dtype=np.float32).reshape(3, 4)
    [f] = read_frames(_write_nifti(tmp_path / "a.nii", img2d))
    _check_frame(f, tmp_path / "a.nii", None, (3, 4))
    four = _volume()[..., None]
    assert len(read_frames(_write_nifti(tmp_path / "b.nii.gz", four))) == 7
    with pytest.raises(UnreadableImage, match="4-D"):
        read_frames(_write_nifti(tmp_path / "c.nii", np.zeros((3, 3, 3, 2), np.float32)))
    gz = _write_nifti(tmp_path / "d.nii.gz", _volume())
    gz.write_bytes(gz.read_bytes()[:60])
    with pytest.raises(UnreadableImage, match="NIfTI"):
        read_frames(gz)


# --------------------------------------------------------------------------- suffixes, find_inputs, bad files


def test_suffixes_and_stems():
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz"} == SUPPORTED_SUFFIXES
    assert supported_suffix(Path("a/B.NII.GZ")) == ".nii.gz" and supported_suffix(Path("x.PNG")) == ".png"
    assert supported_suffix(Path("x.gz")) is None and supported_suffix(Path("IM0001")) is None
    assert image_stem(Path("scan.nii.gz")) == "scan" and image_stem(Path("a.b.png")) == "a.b"


def test_find_inputs_walks_folders_sorted_and_reports_missing(tmp_path):
    root = tmp_path / "in"
    for rel in ["b.png", "a/z.nii.gz", "a/x.DCM", "a/sub/y.tif", "c.JPG", ".hidden.png", ".git/h.png",
                "a/readme.txt", "a/archive.gz"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    loose = tmp_path / "loose.bmp"
    loose.write_bytes(b"x")
    missing = tmp_path / "absent.png"
    files, problems = find_inputs([root, missing, loose, root / "b.png"])
    assert files == [root / "a/sub/y.tif", root / "a/x.DCM", root / "a/z.nii.gz", root / "b.png", root / "c.JPG",
                     loose]  # sorted by path components; b.png once
    assert len(problems) == 1 and problems[0].path == missing and "no such" in problems[0].reason


def test_corrupt_and_empty_files_are_unreadable(tmp_path):
    corrupt = tmp_path / "c.png"
    corrupt.write_bytes(_random(400).tobytes())
    empty = tmp_path / "e.png"
    empty.touch()
    good = tmp_path / "g.png"
    Image.fromarray(_random((20, 20, 3))).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-200])
    for path, reason in [(corrupt, "not a readable image"), (empty, "empty file"), (cut, "not a readable image"),
                         (tmp_path / "missing.png", "no such file"), (tmp_path, "not a file")]:
        with pytest.raises(UnreadableImage) as exc:
            read_frames(path)
        assert exc.value.reason.startswith(reason) and "\n" not in str(exc.value)


# --------------------------------------------------------------------------- the MVTec loader on every format


SIZE = 16


@pytest.fixture()
def medical_root(tmp_path):
    root = tmp_path / "med"
    good = root / "scan" / "train" / "good"
    good.mkdir(parents=True)
    Image.fromarray(_ramp16()).save(good / "a16.png")
    _write_dicom(good / "b.dcm", np.stack([np.full((20, 24), 100 * (k + 1), np.uint16) for k in range(3)]),
                 window=(200, 400))
    _write_nifti(good / "c.nii.gz", _volume()[:, :, :4])
    for kind, n in [("good", 2), ("crack", 1)]:
        (root / "scan" / "test" / kind).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_random((30, 30, 3), seed=i)).save(root / "scan" / "test" / kind / f"{i}.png")
    mask = np.zeros((30, 30), np.uint8)
    mask[:, :15] = 255
    (root / "scan" / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(root / "scan" / "ground_truth" / "crack" / "0_mask.png")
    return root


def test_mvtec_loads_every_format_frames_as_images(medical_root):
    b = make_mvtec(medical_root, SIZE)
    assert b.train.images.shape == (1 + 3 + 4, SIZE, SIZE, 3) and b.train.images.dtype == np.uint8
    good = medical_root / "scan" / "train" / "good"
    assert np.array_equal(b.train.images[0], to_model_input(read_frames(good / "a16.png")[0].image, SIZE))
    # DICOM frames at 100, 200, 300 through window (200, 400): 0.25, 0.5, 0.75 of 255
    assert [int(b.train.images[i, 0, 0, 0]) for i in (1, 2, 3)] == [64, 128, 191]
    # a loose multi-frame file is one unit: its frames share a group, the PNG stands alone
    g = b.train.groups
    assert g is not None and g[1] == g[2] == g[3] and g[4] == g[7] and len(set(g.tolist())) == 3
    assert b.test.images.shape == (3, SIZE, SIZE, 3) and b.test.labels.tolist() == [1, 0, 0]
    m = b.test.masks
    assert m is not None and m[0, :, : SIZE // 2].all() and not m[0, :, SIZE // 2:].any()
    # train_limit caps images (frames), not files
    assert len(make_mvtec(medical_root, SIZE, train_limit=2).train) == 2
    assert len(make_mvtec(medical_root, SIZE, train_limit=3, axis=0).train) == 3


def test_mvtec_volume_masks_and_stems(medical_root):
    crack = medical_root / "scan" / "test" / "crack"
    truth = medical_root / "scan" / "ground_truth" / "crack"
    # a 2-D NIfTI test image finds x_mask.png (not x.nii_mask.png)
    _write_nifti(crack / "x.nii.gz", np.arange(30 * 30, dtype=np.float32).reshape(30, 30))
    Image.fromarray(np.full((30, 30), 255, np.uint8)).save(truth / "x_mask.png")
    b = make_mvtec(medical_root, SIZE)
    assert len(b.test) == 4 and b.test.masks is not None and b.test.masks[1].all()
    # a multi-frame defective test image cannot be labelled by one 2-D mask: no pixel labels for the set
    _write_nifti(crack / "y.nii", _volume()[:, :, :2])
    Image.fromarray(np.full((5, 6), 255, np.uint8)).save(truth / "y_mask.png")
    b = make_mvtec(medical_root, SIZE)
    assert len(b.test) == 6 and b.test.masks is None and b.test.labels.sum() == 4


def test_mvtec_unreadable_medical_file_is_a_one_line_user_error(medical_root):
    bad = medical_root / "scan" / "train" / "good" / "b.dcm"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(UserError) as exc:
        make_mvtec(medical_root, SIZE)
    msg = str(exc.value)
    assert msg.startswith(f"data.root: cannot read image {bad}: ") and "\n" not in msg
