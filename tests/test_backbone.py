"""The packaged EfficientNet-Lite0 weights map onto timm and classify a real photo."""

from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data

from fedsecmem.backbone import (PatchEmbedder, builtin_weights_path, create_classifier,
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
    from fedsecmem.backbone import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"
