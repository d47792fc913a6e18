"""ELPV loader on the real data of the installed package ``elpv-dataset`` (no skip: CI installs it)."""

import shutil

import numpy as np
import pytest
from PIL import Image

from fedsecmem.config import config_from_dict
from fedsecmem.data.elpv import (KIND_DEFECTIVE, KIND_P33, KIND_P67, LICENCE, PRODUCTS, make_elpv,
                                 package_dir, read_labels)
from fedsecmem.data.load import load_benchmark
from fedsecmem.data.types import UNCERTAIN
from fedsecmem.errors import UserError

SIZE = 64
COUNTS = dict(train_per_product=12, test_normal_per_product=6, test_defect_per_product=5,
              uncertain_per_product=2)
PER_PRODUCT_TEST = 6 + 5 + 2 + 2


def _make(seed=0, root=None, image_size=SIZE, **over):
    return make_elpv(image_size=image_size, seed=seed, root=root, **{**COUNTS, **over})


@pytest.fixture(scope="module")
def bench():
    return _make(seed=0)


@pytest.fixture(scope="module")
def levels():
    """labels.csv of the package: path -> (level 0..3, wafer type)."""
    return {c.path: (c.level, PRODUCTS[c.product]) for c in read_labels(package_dir())}


def test_package_counts_match_the_published_ones(levels):
    got = {}
    for level, wafer in levels.values():
        got[(wafer, level)] = got.get((wafer, level), 0) + 1
    assert got == {("mono", 0): 588, ("mono", 1): 117, ("mono", 2): 56, ("mono", 3): 313,
                   ("poly", 0): 920, ("poly", 1): 178, ("poly", 2): 50, ("poly", 3): 402}


def test_shapes_dtypes_and_grey_rgb(bench):
    assert bench.name == "elpv"
    tr, te = bench.train, bench.test
    assert tr.images.shape == (2 * 12, SIZE, SIZE, 3) and tr.images.dtype == np.uint8
    assert te.images.shape == (2 * PER_PRODUCT_TEST, SIZE, SIZE, 3) and te.images.dtype == np.uint8
    assert tr.masks is None and te.masks is None
    for s in (tr, te):
        assert np.array_equal(s.images[..., 0], s.images[..., 1])
        assert np.array_equal(s.images[..., 0], s.images[..., 2])
        assert s.product_names == ["mono", "poly"]
        assert s.images.std() > 5  # real pictures, not blanks
    assert bench.info["licence"] == LICENCE == "CC BY-NC-SA 4.0"
    assert "elpv-dataset" in bench.info["source"]


def test_images_are_the_named_files_resized_bilinear(bench):
    folder = package_dir()
    for s, files in ((bench.train, bench.info["train_files"]), (bench.test, bench.info["test_files"])):
        assert len(files) == len(s)
        for i in (0, len(s) - 1):
            with Image.open(folder / files[i]) as im:
                want = np.asarray(im.convert("L").resize((SIZE, SIZE), Image.BILINEAR))
            assert np.array_equal(s.images[i, ..., 0], want)


def test_train_and_test_are_disjoint(bench):
    train_files, test_files = bench.info["train_files"], bench.info["test_files"]
    assert len(set(train_files)) == len(train_files) and len(set(test_files)) == len(test_files)
    assert not set(train_files) & set(test_files)
    train_px = {img.tobytes() for img in bench.train.images}
    assert not any(img.tobytes() in train_px for img in bench.test.images)


def test_labels_kinds_products_and_headline(bench, levels):
    tr, te = bench.train, bench.test
    want_level = {"good": 0, KIND_P33: 1, KIND_P67: 2, KIND_DEFECTIVE: 3}
    for s, files in ((tr, bench.info["train_files"]), (te, bench.info["test_files"])):
        for f, kind, prod in zip(files, s.kinds, s.products):
            level, wafer = levels[f]
            assert level == want_level[kind] and wafer == PRODUCTS[prod]
    assert set(tr.kinds) == {"good"} and not tr.labels.any()
    assert np.bincount(tr.products).tolist() == [12, 12]
    assert te.labels.tolist() == [0 if k == "good" else 1 for k in te.kinds]
    for p in range(2):
        kinds = [k for k, q in zip(te.kinds, te.products) if q == p]
        assert {k: kinds.count(k) for k in set(kinds)} == {
            "good": 6, KIND_DEFECTIVE: 5, KIND_P33: 2, KIND_P67: 2}
    assert KIND_P33.startswith(UNCERTAIN) and KIND_P67.startswith(UNCERTAIN) and "/" not in KIND_P33
    head = te.headline
    assert head.tolist() == [k in ("good", KIND_DEFECTIVE) for k in te.kinds]
    assert head.sum() == 2 * (6 + 5)
    assert bench.info["counts"]["mono"] == {"train": 12, "good": 6, KIND_DEFECTIVE: 5, KIND_P33: 2, KIND_P67: 2}


def test_deterministic_for_a_seed_and_different_across_seeds(bench):
    again = _make(seed=0)
    assert again.info["train_files"] == bench.info["train_files"]
    assert again.info["test_files"] == bench.info["test_files"]
    assert np.array_equal(again.train.images, bench.train.images)
    assert np.array_equal(again.test.images, bench.test.images)
    other = _make(seed=1)
    assert set(other.info["train_files"]) != set(bench.info["train_files"])
    assert set(other.info["test_files"]) != set(bench.info["test_files"])


def test_test_cells_do_not_move_when_only_the_train_count_changes(bench):
    more = _make(seed=0, image_size=32, train_per_product=30)
    assert more.info["test_files"] == bench.info["test_files"]
    assert set(bench.info["train_files"]) <= set(more.info["train_files"])


@pytest.mark.parametrize("over, field", [
    (dict(train_per_product=700), "data.train_per_product"),
    (dict(train_per_product=585, test_normal_per_product=6), "data.train_per_product"),
    (dict(test_normal_per_product=921), "data.test_normal_per_product"),
    (dict(test_defect_per_product=314), "data.test_defect_per_product"),
    (dict(uncertain_per_product=51), "data.uncertain_per_product"),
])
def test_counts_beyond_the_data_are_refused(over, field):
    with pytest.raises(UserError) as err:
        _make(**over)
    msg = str(err.value)
    assert msg.startswith(field + ":") and "\n" not in msg and "ELPV has" in msg


def test_missing_root_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"^data\.root: ELPV folder not found"):
        _make(root=tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"^data\.root: no labels\.csv"):
        _make(root=tmp_path)


def test_a_users_copy_as_root(tmp_path, levels):
    # a tiny copy in the same layout: per wafer type 3 normal cells and one of each other level
    (tmp_path / "images").mkdir()
    picked, lines = {}, []
    for path, (level, wafer) in sorted(levels.items()):
        if picked.get((wafer, level), 0) < (3 if level == 0 else 1):
            picked[(wafer, level)] = picked.get((wafer, level), 0) + 1
            shutil.copy(package_dir() / path, tmp_path / path)
            lines.append(f"{path}  {level / 3!r}  {wafer}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    b = _make(root=tmp_path, train_per_product=2, test_normal_per_product=1, test_defect_per_product=1,
              uncertain_per_product=1)
    assert len(b.train) == 4 and len(b.test) == 8 and b.info["root"] == str(tmp_path)
    with pytest.raises(UserError, match=r"^data\.train_per_product: .* has 3"):
        _make(root=tmp_path, train_per_product=3, test_normal_per_product=1)
    (tmp_path / "labels.csv").write_text("images/cell0001.png  0.5  mono\n")
    with pytest.raises(UserError, match=r"^data\.root: .*line 1"):
        _make(root=tmp_path)


def test_missing_package_names_the_install(monkeypatch):
    import importlib.resources

    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(UserError, match="pip install elpv-dataset") as err:
        _make()
    assert "make setup" in str(err.value)


def test_load_benchmark_builds_it_from_a_run_config(bench):
    cfg = config_from_dict({"data": {"benchmark": "elpv", "image_size": SIZE, **COUNTS}}, ["seed=0"])
    b = load_benchmark(cfg.data, cfg.seed)
    assert b.name == "elpv"
    assert b.info["test_files"] == bench.info["test_files"]
    assert np.array_equal(b.train.images, bench.train.images)
    bad = config_from_dict({"data": {"benchmark": "elpv", "test_defect_per_product": 500}})
    with pytest.raises(UserError, match=r"^data\.test_defect_per_product"):
        load_benchmark(bad.data, 0)


def test_cells_scored_apart_never_move_the_splits():
    """The uncertain cells are dealt last, from their own generator: how many there are changes
    neither any client's training images nor its headline test images."""
    from fedsecmem.data.partition import partition

    def split(uncertain):
        b = make_elpv(16, 60, 20, 20, uncertain, 0)
        clients = partition(b, 5, 0.5, 0, 2)
        files = b.info["test_files"]
        return ([[b.info["train_files"][i] for i in c.train_index] for c in clients],
                [sorted(files[i] for i in c.test_index if b.test.headline[i]) for c in clients],
                sum(int((~c.test.headline).sum()) for c in clients))

    train0, head0, apart0 = split(0)
    train20, head20, apart20 = split(20)
    assert train0 == train20 and head0 == head20
    assert apart0 == 0 and apart20 == 80  # 20 of p=1/3 and 20 of p=2/3 per wafer type, all dealt


def test_central_run_scores_uncertain_cells_apart(tmp_path):
    """End to end: the headline AUROC and the pooled figure count only normal and defective cells
    (the same images as the 'defective' kind against the normals); the uncertain ones appear per kind."""
    from fedsecmem.run.runner import run

    cfg = config_from_dict({"method": "central", "data": {
        "benchmark": "elpv", "image_size": 64, "train_per_product": 12, "test_normal_per_product": 6,
        "test_defect_per_product": 6, "uncertain_per_product": 4}, "clients": {"n": 1},
        "memory": {"coreset_ratio": 0.05}, "audit": {"ledger": False}})
    r = run(cfg, tmp_path)
    a = r["auroc"]
    row = r["per_client"][0]
    assert row["n_test"] == 24 and row["n_test_apart"] == 16
    assert a["pooled_image_patch_max"] == pytest.approx(a["image"])
    assert set(a["per_kind"]) == {"defective", "uncertain_p33", "uncertain_p67"}
    assert a["per_kind"]["uncertain_p33"]["apart"] and not a["per_kind"]["defective"]["apart"]
    assert a["per_kind"]["defective"]["auroc_image"] == pytest.approx(a["image"])  # the same images
    assert set(a["per_category"]) == {"mono", "poly"}
    assert all(c["n_test"] == 12 for c in a["per_category"].values())
