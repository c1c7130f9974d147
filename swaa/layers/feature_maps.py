"""Feature maps phi applied to queries and keys before the linear-attention recurrence.

Each takes ``[B, T, h, D]`` and returns ``[B, T, h, D']`` (``D' = 2 D`` for hedgehog, else ``D``):

- ``identity``: phi(x) = x. Keeps the pretrained q.k products (the logits of softmax attention).
- ``elu``: phi(x) = elu(x) + 1 (Katharopoulos et al., 2020): positive, so normalisation is safe.
- ``relu``: phi(x) = relu(x): positive but can be all zero (then a normalised output is 0).
- ``softmax``: phi(x) = softmax(x) over the head dim: positive, sums to one, no parameters.
  Computed, and returned, in float32 for half inputs (see ``_softmax``; so is hedgehog).
- ``hedgehog``: phi(x) = [softmax(x W_h), softmax(-x W_h)] with a learnable ``W_h`` ``[D, D]`` per head
  (Zhang et al., 2024, "The Hedgehog & the Porcupine"); ``W_h`` starts as the identity, so before
  training it is the two-sided softmax map.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from swaa.kernels import HALF_DTYPES

FEATURE_MAPS = ("identity", "elu", "relu", "softmax", "hedgehog")


def _softmax(x: torch.Tensor) -> torch.Tensor:
    # float32 for half inputs, and it stays float32: the layer then runs the kernel in float32. A half
    # result would be rounded twice where it hurts: the kernel would hand back the features' gradient in
    # bf16, and softmax's backward, p * (g - <p, g>), subtracts the nearly equal parts of that gradient
    # (the features are close to uniform), which multiplied the rounding error of the keys' gradient
    # ~10x (2.6e-2 relative to float64 in bf16, 5e-3 with float32 features). float64 stays float64.
    if x.dtype in HALF_DTYPES:
        return torch.softmax(x.float(), dim=-1)
    return torch.softmax(x, dim=-1)


class FeatureMap(nn.Module):
    """A parameter-free feature map by name (``identity``, ``elu``, ``relu``, ``softmax``).

    Args:
        name (str): which map.
    """

    def __init__(self, name: str):
        super().__init__()
        if name not in ("identity", "elu", "relu", "softmax"):
            raise ValueError(f"name must be one of identity, elu, relu, softmax, got {name!r}")
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "identity":
            return x
        if self.name == "elu":
            return torch.nn.functional.elu(x) + 1
        if self.name == "relu":
            return torch.relu(x)
        return _softmax(x)

    def extra_repr(self) -> str:
        return self.name


class HedgehogFeatureMap(nn.Module):
    """Learnable two-sided softmax map, one ``[D, D]`` matrix per head.

    Args:
        num_heads (int): heads h of the input ``[B, T, h, D]``.
        head_dim (int): D; the output has ``2 * D`` features.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, head_dim))
        self.reset_parameters()

    def reset_parameters(self):
        # identity start: before training phi is softmax(x) || softmax(-x), a positive map that keeps
        # the ranking of the pretrained q.k scores
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.weight.shape[-1]).expand_as(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("bthd,hde->bthe", x, self.weight.to(x.dtype))
        return torch.cat((_softmax(y), _softmax(-y)), dim=-1)

    def extra_repr(self) -> str:
        h, d, _ = self.weight.shape
        return f"num_heads={h}, head_dim={d}"


def build_feature_map(name: str, num_heads: int, head_dim: int) -> nn.Module:
    """The feature map module for ``name`` (one of ``FEATURE_MAPS``)."""
    if name == "hedgehog":
        return HedgehogFeatureMap(num_heads, head_dim)
    if name in FEATURE_MAPS:
        return FeatureMap(name)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")
