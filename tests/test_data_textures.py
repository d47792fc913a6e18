"""The embedded textures benchmark, its synthetic defects and the Perlin noise behind them."""

import numpy as np
import pytest

from fedsecmem.config import DEFECT_FAMILIES, TEXTURE_PRODUCTS
from fedsecmem.data import textures
from fedsecmem.data.defects import DEFECTS, MIN_AREA, MIN_CHANGE, make_defect
from fedsecmem.data.perlin import perlin_2d
from fedsecmem.data.textures import SOURCES, _regions, load_source, make_textures
from fedsecmem.data.types import Benchmark, ImageSet

PRODUCTS = ["brick", "grass", "retina"]
FAMILIES = list(DEFECTS)
CROP = 64
SIZE = 64
TRAIN, TEST_NORMAL, TEST_DEFECT = 4, 3, 5


def _build(seed=0, products=PRODUCTS, crop=CROP, size=SIZE, defects=FAMILIES):
    return make_textures(list(products), TRAIN, TEST_NORMAL, TEST_DEFECT, list(defects), crop, size, seed)


@pytest.fixture(scope="module")
def bench():
    return _build(seed=0)


def _float_pair(seed, size=CROP):
    """A float texture crop and a foreign crop from another source, both (size, size, 3) in [0, 1]."""
    rng = np.random.default_rng([seed, 99])
    names = list(SOURCES)
    a = load_source(names[seed % len(names)])
    b = load_source(names[(seed + 1) % len(names)])
    img = textures._crop(a, (0, a.shape[0]), size, rng).copy()
    foreign = textures._crop(b, (0, b.shape[0]), size, rng).copy()
    return img, foreign


def _change(before, after):
    return np.abs(after.astype(np.float64) - before.astype(np.float64)).max(axis=-1)


# --------------------------------------------------------------------------- perlin


def test_perlin_shape_range_and_not_constant():
    rng = np.random.default_rng(0)
    for shape, res in [((64, 64), (4, 4)), ((50, 70), (4, 3)), ((33, 17), (2, 8))]:
        noise = perlin_2d(shape, res, rng)
        assert noise.shape == shape
        assert noise.dtype == np.float64
        assert np.isfinite(noise).all()
        assert np.abs(noise).max() <= 1.0 + 1e-9
        assert noise.std() > 0.05
        assert noise.max() - noise.min() > 0.3


def test_perlin_is_zero_on_the_lattice_and_smooth():
    noise = perlin_2d((64, 64), (4, 4), np.random.default_rng(3))
    # gradient noise vanishes at every lattice point (cell size 16)
    np.testing.assert_allclose(noise[::16, ::16], 0.0, atol=1e-12)
    # and varies smoothly between them
    assert np.abs(np.diff(noise, axis=0)).max() < 0.25
    assert np.abs(np.diff(noise, axis=1)).max() < 0.25


def test_perlin_deterministic_per_generator_state():
    a = perlin_2d((32, 32), (4, 4), np.random.default_rng(7))
    b = perlin_2d((32, 32), (4, 4), np.random.default_rng(7))
    c = perlin_2d((32, 32), (4, 4), np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# --------------------------------------------------------------------------- defects


def test_defect_families_match_config():
    assert set(DEFECTS) == set(DEFECT_FAMILIES)
    assert set(SOURCES) == set(TEXTURE_PRODUCTS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_defect_mask_marks_changed_pixels(kind):
    for seed in range(8):
        img, foreign = _float_pair(seed)
        img_before, foreign_before = img.copy(), foreign.copy()
        out, mask = make_defect(kind, img, np.random.default_rng(seed), foreign)
        # inputs untouched
        np.testing.assert_array_equal(img, img_before)
        np.testing.assert_array_equal(foreign, foreign_before)
        assert out.shape == img.shape and out.dtype == img.dtype
        assert mask.shape == img.shape[:2] and mask.dtype == bool
        assert mask.sum() >= MIN_AREA
        assert mask.sum() < mask.size  # a local defect, not the whole image
        change = _change(img, out)
        # every pixel inside the mask changed by more than MIN_CHANGE ...
        assert (change[mask] > MIN_CHANGE).all()
        # ... and nothing outside it changed by more than that (documented contract)
        assert (change[~mask] <= MIN_CHANGE).all()


def test_defect_outside_mask_is_bit_identical():
    leaks = []
    for kind in FAMILIES:
        for seed in range(8):
            img, foreign = _float_pair(seed)
            out, mask = make_defect(kind, img, np.random.default_rng(seed), foreign)
            if not np.array_equal(out[~mask], img[~mask]):
                leaks.append((kind, seed))
    assert leaks == []


@pytest.mark.parametrize("kind", [
    k for k in FAMILIES
])
def test_defect_output_stays_in_unit_range(kind):
    for seed in range(8):
        img, foreign = _float_pair(seed)
        out, _ = make_defect(kind, img, np.random.default_rng(seed), foreign)
        assert out.min() >= 0.0 and out.max() <= 1.0, (seed, out.min(), out.max())


@pytest.mark.parametrize("kind", FAMILIES)
def test_defect_deterministic_for_the_same_generator(kind):
    img, foreign = _float_pair(1)
    out1, mask1 = make_defect(kind, img, np.random.default_rng(5), foreign)
    out2, mask2 = make_defect(kind, img, np.random.default_rng(5), foreign)
    out3, mask3 = make_defect(kind, img, np.random.default_rng(6), foreign)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(mask1, mask2)
    assert not np.array_equal(mask1, mask3)


def test_perlin_blend_uses_the_foreign_texture():
    img = np.zeros((CROP, CROP, 3))
    foreign = np.ones((CROP, CROP, 3))
    out, mask = make_defect("perlin_blend", img, np.random.default_rng(0), foreign)
    # beta in [0.5, 1]: blended pixels are at least half-way to the foreign texture
    assert (out[mask] >= 0.5 - 1e-12).all()
    assert (out[~mask] == 0).all()
    assert 0.02 * mask.size <= mask.sum() <= 0.16 * mask.size


def test_make_defect_redraws_too_small_defects(monkeypatch):
    calls = []

    def tiny_then_big(img, rng, foreign=None):
        calls.append(1)
        mask = np.zeros(img.shape[:2], bool)
        mask[: 1 if len(calls) < 3 else 4, :4] = True  # 4 px, 4 px, then 16 px
        out = img.copy()
        out[mask] = 1 - out[mask]
        return out, mask

    monkeypatch.setitem(DEFECTS, "perlin_blend", tiny_then_big)
    img = np.zeros((16, 16, 3))
    out, mask = make_defect("perlin_blend", img, np.random.default_rng(0), img)
    assert len(calls) == 3
    assert mask.sum() == 16 >= MIN_AREA


def test_make_defect_gives_up_when_nothing_can_change():
    flat = np.full((CROP, CROP, 3), 0.5)  # blurring a flat image changes nothing
    with pytest.raises(RuntimeError, match="blur"):
        make_defect("blur", flat, np.random.default_rng(0), flat)


# --------------------------------------------------------------------------- the benchmark


def test_shapes_and_dtypes(bench):
    assert isinstance(bench, Benchmark)
    assert isinstance(bench.train, ImageSet) and isinstance(bench.test, ImageSet)
    n_tr = TRAIN * len(PRODUCTS)
    n_te = (TEST_NORMAL + TEST_DEFECT) * len(PRODUCTS)
    assert bench.train.images.shape == (n_tr, SIZE, SIZE, 3)
    assert bench.test.images.shape == (n_te, SIZE, SIZE, 3)
    assert bench.train.images.dtype == np.uint8 and bench.test.images.dtype == np.uint8
    assert bench.test.masks is not None
    assert bench.test.masks.shape == (n_te, SIZE, SIZE) and bench.test.masks.dtype == bool
    assert bench.train.product_names == PRODUCTS and bench.test.product_names == PRODUCTS
    assert (bench.train.labels == 0).all()
    assert set(bench.train.kinds) == {"good"}
    assert np.bincount(bench.train.products, minlength=3).tolist() == [TRAIN] * 3
    assert set(np.unique(bench.test.labels)) == {0, 1}
    assert bench.info["crop_size"] == CROP and bench.info["defects"] == FAMILIES
    # images are not degenerate
    assert bench.train.images.std() > 5 and bench.test.images.std() > 5


def test_same_seed_same_benchmark_other_seed_differs(bench):
    again = _build(seed=0)
    other = _build(seed=1)
    for a, b in [(bench.train, again.train), (bench.test, again.test)]:
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.products, b.products)
        assert a.kinds == b.kinds
    np.testing.assert_array_equal(bench.test.masks, again.test.masks)
    assert not np.array_equal(bench.train.images, other.train.images)
    assert not np.array_equal(bench.test.images, other.test.images)
    assert not np.array_equal(bench.test.masks, other.test.masks)


def test_every_product_has_normal_and_defective_test_images(bench):
    test = bench.test
    for p in range(len(PRODUCTS)):
        sel = test.products == p
        assert (test.labels[sel] == 0).sum() == TEST_NORMAL
        assert (test.labels[sel] == 1).sum() == TEST_DEFECT
        kinds = [k for k, s in zip(test.kinds, sel) if s and k != "good"]
        assert kinds == [FAMILIES[j % len(FAMILIES)] for j in range(TEST_DEFECT)]


def test_each_defect_family_appears_and_labels_follow_kinds(bench):
    test = bench.test
    assert set(test.kinds) == set(FAMILIES) | {"good"}
    for k, label in zip(test.kinds, test.labels):
        assert label == (0 if k == "good" else 1)


def test_masks_empty_for_good_and_large_enough_for_defects(bench):
    test = bench.test
    area = test.masks.reshape(len(test), -1).sum(axis=1)
    assert (area[test.labels == 0] == 0).all()
    assert (area[test.labels == 1] >= MIN_AREA).all()
    assert (area[test.labels == 1] < SIZE * SIZE).all()


def test_defect_images_and_masks_match_the_defect_applied(monkeypatch):
    """With crop == image size the stored mask is the defect's mask, and the stored image
    differs from the clean crop at every mask pixel."""
    seen = []
    real = textures.make_defect

    def spy(kind, img, rng, foreign):
        out, mask = real(kind, img, rng, foreign)
        seen.append((kind, img.copy(), out, mask))
        return out, mask

    monkeypatch.setattr(textures, "make_defect", spy)
    b = _build(seed=0)
    defect_rows = np.flatnonzero(b.test.labels == 1)
    assert len(seen) == len(defect_rows)
    for row, (kind, base, out, mask) in zip(defect_rows, seen):
        assert b.test.kinds[row] == kind
        np.testing.assert_array_equal(b.test.masks[row], mask)
        np.testing.assert_array_equal(b.test.images[row], textures._to_uint8(out, SIZE))
        clean = textures._to_uint8(base, SIZE)
        assert (_change(clean, b.test.images[row])[mask] > 0).all()


def test_regions_keep_train_and_test_rows_disjoint():
    for h in [128, 200, 422, 512, 660]:
        for crop in [32, 64, 100]:
            if h < 2 * crop:
                continue
            (a0, a1), (b0, b1) = _regions(h, crop)
            assert a0 == 0 and b1 == h
            assert a1 <= b0  # no row in both
            assert a1 - a0 >= crop and b1 - b0 >= crop
            assert b1 - b0 >= int(textures.TEST_FRACTION * h)
    with pytest.raises(ValueError):
        _regions(100, 64)


def test_crops_come_from_the_right_rows(monkeypatch):
    """Train crops lie in the train rows, test crops (normal and defect bases) in the held-out
    rows of their product; foreign textures come from another source's held-out rows."""
    by_id = {id(load_source(n)): n for n in SOURCES}
    log = []
    real = textures._crop

    def spy(src, rows, crop, rng):
        out = real(src, rows, crop, rng)
        offset = out.ctypes.data - src.ctypes.data
        y, x = offset // src.strides[0], (offset % src.strides[0]) // src.strides[1]
        log.append((by_id[id(src)], int(y), int(x)))
        return out

    monkeypatch.setattr(textures, "_crop", spy)
    b = _build(seed=0)
    per_product = TRAIN + TEST_NORMAL + 2 * TEST_DEFECT
    assert len(log) == per_product * len(PRODUCTS)
    test_normal_rows = np.flatnonzero(b.test.labels == 0)
    for p, name in enumerate(PRODUCTS):
        src = load_source(name)
        (_, split), _ = _regions(src.shape[0], CROP)
        entries = log[p * per_product : (p + 1) * per_product]
        train, rest = entries[:TRAIN], entries[TRAIN:]
        normal, defect = rest[:TEST_NORMAL], rest[TEST_NORMAL:]
        for n, y, x in train:
            assert n == name and 0 <= y and y + CROP <= split
            assert 0 <= x <= src.shape[1] - CROP
        for n, y, x in normal + defect[0::2]:
            assert n == name and y >= split and y + CROP <= src.shape[0]
        for n, y, x in defect[1::2]:  # foreign texture of each defect
            fsrc = load_source(n)
            assert n != name and y >= _regions(fsrc.shape[0], CROP)[1][0]
        # the good test images are exactly those held-out crops, unaugmented
        rows = test_normal_rows[b.test.products[test_normal_rows] == p]
        for row, (n, y, x) in zip(rows, normal):
            np.testing.assert_array_equal(
                b.test.images[row], textures._to_uint8(src[y : y + CROP, x : x + CROP], SIZE))


def test_resized_benchmark_shapes():
    b = make_textures(["gravel", "cell"], 2, 2, 5, FAMILIES, 64, 32, seed=4)
    assert b.train.images.shape == (4, 32, 32, 3)
    assert b.test.images.shape == (14, 32, 32, 3)
    assert b.test.masks.shape == (14, 32, 32)
    area = b.test.masks.reshape(len(b.test), -1).sum(axis=1)
    assert (area[b.test.labels == 0] == 0).all()
    assert (area[b.test.labels == 1] > 0).all()


def test_crop_too_large_for_the_product_raises():
    with pytest.raises(ValueError, match="too large"):
        make_textures(["retina"], 1, 1, 1, ["stain"], 300, 32, seed=0)


def test_crop_that_fits_the_products_never_fails_on_foreign_source():
    for seed in range(4):
        make_textures(["brick"], 1, 0, 2, ["stain"], 240, 32, seed)
