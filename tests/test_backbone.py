"""The packaged EfficientNet-Lite0 weights map onto timm and classify a real photo."""

from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from fedsecmem.detector.backbone import (PatchEmbedder, builtin_weights_path, create_classifier,
                                map_state_dict, to_tensor)
from fedsecmem.errors import UserError

ESPRESSO = 967  # ImageNet class index


def test_mapped_weights_classify_coffee_as_espresso():
    model = create_classifier()
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    x = timm.data.create_transform(**cfg)(Image.fromarray(data.coffee())).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert float(probs[ESPRESSO]) > 0.5


def test_every_tensor_is_mapped_with_its_shape():
    source = torch.load(builtin_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_state_dict(source, list(target), {k: tuple(v.shape) for k, v in target.items()})
    assert list(mapped) == list(target)
    for (_, a), (_, b) in zip(source.items(), mapped.items()):
        assert a is b


def test_shape_mismatch_names_the_tensor():
    src = OrderedDict(a=torch.zeros(3), b=torch.zeros(2, 2))
    with pytest.raises(UserError, match="does not fit"):
        map_state_dict(src, ["x", "y"], {"x": (3,), "y": (4, 2)})
    with pytest.raises(UserError, match="2 tensors"):
        map_state_dict(src, ["x"], {"x": (3,)})


def test_patch_embeddings_shape_and_frozen(embedder):
    imgs = (np.random.default_rng(0).random((3, 96, 96, 3)) * 255).astype(np.uint8)
    emb = embedder.embed(imgs, batch_size=2)
    assert emb.patches.shape == (3, 12, 12, 40 + 112)  # stride 8, stages 2 and 3
    assert emb.images.shape == (3, 320)
    assert all(not p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.features.training
    again = embedder.embed(imgs[:1], batch_size=1)
    np.testing.assert_allclose(again.patches[0], emb.patches[0], rtol=1e-4, atol=1e-4)


def test_local_pooling_smooths_the_grid(embedder):
    img = (np.random.default_rng(1).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    raw = PatchEmbedder(image_layer=None, pool_size=1).embed(img).patches
    pooled = embedder.embed(img).patches
    def rough(p):
        return float(np.abs(np.diff(p, axis=1)).mean())
    assert rough(pooled) < rough(raw)


def test_to_tensor_scales_uint8():
    t = to_tensor(np.full((1, 4, 4, 3), 255, np.uint8))
    assert t.shape == (1, 3, 4, 4) and float(t.max()) == 1.0


def test_other_backbone_needs_weights_and_unknown_names_fail(tmp_path):
    with pytest.raises(UserError, match="only for tf_efficientnet_lite0"):
        create_classifier("resnet18", "builtin")
    with pytest.raises(UserError, match="unknown timm model"):
        create_classifier("no_such_net_xyz", "builtin")
    with pytest.raises(UserError, match="allow_network"):
        create_classifier("resnet18", "hub")
    with pytest.raises(UserError, match="not found"):
        create_classifier("resnet18", str(tmp_path / "missing.pth"))


def test_user_weights_file_for_another_backbone(tmp_path):
    ref = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    emb = PatchEmbedder("resnet18", str(path), layers=(1, 2), image_layer=3)
    out = emb.embed(np.zeros((1, 64, 64, 3), np.uint8))
    assert out.patches.shape == (1, 16, 16, 64 + 128)  # layer1 (stride 4) + layer2
    assert out.images.shape == (1, 256)


def test_cuda_asked_without_cuda_is_a_clear_error(monkeypatch):
    from fedsecmem.detector.backbone import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"


def _real_photos(side: int) -> np.ndarray:
    """A few real photos (scikit-image, CC0) resized to ``side``."""
    photos = [data.coffee(), data.astronaut(), data.chelsea(), np.stack([data.brick()] * 3, -1)]
    return np.stack([np.asarray(Image.fromarray(p).resize((side, side), Image.BILINEAR)) for p in photos])


def test_patch_embedding_equals_patchcore_definition_on_real_photos(embedder):
    """Known answer: PatchCore's patch embedding computed independently from plain timm features:
    3x3 average with the zero padding counted (torch's default), the deeper map upsampled
    bilinearly to the shallower grid, concatenated."""
    imgs = _real_photos(128)
    ours = embedder.embed(imgs, batch_size=4).patches
    full = create_classifier()
    feats = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(2, 3))
    feats.load_state_dict(full.state_dict(), strict=False)
    x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        raw_a, b = feats.eval()(x)
        a = torch.nn.functional.avg_pool2d(raw_a, 3, 1, 1)
        valid_only = torch.nn.functional.avg_pool2d(raw_a, 3, 1, 1, count_include_pad=False)
        b = torch.nn.functional.avg_pool2d(b, 3, 1, 1)
        b = torch.nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        ref = torch.cat([a, b], 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape == (4, 16, 16, 152)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # the padding counts: a corner patch averages its 4 valid neighbours over 9 cells, an edge
    # patch its 6 (the mean over valid cells only cost 20 AUROC points on real photos)
    corner = valid_only[:, :, 0, 0].numpy()
    edge = valid_only[:, :, 0, 5].numpy()
    np.testing.assert_allclose(ours[:, 0, 0, :40], corner * 4 / 9, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[:, 0, 5, :40], edge * 6 / 9, rtol=1e-4, atol=1e-5)
