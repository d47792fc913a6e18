"""Client partitioning, the Fashion-MNIST loader and the MVTec-layout folder loader."""

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsecmem.config import FMNIST_ANOMALY_CLASSES, FMNIST_NORMAL_CLASSES
from fedsecmem.data.fmnist import (CLASS_NAMES, DEBIAN_DIR, FILES, load_fmnist, make_fmnist,
                                   make_fmnist_ovr)
from fedsecmem.data.mvtec import make_mvtec
from fedsecmem.data.partition import ClientData, partition, split_counts
from fedsecmem.data.types import Benchmark, ImageSet
from fedsecmem.errors import UserError

# --------------------------------------------------------------------------- helpers


def _set(products, labels=None, names=None, masks=False):
    products = np.asarray(products, np.int64)
    n = len(products)
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64)
    # each image carries its own index in pixel (0, 0) so subsets can be checked
    images = np.zeros((n, 4, 4, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    kinds = ["good" if l == 0 else "defect" for l in labels]
    names = names or [f"p{i}" for i in range(max(products.max(initial=-1) + 1, 1))]
    return ImageSet(images, labels, products, kinds, names,
                    masks=np.zeros((n, 4, 4), bool) if masks else None)


def _bench(train_sizes, test_normal=None, test_defect=None, orphans=0):
    """Synthetic benchmark: ``train_sizes[p]`` train images of product p, test likewise."""
    test_normal = train_sizes if test_normal is None else test_normal
    test_defect = [0] * len(train_sizes) if test_defect is None else test_defect
    names = [f"p{i}" for i in range(len(train_sizes))]
    tr_prod = np.concatenate([np.full(s, p) for p, s in enumerate(train_sizes)])
    te_prod, te_lab = [], []
    for p in range(len(train_sizes)):
        te_prod += [p] * (test_normal[p] + test_defect[p])
        te_lab += [0] * test_normal[p] + [1] * test_defect[p]
    te_prod += [-1] * orphans
    te_lab += [1] * orphans
    return Benchmark("synthetic", _set(tr_prod, names=names),
                     _set(te_prod, te_lab, names=names, masks=True))


def _pixel_ids(s: ImageSet) -> np.ndarray:
    return s.images[:, 0, 0, 0].astype(int) + 256 * s.images[:, 0, 0, 1].astype(int)


def _assert_exact_cover(parts, n):
    allidx = np.concatenate(parts) if parts else np.array([], int)
    assert len(allidx) == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


# --------------------------------------------------------------------------- split_counts


def test_split_counts_sums_exactly_and_is_proportional():
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(1, 12))
        n = int(rng.integers(0, 500))
        shares = rng.dirichlet(np.full(k, 0.3)) + 1e-12
        counts = split_counts(n, shares)
        assert counts.dtype.kind == "i" and counts.shape == (k,)
        assert counts.sum() == n
        assert (counts >= 0).all()
        raw = shares / shares.sum() * n
        assert (np.abs(counts - raw) < 1).all()  # largest remainders: within one of exact


def test_split_counts_known_values():
    assert split_counts(10, np.array([1.0, 1.0])).tolist() == [5, 5]
    assert split_counts(10, np.array([3.0, 1.0, 0.0, 1.0])).tolist() == [6, 2, 0, 2]
    # raw 3.5/1.75/1.75: floors 3/1/1, the two leftover units go to the largest remainders (.75, .75)
    assert split_counts(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]
    # equal remainders: the stable order gives the unit to the first client
    assert split_counts(1, np.array([1.0, 1.0, 1.0])).tolist() == [1, 0, 0]
    assert split_counts(0, np.array([0.2, 0.8])).tolist() == [0, 0]
    assert split_counts(3, np.array([0.0, 0.0, 1.0])).tolist() == [0, 0, 3]
    # unnormalised shares behave like their normalised version
    assert split_counts(9, np.array([2.0, 4.0, 12.0])).tolist() == split_counts(9, np.array([1, 2, 6]) / 9).tolist()


# --------------------------------------------------------------------------- partition


def test_partition_assigns_every_image_to_exactly_one_client():
    bench = _bench([30, 12, 7, 20], test_normal=[5, 9, 3, 11], test_defect=[4, 2, 6, 0], orphans=13)
    for alpha in (0.1, 1.0, 100.0):
        clients = partition(bench, 5, alpha, seed=3)
        assert len(clients) == 5
        assert [c.client for c in clients] == list(range(5))
        assert all(isinstance(c, ClientData) for c in clients)
        _assert_exact_cover([c.train_index for c in clients], len(bench.train))
        _assert_exact_cover([c.test_index for c in clients], len(bench.test))
        for c in clients:
            # the client's ImageSets are exactly the indexed subsets
            assert np.array_equal(_pixel_ids(c.train), c.train_index)
            assert np.array_equal(_pixel_ids(c.test), c.test_index)
            assert np.array_equal(c.train.products, bench.train.products[c.train_index])
            assert np.array_equal(c.test.labels, bench.test.labels[c.test_index])
            assert c.test.kinds == [bench.test.kinds[i] for i in c.test_index]
            assert c.test.masks.shape[0] == len(c.test_index)
            assert c.train.product_names == bench.train.product_names
            assert np.all(np.diff(c.train_index) > 0) and np.all(np.diff(c.test_index) > 0)


def test_partition_deterministic_per_seed():
    bench = _bench([25, 25, 25], test_defect=[5, 5, 5])
    a = partition(bench, 4, 0.3, seed=1)
    b = partition(bench, 4, 0.3, seed=1)
    for x, y in zip(a, b):
        assert np.array_equal(x.train_index, y.train_index)
        assert np.array_equal(x.test_index, y.test_index)
    differs = []
    for seed in (2, 3, 4):
        c = partition(bench, 4, 0.3, seed=seed)
        differs.append(any(not np.array_equal(x.train_index, z.train_index) for x, z in zip(a, c)))
    assert all(differs)


def test_partition_honours_min_train():
    bench = _bench([20, 15, 10, 5])
    for alpha in (0.01, 0.1, 1.0):
        for seed in range(8):
            for n_clients, min_train in [(5, 5), (4, 10), (10, 4), (3, 1)]:
                clients = partition(bench, n_clients, alpha, seed, min_train=min_train)
                sizes = [len(c.train_index) for c in clients]
                assert min(sizes) >= min_train, (alpha, seed, n_clients, min_train, sizes)
                assert sum(sizes) == len(bench.train)


def test_partition_rejects_impossible_min_train():
    with pytest.raises(ValueError):
        partition(_bench([3, 3]), 4, 1.0, seed=0, min_train=2)


def test_partition_min_train_when_only_an_even_deal_works():
    bench = _bench([1] * 10)
    clients = partition(bench, 10, 0.05, seed=0, min_train=1)
    assert [len(c.train_index) for c in clients] == [1] * 10


def _mean_max_share(bench, n_clients, alpha, seeds):
    vals = []
    for seed in seeds:
        for c in partition(bench, n_clients, alpha, seed):
            if len(c.train_index):
                counts = np.bincount(c.train.products, minlength=len(bench.train.product_names))
                vals.append(counts.max() / counts.sum())
    return float(np.mean(vals))


def test_small_alpha_skews_products_more_than_large_alpha():
    bench = _bench([40] * 5)
    seeds = range(10)
    skewed = _mean_max_share(bench, 5, 0.05, seeds)
    mild = _mean_max_share(bench, 5, 1.0, seeds)
    flat = _mean_max_share(bench, 5, 1000.0, seeds)
    assert skewed > mild > flat
    assert skewed > 0.7
    assert flat < 0.3  # every client holds close to 1/5 of each product


def test_large_alpha_gives_even_products():
    bench = _bench([40] * 4)
    for c in partition(bench, 4, 1e4, seed=0):
        counts = np.bincount(c.train.products, minlength=4)
        assert counts.min() >= 8 and counts.max() <= 12


def test_clients_are_tested_on_the_product_mix_they_trained_on():
    # same number of train and normal-test images per product: the shares deal them identically
    bench = _bench([17, 9, 30], test_normal=[17, 9, 30], test_defect=[17, 9, 30])
    for seed in range(5):
        for c in partition(bench, 4, 0.2, seed):
            tr = np.bincount(c.train.products, minlength=3)
            normal = c.test.labels == 0
            te_norm = np.bincount(c.test.products[normal], minlength=3)
            te_def = np.bincount(c.test.products[~normal], minlength=3)
            assert tr.tolist() == te_norm.tolist() == te_def.tolist()


def test_orphan_test_images_follow_normal_test_counts():
    bench = _bench([20, 20, 20], orphans=31)
    for seed in range(5):
        clients = partition(bench, 4, 0.1, seed)
        normal = np.array([(c.test.products >= 0).sum() for c in clients], float)
        orphans = np.array([(c.test.products < 0).sum() for c in clients])
        assert orphans.sum() == 31
        assert orphans.tolist() == split_counts(31, normal).tolist()
        assert (orphans[normal == 0] == 0).all()


def test_partition_single_client_gets_everything():
    bench = _bench([5, 6], test_defect=[2, 3], orphans=4)
    (only,) = partition(bench, 1, 0.5, seed=0)
    assert np.array_equal(only.train_index, np.arange(len(bench.train)))
    assert np.array_equal(only.test_index, np.arange(len(bench.test)))


# --------------------------------------------------------------------------- Fashion-MNIST


def _hash_index(images, labels):
    return {img.tobytes(): int(l) for img, l in zip(images, labels)}


@pytest.fixture(scope="module")
def fmnist_raw():
    # the Debian package dataset-fashion-mnist is a hard requirement: no skip when missing
    x_tr, y_tr = load_fmnist(None, "train")
    x_te, y_te = load_fmnist(None, "test")
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def fmnist64():
    return make_fmnist(list(FMNIST_NORMAL_CLASSES), list(FMNIST_ANOMALY_CLASSES),
                       train_per_class=6, test_per_class=4, image_size=28, seed=0)


def test_debian_fmnist_files_load(fmnist_raw):
    assert DEBIAN_DIR == Path("/usr/share/datasets/fashion-mnist")
    x_tr, y_tr, x_te, y_te = fmnist_raw
    assert x_tr.shape == (60000, 28, 28) and x_tr.dtype == np.uint8
    assert x_te.shape == (10000, 28, 28) and x_te.dtype == np.uint8
    assert np.bincount(y_tr).tolist() == [6000] * 10
    assert np.bincount(y_te).tolist() == [1000] * 10
    assert x_tr.max() == 255 and x_tr.min() == 0
    assert len(CLASS_NAMES) == 10


def test_fmnist_6_4_protocol(fmnist_raw, fmnist64):
    x_tr, y_tr, x_te, y_te = fmnist_raw
    b = fmnist64
    normal, anomal = list(FMNIST_NORMAL_CLASSES), list(FMNIST_ANOMALY_CLASSES)
    assert b.name == "fmnist"
    assert b.info == {"normal_classes": normal, "anomaly_classes": anomal}
    assert b.train.product_names == [CLASS_NAMES[c] for c in normal]
    assert b.train.images.shape == (6 * 6, 28, 28, 3) and b.train.images.dtype == np.uint8
    assert (b.train.labels == 0).all() and set(b.train.kinds) == {"good"}
    assert np.bincount(b.train.products).tolist() == [6] * 6
    # grey images in three equal channels; at native size they are the original pixels
    for s in (b.train, b.test):
        assert (s.images[..., 0] == s.images[..., 1]).all() and (s.images[..., 0] == s.images[..., 2]).all()
    train_lookup = _hash_index(x_tr, y_tr)
    test_lookup = _hash_index(x_te, y_te)
    # every train image is a training image of the class its product names
    for img, p in zip(b.train.images, b.train.products):
        assert train_lookup[img[..., 0].tobytes()] == normal[p]
    assert len({img.tobytes() for img in b.train.images}) == len(b.train)
    # test: normals only from normal classes (with their product), anomalies only from the others
    t = b.test
    n_anom = 4 * 6 // 4
    assert len(t) == 6 * 4 + 4 * n_anom
    assert t.masks is None
    for img, label, p, kind in zip(t.images, t.labels, t.products, t.kinds):
        true = test_lookup[img[..., 0].tobytes()]  # also proves it came from the test split
        if label == 0:
            assert kind == "good" and p >= 0 and true == normal[p]
        else:
            assert label == 1 and p == -1 and true in anomal and kind == CLASS_NAMES[true]
    assert np.bincount(t.products[t.labels == 0]).tolist() == [4] * 6
    assert sorted(set(t.kinds) - {"good"}) == sorted(CLASS_NAMES[c] for c in anomal)
    assert len({img.tobytes() for img in t.images}) == len(t)


def test_fmnist_deterministic_and_resized(fmnist64):
    again = make_fmnist(list(FMNIST_NORMAL_CLASSES), list(FMNIST_ANOMALY_CLASSES), 6, 4, 28, seed=0)
    other = make_fmnist(list(FMNIST_NORMAL_CLASSES), list(FMNIST_ANOMALY_CLASSES), 6, 4, 28, seed=1)
    assert np.array_equal(again.train.images, fmnist64.train.images)
    assert np.array_equal(again.test.images, fmnist64.test.images)
    assert again.test.kinds == fmnist64.test.kinds
    assert not np.array_equal(other.train.images, fmnist64.train.images)
    big = make_fmnist([0, 1], [9], 2, 2, 32, seed=0)
    assert big.train.images.shape == (4, 32, 32, 3) and big.test.images.shape == (8, 32, 32, 3)
    assert big.test.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert big.test.products.tolist() == [0, 0, 1, 1, -1, -1, -1, -1]


def test_fmnist_one_vs_rest(fmnist_raw):
    x_tr, y_tr, x_te, y_te = fmnist_raw
    b = make_fmnist_ovr(7, train_per_class=5, test_per_class=18, image_size=28, seed=2)
    assert b.name == "fmnist_ovr_7"
    assert b.train.product_names == ["sneaker"]
    assert b.info["anomaly_classes"] == [c for c in range(10) if c != 7]
    assert (b.train.products == 0).all() and len(b.train) == 5
    test_lookup = _hash_index(x_te, y_te)
    t = b.test
    assert (t.labels == 0).sum() == 18 and (t.labels == 1).sum() == 9 * 2
    true = np.array([test_lookup[img[..., 0].tobytes()] for img in t.images])
    assert (true[t.labels == 0] == 7).all()
    assert set(true[t.labels == 1].tolist()) == set(range(10)) - {7}
    assert (t.products[t.labels == 1] == -1).all() and (t.products[t.labels == 0] == 0).all()


def test_fmnist_partition_deals_anomalies_to_clients(fmnist64):
    clients = partition(fmnist64, 3, 0.5, seed=0)
    _assert_exact_cover([c.test_index for c in clients], len(fmnist64.test))
    assert sum((c.test.products == -1).sum() for c in clients) == (fmnist64.test.products == -1).sum()


def test_fmnist_missing_folder_names_the_debian_package(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist") as exc:
        load_fmnist(tmp_path / "nowhere", "train")
    assert "train-images-idx3-ubyte" in str(exc.value)
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        make_fmnist([0], [1], 1, 1, 28, seed=0, root=tmp_path)


def _idx(dims, body=None, dtype_code=0x08):
    header = bytes([0, 0, dtype_code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)
    if body is None:
        body = bytes(int(np.prod(dims)))
    return header + body


def _write_set(folder: Path, split, images: bytes, labels: bytes, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    img_name, lab_name = FILES[split]
    if compress:
        (folder / img_name).write_bytes(gzip.compress(images))
        (folder / lab_name).write_bytes(gzip.compress(labels))
    else:
        (folder / img_name[:-3]).write_bytes(images)
        (folder / lab_name[:-3]).write_bytes(labels)


@pytest.mark.parametrize("compress", [True, False])
def test_fake_idx_files_load(tmp_path, compress):
    pix = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    _write_set(tmp_path, "test", _idx((3, 28, 28), pix.tobytes()), _idx((3,), bytes([4, 0, 9])), compress)
    x, y = load_fmnist(tmp_path, "test")
    assert np.array_equal(x, pix)
    assert y.tolist() == [4, 0, 9]


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_idx_body_is_a_user_error(tmp_path, compress):
    images = _idx((5, 28, 28))
    _write_set(tmp_path, "train", images[:-100], _idx((5,)), compress)
    with pytest.raises(UserError, match="truncated"):
        load_fmnist(tmp_path, "train")


def test_idx_with_wrong_magic_is_a_user_error(tmp_path):
    _write_set(tmp_path, "train", _idx((2, 28, 28), dtype_code=0x0D), _idx((2,)))  # float32 code
    with pytest.raises(UserError, match="not an idx file"):
        load_fmnist(tmp_path, "train")
    _write_set(tmp_path, "train", b"\x89PNG\r\n\x1a\n" + bytes(64), _idx((2,)))
    with pytest.raises(UserError, match="not an idx file"):
        load_fmnist(tmp_path, "train")


def test_idx_images_and_labels_that_disagree_are_a_user_error(tmp_path):
    _write_set(tmp_path, "train", _idx((3, 28, 28)), _idx((4,)))
    with pytest.raises(UserError, match="do not match"):
        load_fmnist(tmp_path, "train")
    _write_set(tmp_path, "train", _idx((3, 784)), _idx((3,)))  # flat images: wrong rank
    with pytest.raises(UserError, match="do not match"):
        load_fmnist(tmp_path, "train")


@pytest.mark.parametrize("case", ["cut_gzip_stream", "short_header", "not_gzip"])
def test_damaged_idx_files_are_user_errors(tmp_path, case):
    images, labels = _idx((5, 28, 28)), _idx((5,))
    img_name, lab_name = FILES["train"]
    tmp_path.joinpath(lab_name).write_bytes(gzip.compress(labels))
    if case == "cut_gzip_stream":
        data = gzip.compress(images)
        raw = data[: len(data) // 2]
    elif case == "short_header":
        raw = gzip.compress(images[:6])
    else:
        raw = images  # named .gz but stored uncompressed
    tmp_path.joinpath(img_name).write_bytes(raw)
    with pytest.raises(UserError):
        load_fmnist(tmp_path, "train")


# --------------------------------------------------------------------------- MVTec layout


CATS = {"bottle": (200, 30, 30), "cable": (20, 180, 60)}
SIZE = 16


def _png(path: Path, colour, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(colour)).save(path)


def _mask(path: Path, size=(40, 32)):
    """White (255) in the left half, a dark grey (not white) band on the right, black elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((size[1], size[0]), np.uint8)
    a[:, : size[0] // 2] = 255
    a[:, 3 * size[0] // 4 :] = 40
    Image.fromarray(a, "L").save(path)


@pytest.fixture()
def mvtec_root(tmp_path):
    root = tmp_path / "mvtec"
    for cat, colour in CATS.items():
        base = np.array(colour)
        for i in range(3):
            _png(root / cat / "train" / "good" / f"{i:03d}.png", base + i)
        (root / cat / "train" / "good" / "readme.txt").write_text("not an image")
        for i in range(2):
            _png(root / cat / "test" / "good" / f"{i:03d}.png", base + 10 + i)
            _png(root / cat / "test" / "crack" / f"{i:03d}.png", base + 20 + i)
            _mask(root / cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    (root / "license_only").mkdir()  # a folder without train/good is not a category
    return root


def test_mvtec_counts_labels_products_and_pixels(mvtec_root):
    b = make_mvtec(mvtec_root, SIZE)
    assert b.name == "mvtec"
    assert b.info["categories"] == ["bottle", "cable"]
    assert b.train.product_names == ["bottle", "cable"] == b.test.product_names
    assert b.train.images.shape == (6, SIZE, SIZE, 3) and b.train.images.dtype == np.uint8
    assert b.train.products.tolist() == [0, 0, 0, 1, 1, 1]
    assert (b.train.labels == 0).all()
    t = b.test
    assert t.images.shape == (8, SIZE, SIZE, 3)
    assert t.products.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert t.kinds == ["crack", "crack", "good", "good"] * 2  # kinds in sorted folder order
    assert t.labels.tolist() == [1, 1, 0, 0] * 2
    # colours survive loading: each image is the flat colour it was written with
    for p, colour in enumerate(CATS.values()):
        for i in range(3):
            assert (b.train.images[3 * p + i] == np.array(colour) + i).all()
        assert (t.images[4 * p] == np.array(colour) + 20).all()
        assert (t.images[4 * p + 3] == np.array(colour) + 11).all()


def test_mvtec_masks_follow_the_white_pixels(mvtec_root):
    t = make_mvtec(mvtec_root, SIZE).test
    assert t.masks is not None
    assert t.masks.shape == (8, SIZE, SIZE) and t.masks.dtype == bool
    expected = np.zeros((SIZE, SIZE), bool)
    expected[:, : SIZE // 2] = True
    for m, label in zip(t.masks, t.labels):
        if label == 1:
            assert np.array_equal(m, expected)
        else:
            assert not m.any()


def test_mvtec_missing_mask_means_no_masks(mvtec_root):
    (mvtec_root / "cable" / "ground_truth" / "crack" / "001_mask.png").unlink()
    b = make_mvtec(mvtec_root, SIZE)
    assert b.test.masks is None
    assert len(b.test) == 8 and b.test.labels.sum() == 4


def test_mvtec_categories_and_train_limit(mvtec_root):
    b = make_mvtec(mvtec_root, SIZE, categories=["cable"], train_limit=2)
    assert b.train.product_names == ["cable"]
    assert len(b.train) == 2 and (b.train.products == 0).all()
    assert (b.train.images[1] == np.array(CATS["cable"]) + 1).all()
    assert len(b.test) == 4 and (b.test.products == 0).all()
    # order of the requested categories defines the product index
    b2 = make_mvtec(mvtec_root, SIZE, categories=["cable", "bottle"])
    assert b2.train.product_names == ["cable", "bottle"]
    assert (b2.train.images[b2.train.products == 0] == np.array(CATS["cable"])[None, None, None] +
            np.arange(3)[:, None, None, None]).all()


def test_mvtec_missing_root_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        make_mvtec(tmp_path / "absent", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train/good"):
        make_mvtec(tmp_path / "empty", SIZE)


def test_mvtec_unknown_category_is_a_user_error(mvtec_root):
    with pytest.raises(UserError, match="carpet") as exc:
        make_mvtec(mvtec_root, SIZE, categories=["bottle", "carpet"])
    assert "bottle" in str(exc.value) and "cable" in str(exc.value)  # lists what was found
    with pytest.raises(UserError, match="license_only"):
        make_mvtec(mvtec_root, SIZE, categories=["license_only"])


def test_mvtec_unreadable_image_is_a_user_error(mvtec_root):
    (mvtec_root / "bottle" / "test" / "good" / "000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        make_mvtec(mvtec_root, SIZE)


def test_mvtec_missing_test_folder_is_a_user_error(mvtec_root):
    import shutil

    shutil.rmtree(mvtec_root / "cable" / "test")
    with pytest.raises(UserError, match="test"):
        make_mvtec(mvtec_root, SIZE)
