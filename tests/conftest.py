"""Shared fixtures: one backbone per session (loading it costs seconds)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def embedder():
    from fedsecmem.detector.backbone import PatchEmbedder

    return PatchEmbedder(image_layer=4)
