"""What border handling of the 3x3 patch average costs: the zero padding counted in the mean
(PatchCore's definition, ours) against the mean over valid neighbours only, on the same images.

One PatchCore per textures product (central, seed 0): image AUROC, AUROC when only interior
patches are scored, the share of normal test images whose maximum patch lies on the border ring,
the border ring's share of the patches and of the greedy coreset, and the mean patch norm on the
border and inside. Writes the "Border handling of patch embeddings" section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from markdown import write_section  # noqa: E402

from fedsecmem.detector.backbone import PatchEmbedder  # noqa: E402
from fedsecmem.config import config_from_dict  # noqa: E402
from fedsecmem.detector.coreset import coreset_size, greedy_coreset  # noqa: E402
from fedsecmem.data.load import load_benchmark  # noqa: E402
from fedsecmem.detector.memory import MemoryBank  # noqa: E402
from fedsecmem.detector.metrics import auroc  # noqa: E402

RATIO = 0.1  # the textures configs' coreset ratio


def ring(h: int, w: int) -> np.ndarray:
    out = np.zeros((h, w), bool)
    out[0] = out[-1] = out[:, 0] = out[:, -1] = True
    return out


def measure(bench, count_pad: bool) -> dict[str, dict]:
    emb = PatchEmbedder(image_layer=None, count_pad=count_pad)
    train, test = emb.embed(bench.train.images).patches, emb.embed(bench.test.images).patches
    n, h, w, d = train.shape
    border = ring(h, w)
    rows = {}
    for p, name in enumerate(bench.train.product_names):
        tr = train[bench.train.products == p].reshape(-1, d)
        te = test[bench.test.products == p]
        labels = bench.test.labels[bench.test.products == p]
        on_border = np.broadcast_to(border, (len(tr) // (h * w), h, w)).reshape(-1)
        keep = greedy_coreset(tr, coreset_size(len(tr), RATIO))
        scores = MemoryBank(tr[keep]).nearest_distance(te.reshape(-1, d)).reshape(len(te), h, w)
        top = scores.reshape(len(te), -1).argmax(1)
        norms = np.linalg.norm(tr, axis=1)
        rows[name] = {"auroc": auroc(labels, scores.reshape(len(te), -1).max(1)),
                      "auroc_interior": auroc(labels, scores[:, 1:-1, 1:-1].reshape(len(te), -1).max(1)),
                      "normal_max_on_border": float(border.reshape(-1)[top][labels == 0].mean()),
                      "border_share_patches": float(on_border.mean()),
                      "border_share_coreset": float(on_border[keep].mean()),
                      "norm_border": float(norms[on_border].mean()), "norm_interior": float(norms[~on_border].mean())}
    return rows


def main() -> None:
    torch.set_num_threads(2)
    cfg = config_from_dict({"data": {"benchmark": "textures"}})
    bench = load_benchmark(cfg.data, 0)
    res = {pad: measure(bench, pad) for pad in (True, False)}
    lines = ["| product | image AUROC, padding counted / valid only | interior patches only | normal images "
             "with max on border | border share of coreset (of patches) | mean norm border / interior |",
             "|---|---|---|---|---|---|"]
    for name in bench.train.product_names:
        a, b = res[True][name], res[False][name]
        lines.append(f"| {name} | {a['auroc']:.3f} / {b['auroc']:.3f} | {a['auroc_interior']:.3f} / "
                     f"{b['auroc_interior']:.3f} | {a['normal_max_on_border']:.0%} / {b['normal_max_on_border']:.0%} | "
                     f"{a['border_share_coreset']:.0%} / {b['border_share_coreset']:.0%} ({a['border_share_patches']:.0%}) | "
                     f"{a['norm_border']:.1f} / {a['norm_interior']:.1f} vs {b['norm_border']:.1f} / {b['norm_interior']:.1f} |")

    def mean(pad, key):
        return np.mean([r[key] for r in res[pad].values()])

    lines.append(f"| **mean** | **{mean(True, 'auroc'):.3f} / {mean(False, 'auroc'):.3f}** | "
                 f"{mean(True, 'auroc_interior'):.3f} / {mean(False, 'auroc_interior'):.3f} | "
                 f"{mean(True, 'normal_max_on_border'):.0%} / {mean(False, 'normal_max_on_border'):.0%} | "
                 f"{mean(True, 'border_share_coreset'):.0%} / {mean(False, 'border_share_coreset'):.0%} | |")
    body = ("Textures, seed 0, one PatchCore per product (40 training crops, 20 normal + 20 defective test "
            f"crops, 160 px, coreset {RATIO:.0%}), tf_efficientnet_lite0 stages 2+3. Each cell: the zero "
            "padding counted in the 3x3 mean (ours, PatchCore's) / the mean over valid neighbours only.\n\n"
            + "\n".join(lines) + "\n\nValid-only averaging keeps the backbone's atypical outermost features at full "
            "magnitude: the border ring takes a large share of the greedy coreset and the normal images' "
            "maximum patch scores, so the image score measures the border. See docs/feddymem.md.")
    print(body)
    write_section("border", "Border handling of patch embeddings", "python bench/bench_border.py", body)


if __name__ == "__main__":
    main()
