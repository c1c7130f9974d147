"""Drop-in attention modules built on ``swaa.kernels`` and ``swaa.cache``.

``model.model.layers[i].self_attn = GatedLinearAttention(model.config, i)`` replaces the softmax
attention of layer ``i`` of a Qwen3, Qwen2, Llama or Mistral model.

Rooms: ``base`` (the forward every layer shares), one file per attention class, ``shape`` (what the
replaced attention looks like, from the config and ``swaa.families``), ``host_inputs`` (masks, packing
and the cache argument as transformers passes them), ``modules`` (RMSNorm, RoPE), ``feature_maps``.
"""

from swaa.layers.feature_maps import FEATURE_MAPS
from swaa.layers.gated_linear_attention import GATES, GatedLinearAttention
from swaa.layers.linear_attention import LinearAttention
from swaa.layers.sliding_window import SlidingWindowGatedLinearAttention, SlidingWindowLinearAttention

__all__ = [
    "FEATURE_MAPS",
    "GATES",
    "GatedLinearAttention",
    "LinearAttention",
    "SlidingWindowGatedLinearAttention",
    "SlidingWindowLinearAttention",
]
