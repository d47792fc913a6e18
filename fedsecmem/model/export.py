"""``fedsecmem export MODEL``: a site's model as one ONNX graph that onnxruntime runs alone.

A site that deploys its detector on a scanner, an inspection line or a hospital server should not
have to install fedsecmem, PyTorch, timm and faiss there. The graph holds everything the Python
``Detector`` does after resizing: the (x - mean) / std preprocessing, the frozen backbone and the
patch embedding, the memory generator, the exact nearest-neighbour distance to every item of the
patch banks (in blocks of ``chunk`` items, so peak memory stays bounded however large the banks),
PatchCore's re-weighted max, the image-level kNN score, and the upsampled, Gaussian-smoothed
anomaly map. The threshold and the rule that normalizes scores to 0..1 travel in the model's
metadata, so a caller of onnxruntime alone can make the same decisions (docs/export.md).

The banks are the site's own training patches: the exported file is as private as the model folder
and stays at the site.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsecmem import __version__
from fedsecmem.detector.threshold import SPAN_FLOOR, Threshold
from fedsecmem.errors import UserError
from fedsecmem.model.store import ModelError, SavedModel, load_model

__all__ = ["AUTO_CHUNK_ITEMS", "INPUT", "OPSET", "export_onnx", "onnx_metadata"]

OPSET = 18
INPUT = "image"
EXPORTERS = ("auto", "torchscript", "dynamo")
INPUT_DOC = "image (N, 3, S, S) float32 in [0, 1]"
AUTO_CHUNK_ITEMS = 4096  # bank items per distance block: a block holds N * patches * chunk float32
EXAMPLE_BATCH = 2  # traced batch size (the batch axis is dynamic in the graph)
GAUSS_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default truncate (kernel radius in sigmas)
PROTOBUF_LIMIT = 2 * 1024**3  # one ONNX file (protobuf) holds at most 2 GiB
NORMALIZATION = ("normalized = clip(0.5 + (score - threshold) / (2 * max(threshold - threshold_calibration_min, "
                 f"{SPAN_FLOOR:g})), 0, 1); anomalous = score > threshold (normalized > 0.5)")


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """scipy.ndimage's 1-D Gaussian: radius int(truncate * sigma + 0.5), weights normalised."""
    radius = int(GAUSS_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * x**2 / sigma**2)
    return torch.from_numpy((w / w.sum()).astype(np.float32))


def _neighbour_tables(saved: SavedModel, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every item of the concatenated patch banks: the global indices of its ``min(k, len(bank))``
    nearest items in its own bank (itself first; rows padded to a common width), which of those
    columns are real, and whether its bank has fewer than 2 items (then the plain max is kept)."""
    banks = list(saved.detector.patch_banks.values())
    width = min(k, max(len(b) for b in banks))
    support, real, single, offset = [], [], [], 0
    for bank in banks:
        kb = min(k, len(bank))
        _, idx = bank.search(bank.items, kb)
        sup = np.full((len(bank), width), offset, np.int64)
        sup[:, :kb] = idx + offset
        mask = np.zeros((len(bank), width), bool)
        mask[:, :kb] = True
        support.append(sup)
        real.append(mask)
        single.append(np.full(len(bank), len(bank) < 2))
        offset += len(bank)
    return np.concatenate(support), np.concatenate(real), np.concatenate(single)


class _ScoringGraph(nn.Module):
    """The exported computation: images in [0, 1] -> the scores and maps of ``SiteDetector`` and
    ``anomaly_maps``. Bank items are stored as transposed blocks of ``chunk`` items."""

    def __init__(self, saved: SavedModel, chunk: int):
        super().__init__()
        det = saved.detector
        self.embedder = saved.backbone.build("cpu").eval()
        self.generator = det.projection.eval() if det.projection is not None else None
        items = np.concatenate([b.items for b in det.patch_banks.values()]).astype(np.float32)
        self.n_blocks = math.ceil(len(items) / chunk)
        for i in range(self.n_blocks):
            block = items[i * chunk:(i + 1) * chunk].astype(np.float64)
            self.register_buffer(f"block{i}", torch.from_numpy(np.ascontiguousarray(block.T, np.float32)))
            self.register_buffer(f"block{i}_sq", torch.from_numpy((block**2).sum(1).astype(np.float32)))
        self.chunk = chunk
        self.reweight = det.reweight_k > 1
        if self.reweight:
            support, real, single = _neighbour_tables(saved, det.reweight_k)
            self.register_buffer("support", torch.from_numpy(support))
            self.register_buffer("support_real", torch.from_numpy(real))
            self.register_buffer("single", torch.from_numpy(single))
        self.has_knn = det.image_bank is not None and saved.backbone.image_layer is not None
        if self.has_knn:
            ib = det.image_bank.items.astype(np.float64)
            self.register_buffer("image_bank_t", torch.from_numpy(np.ascontiguousarray(ib.T, np.float32)))
            self.register_buffer("image_bank_sq", torch.from_numpy((ib**2).sum(1).astype(np.float32)))
            self.image_k = min(det.image_k, len(ib))
        sigma = float(saved.manifest["scoring"]["smoothing_sigma"])
        self.smooth = sigma > 0
        if self.smooth:
            g = _gaussian_kernel(sigma)
            self.radius = (len(g) - 1) // 2
            self.register_buffer("gauss_w", g.view(1, 1, 1, -1))
            self.register_buffer("gauss_h", g.view(1, 1, -1, 1))
        self.size = saved.backbone.image_size
        self.primary = saved.manifest["scoring"]["primary"]

    def _blocks(self):
        for i in range(self.n_blocks):
            yield i * self.chunk, getattr(self, f"block{i}"), getattr(self, f"block{i}_sq")

    def _nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distance of each row of ``q`` to its nearest bank item and that item's global index
        (the first on ties, as faiss), one block at a time."""
        q_sq = (q * q).sum(1, keepdim=True)
        best = index = None
        for start, block_t, block_sq in self._blocks():
            d2 = q_sq - 2.0 * (q @ block_t) + block_sq
            low, arg = d2.min(dim=1)
            arg = arg + start
            if best is None:
                best, index = low, arg
            else:
                closer = low < best
                best, index = torch.where(closer, low, best), torch.where(closer, arg, index)
        return best, index

    def _reweighted(self, patches: torch.Tensor, patch: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``fedsecmem.detector.scoring.reweighted_max``: (N, P, D) patches, (N, P) distances, (N, P)
        indices of their nearest items."""
        top = patch.argmax(dim=1, keepdim=True)  # (N, 1)
        s_max = patch.gather(1, top)[:, 0]
        p_star = patches.gather(1, top[:, :, None].expand(-1, -1, patches.shape[2]))[:, 0]  # (N, D)
        m_star = index.gather(1, top)[:, 0]  # (N,) global index of m*
        p_sq = (p_star * p_star).sum(1, keepdim=True)
        d2_all = torch.cat([p_sq - 2.0 * (p_star @ b) + sq for _, b, sq in self._blocks()], dim=1)  # (N, M)
        dist = d2_all.gather(1, self.support[m_star]).clamp_min(0.0).sqrt()
        dist = torch.where(self.support_real[m_star], dist, torch.full_like(dist, -math.inf))
        weight = 1.0 - torch.softmax(dist, dim=1)[:, 0]
        return torch.where(self.single[m_star], s_max, weight * s_max)

    def _smooth(self, up: torch.Tensor) -> torch.Tensor:
        """scipy.ndimage.gaussian_filter(mode="nearest") as two 1-D convolutions."""
        r = self.radius
        up = F.conv2d(F.pad(up, (0, 0, r, r), mode="replicate"), self.gauss_h)
        return F.conv2d(F.pad(up, (r, r, 0, 0), mode="replicate"), self.gauss_w)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        patches, image_emb = self.embedder(image)  # (N, h, w, D), (N, E) or None
        if self.generator is not None:
            patches = self.generator(patches)
        n, h, w, d = patches.shape
        flat = patches.reshape(-1, d)
        best, index = self._nearest(flat)
        patch_scores = best.clamp_min(0.0).sqrt().reshape(n, h, w)
        per_image = patch_scores.reshape(n, h * w)
        if self.reweight:
            image_patch = self._reweighted(patches.reshape(n, h * w, d), per_image, index.reshape(n, h * w))
        else:
            image_patch = per_image.max(dim=1).values
        up = F.interpolate(patch_scores[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False)
        anomaly_map = (self._smooth(up) if self.smooth else up)[:, 0]
        if not self.has_knn:
            return image_patch, anomaly_map, patch_scores
        g_sq = (image_emb * image_emb).sum(1, keepdim=True)
        d2 = g_sq - 2.0 * (image_emb @ self.image_bank_t) + self.image_bank_sq
        image_knn = d2.topk(self.image_k, dim=1, largest=False).values.clamp_min(0.0).sqrt().mean(dim=1)
        primary = image_knn if self.primary == "image" else image_patch
        return primary, anomaly_map, patch_scores, image_patch, image_knn


def _auto_chunk(n_items: int) -> int:
    """Blocks of at most ``AUTO_CHUNK_ITEMS`` items, of equal size."""
    return math.ceil(n_items / math.ceil(n_items / AUTO_CHUNK_ITEMS))


def onnx_metadata(saved: SavedModel) -> dict[str, str]:
    """What a caller of onnxruntime alone needs to use the graph's scores (all values strings)."""
    thr: Threshold | None = saved.threshold
    bb = saved.backbone
    return {
        "model_id": saved.model_id, "manifest_sha256": saved.manifest_sha256,
        "site": str(saved.manifest.get("site", "")), "run_id": str(saved.manifest.get("run_id", "")),
        "threshold": "" if thr is None else repr(float(thr.value)),
        "threshold_calibration_min": "" if thr is None else repr(float(thr.calibration_min)),
        "threshold_target_fpr": "" if thr is None else repr(float(thr.target_fpr)),
        "image_size": str(bb.image_size), "mean": json.dumps(list(bb.mean)), "std": json.dumps(list(bb.std)),
        "resize": bb.resize, "input": f"RGB {INPUT_DOC}, resized to image_size ({bb.resize}); the graph "
                                      "applies (x - mean) / std",
        "primary_score": saved.manifest["scoring"]["primary"], "fedsecmem_version": __version__,
        "normalization": NORMALIZATION,
        # how training turned DICOM / NIfTI / 16-bit files into 8-bit images (fedsecmem.data.imageio)
        "conversion": json.dumps(saved.manifest.get("conversion") or {"window": None, "slice_axis": 2}),
    }


def _legacy_exporter() -> bool:
    """Whether this torch still ships the TorchScript ONNX exporter (deprecated since torch 2.9)."""
    return callable(getattr(getattr(torch.onnx, "utils", None), "export", None))


def _to_proto(graph: nn.Module, example: torch.Tensor, outputs: list[str], exporter: str):
    """The ONNX ModelProto of ``graph``, traced with ``exporter`` ("torchscript" or "dynamo")."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: not the user's concern
        if exporter == "torchscript":
            buf = io.BytesIO()
            torch.onnx.export(graph, (example,), buf, dynamo=False, input_names=[INPUT], output_names=outputs,
                              dynamic_axes={name: {0: "N"} for name in [INPUT, *outputs]}, opset_version=OPSET)
            return onnx.load_from_string(buf.getvalue())
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[INPUT], output_names=outputs,
                                    dynamic_shapes=({0: torch.export.Dim("N")},), opset_version=OPSET,
                                    external_data=False, verbose=False)
        return program.model_proto


def export_onnx(model_dir: Path, out: Path, chunk: int | None = None, exporter: str = "auto") -> dict:
    """Write the model folder ``model_dir`` as one ONNX graph at ``out`` (see the module docstring).

    ``chunk``: bank items per distance block (default: automatic from the bank size). ``exporter``:
    "torchscript" (torch's legacy exporter: traces this graph several times faster), "dynamo"
    (torch.export), or "auto": torchscript while this torch ships it, else dynamo. Both give the same
    graph semantics. Returns the file's size, its input and outputs, the chunk, opset and exporter."""
    saved = load_model(Path(model_dir))  # checks every file: a tampered folder raises ModelError here
    try:
        import onnx
    except ImportError:
        raise UserError("export: needs the onnx packages (pip install 'fedsecmem[export]')") from None
    if exporter not in EXPORTERS:
        raise UserError(f"export: exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if exporter == "auto":
        exporter = "torchscript" if _legacy_exporter() else "dynamo"
    if saved.manifest["scoring"]["primary"] == "image" and (saved.detector.image_bank is None
                                                             or saved.backbone.image_layer is None):
        raise ModelError(f"model {saved.folder}: primary score 'image' without an image bank; refused")
    out = Path(out)
    n_items = sum(len(b) for b in saved.detector.patch_banks.values())
    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk: must be at least 1, got {chunk}")
    chunk = min(chunk, n_items) if chunk is not None else _auto_chunk(n_items)
    bank_bytes = 4 * sum(b.items.size for b in saved.detector.patch_banks.values())
    if bank_bytes > PROTOBUF_LIMIT:
        raise UserError(f"export: the patch banks hold {bank_bytes / 1e9:.1f} GB, over the 2 GiB an ONNX file holds")
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out: cannot create {out.parent}: {exc.strerror or exc}") from None

    graph = _ScoringGraph(saved, chunk).eval()
    outputs = ["image_score", "anomaly_map", "patch_scores"] + (["image_patch", "image_knn"] if graph.has_knn else [])
    size = saved.backbone.image_size
    example = torch.rand(EXAMPLE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    proto = _to_proto(graph, example, outputs, exporter)
    proto.doc_string = f"fedsecmem site model {saved.model_id}: {INPUT_DOC} -> {', '.join(outputs)}"
    onnx.helper.set_model_props(proto, onnx_metadata(saved))
    tmp = out.with_name(out.name + ".tmp")
    try:
        onnx.save_model(proto, str(tmp))
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
    return {"bytes": out.stat().st_size, "input": INPUT_DOC, "outputs": outputs, "chunk": chunk, "opset": OPSET,
            "exporter": exporter}
