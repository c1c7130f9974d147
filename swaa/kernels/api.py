"""The public kernel functions: each validates its arguments in one call and hands the call to the
one dispatcher (dispatch.py), which picks the decode step, FLA or the torch forms."""

from __future__ import annotations

import torch

from swaa.kernels import dispatch
from swaa.kernels.checks import check_decode_step, check_inputs


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


def decode_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    state,
    scale: float | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    r"""One decode token of GLA (`g` given) or linear attention (`g=None`), updating `state` in place.

    The same step as `gla(..., initial_state=state, output_final_state=True)` (or `linear_attn`),
    but the new state is written into `state` itself instead of a new tensor, so a state kept at a
    static address (a static cache, a captured CUDA graph) stays there and no state is allocated.
    On CUDA the unnormalized step is one Triton kernel writing over its input; elsewhere, and for
    `normalize=True`, the torch step computes the new state and copies it in. No host sync, no
    graph break under `torch.compile`. No autograd: the old state is overwritten.

    Args:
        q (torch.Tensor):
            queries of shape `[B, 1, H, K]`.
        k (torch.Tensor):
            keys of shape `[B, 1, H, K]`, same dtype as q.
        v (torch.Tensor):
            values of shape `[B, 1, H, V]`, same dtype as q.
        g (Optional[torch.Tensor]):
            log forget gates `[B, 1, H, K]`, entries <= 0, for GLA; None for linear attention.
            Default: `None`.
        state (torch.Tensor | tuple):
            the state to update, `[B, H, K, V]`, or with `normalize=True` the tuple
            `(kv_state [B, H, K, V], z_state [B, H, K])`, both updated in place; float32
            (float64 for float64 inputs). Required, keyword-only.
        scale (Optional[float]):
            multiplies q. Default: `K ** -0.5`.
        normalize (bool):
            normalized linear attention, as in `linear_attn` (only with `g=None`). Default: `False`.

    Returns:
        o (torch.Tensor): `[B, 1, H, V]` in v's dtype.

    Raises TypeError / ValueError like `gla` and `linear_attn`, and also when T != 1, when state is
    None, for `normalize=True` with a gate, and when any input requires grad under autograd; a
    refused call leaves `state` as it was.
    """
    p = check_decode_step(q, k, v, g, state, scale, normalize)
    return dispatch.step_in_place(p, q, k, v, g, state)
