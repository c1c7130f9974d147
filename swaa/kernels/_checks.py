"""Argument validation shared by `linear_attn` and `gla` (fast paths and oracles alike).

Every check runs before any computation, so a refused call changes nothing. The checks are
host-side only on CUDA (no value inspection that would force a device sync), which keeps the
single-token decode path cheap and CUDA-graph capturable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "torch", "fla")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """Sizes and resolved options of one validated call."""

    B: int
    T: int
    H: int
    K: int
    V: int
    # number of sequences: B, or len(cu_seqlens) - 1 for packed inputs
    N: int
    scale: float
    state_dtype: torch.dtype


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The recurrent state's dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _flag(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {x!r}")


def _check_state(name, x, shape, dtype, device):
    _tensor(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the state dtype for these inputs), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like q, got {x.device}")


def check_inputs(
    q,
    k,
    v,
    g=None,
    *,
    gated: bool,
    scale=None,
    initial_state=None,
    output_final_state=False,
    normalize=False,
    cu_seqlens=None,
    backend="auto",
) -> Problem:
    """Validate one call of `linear_attn` / `gla` (or their naive twins) and return its sizes.

    Raises TypeError for wrong types/dtypes and ValueError for wrong shapes, devices or values,
    each naming the argument, what was expected and what was given.
    """
    for name, x in (("q", q), ("k", k), ("v", v)) + ((("g", g),) if gated else ()):
        _tensor(name, x)
        if x.dim() != 4:
            what = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{name} must have shape {what} (4 dims), got {list(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {x.device}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"k must have the shape of q {list(q.shape)}, got {list(k.shape)}")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {list(v.shape)}")
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"head count and head dims must be positive, got H={H}, K={K}, V={V}")
    if gated:
        if tuple(g.shape) != (B, T, H, K):
            raise ValueError(f"g must have the shape of q {list(q.shape)}, got {list(g.shape)}")
        # a value check would force a device sync on CUDA; on other devices it is one cheap pass
        # (amax: one reduction, ~20x faster than (g > 0).any() on CPU; NaN passes, as before)
        if g.device.type != "cuda" and g.numel() and bool(g.amax() > 0):
            raise ValueError(f"g must be a log forget gate (all entries <= 0), got max {g.max().item():.4g}")

    if scale is None:
        scale = K**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    _flag("output_final_state", output_final_state)
    _flag("normalize", normalize)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    N = B
    if cu_seqlens is not None:
        _tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be a 1-D tensor [N + 1] with N >= 1, got shape {list(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens must be on {q.device} like q, got {cu_seqlens.device}")
        if B != 1:
            raise ValueError(f"q must have batch size 1 when cu_seqlens is given (packed sequences), got {B}")
        N = cu_seqlens.numel() - 1
        # reading the offsets costs a sync on CUDA; packed prefill is not the latency-critical path
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0 or offsets[-1] != T or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {offsets}")

    sdt = state_dtype_for(q.dtype)
    if initial_state is not None:
        if normalize:
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(
                    "initial_state must be a tuple (kv_state [N, H, K, V], z_state [N, H, K]) "
                    f"when normalize=True, got {type(initial_state).__name__}"
                )
            _check_state("initial_state[0] (kv_state)", initial_state[0], (N, H, K, V), sdt, q.device)
            _check_state("initial_state[1] (z_state)", initial_state[1], (N, H, K), sdt, q.device)
        else:
            if isinstance(initial_state, (tuple, list)):
                raise TypeError(
                    "initial_state must be a tensor [N, H, K, V] when normalize=False, got a tuple"
                )
            _check_state("initial_state", initial_state, (N, H, K, V), sdt, q.device)
    return Problem(B, T, H, K, V, N, float(scale), sdt)
