"""Memory generator: a small trainable network on the frozen patch embeddings.

Its output space is the memory space. The design is residual and starts at a
fixed map: ``z = P x + f(x)`` where ``P`` is a bias-free linear map
initialised to the identity (or to an orthonormal projection when the memory
dimension differs) and ``f`` a two-layer MLP whose last layer starts at zero.
At initialisation the generator therefore keeps the backbone geometry that
PatchCore relies on, and training can only move away from it as far as the
metric loss asks. Only ``Linear`` and ``GELU`` layers: per-sample gradients
(DP-SGD with Opacus) work without changes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MemoryGenerator"]


class MemoryGenerator(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.skip = nn.Linear(in_dim, out_dim, bias=False)
        self.hidden = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            if in_dim == out_dim:
                self.skip.weight.copy_(torch.eye(in_dim))
            else:
                q, _ = torch.linalg.qr(torch.randn(max(in_dim, out_dim), min(in_dim, out_dim), generator=gen))
                w = q[:out_dim, :in_dim] if out_dim >= in_dim else q[:in_dim, :out_dim].T
                self.skip.weight.copy_(w)
            bound = 1.0 / np.sqrt(in_dim)
            self.hidden.weight.uniform_(-bound, bound, generator=gen)
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.out(self.act(self.hidden(x)))

    @torch.no_grad()
    def transform(self, patches: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Map (..., in_dim) float32 numpy features into the memory space."""
        flat = patches.reshape(-1, self.in_dim)
        out = np.empty((len(flat), self.out_dim), np.float32)
        device = self.skip.weight.device
        self.eval()
        for s in range(0, len(flat), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(flat[s : s + batch])).to(device)
            out[s : s + batch] = self(chunk).cpu().numpy()
        return out.reshape(*patches.shape[:-1], self.out_dim)

    def n_bytes(self) -> int:
        """Bytes of all parameters as float32 (what parameter sharing would send)."""
        return int(sum(p.numel() for p in self.parameters()) * 4)
