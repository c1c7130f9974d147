"""Kernels: one function per operation, FLA's Triton kernels on CUDA and exact torch elsewhere.

- `linear_attn(q, k, v, ...)`: S_t = S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t (optionally normalized).
- `gla(q, k, v, g, ...)`: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.
- `decode_step_(q, k, v, g=None, *, state, ...)`: one decode token of either, updating `state` in place.
- `fused_decode_step(q, k, v, gate_logits, *, state, ...)`: a converted layer's whole decode step from its
  raw projections (q/k norm, rotary embedding, gate, grouped kv heads, update, read-out) in one kernel.
- `naive_linear_attn`, `naive_gla`: the token-by-token oracles with the same signatures.
- `fla_available()`, `fla_rms_norm_gated()`: what FLA offers here (FLA is imported nowhere else).

Activations `[B, T, H, D]`, state `[B, H, K, V]` in float32 (float64 for float64 inputs).
This package imports nothing from transformers and nothing from swaa but `swaa.validation`.
"""

from swaa.kernels.api import decode_step_, gla, linear_attn
from swaa.kernels.checks import BACKENDS, FLA_DTYPES, HALF_DTYPES
from swaa.kernels.fla_adapter import FLA_FUSED_RECURRENT_MAX_T, fla_available, fla_rms_norm_gated
from swaa.kernels.fused_step import fused_decode_step, fused_decode_step_torch, fused_step_available
from swaa.kernels.gla import CHUNK_SIZE
from swaa.kernels.naive import NORMALIZE_EPS, naive_gla, naive_linear_attn

__all__ = [
    "linear_attn",
    "gla",
    "decode_step_",
    "fused_decode_step",
    "fused_decode_step_torch",
    "fused_step_available",
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
