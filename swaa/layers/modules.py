"""Small modules of a drop-in layer that mirror the host model's own: RMSNorm and rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from swaa.kernels import HALF_DTYPES

__all__ = ["RMSNorm", "apply_rope"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 like Qwen3's, with the same parameter name
    (``weight``), so ``q_norm``/``k_norm`` copy over one to one.

    Args:
        dim (int): size of the normalised (last) dim.
        eps (float): added to the mean square. Default: 1e-6.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            # torch's fused kernel on CUDA: one launch instead of eight, which is what a decode step,
            # bound by launches, pays for. Float32 inside for half inputs, rounded once after the weight
            # (Qwen3's rounds before it): the two differ by at most a unit in the last place.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float() if dtype in HALF_DTYPES else x
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding in transformers' convention (rotate-half), on FLA's layout.

    Args:
        q (torch.Tensor): ``[B, T, H, D]``.
        k (torch.Tensor): ``[B, T, Hk, D]``.
        cos, sin (torch.Tensor): ``[B, T, D]`` (or ``[1, T, D]``), as the host model's rotary module returns.
    """
    cos, sin = cos.unsqueeze(2).to(q.dtype), sin.unsqueeze(2).to(q.dtype)
    # rotate_half(x) * sin == roll(x, D/2) * [-sin_1, sin_2]: the sign goes on sin once for q and k, and
    # each tensor takes three kernels (mul, roll, addcmul) instead of five
    half = q.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return torch.addcmul(q * cos, q.roll(half, -1), sin), torch.addcmul(k * cos, k.roll(half, -1), sin)
