"""The public kernel functions: each validates its arguments in one call and hands the call to the
one dispatcher (dispatch.py), which picks the decode step, FLA or the torch forms."""

from __future__ import annotations

import torch

from swaa.kernels import dispatch
from swaa.kernels.checks import check_inputs


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Gated linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`, same dtype as q.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`, same dtype as q.
        g (torch.Tensor):
            log forget gates of shape `[B, T, H, K]`, every entry <= 0 (checked in eager mode off
            CUDA only, where the check costs no device sync and no graph break). Zero k and g at
            padding positions to leave the state untouched there.
        scale (Optional[float]):
            multiplies q_t S_t. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor]):
            state before the first token, `[N, H, K, V]` with N = B (or the number of packed
            sequences), float32 (float64 for float64 inputs). Gradients flow into it. Default: `None` (zeros).
        output_final_state (bool):
            return the state after the last token. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            `[N + 1]` offsets of N packed sequences in a B == 1 batch (FlashAttention's
            convention); each sequence starts from its own initial state. Default: `None`.
        backend (str):
            "auto" (FLA's Triton kernels for CUDA tensors when fla imports, torch otherwise;
            a single token without cu_seqlens takes the decode step: swaa's one-kernel Triton
            step on CUDA when no gradients are wanted, which costs far less host time than FLA's
            launch path, else a few torch ops), "fla" (FLA or an error), or "torch".
            Default: "auto".

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in v's dtype.
        final_state (Optional[torch.Tensor]): `[N, H, K, V]` if `output_final_state` else None.
    """
    p = check_inputs(
        q,
        k,
        v,
        g,
        gated=True,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return dispatch.run(p, q, k, v, g, initial_state, cu_seqlens)


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    backend: str = "auto",
):
    r"""Linear attention: S_t = S_{t-1} + k_t^T v_t ; o_t = scale * q_t S_t.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, H, K]` (after any feature map).
        k (torch.Tensor):
            keys of shape `[B, T, H, K]`, same dtype as q. Zero k at padding positions to leave
            the state untouched there.
        v (torch.Tensor):
            values of shape `[B, T, H, V]`, same dtype as q.
        scale (Optional[float]):
            multiplies q. Default: `K ** -0.5`.
        initial_state (Optional[torch.Tensor | tuple]):
            state before the first token: `[N, H, K, V]`, or with `normalize=True` a tuple
            `(kv_state [N, H, K, V], z_state [N, H, K])`; N = B (or the number of packed
            sequences); float32 (float64 for float64 inputs). Gradients flow into it.
            Default: `None` (zeros).
        output_final_state (bool):
            return the state after the last token. Default: `False`.
        normalize (bool):
            divide by the running key sum: z_t = z_{t-1} + k_t (inclusive of t) and
            o_t = (scale * q_t S_t) / (scale * q_t . z_t + NORMALIZE_EPS), NORMALIZE_EPS = 1e-10
            (FLA's value). Meant for non-negative feature maps. Default: `False`.
        cu_seqlens (Optional[torch.LongTensor]):
            `[N + 1]` offsets of N packed sequences in a B == 1 batch; each sequence starts
            from its own initial state. Default: `None`.
        backend (str):
            "auto" (FLA's Triton kernels for CUDA tensors when fla imports, torch otherwise; a
            single token without cu_seqlens takes the decode step: swaa's one-kernel Triton
            step on CUDA when unnormalized and no gradients are wanted, else a few torch ops),
            "fla" (FLA or an error), or "torch". With FLA the normalization runs in float32 torch on top of
            FLA's unnormalized kernel. Default: "auto".

    Returns:
        o (torch.Tensor): `[B, T, H, V]` in v's dtype.
        final_state: `[N, H, K, V]` (or the `(kv_state, z_state)` tuple) if `output_final_state`, else None.
    """
    p = check_inputs(
        q,
        k,
        v,
        gated=False,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        normalize=normalize,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return dispatch.run(p, q, k, v, None, initial_state, cu_seqlens)
