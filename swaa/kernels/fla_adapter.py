"""The one place that imports FLA (flash-linear-attention / fla-core): availability, the choice
between its kernels, its version differences, and the fused gated RMSNorm the layers use.

The rest of swaa sees a single convention: state `[N, H, K, V]` (K before V) in float32, the
normalized linear-attention state as `(kv_state [N, H, K, V], z_state [N, H, K])`. What this
module absorbs:

- the state layout flag (`state_v_first` in fla 0.6; a future default flip would go unnoticed,
  so it is passed explicitly whenever the installed kernel accepts it) and the older
  `head_first` flag (passed as False so activations stay `[B, T, H, D]`);
- the gate argument's name (`g` in `chunk_gla`, `gk` in `fused_recurrent_gla`);
- the normalized linear attention state: its layout (`[N, 1, H, K]` in 0.6) and its precision
  (0.6 accumulates the key sum in the input dtype) changed across releases, so swaa runs FLA's
  unnormalized kernel and normalizes in float32 torch itself, exactly as the torch path does.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from swaa.kernels.checks import FLA_DTYPES

# inputs this long or shorter use FLA's fused recurrent kernels, longer ones the chunked kernels,
# the switch FLA's own GLA and linear-attention layers make (`q_len <= 64`)
FLA_FUSED_RECURRENT_MAX_T = 64

FLA_INSTALL_HINT = (
    "install FLA's Triton kernels with `pip install fla-core` (or `pip install swaa[gpu]`); "
    "they need a CUDA GPU and triton"
)
_warned_missing = False


@functools.lru_cache(maxsize=1)
def _import_fla():
    """Return `(ops, error)`: FLA's kernels as a dict, or the reason they cannot be imported."""
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
    except Exception as e:  # ImportError, or triton failing to initialise without a GPU driver
        return None, e
    ops = {
        "chunk_gla": chunk_gla,
        "fused_recurrent_gla": fused_recurrent_gla,
        "chunk_linear_attn": chunk_linear_attn,
        "fused_recurrent_linear_attn": fused_recurrent_linear_attn,
    }
    return ops, None


def fla_available() -> bool:
    """True when FLA's kernels import."""
    return _import_fla()[0] is not None


@functools.lru_cache(maxsize=1)
def fla_rms_norm_gated():
    """FLA's fused gated RMSNorm, or None when FLA does not import (CPU-only installs, no triton,
    no GPU driver); never raises.

    The function returned is `rms_norm_gated(x, g, weight, bias, activation="swish", eps=...)`:
    RMSNorm of x over its last dim, times weight, times activation(g), in one Triton kernel.
    """
    try:
        try:
            from fla.modules.norm.fused_norm_gate import rms_norm_gated
        except ImportError:  # fla < 0.5 kept it one level up
            from fla.modules.fused_norm_gate import rms_norm_gated
    except Exception:  # ImportError, or triton failing to initialise without a GPU driver
        return None
    return rms_norm_gated


def fla_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:
        return None


@functools.cache
def _layout_kwargs(fn) -> tuple:
    params = inspect.signature(fn).parameters
    kw = []
    if "state_v_first" in params:
        kw.append(("state_v_first", False))
    if "head_first" in params:
        kw.append(("head_first", False))
    return tuple(kw)


def use_fla(backend: str, q: torch.Tensor) -> bool:
    """Resolve `backend` for tensors like `q`: True to run FLA, False to run torch.

    "fla" raises (never falls back) when FLA cannot run these tensors; "auto" picks FLA for CUDA
    tensors of a dtype FLA supports, and warns once when it has to fall back on CUDA.
    """
    global _warned_missing
    if backend == "torch":
        return False
    on_cuda = q.device.type == "cuda"
    if backend == "fla":
        if not on_cuda:
            raise ValueError(
                f"backend='fla' needs CUDA tensors, got tensors on {q.device}; "
                "use backend='torch' or 'auto' to run the torch implementation"
            )
        if q.dtype not in FLA_DTYPES:
            raise ValueError(
                f"backend='fla' supports float16, bfloat16 and float32 inputs, got {q.dtype}; "
                "use backend='torch' for float64"
            )
        ops, err = _import_fla()
        if ops is None:
            raise ImportError(
                f"backend='fla' needs FLA, which failed to import ({err!r}): {FLA_INSTALL_HINT}"
            )
        return True
    # auto
    if not on_cuda or q.dtype not in FLA_DTYPES:
        return False
    if fla_available():
        return True
    if not _warned_missing:
        _warned_missing = True
        warnings.warn(
            f"swaa.kernels: FLA is not available, running the slower torch implementation on CUDA; "
            f"{FLA_INSTALL_HINT}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    """FLA's GLA: fused recurrent for T <= FLA_FUSED_RECURRENT_MAX_T, chunked otherwise."""
    ops = _import_fla()[0]
    if q.shape[1] <= FLA_FUSED_RECURRENT_MAX_T:
        fn, gate = ops["fused_recurrent_gla"], {"gk": g}
    else:
        fn, gate = ops["chunk_gla"], {"g": g}
    o, S = fn(
        q=q,
        k=k,
        v=v,
        **gate,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **dict(_layout_kwargs(fn)),
    )
    return o.to(v.dtype), S


def linear_attn(q, k, v, scale, initial_state, output_final_state, cu_seqlens):
    """FLA's unnormalized linear attention, chosen as FLA's layer does: the chunked kernel
    whenever gradients are needed or T > FLA_FUSED_RECURRENT_MAX_T, fused recurrent otherwise."""
    ops = _import_fla()[0]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, initial_state)
    )
    if needs_grad or q.shape[1] > FLA_FUSED_RECURRENT_MAX_T:
        fn = ops["chunk_linear_attn"]
    else:
        fn = ops["fused_recurrent_linear_attn"]
    o, S = fn(
        q=q,
        k=k,
        v=v,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        normalize=False,
        cu_seqlens=cu_seqlens,
        **dict(_layout_kwargs(fn)),
    )
    return o, S
