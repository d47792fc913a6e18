"""Datasets: the embedded textures benchmark, Fashion-MNIST, MVTec-layout folders, client splits."""

from fedsecmem.data.types import Benchmark, ImageSet

__all__ = ["Benchmark", "ImageSet"]
