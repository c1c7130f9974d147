"""Kernels: one function per operation, FLA's Triton kernels on CUDA and exact torch elsewhere.

- `linear_attn(q, k, v, ...)`: S_t = S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t (optionally normalized).
- `gla(q, k, v, g, ...)`: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.
- `decode_step_(q, k, v, g=None, *, state, ...)`: one decode token of either, updating `state` in place.
- `naive_linear_attn`, `naive_gla`: the token-by-token oracles with the same signatures.
- `fla_available()`, `fla_rms_norm_gated()`: what FLA offers here (FLA is imported nowhere else).

Activations `[B, T, H, D]`, state `[B, H, K, V]` in float32 (float64 for float64 inputs).
This package imports nothing from transformers and nothing from swaa but `swaa.validation`.
"""

from swaa.kernels.api import decode_step_, gla, linear_attn
from swaa.kernels.checks import BACKENDS, FLA_DTYPES, HALF_DTYPES
from swaa.kernels.fla_adapter import FLA_FUSED_RECURRENT_MAX_T, fla_available, fla_rms_norm_gated
from swaa.kernels.gla import CHUNK_SIZE
from swaa.kernels.naive import NORMALIZE_EPS, naive_gla, naive_linear_attn

__all__ = [
    "linear_attn",
    "gla",
    "decode_step_",
    "naive_linear_attn",
    "naive_gla",
    "fla_available",
    "fla_rms_norm_gated",
    "BACKENDS",
    "HALF_DTYPES",
    "FLA_DTYPES",
    "CHUNK_SIZE",
    "FLA_FUSED_RECURRENT_MAX_T",
    "NORMALIZE_EPS",
]
